"""Rich renderings of jobs, attempts, events and offers for the CLI: pure functions from the
API's JSON to Rich renderables, shared by `jobs`, `show`, `watch` and `demo`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

STATUS_STYLE = {
    "queued": "dim", "launching": "cyan", "running": "green", "recovering": "yellow",
    "succeeded": "bold green", "failed": "bold red", "cancelled": "magenta",
}
REASON_STYLE = {"succeeded": "green", "failed": "red", "preempted": "yellow", "lost": "yellow",
                "cancelled": "magenta", "budget": "red", "no_capacity": "dim"}


def status_text(status: str | None) -> Text:
    return Text(status or "-", style=STATUS_STYLE.get(status or "", ""))


def money(value: float | None) -> str:
    return "-" if value is None else f"${value:,.4f}" if value < 1 else f"${value:,.2f}"


def estimated(attempt: dict[str, Any]) -> str:
    """An attempt's cost, marked ~ when it ended but its machine's final bill is not read yet."""
    text = money(attempt.get("cost_usd"))
    return f"~{text}" if attempt.get("status") == "ended" and attempt.get("cost_final") is False else text


def counted(n: int, one: str, many: str | None = None) -> str:
    """3, 'retry', 'retries' -> '3 retries'; 1 -> '1 retry'."""
    return f"{n} {one if n == 1 else (many or one + 's')}"


def duration(seconds: float) -> str:
    """3725 -> '1 h 2 min'; 42 -> '42 s'."""
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def ago(iso: str | None, now: datetime | None = None) -> str:
    if not iso:
        return "-"
    then = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    secs = int(((now or datetime.now(UTC)) - then).total_seconds())
    if secs < 60:
        return f"{max(secs, 0)}s"
    if secs < 3600:
        return f"{secs // 60}m"
    if secs < 86400:
        return f"{secs // 3600}h{(secs % 3600) // 60:02d}m"
    return f"{secs // 86400}d"


def where(attempt: dict[str, Any] | None) -> str:
    if not attempt:
        return "-"
    gpu = f" {attempt['gpu']}x{attempt['gpu_count']}" if attempt.get("gpu") else ""
    return f"{attempt['provider']} {attempt.get('region') or ''}{gpu}".strip()


def jobs_table(jobs: list[dict[str, Any]], title: str | None = None) -> Table:
    table = Table(title=title, header_style="bold", expand=False)
    for col in ("ID", "NAME", "STATUS", "ATTEMPTS", "WHERE", "COST", "AGE", "WHY / NOW"):
        table.add_column(col, overflow="fold" if col == "WHY / NOW" else "ellipsis", no_wrap=col != "WHY / NOW")
    for job in jobs:
        attempts = job.get("attempts", [])
        last = attempts[-1] if attempts else None
        table.add_row(
            job["id"], job["name"], status_text(job["status"]), str(len(attempts)), where(last),
            money(job.get("cost_usd")), ago(job.get("created_at")),
            job.get("end_reason") or job.get("message") or "",
        )
    return table


def attempts_table(attempts: list[dict[str, Any]]) -> Table:
    table = Table(header_style="bold", title="attempts", title_justify="left")
    for col in ("#", "PROVIDER", "REGION", "GPU", "CAPACITY", "$/H", "INSTANCE", "STATUS", "ENDED", "COST", "DETAIL"):
        table.add_column(col, overflow="fold" if col in ("DETAIL", "INSTANCE") else "ellipsis")
    for a in attempts:
        gpu = f"{a['gpu']} x{a['gpu_count']}" if a.get("gpu") else "cpu"
        reason = a.get("end_reason")
        table.add_row(
            str(a["number"]), a["provider"], a.get("region") or "-", gpu, a.get("capacity") or "-",
            f"{a.get('price_per_hour', 0):.3f}", a.get("instance_id") or "-", a["status"],
            Text(reason or "-", style=REASON_STYLE.get(reason or "", "")), estimated(a),
            a.get("detail") or "",
        )
    return table


def placements_table(attempts: list[dict[str, Any]]) -> Table:
    """Why each attempt ran where it did; a move away from the volume says what the transfer cost."""
    table = Table(header_style="bold", title="placement", title_justify="left", show_edge=False)
    table.add_column("#", no_wrap=True)
    table.add_column("TRANSFER", no_wrap=True, justify="right")
    table.add_column("WHY THERE", overflow="fold")
    for a in attempts:
        transfer = a.get("transfer_cost_usd")
        table.add_row(str(a["number"]), "-" if transfer is None else money(transfer), a.get("placement_reason") or "-")
    return table


def events_table(events: list[dict[str, Any]], last: int = 15) -> Table:
    table = Table(header_style="bold", title="events", title_justify="left", show_edge=False)
    table.add_column("AT", no_wrap=True)
    table.add_column("EVENT", no_wrap=True)
    table.add_column("MESSAGE", overflow="fold")
    for e in events[-last:]:
        table.add_row((e.get("at") or "")[11:19], e["kind"], e["message"])
    return table


def job_detail(job: dict[str, Any]) -> Group:
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("job", f"{job['id']}  {job['name']}")
    head.add_row("status", status_text(job["status"]))
    if job.get("end_reason"):
        head.add_row("why it ended", job["end_reason"])
    elif job.get("message"):
        head.add_row("now", job["message"])
    awaited = any(a.get("status") == "ended" and a.get("cost_final") is False for a in job["attempts"])
    head.add_row("cost", f"{money(job['cost_usd'])}{' (~: an estimate until the bill is read)' if awaited else ''}"
                         f" over {counted(len(job['attempts']), 'attempt')}, "
                         f"{counted(job.get('relaunches', 0), 'relaunch', 'relaunches')}, "
                         f"{counted(job.get('retries', 0), 'retry', 'retries')}")
    if job.get("volume"):
        v = job["volume"]
        place = f"{v['provider']} {v['region']} ({v['volume_id']})" if v.get("provider") else "not created yet"
        storage = f", storage {money(v.get('storage_usd_per_month'))} per month" if v.get("provider") else ""
        head.add_row("volume", f"{v['name']} {v['size_gb']} GB at {v['mount_path']}: {place}{storage}")
    elif (job.get("spec") or {}).get("volume"):
        head.add_row("volume", f"{job['spec']['volume']['name']}: deleted")
    head.add_row("submitted", f"{job['created_at']} ({ago(job['created_at'])} ago)")
    parts: list[Any] = [head]
    if job["attempts"]:
        parts.append(attempts_table(job["attempts"]))
        parts.append(placements_table(job["attempts"]))
    if job.get("events"):
        parts.append(events_table(job["events"]))
    return Group(*parts)


def volumes_table(data: dict[str, Any]) -> Table:
    """`gpuhop volumes`: one row per volume, what it costs to keep, and the total per month."""
    table = Table(title=f"volumes: storage {money(data['storage_usd_per_month'])} per month",
                  header_style="bold", title_justify="left")
    for col in ("NAME", "WHERE", "SIZE", "JOBS", "IN USE BY", "LAST USED", "$/MONTH", "SO FAR"):
        table.add_column(col, justify="right" if col in ("SIZE", "JOBS", "$/MONTH", "SO FAR") else "left")
    for v in data["volumes"]:
        place = f"{v['provider']} {v['region']}" if v.get("provider") else "not created yet"
        if v.get("moving_to"):
            place += f", moving to {v['moving_to']}"
        size = f"{v['size_gb']} GB"
        if v.get("checkpoint_gb") is not None:
            size += f" (checkpoint {v['checkpoint_gb']:.1f} GB)"
        table.add_row(v["name"], place, size, str(v["jobs"]), v.get("active_job") or "-",
                      f"{ago(v['last_used_at'])} ago" if v.get("last_used_at") else "-",
                      money(v["storage_usd_per_month"]), money(v["storage_usd_so_far"]))
    for r in data.get("retired") or []:
        table.add_row(f"{r['volume_name']} (retired)", f"{r['provider']} {r['region']} ({r['volume_id']})",
                      "-", "-", "-", f"being deleted: {r['reason']}" if r.get("reason") else "being deleted",
                      "?" if r.get("storage_usd_per_month") is None else money(r["storage_usd_per_month"]), "-")
    return table


def costs_table(data: dict[str, Any]) -> Table:
    """`gpuhop costs`: one row per group, then the total; savings where they can be known."""
    table = Table(title=f"costs by {data['by']} since {data['since'][:16].replace('T', ' ')} UTC",
                  header_style="bold", title_justify="left")
    for col, justify in (("", "left"), ("attempts", "right"), ("GPU hours", "right"), ("cost", "right"),
                         ("on-demand", "right"), ("saved", "right")):
        table.add_column(col or data["by"], justify=justify)  # type: ignore[arg-type]

    def row(line: dict[str, Any], style: str = "") -> None:
        saved = line["saved_usd"]
        od = line["on_demand_usd"]
        pct = f" ({saved / od:.0%})" if saved is not None and od else ""
        table.add_row(line["key"], str(line["attempts"]), f"{line['hours']:.2f}", money(line["cost_usd"]),
                      "-" if od is None else money(od), "-" if saved is None else money(saved) + pct, style=style)

    for line in data["lines"]:
        row(line)
    if data["lines"]:
        table.add_section()
    row(data["total"], "bold")
    return table


def offers_table(offers: list[dict[str, Any]], limit: int = 40) -> Table:
    table = Table(header_style="bold", title="offers, cheapest expected cost first")
    for col in ("PROVIDER", "REGION", "GPU", "VRAM", "CAPACITY", "$/H", "EXPECTED $/H", "AVAIL", "VOLUMES"):
        table.add_column(col, justify="right" if "$" in col or col in ("VRAM", "AVAIL") else "left")
    for o in offers[:limit]:
        gpu = f"{o['gpu']} x{o['gpu_count']}" if o.get("gpu") else "cpu"
        table.add_row(o["provider"], o["region"], gpu, f"{o['vram_gb']} GB" if o.get("gpu") else "-",
                      o["capacity"], f"{o['price_per_hour']:.3f}", f"{o['expected_cost_per_hour']:.3f}",
                      str(o["available"]), "yes" if o["supports_volumes"] else "no")
    return table

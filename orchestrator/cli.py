"""The `gpuhop` command: run the daemon (`serve`), and talk to it (`submit`, `jobs`, `show`,
`watch`, `logs`, `cancel`, `offers`, `costs`, `volumes`, `volume rm`). Commands that ship with the simulators (`demo`, `sim`)
are found through the `gpuhop.cli` entry-point group, so this module never imports them.

Every command prints a table for people and takes `--json` where a script would want it;
errors say what went wrong and what to do, and exit non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import re
import sys
import time
import tomllib
from importlib.metadata import PackageNotFoundError, entry_points, version
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.text import Text

from orchestrator import render, workdir_upload
from orchestrator.client import Client, ClientError
from orchestrator.config import ConfigError
from orchestrator.models import JobSpec, JobStatus
from orchestrator.workdir import WorkdirError

app = typer.Typer(
    help="gpuhop: run GPU jobs on the cheapest suitable capacity, and bring them back from their "
    "checkpoint when a machine is taken away.",
    no_args_is_help=True,
    add_completion=True,  # gpuhop --install-completion [bash|zsh|fish]
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
console = Console()
if not console.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
    console = Console(width=160)
err = Console(stderr=True, soft_wrap=True)

ServerOpt = Annotated[str | None, typer.Option("--server", help="daemon URL (default: GPUHOP_SERVER, or the local daemon)")]
StateOpt = Annotated[Path | None, typer.Option("--state-dir", help="the daemon's state dir, to find its URL and token")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
JOB_ID_RE = re.compile(r"[0-9a-f]{8}")
TERMINAL = {s.value for s in JobStatus if s.terminal}


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True)
    raise typer.Exit(code)


def client(server: str | None, state_dir: Path | None) -> Client:
    try:
        return Client.discover(server=server, state_dir=state_dir)
    except ClientError as exc:
        fail(str(exc))
        raise  # unreachable; for type checkers


def call(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except ClientError as exc:
        fail(str(exc), 2 if 400 <= exc.status < 500 else 1)


def resolve(c: Client, ref: str) -> str:
    """A job id from what the user typed: the id itself, a unique prefix of one, or a job's
    name (the newest job of that name that has not ended, else the newest of that name)."""
    if JOB_ID_RE.fullmatch(ref):
        return ref
    rows = call(c.jobs, None)
    by_prefix = [j for j in rows if j["id"].startswith(ref.lower())] if ref and ref.isalnum() else []
    if len(by_prefix) == 1:
        return str(by_prefix[0]["id"])
    named = [j for j in rows if j["name"] == ref]
    live = [j for j in named if j["status"] not in TERMINAL]
    if len(by_prefix) > 1:
        shown = ", ".join(f"{j['id']} ({j['name']})" for j in by_prefix[:6])
        fail(f"{ref!r} matches {len(by_prefix)} jobs: {shown}; give more of the id", 2)
    if named:
        return str((live or named)[0]["id"])  # newest first
    fail(f"no job with id, id prefix or name {ref!r}; `gpuhop jobs` lists them", 2)
    return ref  # not reached: fail exits


# ----------------------------------------------------------------------------- daemon


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML configuration (see config.example.toml)")] = None,
    listen: Annotated[str | None, typer.Option("--listen", help="HOST:PORT to serve on (overrides the file)")] = None,
    state_dir: Annotated[Path | None, typer.Option("--state-dir", help="state directory (overrides the file)")] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING")] = "INFO",
) -> None:
    """Run the daemon: the REST API and the reconcile loop, until SIGTERM or Ctrl-C."""
    from orchestrator.daemon import load_config, setup_logging
    from orchestrator.daemon import serve as run_daemon

    overrides: dict[str, Any] = {"server": {}}
    if listen:
        overrides["server"]["listen"] = listen
    if state_dir:
        overrides["server"]["state_dir"] = str(state_dir)
    try:
        settings = load_config(config, overrides)
    except ConfigError as exc:
        fail(str(exc))
        return
    setup_logging(log_level.upper())
    try:
        asyncio.run(run_daemon(settings))
    except (OSError, ConfigError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass


# ----------------------------------------------------------------------------- jobs


def load_spec_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}")
    try:
        data: Any = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        fail(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}")
    if not isinstance(data, dict):
        fail(f"{path}: a job spec must be a table/object")
    try:
        # `workdir` is a path on this machine: submit turns it into workdir_sha256 (workdir_upload)
        JobSpec.model_validate({k: v for k, v in data.items() if k != "workdir"})
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in e['loc']) or '<top>'}: "
                 f"{'unknown field' if e['type'] == 'extra_forbidden' else e['msg']}" for e in exc.errors()]
        fail(f"{path}: invalid job spec\n" + "\n".join(lines))
    return data  # type: ignore[no-any-return]


@app.command()
def submit(
    file: Annotated[Path, typer.Argument(help="job spec, TOML (or .json)")],
    force: Annotated[bool, typer.Option("--force", help="queue it even if no configured provider offers "
                                                        "what it asks for")] = False,
    reuse_volume: Annotated[bool, typer.Option("--reuse-volume", help="run on its volume even though the last "
                                                                      "job on it succeeded (it resumes from there)")] = False,
    workdir: Annotated[Path | None, typer.Option("--workdir", help="upload this directory as the job's working "
                                                               "directory (overrides the file's workdir)")] = None,
    server: ServerOpt = None, state_dir: StateOpt = None, as_json: JsonOpt = False,
) -> None:
    """Submit a job; prints its id. A job that no configured provider could ever run (a GPU
    nobody offers, a GPU job on a machine without one) is refused with what is offered, and so
    is a job naming a volume whose last job succeeded, unless --reuse-volume. A `workdir` (in the
    file, relative to it, or --workdir) is uploaded first, minus what .gitignore/.gpuhopignore
    exclude, and the command runs in a fresh copy of it on every attempt."""
    spec = load_spec_file(file)
    c = client(server, state_dir)
    try:
        directory = workdir_upload.take_workdir(spec, file, workdir)
        if directory is not None:
            spec["workdir_sha256"] = call(workdir_upload.upload, c, directory)
    except WorkdirError as exc:
        fail(f"workdir: {exc}")
    job = call(c.submit, spec, force, reuse_volume)
    if as_json:
        console.print_json(json.dumps(job))
    else:
        print(job["id"])


@app.command()
def jobs(
    status: Annotated[str | None, typer.Option("--status", "-s", help="comma-separated: queued,running,...")] = None,
    server: ServerOpt = None, state_dir: StateOpt = None, as_json: JsonOpt = False,
) -> None:
    """List jobs, newest first."""
    rows = call(client(server, state_dir).jobs, status)
    if as_json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        console.print("no jobs" + (f" with status {status}" if status else "") + "; submit one with `gpuhop submit FILE`")
    else:
        console.print(render.jobs_table(rows))


@app.command()
def show(
    job_id: Annotated[str, typer.Argument(help="job id, a unique prefix of one, or a job's name")],
    server: ServerOpt = None, state_dir: StateOpt = None, as_json: JsonOpt = False,
) -> None:
    """One job: its attempts, what each cost, and why it ended."""
    c = client(server, state_dir)
    job = call(c.job, resolve(c, job_id))
    if as_json:
        print(json.dumps(job, indent=2))
    else:
        console.print(render.job_detail(job))


@app.command()
def watch(
    job_id: Annotated[str | None, typer.Argument(
        help="job id, a unique prefix of one, or a job's name (default: every job)")] = None,
    interval: Annotated[float, typer.Option("--interval", help="seconds between refreshes")] = 1.0,
    server: ServerOpt = None, state_dir: StateOpt = None,
) -> None:
    """A live view until the job ends (or, for every job, until all have ended; Ctrl-C to leave)."""
    c = client(server, state_dir)
    job_id = resolve(c, job_id) if job_id else None

    def poll() -> tuple[Any, bool, str | None]:
        nonlocal c
        """(view, done, a summary to compare) now; a daemon that is away (restarting) is waited
        for with a message, not an exit."""
        try:
            data: Any = c.job(job_id) if job_id else c.jobs(None)
        except ClientError as exc:
            if exc.status:
                fail(str(exc), 2 if 400 <= exc.status < 500 else 1)
            with contextlib.suppress(typer.Exit):  # a restarted daemon may listen elsewhere
                c = client(server, state_dir)
            text = f"the daemon does not answer; retrying every {interval:g} s (Ctrl-C to leave)"
            return Text(text, style="yellow"), False, None
        if job_id:
            return render.job_detail(data), data["status"] in TERMINAL, json.dumps(data, sort_keys=True)
        done = bool(data) and all(j["status"] in TERMINAL for j in data)
        return render.jobs_table(data, title="gpuhop jobs"), done, json.dumps(data, sort_keys=True)

    try:
        view, done, summary = poll()
        if not console.is_terminal:  # piped: print each change once, not a redraw
            last: str | None = ""
            while True:
                if summary != last:
                    if summary is None:
                        err.print("the daemon does not answer; retrying")
                    else:
                        console.print(view)
                    last = summary
                if done:
                    return
                time.sleep(interval)
                view, done, summary = poll()
        with Live(view, console=console, refresh_per_second=4) as live:
            while not done:
                time.sleep(interval)
                view, done, _ = poll()
                live.update(view)
    except KeyboardInterrupt:
        pass


@app.command()
def logs(
    job_id: Annotated[str, typer.Argument(help="job id, a unique prefix of one, or a job's name")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="stream until the job ends")] = False,
    tail: Annotated[int, typer.Option("--tail", "-n", help="only the last N lines (0 = all)")] = 0,
    server: ServerOpt = None, state_dir: StateOpt = None,
) -> None:
    """The job's output, every attempt in order."""
    c = client(server, state_dir)
    job_id = resolve(c, job_id)
    out = sys.stdout.buffer
    written = 0  # bytes of the whole output shown so far (from its start when tail is 0)
    try:
        while True:
            skip = written if not tail else 0
            try:
                for chunk in c.logs(job_id, tail, follow):
                    if skip:  # a reconnect: the output is append-only, so drop what was shown
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                    out.write(chunk)
                    out.flush()
                    written += len(chunk)
            except ClientError as exc:
                if exc.status or not follow:
                    fail(str(exc), 2 if 400 <= exc.status < 500 else 1)
            except (OSError, http.client.HTTPException):
                if not follow:
                    raise
            if not follow or _ended(c, job_id):
                return
            # the stream ended but the job did not: the daemon went away (a restart); wait for it
            err.print(f"[yellow]the daemon closed the stream; reconnecting every {RECONNECT_SECONDS:g} s[/]"
                      + (f" (the last {tail} lines will show again)" if tail else ""))
            time.sleep(RECONNECT_SECONDS)
            c = client(server, state_dir)  # a restarted daemon may listen elsewhere: ask again
    except KeyboardInterrupt:
        pass


RECONNECT_SECONDS = 1.0


def _ended(c: Client, job_id: str) -> bool:
    """Has the job ended? While the daemon is away: not known yet, so no."""
    try:
        return c.job(job_id)["status"] in TERMINAL
    except ClientError as exc:
        if exc.status:
            fail(str(exc), 2 if 400 <= exc.status < 500 else 1)
        return False


@app.command()
def cancel(
    job_id: Annotated[str, typer.Argument(help="job id, a unique prefix of one, or a job's name")],
    server: ServerOpt = None, state_dir: StateOpt = None, as_json: JsonOpt = False,
) -> None:
    """Cancel a job: its machines are stopped within seconds."""
    c = client(server, state_dir)
    job = call(c.cancel, resolve(c, job_id))
    if as_json:
        print(json.dumps(job, indent=2))
    elif job["status"] in TERMINAL:
        console.print(f"job {job['id']} had already ended: {job['status']}")
    else:
        console.print(f"cancelling job {job['id']}; `gpuhop show {job['id']}` to see it end")


@app.command()
def offers(
    limit: Annotated[int, typer.Option("--limit", help="rows to show")] = 40,
    server: ServerOpt = None, state_dir: StateOpt = None, as_json: JsonOpt = False,
) -> None:
    """What every configured provider offers now, ranked by expected cost."""
    data = call(client(server, state_dir).offers)
    if as_json:
        print(json.dumps(data, indent=2))
        return
    console.print(render.offers_table(data["offers"], limit))
    for name, h in data["providers"].items():
        if not h["ok"]:
            err.print(f"[yellow]provider {name} is degraded:[/] {h['error']}")


@app.command()
def costs(
    since: Annotated[str, typer.Option("--since", help="a span back from now: 30m, 24h, 7d, or all")] = "30d",
    by: Annotated[str, typer.Option("--by", help="provider, job or day")] = "provider",
    server: ServerOpt = None, state_dir: StateOpt = None, as_json: JsonOpt = False,
) -> None:
    """What was spent, by provider, job or day, and what the same GPU hours would have cost on
    the cheapest on-demand offer known now (the saving)."""
    data = call(client(server, state_dir).costs, since, by)
    if as_json:
        print(json.dumps(data, indent=2))
        return
    console.print(render.costs_table(data))


@app.command()
def status(server: ServerOpt = None, state_dir: StateOpt = None, as_json: JsonOpt = False) -> None:
    """How the daemon is: version, uptime, its loop, each provider's health, jobs by status,
    where it keeps its state."""
    data = call(client(server, state_dir).status)
    if as_json:
        print(json.dumps(data, indent=2))
        return
    from rich.table import Table

    loop = "alive" if data["ok"] else "[red]STALLED[/]"
    age = data["tick_age_seconds"]
    console.print(f"gpuhop {escape(data['version'])}, up {render.duration(data['uptime_seconds'])}; loop {loop} "
                  f"({data['ticks']} ticks, last {'-' if age is None else f'{age:.1f} s'} ago)")
    console.print(f"state dir {escape(data['state_dir'])}; database {escape(data['database'])}")
    if data.get("peers"):
        console.print(f"replica {escape(data['replica'])}{' (leader)' if data['leader'] else ''} of "
                      f"{len(data['peers']) + 1}; others: {escape(', '.join(data['peers']))}")
    table = Table(header_style="bold")
    for col in ("provider", "health", "detail"):
        table.add_column(col)
    for name, h in sorted(data["providers"].items()):
        if h.get("suspended_until"):
            health, detail = "[yellow]suspended[/]", h.get("suspended_why") or ""
        elif h["ok"]:
            health, detail = "[green]ok[/]", ""
        else:
            health, detail = "[red]degraded[/]", h.get("error") or ""
        table.add_row(escape(name), health, escape(detail))
    console.print(table)
    counts = ", ".join(f"{n} {s}" for s, n in data["jobs"].items() if n)
    console.print(f"jobs: {counts or 'none'}")
    if not data["ok"]:
        raise typer.Exit(1)


@app.command()
def volumes(server: ServerOpt = None, state_dir: StateOpt = None, as_json: JsonOpt = False) -> None:
    """Network volumes: where each lives, the jobs that used it, and what it costs to keep
    (providers bill storage whether or not a job runs)."""
    data = call(client(server, state_dir).volumes)
    if as_json:
        print(json.dumps(data, indent=2))
        return
    console.print(render.volumes_table(data))


volume_app = typer.Typer(help="One network volume: `gpuhop volume rm NAME` (`gpuhop volumes` lists them).",
                         no_args_is_help=True, rich_markup_mode=None)
app.add_typer(volume_app, name="volume")


@volume_app.command("rm")
def volume_rm(
    name: Annotated[str, typer.Argument(help="the volume's name (as in the job spec and `gpuhop volumes`)")],
    server: ServerOpt = None, state_dir: StateOpt = None, as_json: JsonOpt = False,
) -> None:
    """Delete a volume and its data, at its provider too (its storage stops billing). Refused
    while a job that has not ended uses it; a provider failure keeps it (try again)."""
    data = call(client(server, state_dir).delete_volume, name)
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        console.print(escape(data["message"]))


@app.command()
def dashboard(server: ServerOpt = None, state_dir: StateOpt = None) -> None:
    """The web dashboard's address, with a link that logs in (the token rides in the #fragment,
    which the browser never sends to a server). Keep the link private: it is the API token."""
    c = client(server, state_dir)
    call(c.status)  # the daemon answers, and the token is right
    console.print(f"dashboard: {escape(c.url)}/")
    console.print(f"log in with: {escape(c.url)}/#token={escape(c.token)}", soft_wrap=True)
    if not c.url.startswith("https://") and "127.0.0.1" not in c.url and "localhost" not in c.url:
        err.print("[yellow]the daemon is not served over TLS: put it behind a reverse proxy with TLS before opening "
                  "it across a network (deploy/README.md)[/]")


@app.command()
def gpus() -> None:
    """The GPU names gpuhop knows (use these in `resources.gpu`)."""
    from rich.table import Table

    from orchestrator.gpus import GPUS

    table = Table(header_style="bold")
    for col in ("NAME", "VRAM", "ALSO KNOWN AS"):
        table.add_column(col)
    for g in GPUS:
        table.add_row(g.name, f"{g.vram_gb} GB", ", ".join(g.aliases))
    console.print(table)


@app.command("check-config")
def check_config(
    config: Annotated[Path, typer.Argument(help="TOML configuration")],
    offline: Annotated[bool, typer.Option("--offline", help="check the file only; call no provider")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait for each provider")] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Validate a configuration file, then check each provider's credentials with one cheap
    read-only call (nothing is launched). Exits 1 when the file or any provider fails."""
    from orchestrator.daemon import check_providers, load_config

    try:
        settings = load_config(config)
    except ConfigError as exc:
        fail(str(exc))
        return
    results = [] if offline else asyncio.run(check_providers(settings, timeout))
    if as_json:
        print(json.dumps({"config": str(config), "ok": all(ok for _, ok, _ in results),
                          "providers": [{"name": n, "ok": ok, "detail": text} for n, ok, text in results]}))
    else:
        console.print(f"{escape(str(config))}: ok (providers: {', '.join(settings.providers)}; "
                      f"state dir {escape(str(settings.state_dir))})")
        for name, ok, text in results:
            mark = "[green]ok[/]" if ok else "[red]failed[/]"
            console.print(f"  {name}: {mark}: {escape(text)}")
    if not all(ok for _, ok, _ in results):
        raise typer.Exit(1)


def _plugins() -> None:
    for ep in entry_points(group="gpuhop.cli"):
        try:
            obj = ep.load()
        except ImportError as exc:  # an optional part not installed: say so, keep the rest working
            err.print(f"[yellow]warning:[/] gpuhop command {ep.name!r} unavailable: {exc}")
            continue
        if isinstance(obj, typer.Typer):
            app.add_typer(obj, name=ep.name)
        else:
            app.command(ep.name)(obj)


def _version(value: bool) -> None:
    if value:
        try:
            print(f"gpuhop {version('gpuhop')}")
        except PackageNotFoundError:
            print("gpuhop (not installed: run `pip install -e .` in the checkout)")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                               help="print gpuhop's version and exit")] = False,
) -> None:
    """gpuhop: run GPU jobs on the cheapest suitable capacity, and bring them back from their
    checkpoint when a machine is taken away."""


def main() -> None:
    _plugins()
    app()


if __name__ == "__main__":
    main()

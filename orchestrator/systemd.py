"""Talk to systemd as a `Type=notify` service: readiness, status, and the watchdog.

It exists so that `systemctl start gpuhop` returns only once the daemon really serves (READY=1
after the API is listening and the store is open), and so that a daemon whose event loop is stuck
is restarted by systemd (WatchdogSec=): the watchdog ping is sent from the loop itself and only
while the daemon says it is healthy, so a wedged loop or an unhealthy engine stops the pings.

The protocol is one datagram per message on the AF_UNIX socket named by $NOTIFY_SOCKET (an
abstract socket when it starts with "@"); see sd_notify(3). Standard library only, and every
function is a no-op outside systemd, so the daemon runs the same way from a terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)


def _address(raw: str) -> str | bytes | None:
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()  # abstract namespace
    if raw.startswith("/"):
        return raw
    return None  # vsock and other forms are not used by a system service


def notify(message: str) -> bool:
    """Send `message` ("READY=1", "STATUS=...", "STOPPING=1", "WATCHDOG=1"; several may be joined
    by newlines) to systemd. Returns False when not under systemd or the send failed; never
    raises and never blocks."""
    raw = os.environ.get("NOTIFY_SOCKET", "")
    address = _address(raw) if raw else None
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(message.encode(), address)
    except OSError as exc:
        log.debug("sd_notify %r failed: %s", message.split("=")[0], exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings: half of WATCHDOG_USEC (as sd_watchdog_enabled(3)
    advises), or None when the watchdog is off or meant for another process."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    try:
        usec_value = int(usec)
        if pid and int(pid) != os.getpid():
            return None
    except ValueError:
        return None
    if usec_value <= 0:
        return None
    return usec_value / 2 / 1_000_000


async def watchdog_loop(stop: asyncio.Event, healthy: Callable[[], bool]) -> None:
    """Send WATCHDOG=1 every `watchdog_interval()` seconds while `healthy()` is true, until
    `stop` is set. Returns at once (after `stop`) when the watchdog is off. An unhealthy daemon
    skips its pings, and systemd restarts it when WatchdogSec passes without one."""
    interval = watchdog_interval()
    if interval is None:
        await stop.wait()
        return
    while not stop.is_set():
        try:
            ok = healthy()
        except Exception:  # a broken health check counts as unhealthy, and is said so
            log.exception("health check failed; not pinging the systemd watchdog")
            ok = False
        if ok:
            notify("WATCHDOG=1")
        else:
            log.warning("daemon unhealthy: withholding the systemd watchdog ping")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)

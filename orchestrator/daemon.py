"""The supervisor behind `gpuhop serve`: opens the store (migrating it), builds the adapters
from the configuration, runs the engine and the REST API as named root tasks, and stops them
in order on SIGTERM/SIGINT. It tells systemd when it is ready and pings its watchdog while the
engine keeps ticking.

Stopping the daemon never stops jobs: local jobs run under their own agents, cloud machines
keep running, and the next start finds them again by name.

One daemon per state dir: a second `gpuhop serve` on the same state dir refuses to start (an
flock on `daemon.lock`) instead of running two loops over one database. A configuration mistake
stops the start with one line naming the key; a provider that fails to start for any other
reason (network, credentials that the provider refuses, plumbing) is marked degraded and retried
with backoff by the engine while the other providers, and the local jobs, keep running.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import signal
import socket
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

from aiohttp import web

from adapters.base import Adapter, AdapterContext, AdapterError, AuthError
from adapters.registry import create_adapter, validate_settings
from orchestrator import auth, systemd, volume_deletion
from orchestrator.api.app import ApiContext, make_app
from orchestrator.cluster import Cluster, default_replica_id
from orchestrator.collector import full_collections, tune_gc
from orchestrator.config import ConfigError, Settings, load_settings
from orchestrator.engine import Engine
from orchestrator.looplag import watch_loop_lag
from orchestrator.objectstore import ObjectStore
from orchestrator.store import Store

log = logging.getLogger("gpuhop.daemon")

SERVER_FILE = "server.json"
LOCK_FILE = "daemon.lock"


class _RedactSecrets(logging.Filter):
    """Last line of defence: secrets never reach a log line, whoever formats it."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s and len(s) >= 8]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            msg = record.getMessage()
            if any(s in msg for s in self.secrets):
                for s in self.secrets:
                    msg = msg.replace(s, "***")
                record.msg, record.args = msg, None
        return True


def setup_logging(level: str = "INFO", secrets: list[str] | None = None) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_RedactSecrets(secrets or []))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("aiohttp.access", "botocore", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


SECRET_WORDS = ("key", "secret", "token", "password")


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> Settings:
    """The configuration with every provider table checked by its adapter (raises ConfigError)."""
    return load_settings(path, overrides, validate_provider=validate_settings)


def configured_secrets(settings: Settings) -> list[str]:
    """Every credential in the configuration (provider API keys and the like), to redact."""
    found = [settings.server.token.get_secret_value()] if settings.server.token else []
    if settings.storage is not None:
        found += [s.get_secret_value() for s in (settings.storage.secret_access_key, settings.storage.access_key_id)
                  if s is not None]
    for table in settings.providers.values():
        for name, value in table.items():
            if isinstance(value, str) and any(w in name.lower() for w in SECRET_WORDS) and not name.endswith("_name"):
                found.append(value)
    return found


def build_adapters(settings: Settings, logs_dir: Path) -> dict[str, Adapter]:
    """Every configured adapter, constructed (not started). A provider that cannot even be
    constructed is a configuration mistake: ConfigError, one line, naming the provider."""
    ctx = AdapterContext(
        prefix=settings.server.instance_prefix, state_dir=settings.state_dir, logs_dir=logs_dir,
        public_url=settings.server.agent_base_url(),
    )
    adapters: dict[str, Adapter] = {}
    for name, table in settings.providers.items():
        try:
            adapters[name] = create_adapter(name, table, ctx)
        except AdapterError as exc:
            raise ConfigError(f"providers.{name}: {exc}") from None
    return adapters


def warn_unreachable_agents(settings: Settings, adapters: dict[str, Adapter]) -> None:
    """Cloud machines report to `server.public_url`; a loopback address there is unreachable
    from any cloud (right only for the simulators, which run on this machine)."""
    remote = sorted(name for name, a in adapters.items() if a.remote)
    url = settings.server.agent_base_url()
    host = (urllib.parse.urlsplit(url).hostname or "").strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if remote and loopback:
        log.warning(
            "server.public_url is %s, a loopback address: machines on %s cannot reach it to report, and "
            "their jobs would be called lost. Set public_url to an address they can reach (see deploy/README.md: "
            "TLS through a reverse proxy, firewall). Fine with the simulators, which run on this machine.",
            url, ", ".join(remote),
        )


async def check_providers(settings: Settings, per_provider_seconds: float = 30.0) -> list[tuple[str, bool, str]]:
    """(provider, ok, one line) for each configured provider, from one cheap read-only call
    each (`Adapter.verify`), run side by side in a scratch state dir (nothing is written to the
    real one, nothing is launched). Credentials never appear in the lines."""
    secrets = [s for s in configured_secrets(settings) if s]

    def clean(text: str) -> str:
        for secret in secrets:
            text = text.replace(secret, "***")
        return " ".join(text.split())[:300]

    with tempfile.TemporaryDirectory(prefix="gpuhop-check-") as scratch:
        ctx = AdapterContext(
            prefix=settings.server.instance_prefix, state_dir=Path(scratch), logs_dir=Path(scratch) / "logs",
            public_url=settings.server.agent_base_url(),
        )

        async def one(name: str, table: dict[str, Any]) -> tuple[str, bool, str]:
            try:
                adapter = create_adapter(name, table, ctx)
            except AdapterError as exc:
                return name, False, clean(f"not usable: {exc}")
            try:  # a read-only call in a command that exits next: a bound here is harmless
                text = await asyncio.wait_for(adapter.verify(), per_provider_seconds)
            except TimeoutError:
                return name, False, f"no answer within {per_provider_seconds:.0f} s"
            except AuthError as exc:
                return name, False, clean(f"credentials refused: {exc}")
            except Exception as exc:
                return name, False, clean(f"{type(exc).__name__}: {exc}")
            finally:
                with contextlib.suppress(Exception):
                    await adapter.close()
            return name, True, clean(text)

        return list(await asyncio.gather(*(one(n, t) for n, t in settings.providers.items())))


class StateDirBusy(OSError):
    """Another daemon holds this state dir."""


def lock_state_dir(state_dir: Path) -> int:
    """Take the state dir's lock for the life of this process (released when it exits, even
    on kill -9). Raises StateDirBusy naming the other daemon's pid."""
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StateDirBusy(
            f"another gpuhop daemon (pid {other}) is already using the state dir {state_dir}; "
            "stop it first, or give this one its own --state-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run until `stop` is set or a SIGTERM/SIGINT arrives."""
    state_dir = settings.state_dir
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock_fd = lock_state_dir(state_dir)
    logs_dir = state_dir / "logs"
    logs_dir.mkdir(exist_ok=True, mode=0o700)
    store = Store(settings.database_url(), event_retention_days=settings.database.event_retention_days)
    await store.run(store.migrate)
    tune_gc()
    # replicas on one database share the API token (unless configured) and the agent-token key:
    # the first to start records its own (from its state dir), the others take it and keep a copy
    # in their state dir, where the CLI on their host looks for the token
    configured = settings.server.token.get_secret_value() if settings.server.token else None
    token = configured or os.environ.get("GPUHOP_TOKEN") or auth.keep(
        state_dir / auth.TOKEN_FILE,
        await store.run(store.shared_secret, "api_token", auth.api_token(state_dir)))
    agent_key = auth.keep(state_dir / auth.AGENT_KEY_FILE, await store.run(
        store.shared_secret, "agent_key", auth.agent_key(state_dir).decode())).encode()
    for handler in logging.getLogger().handlers:
        handler.addFilter(_RedactSecrets([token, *configured_secrets(settings)]))

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    # bind first, so that agents are told the real port (listen = HOST:0 picks a free one)
    runner: web.AppRunner | None = None
    adapters: dict[str, Adapter] = {}
    try:
        site = await _bind(settings)
        settings.server.listen = f"{settings.server.host}:{site[1]}"
        sock = site[0]
        adapters = build_adapters(settings, logs_dir)
        warn_unreachable_agents(settings, adapters)
        engine = Engine(settings, store, adapters, lambda name: auth.attempt_token(agent_key, name))
        objects = ObjectStore(settings.storage) if settings.storage is not None else None
        app = make_app(ApiContext(store=store, engine=engine, token=token, agent_key=agent_key, logs_dir=logs_dir,
                                  max_followers_per_token=settings.server.max_log_followers, objects=objects))
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        url = f"http://{_url_host(settings.server.host)}:{site[1]}"
        _write_server_file(state_dir, url)
        log.info("gpuhop listening on %s (state %s, providers: %s)", url, state_dir, ", ".join(adapters))
        cluster = _cluster(settings, store, engine)
        await cluster.start()

        def fatal(why: str) -> None:
            log.error("stopping: %s", why)
            stop.set()

        cluster_task = asyncio.create_task(cluster.run(stop, fatal), name="cluster")
        engine_task = asyncio.create_task(engine.run(stop), name="engine")
        watchdog = asyncio.create_task(systemd.watchdog_loop(stop, engine.healthy), name="watchdog")
        collections = asyncio.create_task(full_collections(stop), name="gc")
        loop_lag = asyncio.create_task(watch_loop_lag(stop), name="loop-lag")
        volume_retention = asyncio.create_task(volume_deletion.retention_loop(
            store, adapters, settings.volumes.delete_after_days, stop, ready=engine.observer.started,
            objects=objects,
        ), name="volume-retention")
        systemd.notify("READY=1\nSTATUS=serving")
        done, _ = await asyncio.wait({engine_task, asyncio.ensure_future(stop.wait())},
                                     return_when=asyncio.FIRST_COMPLETED)
        if engine_task in done and engine_task.exception():
            raise engine_task.exception()  # type: ignore[misc]
        systemd.notify("STOPPING=1")
        log.info("stopping: jobs keep running and will be found again on the next start")
        stop.set()
        await asyncio.wait_for(engine_task, 60)
        watchdog.cancel()
        collections.cancel()
        loop_lag.cancel()
        cluster_task.cancel()
        await asyncio.gather(cluster_task, return_exceptions=True)
        await cluster.retire()  # after the engine's last write: the other replicas take over now
        with contextlib.suppress(Exception):  # it stops between deletions: let one in flight end
            await asyncio.wait_for(volume_retention, 60)
    finally:
        if runner is not None:
            with contextlib.suppress(Exception):
                await runner.cleanup()
        for adapter in adapters.values():
            with contextlib.suppress(Exception):
                await adapter.close()
        store.close()
        os.close(lock_fd)
        with contextlib.suppress(FileNotFoundError):
            server_file = state_dir / SERVER_FILE
            if json.loads(server_file.read_text()).get("pid") == os.getpid():
                server_file.unlink()


def _cluster(settings: Settings, store: Store, engine: Engine) -> Cluster:
    """This daemon's replica: its lease fences the engine's writes, the leader reaps machines of
    ended jobs, and agents are told every live replica's URL."""
    c = settings.cluster

    def follow(cluster: Cluster) -> None:
        engine.leader = cluster.leader
        engine.workers.peer_urls = cluster.peer_urls

    return Cluster(store, c.replica_id or default_replica_id(settings.state_dir), settings.server.agent_base_url(),
                   c.lease_ttl_seconds, c.claim_interval_seconds, on_claim=engine.hint, on_refresh=follow,
                   host_bound=frozenset(name for name, a in engine.adapters.items() if not a.remote))


async def _bind(settings: Settings) -> tuple[socket.socket, int]:
    host, port = settings.server.host, settings.server.port
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {settings.server.listen}: {exc.strerror} "
                      "(is another gpuhop running? use --listen HOST:PORT)") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock, sock.getsockname()[1]


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _write_server_file(state_dir: Path, url: str) -> None:
    """Where the CLI on this host finds the daemon (the token is in `token` beside it)."""
    path = state_dir / SERVER_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)

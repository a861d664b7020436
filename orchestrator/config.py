"""Typed settings, loaded once from one TOML file and passed down explicitly.

Every mistake in the file (an unknown key, a wrong type, an impossible value) stops the daemon
at start-up with the file, the dotted key and what was expected, instead of surfacing later as
odd behaviour. Provider tables are validated by each adapter's own `Settings` model: the daemon
passes the registry's validator in (`daemon.load_config`), so a typo under `[providers.runpod]`
is caught just as early without this module knowing any adapter.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

DEFAULT_PORT = 8470


def default_state_dir() -> Path:
    env = os.environ.get("GPUHOP_STATE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "gpuhop"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ServerSettings(_Section):
    listen: str = Field(default=f"127.0.0.1:{DEFAULT_PORT}", description="HOST:PORT the REST API binds")
    public_url: str = Field(
        default="", description="URL agents on remote machines use to reach the daemon; default http://<listen>"
    )
    state_dir: Path = Field(default_factory=default_state_dir, description="database, token, logs, local instances")
    token: SecretStr | None = Field(
        default=None, description="API bearer token; default: GPUHOP_TOKEN or <state_dir>/token, created on first start"
    )
    instance_prefix: str = Field(
        default="gpuhop", pattern=r"^[a-z][a-z0-9]{0,15}$", description="every instance we own is named <prefix>-<job>-<n>"
    )
    max_log_followers: int = Field(
        default=32, ge=1, le=10_000, description="concurrent `logs?follow=true` streams per token (429 past it)"
    )
    log_retention_days: float = Field(
        default=30.0, gt=0, le=36500,
        description="output files of attempts that are not live and unwritten this long are deleted",
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:8470")
        return value

    @field_validator("public_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL")
        return value.rstrip("/")

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    def agent_base_url(self) -> str:
        if self.public_url:
            return self.public_url
        host = self.host if self.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return f"http://{host}:{self.port}"


class DatabaseSettings(_Section):
    url: str = Field(default="", description="SQLAlchemy URL; empty = SQLite (WAL) at <state_dir>/gpuhop.db")
    event_retention_days: float = Field(
        default=30.0, gt=0, le=36500, description="events of ended jobs older than this are deleted"
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value and not value.startswith(("sqlite://", "postgresql://", "postgresql+psycopg://")):
            raise ValueError("expected a sqlite:// or postgresql:// URL")
        return value


class VolumeSettings(_Section):
    delete_after_days: float = Field(
        default=0.0, ge=0, le=36500,
        description="volumes no job used for this many days are deleted, at the provider too (0 = never)",
    )


class WorkdirSettings(_Section):
    max_mb: float = Field(
        default=50.0, gt=0, le=1024,
        description="largest job working directory (`workdir`) accepted, in MB of its tar.gz; "
        "it is kept in the database and fetched by the agent on every attempt",
    )
    max_unpacked_mb: float = Field(
        default=1024.0, gt=0, le=65536, description="what one may unpack to on the machine (a tar bomb stops here)"
    )
    keep_days: float = Field(
        default=7.0, gt=0, le=36500,
        description="an archive no unfinished job names is deleted this many days after its last upload",
    )


class ClusterSettings(_Section):
    replica_id: str = Field(
        default="", pattern=r"^$|^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$",
        description="this daemon's name among replicas sharing the database; default <hostname>-<hash of state_dir>. "
        "Keep it across restarts: a restarted replica takes its own jobs back at once",
    )
    lease_ttl_seconds: float = Field(
        default=15.0, ge=2, le=3600,
        description="a replica silent this long loses its jobs to the others (renewed every third of it)",
    )
    claim_interval_seconds: float = Field(
        default=1.0, gt=0, le=600, description="how often a replica looks for jobs whose owner's lease expired"
    )


class EngineSettings(_Section):
    tick_seconds: float = Field(default=5.0, gt=0, le=3600, description="reconcile period (woken early by hints)")
    launch_grace_seconds: float = Field(
        default=60.0, ge=0, le=3600, description="how long a launched instance may be missing from listings"
    )
    heartbeat_timeout_seconds: float = Field(
        default=180.0, gt=0, le=86400, description="a remote agent silent this long means its machine is lost"
    )
    heartbeat_seconds: float = Field(default=10.0, gt=0, le=3600, description="how often remote agents report")
    provider_timeout_seconds: float = Field(default=30.0, gt=0, le=600, description="bound on one provider call")
    offer_refresh_seconds: float = Field(default=30.0, gt=0, le=3600, description="how often offers are re-read")
    retry_backoff_max_seconds: float = Field(
        default=60.0, gt=0, le=3600, description="longest wait between placement tries when nothing fits"
    )
    stop_grace_seconds: float = Field(default=10.0, ge=0, le=600, description="SIGTERM to SIGKILL on stop")
    listing_wait_seconds: float = Field(
        default=2.0, gt=0, le=600,
        description="how long a tick waits for a provider's listing; a slower answer is used by the next tick",
    )
    # 32, not 8: after a wave of preemptions the replacements wait in this queue, and each
    # worker's write-ahead record and launch record share transactions with the others'
    # (orchestrator/groupcommit.py); calls to one provider are still bounded by provider_concurrency
    launch_concurrency: int = Field(default=32, ge=1, le=1024, description="launches in flight at once, in all")
    provider_concurrency: int = Field(
        default=4, ge=1, le=256, description="launches and terminations in flight at once per provider"
    )
    provider_start_backoff_max_seconds: float = Field(
        default=300.0, gt=0, le=86400, description="longest pause between tries to start a failing provider"
    )
    account_suspend_seconds: float = Field(
        default=900.0, ge=0, le=7 * 86400,
        description="how long a provider that stopped a machine for the account (insufficient balance) "
        "gets no launches",
    )


class PlacementSettingsModel(_Section):
    prior_weight_hours: float = Field(default=24.0, gt=0, le=1e6)
    default_restart_overhead_seconds: float = Field(default=120.0, ge=0, le=86400)
    restart_overhead_seconds: dict[str, float] = Field(default_factory=dict, description="per provider")
    spot_preemption_priors: dict[str, float] = Field(
        default_factory=lambda: {"runpod": 0.10, "aws": 0.05, "vast": 0.20},
        description="expected preemptions per hour of spot capacity, per provider, before any history",
    )

    @field_validator("spot_preemption_priors", "restart_overhead_seconds")
    @classmethod
    def _non_negative(cls, value: dict[str, float]) -> dict[str, float]:
        for key, rate in value.items():
            if rate < 0 or rate != rate or rate > 1e6:
                raise ValueError(f"{key}: expected a number >= 0")
        return value


class StorageSettings(_Section):
    """An S3-compatible bucket where volumes with `[volume] sync = "object-store"` are checkpointed.
    Only the daemon holds the keys: agents get short-lived presigned URLs."""

    endpoint_url: str = Field(
        default="", description="S3 API endpoint, e.g. https://s3.eu-west-1.amazonaws.com or a MinIO/R2 URL; "
        "empty = AWS's own for `region`",
    )
    bucket: str = Field(
        min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$",
        description="the bucket (it must exist); required",
    )
    prefix: str = Field(
        default="gpuhop", max_length=200, pattern=r"^$|^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$",
        description="every key starts with <prefix>/volumes/<volume name>/",
    )
    region: str = Field(default="us-east-1", pattern=r"^[a-z0-9-]{2,32}$", description="the bucket's region")
    access_key_id: SecretStr | None = Field(
        default=None, description="default: boto3's own chain (AWS_ACCESS_KEY_ID, instance role, ...)"
    )
    secret_access_key: SecretStr | None = Field(default=None, description="with access_key_id")
    presign_ttl_seconds: int = Field(
        default=900, ge=10, le=7 * 86400, description="how long a URL handed to an agent stays valid"
    )
    sync_interval_seconds: float = Field(
        default=60.0, ge=0.1, le=86400, description="how often an agent uploads a changed volume"
    )

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("secret_access_key")
    @classmethod
    def _pair(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if (value is None) != (info.data.get("access_key_id") is None):
            raise ValueError("give access_key_id and secret_access_key together, or neither")
        return value


class MovingSettingsModel(_Section):
    """When a job whose volume syncs to object storage (`[volume] sync = "object-store"`) finds no
    capacity where its volume lives, it moves elsewhere only if moving costs less than waiting
    (orchestrator/moving.py). Jobs with `sync = "none"` always wait where their volume is."""

    enabled: bool = Field(default=True, description="false: object-store jobs wait pinned like the others")
    egress_usd_per_gb: float = Field(
        default=0.09, ge=0, le=100, description="what reading a GB of checkpoint out of the bucket costs (egress)")
    restore_mb_per_second: float = Field(
        default=100.0, gt=0, le=1e6,
        description="how fast a new machine restores the checkpoint from the bucket; the restore's "
        "machine time is charged at the new place's price")
    wait_cost_multiple: float = Field(
        default=1.0, ge=0, le=1000,
        description="an hour of waiting costs this multiple of the pinned place's price per hour "
        "(1: an hour of progress is worth what the user pays for it)")
    wait_usd_per_hour: float | None = Field(
        default=None, ge=0, le=1e6, description="a fixed cost of an hour of waiting, instead of wait_cost_multiple")
    premium_hours: float = Field(
        default=1.0, ge=0, le=1e5,
        description="hours of the job's run at the new place charged with its price difference from the "
        "pinned place (a dearer place costs more, a cheaper one saves)")
    prior_wait_seconds: float = Field(
        default=1800.0, gt=0, le=30 * 86400, description="expected length of a capacity gap before any history")
    prior_weight_gaps: float = Field(
        default=2.0, gt=0, le=1e6, description="how many observed gaps the prior counts as")
    history_days: float = Field(
        default=14.0, gt=0, le=3650, description="capacity gaps older than this are forgotten")


class Settings(_Section):
    server: ServerSettings = Field(default_factory=ServerSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    placement: PlacementSettingsModel = Field(default_factory=PlacementSettingsModel)
    volumes: VolumeSettings = Field(default_factory=VolumeSettings)
    moving: MovingSettingsModel = Field(default_factory=MovingSettingsModel)
    workdirs: WorkdirSettings = Field(default_factory=WorkdirSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    storage: StorageSettings | None = Field(
        default=None, description="object storage for volumes synced through it; none: such jobs are refused"
    )
    providers: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"local": dict[str, Any]()},
        description="one table per provider; each is validated by that provider's adapter",
    )

    @property
    def state_dir(self) -> Path:
        return self.server.state_dir.expanduser()

    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.state_dir / 'gpuhop.db'}"


class ConfigError(Exception):
    """The configuration is wrong; the message says where and what was expected."""


def format_validation_error(source: str, exc: ValidationError, prefix: str = "") -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        key = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling against config.example.toml)"
        got = err.get("input")
        got_text = "" if err["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r:.60})"
        lines.append(f"  {key or '<top>'}: {msg}{got_text}")
    return "\n".join(lines)


def load_settings(
    path: Path | None,
    overrides: dict[str, Any] | None = None,
    validate_provider: Callable[[str, dict[str, Any]], Any] | None = None,
) -> Settings:
    """Read and validate the file (or defaults when `path` is None), apply CLI overrides such as
    {"server": {"listen": ...}}, and, given `validate_provider`, every provider table."""
    raw: dict[str, Any] = {}
    source = str(path) if path else "<defaults>"
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{source}: no such file (copy config.example.toml to start)") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
    for section, values in (overrides or {}).items():
        if values:
            raw.setdefault(section, {})
            if not isinstance(raw[section], dict):
                raise ConfigError(f"{source}: {section}: expected a table")
            raw[section].update(values)
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from None
    if validate_provider is not None:
        validate_providers(settings, source, validate_provider)
    return settings


def validate_providers(settings: Settings, source: str, validate: Callable[[str, dict[str, Any]], Any]) -> None:
    """Check each `[providers.<name>]` table with `validate(name, table)` (the adapter registry's,
    passed in by the daemon: settings do not know the adapters). KeyError = unknown provider."""
    if not settings.providers:
        raise ConfigError(f"{source}: providers: configure at least one provider, e.g. [providers.local]")
    for name, table in settings.providers.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: providers.{name}: expected a table")
        try:
            validate(name, table)
        except KeyError as exc:
            raise ConfigError(f"{source}: providers.{name}: {exc.args[0]}") from None
        except ValidationError as exc:
            raise ConfigError(format_validation_error(source, exc, prefix=f"providers.{name}")) from None

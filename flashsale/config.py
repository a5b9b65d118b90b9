"""Settings: one frozen dataclass, built from the environment in one place."""

from __future__ import annotations

import os
import re
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flashsale.schemas import bounds

SECRET_MIN_CHARS = 16
SECRET_MAX_CHARS = 512
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(Exception):
    """The configuration is invalid."""


def _valid_secret(name: str, value: str) -> str:
    if not (SECRET_MIN_CHARS <= len(value) <= SECRET_MAX_CHARS):
        raise ConfigError(
            f"{name} must be {SECRET_MIN_CHARS}-{SECRET_MAX_CHARS} characters (got {len(value)})"
        )
    if not all("\x21" <= ch <= "\x7e" for ch in value):
        raise ConfigError(f"{name} must be printable ASCII without spaces")
    return value



# --------------------------------------------------------------------------- from_env, by group


def _secrets_from(env: Mapping[str, str]) -> dict[str, Any]:
    """The secrets given (validated), or generated: ``generated`` names those."""
    generated: list[str] = []
    out: dict[str, Any] = {}
    for var, attr in (
        ("FLASHSALE_ADMIN_TOKEN", "admin_token"),
        ("FLASHSALE_JWT_SECRET", "jwt_secret"),
        ("FLASHSALE_WEBHOOK_SECRET", "webhook_secret"),
        ("FLASHSALE_PASS_SECRET", "pass_secret"),
    ):
        raw = env.get(var)
        if raw is None or raw == "":
            out[attr] = secrets.token_urlsafe(32)
            generated.append(var)
        else:
            out[attr] = _valid_secret(var, raw)
    return {**out, "generated": tuple(generated)}


def _redis_from(env: Mapping[str, str]) -> dict[str, Any]:
    """Redis: a URL, a Cluster seed or Sentinels; the key prefix; replica acks."""
    fsync = env.get("FLASHSALE_REDIS_APPENDFSYNC", "everysec")
    if fsync not in ("always", "everysec", "no"):
        raise ConfigError("FLASHSALE_REDIS_APPENDFSYNC must be always, everysec or no")
    prefix = env.get("FLASHSALE_KEY_PREFIX", "fs")
    if not prefix or not all(ch.isalnum() or ch in "_-" for ch in prefix):
        raise ConfigError("FLASHSALE_KEY_PREFIX must be letters, digits, '_' or '-'")
    redis_url = _url(env, "FLASHSALE_REDIS_URL", ("redis", "rediss", "unix"))
    cluster = env.get("FLASHSALE_REDIS_CLUSTER", "") in ("1", "true", "yes")
    sentinels = _sentinels(env)
    master = env.get("FLASHSALE_REDIS_SENTINEL_MASTER") or "flashsale"
    if not _MASTER_NAME_RE.match(master):
        raise ConfigError(
            "FLASHSALE_REDIS_SENTINEL_MASTER must be 1-64 letters, digits, '.', '_' or '-'"
        )
    if sentinels and redis_url:
        raise ConfigError(
            "set FLASHSALE_REDIS_SENTINELS or FLASHSALE_REDIS_URL, not both "
            "(with Sentinel the primary is found through the sentinels)"
        )
    if sentinels and cluster:
        raise ConfigError(
            "FLASHSALE_REDIS_SENTINELS and FLASHSALE_REDIS_CLUSTER exclude each other"
        )
    # acknowledged means replicated: on by default where the topology has a replica
    # (Sentinel); a single Redis or a Cluster may have none, so 0 unless set (on a
    # Cluster the rule then holds per shard: core/replication.py)
    acks = _int(env, "FLASHSALE_REDIS_REPLICA_ACKS", 1 if sentinels else 0, 0, REPLICA_ACKS_MAX)
    return {
        "redis_url": redis_url, "redis_sentinels": sentinels, "redis_sentinel_master": master,
        "redis_replica_acks": acks,
        "redis_replica_ack_timeout_ms": _int(
            env, "FLASHSALE_REDIS_REPLICA_ACK_TIMEOUT_MS", 500, 1, REPLICA_ACK_TIMEOUT_MS_MAX
        ),
        "key_prefix": prefix, "redis_cluster": cluster, "redis_appendfsync": fsync,
    }


def _process_from(env: Mapping[str, str]) -> dict[str, Any]:
    """The process: PostgreSQL, bind address, data dir, logs, embedded servers."""
    log_level = (env.get("FLASHSALE_LOG_LEVEL") or "INFO").upper()
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"FLASHSALE_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}")
    log_format = env.get("FLASHSALE_LOG_FORMAT") or "text"
    if log_format not in ("text", "json"):
        raise ConfigError(f"FLASHSALE_LOG_FORMAT must be text or json (got {log_format!r})")
    access_log = env.get("FLASHSALE_ACCESS_LOG") or "1"
    if access_log not in ("0", "1"):
        raise ConfigError(f"FLASHSALE_ACCESS_LOG must be 0 or 1 (got {access_log!r})")
    return {
        "database_url": _url(
            env, "FLASHSALE_DATABASE_URL", ("postgres", "postgresql"), check_port=False
        ),
        "host": env.get("FLASHSALE_HOST") or "127.0.0.1",
        "port": _int(env, "FLASHSALE_PORT", 8080, 0, 65535),
        "data_dir": Path(env.get("FLASHSALE_DATA_DIR") or ".flashsale"),
        "log_level": log_level, "log_format": log_format, "access_log": access_log == "1",
        "embedded_user": env.get("FLASHSALE_EMBEDDED_USER") or None,
        "embedded_redis_server": _path(env, "FLASHSALE_REDIS_SERVER"),
        "embedded_pg_bin_dir": _path(env, "FLASHSALE_PG_BIN_DIR"),
        "embedded_restart_max": _int(env, "FLASHSALE_EMBEDDED_RESTART_MAX", 5, 0, 100),
        "embedded_restart_window_s": _int(
            env, "FLASHSALE_EMBEDDED_RESTART_WINDOW_S", 60, 1, 3600
        ),
        "consume_metrics_port": _port_or_off(env, "FLASHSALE_CONSUME_METRICS_PORT"),
        "compensate_metrics_port": _port_or_off(env, "FLASHSALE_COMPENSATE_METRICS_PORT"),
        "metrics_host": env.get("FLASHSALE_METRICS_HOST") or "127.0.0.1",
    }


def _pipeline_from(env: Mapping[str, str]) -> dict[str, Any]:
    """The reservation, the consumer, the payment inbox, live sales, the room."""
    return {
        "idempotency_ttl_s": _int(env, "FLASHSALE_IDEMPOTENCY_TTL_S", 86_400, 60, 30 * 86_400),
        "consumer_batch_max": _int(env, "FLASHSALE_CONSUMER_BATCH_MAX", 500, 1, 10_000),
        "consumer_concurrency": _int(env, "FLASHSALE_CONSUMER_CONCURRENCY", 4, 1, 32),
        "reserve_queue_max": _int(env, "FLASHSALE_RESERVE_QUEUE_MAX", 4096, 1, 1_000_000),
        "reserve_resolve_s": _int(env, "FLASHSALE_RESERVE_RESOLVE_MS", 1000, 100, 60_000) / 1000,
        "consumer_claim_idle_ms": _int(
            env, "FLASHSALE_CONSUMER_CLAIM_IDLE_MS", 5_000, 100, 3_600_000
        ),
        "consumer_max_deliveries": _int(env, "FLASHSALE_CONSUMER_MAX_DELIVERIES", 5, 1, 100),
        "payment_inbox_batch_max": _int(
            env, "FLASHSALE_PAYMENT_INBOX_BATCH_MAX", 100, 1, 10_000
        ),
        "payment_inbox_backoff_max_s": _int(
            env, "FLASHSALE_PAYMENT_INBOX_BACKOFF_MAX_MS", 2000, 100, 600_000
        ) / 1000,
        "live_sales_max": _int(env, "FLASHSALE_LIVE_SALES_MAX", 100, 1, 1000),
        "live_ended_grace_s": _int(env, "FLASHSALE_LIVE_ENDED_GRACE_S", 3600, 0, 30 * 86_400),
        "room_tickets_max": _int(env, "FLASHSALE_ROOM_TICKETS_MAX", 1_000_000, 1, 100_000_000),
        "room_admit_interval_ms": _int(env, "FLASHSALE_ROOM_ADMIT_INTERVAL_MS", 100, 10, 1000),
    }


def _front_from(env: Mapping[str, str]) -> dict[str, Any]:
    """The HTTP front: admission (rate limits, tarpit), connection bounds, admin streams."""
    return {
        "rate_user_per_s": _int(env, "FLASHSALE_RATE_USER_PER_S", 10, 0, 1_000_000),
        "rate_user_burst": _int(env, "FLASHSALE_RATE_USER_BURST", 20, 1, 1_000_000),
        "rate_global_per_s": _int(env, "FLASHSALE_RATE_GLOBAL_PER_S", 0, 0, 10_000_000),
        "rate_limited_delay_s": _int(env, "FLASHSALE_RATE_LIMITED_DELAY_MS", 1000, 0, 10_000)
        / 1000,
        "http_header_timeout_s": _int(env, "FLASHSALE_HTTP_HEADER_TIMEOUT_S", 10, 1, 300),
        "http_body_timeout_s": _int(env, "FLASHSALE_HTTP_BODY_TIMEOUT_S", 10, 1, 300),
        "http_keepalive_idle_s": _int(env, "FLASHSALE_HTTP_KEEPALIVE_IDLE_S", 15, 1, 3600),
        "http_max_connections": _int(
            env, "FLASHSALE_HTTP_MAX_CONNECTIONS", 4096, 1, 1_000_000
        ),
        "admin_streams_max": _int(env, "FLASHSALE_ADMIN_STREAMS_MAX", 16, 1, 1000),
        "admin_events_interval_ms": _int(
            env, "FLASHSALE_ADMIN_EVENTS_INTERVAL_MS", 1000, 100, 1000
        ),
    }

def _int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer (got {raw!r})") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be between {lo} and {hi} (got {value})")
    return value


def _path(env: Mapping[str, str], name: str) -> Path | None:
    raw = env.get(name) or None
    return Path(raw) if raw is not None else None


SENTINELS_MAX = 16
_MASTER_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
REPLICA_ACKS_MAX = 16
# below redis_timeout_s: WAIT must answer before the socket times out
REPLICA_ACK_TIMEOUT_MS_MAX = 1_500


def _sentinels(env: Mapping[str, str]) -> tuple[tuple[str, int], ...]:
    """FLASHSALE_REDIS_SENTINELS: "host:port" entries separated by commas."""
    raw = (env.get("FLASHSALE_REDIS_SENTINELS") or "").strip()
    if not raw:
        return ()
    out: list[tuple[str, int]] = []
    for entry in (e.strip() for e in raw.split(",")):
        host, sep, port = entry.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535 \
                or any(ch.isspace() or ch in "/@" for ch in host):
            raise ConfigError(
                f"FLASHSALE_REDIS_SENTINELS must be host:port entries separated by commas "
                f"(got {entry!r})"
            )
        out.append((host, int(port)))
    if len(out) > SENTINELS_MAX:
        raise ConfigError(f"FLASHSALE_REDIS_SENTINELS names at most {SENTINELS_MAX} sentinels")
    return tuple(out)


def _url(
    env: Mapping[str, str], name: str, schemes: tuple[str, ...], *, check_port: bool = True
) -> str | None:
    """The URL in ``name``, or None. The message never quotes the URL: it may
    hold a password. ``check_port`` is off for PostgreSQL DSNs, which may name
    several hosts ("h1:5432,h2:5433")."""
    raw = env.get(name) or None
    if raw is None:
        return None
    try:
        parts = urlsplit(raw)  # ValueError on e.g. "redis://[::1"
        if check_port:
            _ = parts.port  # ValueError unless absent or a number in 0..65535
    except ValueError as exc:
        raise ConfigError(f"{name} is not a valid URL ({exc})") from None
    if parts.scheme not in schemes:
        raise ConfigError(
            f"{name} must be a URL with scheme {' or '.join(schemes)} "
            f"(got {parts.scheme + '://' if parts.scheme else 'no scheme'})"
        )
    return raw


def _port_or_off(env: Mapping[str, str], name: str) -> int | None:
    """A worker's metrics port: ``name``, else FLASHSALE_METRICS_PORT (one port
    for a process alone in its container), else None (no listener). 0 asks
    for an ephemeral port (logged at start)."""
    for var in (name, "FLASHSALE_METRICS_PORT"):
        if env.get(var):
            return _int(env, var, 0, 0, 65535)
    return None


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the service reads from its environment, validated."""

    redis_url: str | None = None
    database_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path(".flashsale")
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    jwt_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    webhook_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    pass_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))  # room passes
    generated: tuple[str, ...] = ()
    key_prefix: str = "fs"
    redis_cluster: bool = False
    redis_appendfsync: str = "everysec"
    log_level: str = "INFO"
    # embedded servers (flashsale/run/embedded/servers.py), for whichever URL is unset
    embedded_user: str | None = None  # runs them under root; else the cluster's owner, nobody
    embedded_redis_server: Path | None = None  # a redis-server binary to prefer
    embedded_pg_bin_dir: Path | None = None  # a directory with initdb and postgres to prefer
    embedded_restart_max: int = 5  # restarts of a dead server within the window; 0: none
    embedded_restart_window_s: int = 60
    # Redis Sentinel (in place of redis_url) and replica acknowledgement (replication.py)
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_sentinel_master: str = "flashsale"
    redis_replica_acks: int = 0  # WAIT for this many replicas after each reservation batch
    redis_replica_ack_timeout_ms: int = 500
    # reservation path
    idempotency_ttl_s: int = 86_400
    reserve_batch_max: int = 256
    reserve_inflight_batches: int = 2
    reserve_queue_max: int = 4096
    rate_user_per_s: float = 10.0
    rate_user_burst: float = 20.0
    rate_global_per_s: float = 0.0
    rate_limited_delay_s: float = 1.0  # a buyer's 429 is held this long (admission.py)
    body_max_bytes: int = bounds.MAX_BODY_BYTES  # the contract's 16 KiB
    # HTTP connections (flashsale/web/front.py): slow or idle clients never hold a slot long
    http_header_timeout_s: float = 10.0  # connect or first byte -> request head complete
    http_body_timeout_s: float = 10.0  # a handler's whole read of a body (<= body_max_bytes)
    http_keepalive_idle_s: float = 15.0  # response sent -> first byte of the next request
    http_max_connections: int = 4096  # open connections per process (clamped to the fd limit)
    redis_timeout_s: float = 2.0
    # after a reservation call failed once sent: how long the front keeps asking
    # Redis (fresh connections) which of its orders were reserved (reserve.py)
    reserve_resolve_s: float = 1.0
    # consumer
    consumer_group: str = "persist"
    consumer_name: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    consumer_batch_max: int = 500
    consumer_concurrency: int = 4  # consumers of the group per process (persist.run_consumers)
    consumer_block_ms: int = 200
    consumer_claim_idle_ms: int = 5_000
    consumer_max_deliveries: int = 5
    # compensator
    compensator_interval_s: float = 0.25
    compensator_batch_max: int = 500
    # payment inbox: webhook events kept for orders not persisted yet (payment.py),
    # applied by the compensator a bounded batch per round, retried with backoff
    payment_inbox_batch_max: int = 100
    payment_inbox_backoff_base_s: float = 0.1
    payment_inbox_backoff_max_s: float = 2.0
    # postgres
    pg_pool_min: int = 2
    pg_pool_max: int = 10
    pg_timeout_s: float = 5.0
    # commerce: webhook, mock gateway and carrier, fulfilment saga, domain events
    webhook_tolerance_s: int = 300
    gateway_timeout_s: float = 2.0
    gateway_webhook_attempts: int = 5
    carrier_timeout_s: float = 2.0
    carrier_attempts_max: int = 5
    refund_attempts_max: int = 10
    saga_backoff_base_s: float = 0.5
    saga_backoff_max_s: float = 60.0
    saga_lease_s: float = 30.0
    saga_interval_s: float = 0.25
    saga_batch_max: int = 100
    breaker_failure_threshold: int = 5
    breaker_open_s: float = 5.0
    events_maxlen: int = 100_000
    # operator's view: logs, the dashboard's live figures, worker metrics endpoints
    log_format: str = "text"  # text | json (flashsale/ops/logs.py)
    access_log: bool = True  # one log line per request (flashsale.access, level INFO)
    consume_metrics_port: int | None = None  # None: no /metrics listener; 0: an ephemeral port
    compensate_metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    admin_streams_max: int = 16  # concurrent GET /api/v1/admin/events streams per process
    admin_events_interval_ms: int = 1000
    live_sales_max: int = 100  # sales shown and exported with a sale_id label
    # an ended sale stays live at least this long, then until it is drained (core/live_sales.py)
    live_ended_grace_s: int = 3600
    # waiting room (flashsale/room/): tickets per sale, the admitter's step
    room_tickets_max: int = 1_000_000
    room_admit_interval_ms: int = 100
    # the lottery's draws (room/tickets.py lottery_draws): None, the OS's CSPRNG; a seed,
    # reproducible draws for tests. Never read from the environment: a known seed
    # would make the lottery's order predictable
    room_lottery_seed: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``env`` (default ``os.environ``); raise ConfigError."""
        env = os.environ if env is None else env
        return cls(
            **_secrets_from(env), **_redis_from(env), **_process_from(env),
            **_pipeline_from(env), **_front_from(env),
        )

    @property
    def redis_given(self) -> bool:
        """A Redis is configured (a URL or Sentinels): no embedded one starts."""
        return bool(self.redis_url or self.redis_sentinels)

    def with_urls(self, redis_url: str | None, database_url: str | None) -> Settings:
        """A copy whose missing URLs are filled in (by the embedded servers)."""
        return replace(
            self,
            redis_url=self.redis_url or (None if self.redis_sentinels else redis_url),
            database_url=self.database_url or database_url,
        )

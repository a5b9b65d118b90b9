"""Process plumbing for the CLI: uvloop, signals, embedded servers, secrets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from flashsale.config import Settings
from flashsale.ops import logs
from flashsale.run.embedded.servers import EmbeddedError, EmbeddedServers
from flashsale.run.secrets_file import SECRETS_FILE as SECRETS_FILE
from flashsale.run.secrets_file import keep_secrets

T = TypeVar("T")
log = logging.getLogger("flashsale")

_SECRET_VARS = {
    "FLASHSALE_ADMIN_TOKEN": "admin_token",
    "FLASHSALE_JWT_SECRET": "jwt_secret",
    "FLASHSALE_WEBHOOK_SECRET": "webhook_secret",
    "FLASHSALE_PASS_SECRET": "pass_secret",
}


class _OneLineExceptions(logging.Filter):
    """A library's expected error, logged with its traceback, on one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {exc}"
            record.args = None
            record.exc_info = record.exc_text = None
        return True


def setup_logging(fmt: str = "text", level: str = "INFO") -> None:
    """Text or JSON lines (Settings.log_format, see flashsale/ops/logs.py) at
    Settings.log_level."""
    logs.setup(fmt, level)
    # asyncpg's pool logs a traceback each time it cannot refill itself, e.g.
    # while an embedded PostgreSQL is being restarted
    logging.getLogger("asyncpg.pool").addFilter(_OneLineExceptions())


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def stop_event() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (installed on the running loop)."""
    """An event set by SIGINT or SIGTERM (installed on the running loop), or
    when an embedded server died for good (see :func:`backing_servers`)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def server_failed(_reason: str) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed already
            loop.call_soon_threadsafe(stop.set)

    on_server_failure(server_failed)
    return stop


# The embedded servers behind this process (set by backing_servers).
_servers: list[EmbeddedServers] = []
_servers_lock = threading.Lock()


def on_server_failure(listener: Callable[[str], None]) -> None:
    """Call ``listener(reason)`` (from another thread) when an embedded server
    of this process died and could not be restarted."""
    with _servers_lock:
        current = list(_servers)
    for servers in current:
        servers.add_failure_listener(listener)


def keep_generated_secrets(settings: Settings) -> Settings:
    """Secrets not given in the environment are generated once and kept in the
    data dir (mode 0600), so tokens minted by `flashsale token` stay valid
    across restarts of `flashsale up`."""
    if not settings.generated:
        return settings
    def generated(var: str) -> Callable[[], str]:
        return lambda: str(getattr(settings, _SECRET_VARS[var]))

    stored = keep_secrets(settings.data_dir, {var: generated(var) for var in settings.generated})
    return replace(
        settings,
        pass_secret=stored["FLASHSALE_PASS_SECRET"] if "FLASHSALE_PASS_SECRET" in settings.generated
        else settings.pass_secret,
        admin_token=stored["FLASHSALE_ADMIN_TOKEN"] if "FLASHSALE_ADMIN_TOKEN" in settings.generated
        else settings.admin_token,
        jwt_secret=stored["FLASHSALE_JWT_SECRET"] if "FLASHSALE_JWT_SECRET" in settings.generated
        else settings.jwt_secret,
        webhook_secret=stored["FLASHSALE_WEBHOOK_SECRET"]
        if "FLASHSALE_WEBHOOK_SECRET" in settings.generated else settings.webhook_secret,
    )


@contextlib.contextmanager
def backing_servers(settings: Settings) -> Iterator[Settings]:
    """Settings with both URLs: the configured ones, or embedded child servers.

    The embedded servers are supervised: a dead one is restarted on its port.
    If one cannot be, :func:`stop_event` fires (the command stops as on
    SIGTERM) and leaving this context raises EmbeddedError with the one-line
    reason, which the CLI prints before exiting with status 1.
    """
    if settings.redis_given and settings.database_url:
        yield settings
        return
    servers = EmbeddedServers.from_settings(settings, Path(settings.data_dir).resolve())
    servers.start()
    with _servers_lock:
        _servers.append(servers)
    try:
        yield settings.with_urls(servers.redis_url, servers.database_url)
    finally:
        with _servers_lock:
            _servers.remove(servers)
        servers.stop()
        if servers.failure is not None:
            raise EmbeddedError(servers.failure)

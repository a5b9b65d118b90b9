"""Process plumbing for the CLI: uvloop, signals, embedded servers, secrets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from flashsale.config import Settings

T = TypeVar("T")
log = logging.getLogger("flashsale")

SECRETS_FILE = "secrets.json"
_SECRET_VARS = {
    "FLASHSALE_ADMIN_TOKEN": "admin_token",
    "FLASHSALE_JWT_SECRET": "jwt_secret",
    "FLASHSALE_WEBHOOK_SECRET": "webhook_secret",
}


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("FLASHSALE_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def stop_event() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (installed on the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def keep_generated_secrets(settings: Settings) -> Settings:
    """Secrets not given in the environment are generated once and kept in the
    data dir (mode 0600), so tokens minted by `flashsale token` stay valid
    across restarts of `flashsale up`."""
    if not settings.generated:
        return settings
    path = settings.data_dir / SECRETS_FILE
    stored: dict[str, str] = {}
    if path.exists():
        with contextlib.suppress(ValueError, OSError):
            stored = json.loads(path.read_text())
    for var in settings.generated:
        stored[var] = stored.get(var) or getattr(settings, _SECRET_VARS[var])
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    # 0600 from the first byte: write_text-then-chmod left the secrets readable
    # by anyone (umask 022) for a moment, in a data dir others may traverse
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # a leftover tmp keeps its old mode otherwise
        f.write(json.dumps(stored, indent=2))
    tmp.replace(path)
    return replace(
        settings,
        admin_token=stored["FLASHSALE_ADMIN_TOKEN"] if "FLASHSALE_ADMIN_TOKEN" in settings.generated
        else settings.admin_token,
        jwt_secret=stored["FLASHSALE_JWT_SECRET"] if "FLASHSALE_JWT_SECRET" in settings.generated
        else settings.jwt_secret,
        webhook_secret=stored["FLASHSALE_WEBHOOK_SECRET"]
        if "FLASHSALE_WEBHOOK_SECRET" in settings.generated else settings.webhook_secret,
    )


@contextlib.contextmanager
def backing_servers(settings: Settings) -> Iterator[Settings]:
    """Settings with both URLs: the configured ones, or embedded child servers."""
    if settings.redis_given and settings.database_url:
        yield settings
        return
    from flashsale.embedded import EmbeddedServers

    servers = EmbeddedServers(
        Path(settings.data_dir).resolve(),
        redis=not settings.redis_given,
        postgres=settings.database_url is None,
        appendfsync=settings.redis_appendfsync,
    )
    servers.start()
    try:
        yield settings.with_urls(servers.redis_url, servers.database_url)
    finally:
        servers.stop()

"""The embedded servers' data directory: one process at a time (a lock file
naming its holder), and the servers' passwords, generated once and kept in
``secrets.json`` with the other secrets (0600)."""

from __future__ import annotations

import fcntl
import os
import re
import secrets
from pathlib import Path
from typing import IO

from flashsale.run.embedded.proc import EmbeddedError
from flashsale.run.secrets_file import keep_secrets

REDIS_PASSWORD_SECRET = "FLASHSALE_EMBEDDED_REDIS_PASSWORD"
POSTGRES_PASSWORD_SECRET = "FLASHSALE_EMBEDDED_POSTGRES_PASSWORD"
PASSWORD_SECRETS = {"redis": REDIS_PASSWORD_SECRET, "postgres": POSTGRES_PASSWORD_SECRET}
PASSWORD_RE = re.compile(r"^[A-Za-z0-9_-]{16,128}$")  # safe in a URL and a config file


def new_password() -> str:
    return secrets.token_urlsafe(32)


def redact(url: str | None) -> str | None:
    """The URL with its password shown as ``***``."""
    return re.sub(r"://([^:@/]*):[^@/]*@", r"://\1:***@", url) if url else url


def keep_passwords(
    data_dir: Path, given: dict[str, str | None], wanted: dict[str, bool]
) -> dict[str, str | None]:
    """``given`` with every wanted server's missing password filled in from
    secrets.json (generated and kept there the first time)."""
    missing = [s for s in PASSWORD_SECRETS if wanted[s] and given[s] is None]
    if not missing:
        return given
    kept = keep_secrets(data_dir, {PASSWORD_SECRETS[s]: new_password for s in missing})
    return {**given, **{s: kept[PASSWORD_SECRETS[s]] for s in missing}}


def lock(data_dir: Path) -> IO[bytes]:
    """Hold the data directory for this process (released when the file is closed)."""
    path = data_dir / ".embedded.lock"
    held = path.open("a+b")
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        held.seek(0)
        holder = held.read().decode(errors="replace").strip() or "?"
        held.close()
        raise EmbeddedError(
            f"data directory {data_dir} is in use by another process (pid {holder}); "
            "stop it or choose another FLASHSALE_DATA_DIR"
        ) from None
    held.truncate(0)
    held.write(str(os.getpid()).encode())
    held.flush()
    return held

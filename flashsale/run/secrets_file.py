"""The data dir's ``secrets.json``: secrets generated once and kept (mode 0600).

One file, one mechanism, for every generated secret: the admin token, JWT and
webhook secrets (:func:`flashsale.run.runtime.keep_generated_secrets`) and the
embedded servers' passwords (:mod:`flashsale.run.embedded.servers`). Writers hold an
exclusive ``flock`` on the data directory while they read, merge and replace
the file, so two of them never lose each other's entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

SECRETS_FILE = "secrets.json"


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def read_secrets(data_dir: Path) -> dict[str, str]:
    """The stored secrets ({} when the file is missing or unreadable)."""
    path = data_dir / SECRETS_FILE
    stored: dict[str, str] = {}
    if path.exists():
        with contextlib.suppress(ValueError, OSError):
            loaded = json.loads(path.read_text())
            if isinstance(loaded, dict):
                stored = {str(k): str(v) for k, v in loaded.items() if v}
    return stored


def keep_secrets(data_dir: Path, wanted: Mapping[str, Callable[[], str]]) -> dict[str, str]:
    """For each name in ``wanted``: the stored value, else a new one from its
    generator, stored now. Returns the values of the names in ``wanted``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / SECRETS_FILE
    with _locked(data_dir):
        stored = read_secrets(data_dir)
        for name, generate in wanted.items():
            stored[name] = stored.get(name) or generate()
        tmp = path.with_suffix(".tmp")
        # 0600 from the first byte: write_text-then-chmod left the secrets readable
        # by anyone (umask 022) for a moment, in a data dir others may traverse
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)  # a leftover tmp keeps its old mode otherwise
            f.write(json.dumps(stored, indent=2))
        tmp.replace(path)
    return {name: stored[name] for name in wanted}

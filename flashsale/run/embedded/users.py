"""The unprivileged user the embedded servers run as under root (initdb and
postgres refuse root), and directories and files only that user can read."""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flashsale.run.embedded.proc import EmbeddedError

# ---------------------------------------------------------------------------
# Unprivileged user (root cannot run initdb/postgres)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RunAs:
    name: str
    uid: int
    gid: int


def _user_by_name(name: str) -> RunAs:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise EmbeddedError(
            f"user {name!r} (to run the embedded servers as) does not exist"
        ) from None
    if entry.pw_uid == 0:
        raise EmbeddedError(f"user {name!r} is root; PostgreSQL refuses to run as root")
    return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _existing_owner(dirs: Sequence[Path]) -> RunAs | None:
    for path in dirs:
        with contextlib.suppress(OSError, KeyError):
            uid = path.stat().st_uid
            if uid != 0:
                entry = pwd.getpwuid(uid)
                return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)
    return None


def choose_run_as(data_dir: Path, override: str | None = None) -> RunAs | None:
    """None when not root: the servers then run as the current user
    (``override`` is FLASHSALE_EMBEDDED_USER)."""
    if os.geteuid() != 0:
        return None
    if override:
        return _user_by_name(override)
    owner = _existing_owner([data_dir / "postgres", data_dir / "redis"])
    return owner if owner is not None else _user_by_name("nobody")


def _can_traverse(st: os.stat_result, who: RunAs) -> bool:
    if st.st_uid == who.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == who.gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def check_reachable(directory: Path, who: RunAs, what: str, path: Path) -> None:
    """``directory`` and every directory above it must be searchable by ``who``."""
    for parent in (*reversed(directory.parents), directory):
        st = parent.stat()
        if not _can_traverse(st, who):
            raise EmbeddedError(
                f"{what} {path} is not reachable by user {who.name!r}, which runs the "
                f"embedded servers because PostgreSQL refuses to run as root: "
                f"{parent} has mode {stat.S_IMODE(st.st_mode):04o}. Use a directory "
                f"under a world-searchable path (e.g. FLASHSALE_DATA_DIR in the "
                f"repository), `chmod o+x {parent}`, or set FLASHSALE_EMBEDDED_USER"
            )


def _chown_tree(path: Path, who: RunAs) -> None:
    if path.stat().st_uid == who.uid and path.stat().st_gid == who.gid:
        return
    os.chown(path, who.uid, who.gid)
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            os.lchown(os.path.join(root, name), who.uid, who.gid)


def private_dir(path: Path, who: RunAs | None) -> Path:
    """Create ``path`` (mode 0700), owned by ``who`` when given."""
    path.mkdir(parents=True, exist_ok=True)
    if who is not None:
        _chown_tree(path, who)
    path.chmod(0o700)
    return path


def private_file(path: Path, content: str, who: RunAs | None) -> Path:
    """Write ``content`` to ``path`` atomically, mode 0600 from the first byte,
    owned by ``who`` when given (the server reads it, nobody else)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), 0o600)  # a leftover tmp keeps its old mode otherwise
        if who is not None:
            os.fchown(fh.fileno(), who.uid, who.gid)
        fh.write(content)
    tmp.replace(path)
    return path



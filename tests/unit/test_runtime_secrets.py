"""Generated secrets are kept in FLASHSALE_DATA_DIR/secrets.json, private from the start."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from flashsale.config import Settings
from flashsale.run import runtime


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_generated_secrets_are_kept_and_reused(tmp_path: Path, open_umask: None) -> None:
    env = {"FLASHSALE_DATA_DIR": str(tmp_path), "FLASHSALE_JWT_SECRET": "given-secret-0123456789"}
    first = runtime.keep_generated_secrets(Settings.from_env(env))
    second = runtime.keep_generated_secrets(Settings.from_env(env))
    assert (first.admin_token, first.webhook_secret) == (second.admin_token, second.webhook_secret)
    assert first.pass_secret == second.pass_secret  # the waiting room's pass secret too
    assert first.jwt_secret == second.jwt_secret == "given-secret-0123456789"
    stored = json.loads((tmp_path / runtime.SECRETS_FILE).read_text())
    assert set(stored) == {
        "FLASHSALE_ADMIN_TOKEN", "FLASHSALE_WEBHOOK_SECRET", "FLASHSALE_PASS_SECRET"
    }
    assert stored["FLASHSALE_ADMIN_TOKEN"] == first.admin_token


def test_secrets_file_is_never_readable_by_others(
    tmp_path: Path, open_umask: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even a leftover temp file with open permissions, and a umask of 0, never
    lets the secrets sit in a file readable by group or others."""
    leftover = tmp_path / "secrets.tmp"
    leftover.write_text("{}")
    leftover.chmod(0o666)
    seen_modes: list[int] = []
    real_replace = Path.replace

    def checking_replace(self: Path, target: str | os.PathLike[str]) -> Path:
        seen_modes.append(stat.S_IMODE(self.stat().st_mode))
        return real_replace(self, target)

    real_dumps = json.dumps

    def checking_dumps(obj: object, **kw: object) -> str:
        # by the time the content exists, any temp file on disk must be private
        if leftover.exists():
            seen_modes.append(stat.S_IMODE(leftover.stat().st_mode))
        return real_dumps(obj, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "replace", checking_replace)
    monkeypatch.setattr(json, "dumps", checking_dumps)
    runtime.keep_generated_secrets(Settings.from_env({"FLASHSALE_DATA_DIR": str(tmp_path)}))
    final = stat.S_IMODE((tmp_path / runtime.SECRETS_FILE).stat().st_mode)
    assert final == 0o600
    assert seen_modes and all(m & 0o077 == 0 for m in seen_modes), [oct(m) for m in seen_modes]

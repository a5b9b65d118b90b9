"""The one Lua loader's includes (flashsale/core/scripts.py): code shared by
scripts lives once in lua/lib/ and is inlined, once, before registration."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from redis.asyncio import Redis

from flashsale.core.scripts import SCRIPT_FILES, Scripts, ScriptSourceError, lua_dir, source

_FUNCTION = re.compile(r"^local function (\w+)", re.MULTILINE)
_DIRECTIVE = re.compile(r"^--\s*@include\b", re.MULTILINE)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_an_include_is_inlined_once_where_it_is_first_named(tmp_path: Path) -> None:
    base = _tree(tmp_path, {
        "lib/a.lua": "local function a() return 1 end\n",
        "lib/b.lua": '-- @include "lib/a.lua"\nlocal function b() return a() + 1 end\n',
        "s-1.lua": '--[[ header ]]\n-- @include "lib/a.lua"\n-- @include "lib/b.lua"\n'
                   '--   @include "lib/a.lua"\nreturn b()\n',
    })
    text = source("s-1.lua", base)
    assert text.count("local function a()") == 1
    assert text.count("local function b()") == 1
    assert text.index("local function a()") < text.index("local function b()")
    assert text.startswith("--[[ header ]]\n")
    assert text.endswith("return b()\n")
    assert _DIRECTIVE.search(text) is None


@pytest.mark.parametrize(("line", "says"), [
    ('-- @include "lib/gone.lua"', "'lib/gone.lua' not found"),
    ("-- @include lib/a.lua", "malformed include"),
    ("-- @include", "malformed include"),
    ('-- @include "../outside.lua"', "outside"),
])
def test_a_bad_include_fails_loudly(tmp_path: Path, line: str, says: str) -> None:
    (tmp_path / "outside.lua").write_text("return 0\n")
    base = _tree(tmp_path / "lua", {"lib/a.lua": "local x = 1\n", "s-1.lua": f"-- x\n{line}\n"})
    with pytest.raises(ScriptSourceError, match=re.escape(says)) as exc:
        source("s-1.lua", base)
    assert "s-1.lua, line 2" in str(exc.value)


async def test_a_missing_include_fails_registration_not_a_call(tmp_path: Path) -> None:
    base = tmp_path / "lua"
    shutil.copytree(lua_dir(), base)
    (base / "lib" / "checks.lua").unlink()
    client = Redis()  # register_script sends nothing: no server is needed to fail
    try:
        with pytest.raises(ScriptSourceError, match=re.escape("'lib/checks.lua' not found")):
            Scripts.register(client, base)
    finally:
        await client.aclose()


def test_every_shipped_script_resolves_and_defines_each_helper_once() -> None:
    lib = {name for path in (lua_dir() / "lib").glob("*.lua")
           for name in _FUNCTION.findall(path.read_text())}
    assert {"int", "key_types", "counter", "hold", "group_exists", "trim_acked",
            "sale_missing"} <= lib
    for fname in SCRIPT_FILES.values():
        own = _FUNCTION.findall((lua_dir() / fname).read_text())
        assert not set(own) & lib, f"{fname} writes a lib/ helper again: {set(own) & lib}"
        text = source(fname)
        assert _DIRECTIVE.search(text) is None, fname
        defined = _FUNCTION.findall(text)
        assert len(defined) == len(set(defined)), f"{fname}: a helper inlined twice"


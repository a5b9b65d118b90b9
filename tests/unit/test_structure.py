"""The package's shape (house style): no import cycle, an import chain no
deeper than scripts/structure.py's IMPORT_DEPTH_MAX, no module over 400
lines, no function over 70 (scripts/structure.py measures them)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "structure.py"


def _structure() -> ModuleType:
    spec = importlib.util.spec_from_file_location("structure", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["structure"] = module
    spec.loader.exec_module(module)
    return module


def test_no_import_cycle() -> None:
    s = _structure()
    assert s.cycles(s.graph()) == []


def test_no_module_or_function_past_its_bound() -> None:
    long_modules, long_functions = _structure().sizes()
    assert long_modules == [], f"modules over 400 lines: {long_modules}"
    assert long_functions == [], f"functions over 70 lines: {long_functions}"


def test_import_depth_within_its_bound() -> None:
    s = _structure()
    depth, chain = s.depth(s.graph())
    assert depth <= s.IMPORT_DEPTH_MAX, f"import depth {depth}: {' -> '.join(chain)}"


def test_the_checker_measures_depth_in_modules() -> None:
    s = _structure()
    assert s.depth({"a": {"b"}, "b": {"c"}, "c": set()}) == (3, ["a", "b", "c"])


def test_the_checker_sees_a_cycle() -> None:
    s = _structure()
    assert s.cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]

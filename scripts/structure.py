"""The package's shape: import cycles, import depth, module and function sizes.

    python scripts/structure.py            # report
    python scripts/structure.py --check    # exit 1 past the bounds (tests/unit/test_structure.py)

Bounds: no import cycle, import depth at most IMPORT_DEPTH_MAX, modules at
most MODULE_LINES_MAX lines, functions at most FUNCTION_LINES_MAX.

Depth is the longest chain of module-level imports between flashsale's own
modules (imports under ``if TYPE_CHECKING:`` and inside functions do not count:
they do not run at import time).
"""

from __future__ import annotations

import argparse
import ast
import sys
from functools import cache
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "flashsale"
MODULE_LINES_MAX = 400
FUNCTION_LINES_MAX = 70
# the longest chain of module-level imports, in modules (was 17 before issue 11's
# layout, 13 after it; cut to 10 by leaves and type-only imports)
IMPORT_DEPTH_MAX = 10


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Own modules imported at module level by ``name``."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    body = list(tree.body)
    while body:
        node = body.pop(0)
        if isinstance(node, ast.If) and not _is_type_checking(node):
            body.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            body.extend(node.body)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    out = set()
    for f in found:
        while f and f not in known:
            f = f.rpartition(".")[0]
        if f and f != name and f != "flashsale":
            out.add(f)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {n: imports(n, p, known) for n, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                found.append([*stack[stack.index(m):], m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)
    return found


def depth(g: dict[str, set[str]]) -> tuple[int, list[str]]:
    @cache
    def longest(n: str, seen: frozenset[str] = frozenset()) -> tuple[str, ...]:
        best: tuple[str, ...] = ()
        for m in g[n]:
            if m in seen:
                continue
            chain = longest(m, seen | {n})
            if len(chain) > len(best):
                best = chain
        return (n, *best)

    chain = max((longest(n) for n in g), key=len)
    return len(chain), list(chain)


def sizes() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    long_modules, long_functions = [], []
    for name, path in modules().items():
        text = path.read_text()
        lines = text.count("\n")
        if lines > MODULE_LINES_MAX:
            long_modules.append((name, lines))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > FUNCTION_LINES_MAX:
                    long_functions.append((f"{name}.{node.name}", n))
    return long_modules, long_functions


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    g = graph()
    cyc = cycles(g)
    d, chain = depth(g)
    long_modules, long_functions = sizes()
    print(f"modules: {len(g)}; import depth: {d} (bound {IMPORT_DEPTH_MAX}: {' -> '.join(chain)})")
    print(f"import cycles: {len(cyc)}")
    for c in cyc:
        print("  " + " -> ".join(c))
    print(f"modules over {MODULE_LINES_MAX} lines: {len(long_modules)}")
    for n, lines in long_modules:
        print(f"  {n}: {lines}")
    print(f"functions over {FUNCTION_LINES_MAX} lines: {len(long_functions)}")
    for n, lines in long_functions:
        print(f"  {n}: {lines}")
    bad = bool(cyc or long_modules or long_functions or d > IMPORT_DEPTH_MAX)
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())

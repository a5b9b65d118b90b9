"""docs/OBSERVABILITY.md stays true to deploy/ and the code: every Grafana
panel has its line, naming the metrics its queries use, and every metric the
service registers is in the metrics list."""

from __future__ import annotations

import json
import re
from pathlib import Path

from flashsale.ops.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "OBSERVABILITY.md").read_text()
NAME_RE = re.compile(r"\bflashsale_[a-z0-9_]+\b")


def _section(title: str) -> str:
    start = DOC.index(title)
    end = DOC.find("\n#", start + len(title))
    return DOC[start:] if end < 0 else DOC[start:end]


def test_every_grafana_panel_has_its_line() -> None:
    panels = json.loads((REPO / "deploy/prometheus/grafana-dashboard.json").read_text())["panels"]
    table = _section("### Grafana panels")
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()
            if line.startswith("| ") and not line.startswith(("| panel", "| ---"))}
    assert set(rows) == {p["title"] for p in panels}, set(rows) ^ {p["title"] for p in panels}
    for p in panels:
        used = {n.removesuffix("_bucket") for t in p["targets"] for n in NAME_RE.findall(t["expr"])}
        named = {n.removesuffix("_bucket") for n in NAME_RE.findall(rows[p["title"]])}
        assert used <= named, (p["title"], used - named)


def test_every_metric_is_listed() -> None:
    listed = _section("### Metrics")
    for family in Metrics().registry.collect():
        short = family.name.removeprefix("flashsale_")
        name = short + "_total" if family.type == "counter" else short
        assert re.search(rf"`{re.escape(name)}[`{{]", listed), f"{name} is not in the list"

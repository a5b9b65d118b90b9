"""latest.md's "Waiting room" section, written from room.json (bench/room.py)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.room import add_section

ROOM = {"concurrency": 64, "duration_s": 8.0, "tickets": 50_000, "echo_per_s": 10_891.5,
        "polls_per_s": 4_717.0, "polls_vs_echo": 0.433, "poll_statuses": {"200": 37_773},
        "joins_per_s": 2_597.7, "redis_bytes_per_ticket": 420.7, "client": "closed loop"}


def test_the_section_has_room_json_figures_once_and_keeps_the_others(tmp_path: Path) -> None:
    md, js = tmp_path / "latest.md", tmp_path / "room.json"
    md.write_text("# bench\n\n## Targets\n\n| a |\n\n## Reserve with one replica\n\n| b |\n")
    js.write_text(json.dumps(ROOM))
    add_section(md, js)
    text = md.read_text()
    for figure in ("| polls/s (GET ticket) | 4,717.0 |", "| polls vs echo | 0.433 |",
                   "| joins/s (POST queue) | 2,597.7 |",
                   "| Redis bytes per waiting ticket | 420.7 |"):
        assert figure in text, text
    assert text.index("## Reserve with one replica") < text.index("## Waiting room")
    js.write_text(json.dumps({**ROOM, "polls_per_s": 5_000.0}))
    add_section(md, js)  # a section already there is replaced, not repeated
    again = md.read_text()
    assert again.count("## Waiting room") == 1 and "| polls/s (GET ticket) | 5,000.0 |" in again
    assert "| b |" in again and "| a |" in again
    md.write_text(again + "\n## Later\n\nx\n")
    add_section(md, js)  # a section in the middle: the one after it stays
    last = md.read_text()
    assert last.count("## Waiting room") == 1 and "## Later\n\nx" in last, last

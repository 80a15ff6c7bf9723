"""Reading a display session file for `cytoedge adapt`: decisions count, slide events are not errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from edge.sitedata import _decisions


def test_slide_end_and_signoff_lines_are_neither_decisions_nor_unreadable(tmp_path: Path) -> None:
    session = tmp_path / "slide-1.jsonl"
    lines = [
        {"run": "r1", "frame_id": 3, "cell_id": 1, "label": "neutrophil", "action": "accept"},
        {"event": "slide-end", "slide": "1", "started_at": 1.0, "ended_at": 2.0},
        {"event": "signoff", "name": "A. Reviewer", "time": 3.0},
        "not json at all",
    ]
    session.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    skipped: Counter[str] = Counter()
    decisions = _decisions(session, skipped)
    assert list(decisions) == [("r1", 3, 1)]
    assert skipped == Counter({"unreadable session line": 1})

"""`cytoedge watch` puts the domain alarm and the 'checked' state on the first line of its screen, and
shows rejected frames by reason only when the status carries a well-formed breakdown."""

from __future__ import annotations

from edge.commands.watch import Differential
from edge.messages import rejected_by_reason, rejections_text


def _cells(alarm: bool, checked: bool) -> dict:
    cell = {"kind": "wbc", "label": "neutrophil", "review": True, "first_seen": True}
    return {"cells": [cell], "domain_alarm": alarm, "domain_checked": checked}


def test_alarm_is_the_first_line_and_says_cells_go_to_review() -> None:
    differential = Differential()
    differential.add(_cells(alarm=True, checked=False))
    first = differential.render(None).splitlines()[0]
    assert first.startswith("!! DOMAIN ALARM") and "review" in first


def test_unchecked_state_is_shown_until_the_window_looks_familiar() -> None:
    differential = Differential()
    differential.add(_cells(alarm=False, checked=False))
    assert differential.render(None).splitlines()[0].startswith("CHECKING")
    differential.add(_cells(alarm=False, checked=True))
    assert differential.render(None).splitlines()[0].startswith("domain: checked")


def test_alarm_is_highlighted_on_a_terminal_only() -> None:
    differential = Differential()
    differential.add(_cells(alarm=True, checked=True))
    assert differential.render(None, colour=True).startswith("\x1b[")
    assert not differential.render(None, colour=False).startswith("\x1b[")


def test_a_status_without_or_with_a_malformed_breakdown_shows_no_line_and_no_traceback() -> None:
    """Older publishers send no breakdown; a broken one is ignored field by field, never fatal."""
    base = {"source_state": "streaming", "fps": 5.0, "latency_ms": {}, "model": "m", "warnings": []}
    malformed = [
        {"rejected": 3},
        {"rejected": 3, "rejected_by_reason": "lots"},
        {"rejected": 3, "rejected_by_reason": [["too_dark", 3]]},
        {"rejected": 3, "rejected_by_reason": {"too_dark": "3", "blurred": True, "no_cells": -1}},
    ]
    for frames in malformed:
        status = {**base, "frames": frames}
        assert rejected_by_reason(status) == {} and rejections_text(status) == ""
        assert "rejected frames" not in Differential().render(status)
    assert rejected_by_reason({**base, "frames": "nonsense"}) == {}
    mixed = {**base, "frames": {"rejected_by_reason": {"too_dark": 2, "odd": 1.5, "out_of_focus": 5}}}
    assert rejections_text(mixed) == "out_of_focus 5, too_dark 2"
    assert "rejected frames by reason: out_of_focus 5, too_dark 2" in Differential().render(mixed).splitlines()

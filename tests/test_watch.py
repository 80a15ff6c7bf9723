"""`cytoedge watch` puts the domain alarm and the 'checked' state on the first line of its screen."""

from __future__ import annotations

from edge.commands.watch import Differential


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

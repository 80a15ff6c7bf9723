"""Model cards are written in one place: json and markdown together, and marked blocks survive a re-render."""

from __future__ import annotations

import json
from pathlib import Path

from engines import card


def test_a_re_rendered_body_keeps_the_blocks_other_steps_added(tmp_path: Path) -> None:
    card.save(tmp_path, {"name": "m"}, "# Model card: m\n\nold body\n")
    card.update_block(tmp_path, "out-of-domain", lambda c: c.update(ood=1) or "\n".join(card.markers("out-of-domain")))
    card.update_block(tmp_path, "held-back", lambda c: c.update(held=2) or "\n".join(card.markers("held-back")))
    card.save(tmp_path, {"name": "m", "ood": 1, "held": 2}, "# Model card: m\n\nnew body\n")
    text = (tmp_path / "card.md").read_text()
    assert "new body" in text and "old body" not in text
    assert set(card.blocks(text)) == {"out-of-domain", "held-back"}
    assert json.loads((tmp_path / "card.json").read_text()) == {"name": "m", "ood": 1, "held": 2}


def test_updating_a_block_replaces_it_in_place_and_records_its_figures(tmp_path: Path) -> None:
    begin, end = card.markers("out-of-domain")
    card.save(tmp_path, {}, f"# Model card: m\n\n{begin}\nfirst\n{end}\n\n## Limitations\n")
    figures = card.update_block(tmp_path, "out-of-domain", lambda c: c.update(n=2) or f"{begin}\nsecond\n{end}")
    text = (tmp_path / "card.md").read_text()
    assert "second" in text and "first" not in text
    assert text.index("second") < text.index("## Limitations")  # replaced where it was, not appended
    assert figures == {"n": 2} and json.loads((tmp_path / "card.json").read_text()) == {"n": 2}


def test_a_body_that_renders_its_own_block_wins_over_the_old_one(tmp_path: Path) -> None:
    begin, end = card.markers("out-of-domain")
    card.save(tmp_path, {}, f"# m\n{begin}\nold\n{end}\n")
    card.save(tmp_path, {}, f"# m\n{begin}\nnew\n{end}\n")
    text = (tmp_path / "card.md").read_text()
    assert "new" in text and "old" not in text and text.count(begin) == 1

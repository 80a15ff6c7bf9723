"""Model cards: the one place a model folder's ``card.json`` and ``card.md`` are written.

Each engine renders its own card body from its own figures (a baseline, a student and a site model report
different things), but every card is written here: ``card.json`` and ``card.md`` together, atomically, and
the marked blocks that other steps add to a card (``<!-- cytoedge:NAME:begin -->`` … ``end``: the
out-of-domain figures, the held-back comparison) are refreshed in place by :func:`update_block` and survive
a re-render of the body by :func:`save`, so re-measuring one part of a card never drops another.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from edge.fileutil import atomic_write_json, atomic_write_text

FORMAT = "cytoedge-card/1"
_BLOCK = re.compile(r"<!-- cytoedge:(?P<name>[a-z0-9-]+):begin -->.*?<!-- cytoedge:(?P=name):end -->", re.S)


def markers(name: str) -> tuple[str, str]:
    """The begin and end comments around a named block of card.md."""
    return f"<!-- cytoedge:{name}:begin -->", f"<!-- cytoedge:{name}:end -->"


def blocks(markdown: str) -> dict[str, str]:
    """Every marked block in ``markdown``, by name, markers included."""
    return {m.group("name"): m.group(0) for m in _BLOCK.finditer(markdown)}


def upsert_block(markdown: str, name: str, section: str) -> str:
    """``markdown`` with the block ``name`` replaced by ``section`` (which carries its markers), or appended."""
    begin, end = markers(name)
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if pattern.search(markdown):
        return pattern.sub(lambda _: section, markdown)
    return markdown.rstrip("\n") + "\n\n" + section + "\n"


def save(model_dir: Path, card: dict, body: str) -> None:
    """Write card.json and card.md; blocks that the previous card.md had and ``body`` lacks are kept."""
    model_dir = Path(model_dir)
    md_path = model_dir / "card.md"
    previous = blocks(md_path.read_text(encoding="utf-8")) if md_path.is_file() else {}
    for name, section in previous.items():
        if name not in blocks(body):
            body = upsert_block(body, name, section)
    atomic_write_json(model_dir / "card.json", card)
    atomic_write_text(md_path, body if body.endswith("\n") else body + "\n")


def update_block(model_dir: Path, name: str, change: Callable[[dict], str]) -> dict:
    """Read card.json, let ``change`` update it and return the block's markdown, write both back."""
    model_dir = Path(model_dir)
    card_path = model_dir / "card.json"
    card = json.loads(card_path.read_text(encoding="utf-8")) if card_path.is_file() else {}
    section = change(card)
    md_path = model_dir / "card.md"
    text = md_path.read_text(encoding="utf-8") if md_path.is_file() else f"# Model card: {model_dir.name}\n"
    atomic_write_json(card_path, card)
    atomic_write_text(md_path, upsert_block(text, name, section))
    return card

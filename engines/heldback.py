"""The project's held-back comparison in a model card: figures measured outside this repository.

Issue 15's author measured the shipped models on data the project never sees (held-back PBC cells and
labelled white cells cut from BCCD frames) through ``cytoedge classify --json``. Those figures cannot be
recomputed here by design, so they live in one data file with their source (``engines/heldback.json``)
and this command copies them, unchanged, into a marked block of the named model cards:

    python -m engines.heldback engines/models/student-v1

Nothing else writes the block; the evaluate commands leave it alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engines import card

DATA = Path(__file__).with_name("heldback.json")
BLOCK = "held-back"
BEGIN, END = card.markers(BLOCK)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def render_section(data: dict, this_model: str) -> str:
    """Markdown: one row per model, this card's model in bold, with the source stated above the table."""
    cols = data["columns"]
    lines = [BEGIN, "## Held-back comparison (measured outside this repository)", "",
             f"Source: {data['source']}. Not reproducible from this repository (the data are kept back on "
             "purpose); copied by `python -m engines.heldback` from `engines/heldback.json`.", "",
             f"| model | {cols['pbc_heldback']} | {cols['bccd_white']} |", "|---|---|---|"]
    for name, row in data["models"].items():
        pbc_cell = _fmt(row.get("pbc_heldback"))
        if row.get("pbc_heldback_ece") is not None:
            pbc_cell += f" (ECE {row['pbc_heldback_ece']:.3f})"
        bccd = _fmt(row.get("bccd_white")) + (f" ({row['bccd_note']})" if row.get("bccd_note") else "")
        label = f"**{name}** (this card)" if name == this_model else name
        lines.append(f"| {label} | {pbc_cell} | {bccd} |")
    lines += ["", *(f"- {item}" for item in data.get("also_measured", [])), "", END]
    return "\n".join(lines)


def update_card(model_dir: Path, data: dict) -> None:
    """Replace (or append) the marked block of card.md and keep the figures in card.json under ``held_back``."""
    def change(figures: dict) -> str:
        figures["held_back"] = data
        return render_section(data, Path(model_dir).name)

    card.update_block(model_dir, BLOCK, change)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.heldback", description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="+", help="model folders whose cards get the block")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args(argv)
    data = json.loads(args.data.read_text(encoding="utf-8"))
    for folder in args.models:
        update_card(folder, data)
        print(f"held-back comparison written into {folder / 'card.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Choose the finder's defaults on the *train* frames of the shared microscopes (never test).

    python -m engines.finder.tune [--leave-out SOURCE] [--frames 40]

Coordinate search over the stain and size thresholds, maximising the mean over microscopes of
white-cell F1 plus half the platelet F2 (recall-weighted), at the scale ``calibrate`` estimates for each. With
``--leave-out``, that microscope's frames are not used, for the leave-one-microscope-out column.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import cv2
import numpy as np

from edge.calibrate import estimate_um_per_px
from edge.cellfinder import FinderParams, find_cells
from edge.fileutil import atomic_write_bytes
from engines.finder.bccd import match
from engines.finder.bench import site_frames
from engines.finder.data import SOURCES, available, frames

MICROSCOPES = {"bccd": "BCCD", "bccd-voc": "BCCD", "bcd": "BCD", "raabin": "Raabin"}
GRID = {
    "nucleus_delta": [16.0, 20.0, 24.0, 28.0, 32.0, 38.0],
    "cyto_delta": [6.0, 8.0, 10.0, 13.0, 16.0],
    "wbc_min_grow": [1.0, 1.15, 1.3, 1.45],
    "wbc_box_scale": [0.9, 1.0, 1.1, 1.2],
    "platelet_delta": [6.0, 8.0, 10.0, 13.0, 16.0],
    "platelet_peak": [12.0, 14.0, 16.0, 18.0, 20.0, 24.0, 28.0],
    "platelet_min_um": [0.6, 0.8, 1.0, 1.3],
    "platelet_max_um": [3.5, 4.5, 5.5],
    "platelet_box_um": [2.2, 2.8, 3.4],
    "platelet_br_delta": [16.0, 19.0, 22.0, 26.0],
    "platelet_br_peak": [22.0, 25.0, 28.0, 32.0],
    "wbc_min_nucleus_um2": [10.0, 15.0, 20.0, 30.0],
    "wbc_max_diameter_um": [16.0, 18.0, 20.0, 22.0],
}


def load(source: str, n: int) -> tuple[float, list[tuple[np.ndarray, dict]]]:
    scale = estimate_um_per_px(site_frames(source, 60)).um_per_px
    picked = [f for f in frames(source) if f.split == "train"][:n]
    data = []
    for f in picked:
        image = cv2.imread(str(f.image))
        if image is not None:
            data.append((image, f.boxes((image.shape[1], image.shape[0]))))
    return scale, data


def objective(sets: dict[str, tuple[float, list]], params: FinderParams) -> float:
    scores = []
    for scale, data in sets.values():
        tp = {"wbc": 0, "platelet": 0}
        found = dict(tp)
        truth = dict(tp)
        for image, boxes in data:
            dets = find_cells(image, scale, params)
            for kind in tp:
                mine = [d for d in dets if d.kind == kind]
                tp[kind] += match(mine, boxes[kind])
                found[kind] += len(mine)
                truth[kind] += len(boxes[kind])
        f1 = 2 * tp["wbc"] / max(1, found["wbc"] + truth["wbc"])
        # platelets: F2 (recall counts four times precision; the goal is recall, few false ones are cheap)
        f2 = 5 * tp["platelet"] / max(1, 4 * truth["platelet"] + found["platelet"])
        scores.append(f1 + 0.5 * f2)
    return float(np.mean(scores))


def tune(sets: dict[str, tuple[float, list]], start: FinderParams, rounds: int = 2) -> tuple[FinderParams, float]:
    best, best_score = start, objective(sets, start)
    for _ in range(rounds):
        for name, values in GRID.items():
            for value in values:
                trial = dataclasses.replace(best, **{name: value})
                value_score = objective(sets, trial)
                if value_score > best_score + 1e-6:
                    best, best_score = trial, value_score
            print(f"  {name} = {getattr(best, name)}  score {best_score:.4f}", flush=True)
    return best, best_score


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--leave-out", choices=sorted(set(MICROSCOPES.values())))
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--save", help="write the chosen parameters (all of them) to this JSON file")
    args = parser.parse_args(argv)
    if not available():
        print("the shared data (../shared/data) is not here", file=sys.stderr)
        return 2
    cv2.setNumThreads(1)
    sets = {s: load(s, args.frames) for s in SOURCES if MICROSCOPES[s] != args.leave_out}
    best, score = tune(sets, FinderParams(), args.rounds)
    changed = {f.name: getattr(best, f.name) for f in dataclasses.fields(best)
               if getattr(best, f.name) != getattr(FinderParams(), f.name)}
    print(f"score {score:.4f}; changed from the defaults: {changed}")
    if args.save:
        text = json.dumps({"left_out": args.leave_out, "train_score": round(score, 4),
                           "params": dataclasses.asdict(best)}, indent=1)
        atomic_write_bytes(Path(args.save), (text + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scale calibration against the annotated red cells of every shared source.

    python -m engines.finder.scale [--frames 30]

Truth: 7.5 µm over the median of (w + h) / 2 of the annotated red-cell boxes that lie wholly inside
the frame, on all frames of the source (the same 7.5 µm convention the estimate uses, so the comparison
tests the sizing, not the convention). Estimate: ``edge.calibrate.estimate_um_per_px`` on up to ``--frames``
val+test frames, unlabelled, as ``cytoedge calibrate site`` would see them. ``--fit`` prints the rim
factor (truth box size / segmented size) per source on the train frames only, the figure
``RIM_FACTOR`` was set from.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass

import cv2
import numpy as np

from edge.calibrate import (
    CROWDED_PERCENTILE,
    RBC_DIAMETER_UM,
    CalibrationError,
    _near_mode,
    crowded_cell_sizes,
    estimate_um_per_px,
    red_cell_sizes,
)
from engines.finder.data import SOURCES, Frame, available, frames, shared_data


def true_um_per_px(train: list[Frame]) -> tuple[float, int]:
    """7.5 µm / median size of the fully visible annotated red cells, and how many were used."""
    sizes = []
    for frame in train:
        image = cv2.imread(str(frame.image))
        if image is None:
            continue
        height, width = image.shape[:2]
        for x, y, w, h in frame.boxes((width, height))["rbc"]:
            if x > 2 and y > 2 and x + w < width - 2 and y + h < height - 2:
                sizes.append((w + h) / 2)
    return RBC_DIAMETER_UM / float(np.median(sizes)), len(sizes)


@dataclass
class ScaleRow:
    source: str
    truth: float
    truth_cells: int
    estimate: float | None
    summary: str

    @property
    def error(self) -> float | None:
        return None if self.estimate is None else self.estimate / self.truth - 1


def evaluate(source: str, n_frames: int = 30) -> ScaleRow:
    every = frames(source)
    truth, cells = true_um_per_px(every)
    test = [cv2.imread(str(f.image)) for f in every if f.split != "train"][:n_frames]
    try:
        estimate = estimate_um_per_px(test)
        return ScaleRow(source, truth, cells, estimate.um_per_px, estimate.summary())
    except CalibrationError as error:
        return ScaleRow(source, truth, cells, None, f"refused: {error}")


def rim_factors(source: str, n_frames: int = 60) -> tuple[float, float]:
    """Box size of the annotated red cells over the measured size, on train frames: for isolated
    cells (median) and for the crowded-field measure (its 70th percentile)."""
    train = [f for f in frames(source) if f.split == "train"][:n_frames]
    truth, _n = true_um_per_px(train)
    images = [cv2.imread(str(f.image)) for f in train]
    alone = _near_mode(np.concatenate([red_cell_sizes(i) for i in images]))
    crowded = _near_mode(np.concatenate([crowded_cell_sizes(i) for i in images]))
    box = RBC_DIAMETER_UM / truth
    return box / float(np.median(alone)), box / float(np.percentile(crowded, CROWDED_PERCENTILE))


CELLAVISION_REFERENCE = 0.10  # µm/px: PBC's CellaVision DM96 crops (pbc/ README: ~0.25 at 144 px from 360 px)


def evaluate_cellavision(n_frames: int) -> ScaleRow:
    """wbc-shift's cellavision-blog crops have no boxes: compared with the CellaVision DM96 scale."""
    manifest = shared_data() / "wbc-shift" / "manifest.csv"
    with open(manifest, newline="") as handle:
        paths = [row["path"] for row in csv.DictReader(handle) if row["domain"] == "cellavision-blog"]
    images = [cv2.imread(str(manifest.parent / p)) for p in paths[:n_frames]]
    try:
        estimate = estimate_um_per_px([i for i in images if i is not None])
        return ScaleRow("wbc-shift cellavision-blog*", CELLAVISION_REFERENCE, 0, estimate.um_per_px,
                        estimate.summary())
    except CalibrationError as error:
        return ScaleRow("wbc-shift cellavision-blog*", CELLAVISION_REFERENCE, 0, None, f"refused: {error}")


def table(rows: list[ScaleRow]) -> str:
    lines = ["| source | truth µm/px (boxes used) | estimated µm/px | error | calibrate says |",
             "|---|---|---|---|---|"]
    for r in rows:
        est = "refused" if r.estimate is None else f"{r.estimate:.4f}"
        err = "—" if r.error is None else f"{r.error:+.1%}"
        lines.append(f"| {r.source} | {r.truth:.4f} ({r.truth_cells}) | {est} | {err} | {r.summary} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--fit", action="store_true", help="print the rim factor per source (train+val)")
    args = parser.parse_args(argv)
    if not available():
        print("the shared data (../shared/data: txl-pbc, bccd) is not here", file=sys.stderr)
        return 2
    if args.fit:
        for source in SOURCES:
            alone, crowded = rim_factors(source)
            print(f"{source}: isolated-cell factor {alone:.3f}, crowded-field factor {crowded:.3f}")
        return 0
    rows = [evaluate(s, args.frames) for s in SOURCES] + [evaluate_cellavision(args.frames)]
    print(table(rows))
    print("\n*reference, not a measurement: the CellaVision DM96 scale of PBC's crops (no boxes in wbc-shift)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

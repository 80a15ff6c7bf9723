"""Scale calibration against the annotated red cells of every shared source.

    python -m engines.eval_scale [--frames 30]

Truth: 7.5 µm over the median of (w + h) / 2 of the annotated red-cell boxes that lie wholly inside
the frame, on all frames of the source (the same 7.5 µm convention the estimate uses, so the comparison
tests the sizing, not the convention). Estimate: ``edge.calibrate.estimate_um_per_px`` on up to ``--frames``
val+test frames, unlabelled, as ``cytoedge calibrate site`` would see them. ``--fit`` prints the rim
factor (truth box size / segmented size) per source on the train frames only, the figure
``RIM_FACTOR`` was set from.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import cv2
import numpy as np

from edge.calibrate import RBC_DIAMETER_UM, CalibrationError, estimate_um_per_px, red_cell_sizes
from engines.finder_data import SOURCES, Frame, available, frames


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


def rim_factor(source: str, n_frames: int = 60) -> float:
    """Box size of the annotated red cells / median segmented size, on train frames."""
    train = [f for f in frames(source) if f.split == "train"][:n_frames]
    truth, _n = true_um_per_px(train)
    sizes = np.concatenate([red_cell_sizes(cv2.imread(str(f.image))) for f in train])
    from edge.calibrate import _near_mode

    return RBC_DIAMETER_UM / truth / float(np.median(_near_mode(sizes)))


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
            print(f"{source}: rim factor {rim_factor(source):.3f}")
        return 0
    print(table([evaluate(s, args.frames) for s in SOURCES]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The before/after pictures of docs/new-microscope.md, from a Raabin frame (TXL-PBC test split).

    python -m engines.finder.figures [--out docs/img]

"Before": the finder as shipped before issue 14 (blue-minus-red stain, BCCD-tuned thresholds) at the
scale the old calibration gave for these frames (0.0848 µm/px). "After": `calibrate site` on the
unlabelled val+test frames, then the current finder. Red boxes: white cells found; yellow:
platelets found; thin green: red cells; blue: the annotated white cell.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from edge.calibrate import estimate_um_per_px
from edge.cellfinder import FinderParams, find_cells
from edge.fileutil import atomic_write_bytes
from engines.finder.bench import site_frames
from engines.finder.data import available, frames

BEFORE = FinderParams(stain_od=False, nucleus_delta=40.0, wbc_min_nucleus_um2=15.0, cyto_delta=12.0,
                      platelet_delta=22.0, platelet_peak=28.0, platelet_box_um=2.8, wbc_max_diameter_um=22.0)
BEFORE_SCALE = 0.0848  # what the earlier iterative `calibrate scale` estimated on these frames
COLOURS = {"wbc": (0, 0, 230), "platelet": (0, 220, 255), "rbc": (0, 170, 0)}


def draw(image: np.ndarray, um_per_px: float, params: FinderParams, truth: list, title: str) -> np.ndarray:
    out = image.copy()
    for x, y, w, h in truth:
        cv2.rectangle(out, (x, y), (x + w, y + h), (230, 120, 0), 4)
    found = find_cells(image, um_per_px, params)
    for d in found:
        x, y, w, h = d.bbox
        cv2.rectangle(out, (x, y), (x + w, y + h), COLOURS[d.kind], 1 if d.kind == "rbc" else 3)
    n = {k: sum(d.kind == k for d in found) for k in COLOURS}
    cv2.rectangle(out, (0, 0), (out.shape[1], 44), (255, 255, 255), -1)
    cv2.putText(out, title, (8, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(out, f"{um_per_px:.4f} um/px: {n['wbc']} white, {n['platelet']} platelets, {n['rbc']} red",
                (8, 38), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    parser.add_argument("--index", type=int, default=1, help="which Raabin test frame")
    args = parser.parse_args(argv)
    if not available():
        print("the shared data (../shared/data) is not here", file=sys.stderr)
        return 2
    frame = [f for f in frames("raabin") if f.split == "test"][args.index]
    image = cv2.imread(str(frame.image))
    truth = frame.boxes((image.shape[1], image.shape[0]))["wbc"]
    scale = estimate_um_per_px(site_frames("raabin", 60)).um_per_px
    pictures = {
        "newscope-before.jpg": draw(image, BEFORE_SCALE, BEFORE, truth, "before: BCCD-tuned finder, old scale"),
        "newscope-after.jpg": draw(image, scale, FinderParams(), truth, "after: calibrate site + current finder"),
    }
    for name, picture in pictures.items():
        small = cv2.resize(picture, (400, round(400 * picture.shape[0] / picture.shape[1])),
                           interpolation=cv2.INTER_AREA)
        ok, data = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 85])
        if ok:
            atomic_write_bytes(args.out / name, data.tobytes())
            print(args.out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())

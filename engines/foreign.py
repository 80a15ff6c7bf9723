"""Unlabelled white cells from other microscopes: txl-pbc's frames cut by their white-cell boxes.

``../shared/data/txl-pbc`` holds frames from three sources (Raabin-WBC, BCCD, BCD) with YOLO boxes for
white cells, red cells and platelets but no white-cell subtypes. They are the project's only unlabelled
cells from microscopes other than PBC's, used here (never as ground truth) for

* **distillation on foreign cells**: the diffusion teacher's posterior on them is a training signal
  for the student that no label can give (docs/robustness.md);
* **leave-one-microscope-out selection** without test labels: how a model spreads one source's white
  cells over the classes, compared with a normal differential (a model that calls every cell of a
  microscope one class has collapsed there, whatever the truth).

Scale, as the runtime must find it at a new microscope: a red cell is about 7.5 µm, so each source's
µm/px is 7.5 µm over the median side of its frames' red-cell boxes (boxes of whole, isolated red cells
dominate the median; touching the frame edge excluded). Each white cell is then cut at the model's
field around its box centre exactly as the runtime cuts a found cell (``edge.crops.cut_crops``).

    python -m engines.foreign cut --out .cache/foreign/white64.npz       # crops + source + frame, all splits
    python -m engines.foreign spread --cells .cache/foreign/white64.npz engines/models/student-v1/model.onnx
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import cv2
import numpy as np

from edge.crops import cut_crops
from engines import pbc

RED_CELL_UM = 7.5
FIELD_UM = 36.0
SIZE = 64
WHITE, RED = 0, 1
# Shares of a normal adult differential (engines.reference.NORMAL_MIX), the yardstick for a collapse.
NORMAL_MIX = {"neutrophil": 0.60, "lymphocyte": 0.30, "monocyte": 0.06, "eosinophil": 0.03, "basophil": 0.01}


def data_dir(explicit: str | Path | None = None) -> Path:
    return pbc.shared_dataset("txl-pbc", "CYTOEDGE_TXL_PBC", explicit)


def read_boxes(path: Path, width: int, height: int) -> list[tuple[int, tuple[int, int, int, int]]]:
    """YOLO lines -> (class, (x, y, w, h) in pixels)."""
    boxes = []
    for line in path.read_text().split("\n"):
        parts = line.split()
        if len(parts) != 5:
            continue
        c, xc, yc, w, h = int(parts[0]), *(float(v) for v in parts[1:])
        boxes.append((c, (round((xc - w / 2) * width), round((yc - h / 2) * height), round(w * width),
                          round(h * height))))
    return boxes


def _inside(box: tuple[int, int, int, int], width: int, height: int, margin: int = 2) -> bool:
    x, y, w, h = box
    return x > margin and y > margin and x + w < width - margin and y + h < height - margin


def source_scales(root: Path, rows: list[dict]) -> dict[str, dict]:
    """µm/px per source from the median side of its red-cell boxes that do not touch the frame edge."""
    sides: dict[str, list[float]] = {}
    for row in rows:
        width, height = int(row["width"]), int(row["height"])
        for c, box in read_boxes(root / row["labels"], width, height):
            if c == RED and _inside(box, width, height):
                sides.setdefault(row["source"], []).append((box[2] + box[3]) / 2)
    return {s: {"red_cell_px": float(np.median(v)), "um_per_px": RED_CELL_UM / float(np.median(v)), "n_red": len(v)}
            for s, v in sorted(sides.items())}


def white_cells(root: Path, field_um: float = FIELD_UM, size: int = SIZE) -> dict[str, np.ndarray | dict]:
    """Every white-cell box of every frame, cut at the model's field: crops, source, frame split, frame index."""
    with open(root / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    scales = source_scales(root, rows)
    crops, sources, splits, frames = [], [], [], []
    for index, row in enumerate(rows):
        image = cv2.imread(str(root / row["image"]), cv2.IMREAD_COLOR)
        if image is None:
            continue
        height, width = image.shape[:2]
        boxes = [b for c, b in read_boxes(root / row["labels"], width, height) if c == WHITE]
        if not boxes:
            continue
        crops.append(cut_crops(image, boxes, scales[row["source"]]["um_per_px"], field_um, size))
        sources += [row["source"]] * len(boxes)
        splits += [row["split"]] * len(boxes)
        frames += [index] * len(boxes)
    return {"crops": np.concatenate(crops), "source": np.array(sources), "split": np.array(splits),
            "frame": np.array(frames, np.int64), "scales": scales}


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def spread(predicted: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Share of cells per predicted class."""
    return {c: round(float((predicted == i).mean()), 4) for i, c in enumerate(classes)} if len(predicted) else {}


def collapse(shares: dict[str, float]) -> float:
    """Total-variation distance between the predicted spread and a normal differential (0 = the same mix,
    1 = nothing in common): a label-free sign that a model has collapsed on a microscope."""
    return round(0.5 * sum(abs(shares.get(c, 0.0) - NORMAL_MIX.get(c, 0.0)) for c in set(shares) | set(NORMAL_MIX)), 4)


def measure(model_path: Path, cells: dict[str, np.ndarray]) -> dict:
    """Per source: the model's class spread over its white cells, the distance of that spread from a normal
    differential, mean confidence and mean uncertainty output. Label-free; for selection, not for claims."""
    from edge.onnx_backend import OnnxRuntimeClassifier

    model = OnnxRuntimeClassifier(model_path, threads=1)
    classes = model.metadata.classes
    pred = model.classify(cells["crops"])
    result = {"model": model.model_id, "sources": {}}
    for source in sorted(set(cells["source"].tolist())):
        mask = cells["source"] == source
        shares = spread(pred.probs[mask].argmax(1), classes)
        result["sources"][source] = {"n": int(mask.sum()), "spread": shares, "distance_from_normal": collapse(shares),
                                     "mean_confidence": round(float(pred.probs[mask].max(1).mean()), 4),
                                     "mean_uncertainty": round(float(pred.uncertainty[mask].mean()), 4)}
    result["mean_distance_from_normal"] = round(float(np.mean(
        [s["distance_from_normal"] for s in result["sources"].values()])), 4)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.foreign", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cut", help="cut every white-cell box of txl-pbc at the model's field")
    c.add_argument("--data", default=None, help="txl-pbc folder (default ../shared/data/txl-pbc)")
    c.add_argument("--out", type=Path, required=True, help=".npz with crops, source, split, frame")
    m = sub.add_parser("spread", help="how models spread each source's white cells over the classes")
    m.add_argument("models", type=Path, nargs="+", help="model.onnx files")
    m.add_argument("--cells", type=Path, required=True, help="the .npz written by 'cut'")
    args = parser.parse_args(argv)
    if args.command == "spread":
        import json

        cells = load(args.cells)
        for model in args.models:
            print(json.dumps(measure(model, cells)))
        return 0
    root = data_dir(args.data)
    if not (root / "manifest.csv").is_file():
        print(f"no txl-pbc data at {root} (set --data or CYTOEDGE_TXL_PBC)", file=sys.stderr)
        return 2
    cells = white_cells(root)
    buffer = io.BytesIO()
    np.savez(buffer, crops=cells["crops"], source=cells["source"], split=cells["split"], frame=cells["frame"],
             scales=np.array(repr(cells["scales"])))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pbc.atomic_write_bytes(args.out, buffer.getvalue())
    counts = {s: int((cells["source"] == s).sum()) for s in np.unique(cells["source"])}
    print(f"wrote {args.out}: {len(cells['crops'])} white cells {counts}; scales {cells['scales']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

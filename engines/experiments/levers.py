"""One row per model for the robustness-lever table (docs/robustness.md): what selects, and what tests.

Selection figures (looked at to choose): PBC validation balanced accuracy, and the label-free
leave-one-microscope-out measure on txl-pbc's white cells from frames the students never trained on
(val/test frames): distance of each source's predicted spread from a normal differential
(``engines.foreign.collapse``). Test figures (reported, never used to choose): PBC test split and the
wbc-shift sets (tecom, cellavision-blog) at their matched scale.

    python -m engines.experiments.levers --cells .cache/foreign/white64.npz \
        --models engines/models/student-v1 .cache/levers/student-v2 ... --out engines/experiments/levers.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from edge.onnx_backend import OnnxRuntimeClassifier
from engines import evaluate, foreign, ood, pbc
from engines.baseline import FIELD_UM, INPUT_SIZE, PreparedData, TrainConfig, prepare_data


def inputs(cells_path: Path) -> tuple[Path, PreparedData, dict, dict]:
    """What every lever measurement needs: the PBC folder, the full prepared split, the foreign cells and the
    wbc-shift domains cut at the model's field."""
    root = pbc.data_dir(None)
    domains, _ = ood.domain_crops(pbc.CLASSES, FIELD_UM, INPUT_SIZE)
    return root, prepare_data(root, TrainConfig()), foreign.load(cells_path), domains


def row(folder: Path, data, cells: dict, domains: dict) -> dict:
    model = OnnxRuntimeClassifier(folder / "model.onnx", threads=1)
    classes = model.metadata.classes
    result: dict = {"model": model.model_id}
    for split in ("val", "test"):
        pred = model.classify(data.images[split]).probs.argmax(1)
        result[f"pbc_{split}_balanced_accuracy"] = round(
            evaluate.classification_metrics(pred, data.labels[split], classes)["balanced_accuracy"], 4)
    held = cells["split"] != "train"
    spread = foreign.measure(folder / "model.onnx", {k: v[held] for k, v in cells.items() if k != "scales"})
    result["lomo_distance_from_normal"] = {s: v["distance_from_normal"] for s, v in spread["sources"].items()}
    result["lomo_mean_distance"] = spread["mean_distance_from_normal"]
    for domain, (crops, labels) in domains.items():
        scored = ood.score(model, crops, labels)
        result[domain] = {k: scored[k] for k in ("balanced_accuracy", "ece", "risk_coverage")}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.experiments.levers", description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, nargs="+", required=True, help="model folders")
    parser.add_argument("--cells", type=Path, required=True, help="python -m engines.foreign cut output")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    _, data, cells, domains = inputs(args.cells)
    report = {"selection": ["pbc_val_balanced_accuracy", "lomo_mean_distance"],
              "tests": ["pbc_test_balanced_accuracy", *domains],
              "lomo_cells": {s: int(((cells["source"] == s) & (cells["split"] != "train")).sum())
                             for s in np.unique(cells["source"]).tolist()},
              "rows": {}}
    for folder in args.models:
        report["rows"][folder.name] = row(folder, data, cells, domains)
        print(folder.name, json.dumps(report["rows"][folder.name]))
    pbc.atomic_write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

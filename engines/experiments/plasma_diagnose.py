"""Why plasma-relative input did what it did (docs/robustness.md): how stable each domain's in-graph plasma
estimate is, which classes the lever models call each foreign domain's cells (mean share over seeds), and
PBC test balanced accuracy under a pure per-channel gain (the shift the lever removes by construction).

    python -m engines.experiments.plasma_diagnose --cells .cache/foreign/white64.npz \
        --out engines/experiments/results/plasma_diagnostics.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from edge.onnx_backend import OnnxRuntimeClassifier
from engines import evaluate, foreign, ood, pbc
from engines.baseline import FIELD_UM, INPUT_SIZE, TrainConfig, prepare_data, to_tensor
from engines.plasma_norm import PlasmaNorm


def plasma_spread(crops_bgr: np.ndarray) -> dict:
    """Per-channel (RGB) percentiles 5/50/95 of the plasma level the network's first layer estimates."""
    with torch.no_grad():
        level = PlasmaNorm([0.0] * 3, [1.0] * 3).plasma(to_tensor(crops_bgr)).flatten(1).numpy()
    return {f"p{q}": [round(float(v), 3) for v in np.percentile(level, q, axis=0)] for q in (5, 50, 95)}


# Per-channel (R, G, B) gains on PBC test crops, clipped to uint8: PBC's plasma (0.998, 0.894, 0.796) moved to
# tecom's (1.0, 1.0, 0.70), and a bluer lamp.
GAINS = {"tecom-like": (1.0, 1.12, 0.88), "bluer-lamp": (0.85, 1.0, 1.2)}


def gained(crops_bgr: np.ndarray, rgb: tuple[float, float, float]) -> np.ndarray:
    return np.clip(np.rint(crops_bgr.astype(np.float32) * np.float32(rgb[::-1])), 0, 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.experiments.plasma_diagnose",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=Path, required=True, help="python -m engines.foreign cut output")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", default=["bn+basic", "bn+basic+plasma", "bn+basic+ratio",
                                                           "bn+strong", "bn+strong+plasma", "bn+strong+ratio"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=pbc.REPO_ROOT / ".cache" / "levers")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = prepare_data(pbc.data_dir(None), TrainConfig(per_class_limit=200))
    full = prepare_data(pbc.data_dir(None), TrainConfig())
    tests = {"none": full.images["test"], **{g: gained(full.images["test"], v) for g, v in GAINS.items()}}
    domains, _ = ood.domain_crops(pbc.CLASSES, FIELD_UM, INPUT_SIZE)
    cells = foreign.load(args.cells)
    sets = {"pbc-train-subset": data.images["train"], **{d: c for d, (c, _) in domains.items()},
            **{s: cells["crops"][cells["source"] == s] for s in np.unique(cells["source"]).tolist()}}
    report: dict = {"plasma_estimate_rgb": {name: plasma_spread(crops) for name, crops in sets.items()},
                    "predicted_share": {}, "pbc_test_under_gain": {}, "gains_rgb": GAINS}
    for variant in args.variants:
        shares: dict[str, list[np.ndarray]] = {d: [] for d in domains}
        under_gain: dict[str, list[float]] = {g: [] for g in tests}
        for seed in range(args.seeds):
            path = args.work / f"{variant}-seed{seed}" / "model.onnx"
            if not path.is_file():
                continue
            model = OnnxRuntimeClassifier(path, threads=1)
            for domain, (crops, _) in domains.items():
                predicted = model.classify(crops).probs.argmax(1)
                shares[domain].append(np.bincount(predicted, minlength=len(pbc.CLASSES)) / len(predicted))
            for gain, crops in tests.items():
                predicted = model.classify(crops).probs.argmax(1)
                under_gain[gain].append(evaluate.classification_metrics(predicted, full.labels["test"], pbc.CLASSES)
                                        ["balanced_accuracy"])
        report["predicted_share"][variant] = {
            d: {c: round(float(v), 3) for c, v in zip(pbc.CLASSES, np.mean(s, axis=0), strict=True) if v >= 0.005}
            for d, s in shares.items() if s}
        report["pbc_test_under_gain"][variant] = {g: [round(float(np.mean(v)), 4), round(float(np.std(v)), 4)]
                                                  for g, v in under_gain.items() if v}
    pbc.atomic_write_json(args.out, report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

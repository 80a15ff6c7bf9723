"""Why plasma-relative input did what it did (docs/robustness.md): how stable each domain's in-graph plasma
estimate is, and which classes the lever models call each foreign domain's cells (mean share over seeds).

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
from engines import foreign, ood, pbc
from engines.baseline import FIELD_UM, INPUT_SIZE, TrainConfig, prepare_data, to_tensor
from engines.plasma_norm import PlasmaNorm


def plasma_spread(crops_bgr: np.ndarray) -> dict:
    """Per-channel (RGB) percentiles 5/50/95 of the plasma level the network's first layer estimates."""
    with torch.no_grad():
        level = PlasmaNorm([0.0] * 3, [1.0] * 3).plasma(to_tensor(crops_bgr)).flatten(1).numpy()
    return {f"p{q}": [round(float(v), 3) for v in np.percentile(level, q, axis=0)] for q in (5, 50, 95)}


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
    domains, _ = ood.domain_crops(pbc.CLASSES, FIELD_UM, INPUT_SIZE)
    cells = foreign.load(args.cells)
    sets = {"pbc-train-subset": data.images["train"], **{d: c for d, (c, _) in domains.items()},
            **{s: cells["crops"][cells["source"] == s] for s in np.unique(cells["source"]).tolist()}}
    report: dict = {"plasma_estimate_rgb": {name: plasma_spread(crops) for name, crops in sets.items()},
                    "predicted_share": {}}
    for variant in args.variants:
        shares: dict[str, list[np.ndarray]] = {d: [] for d in domains}
        for seed in range(args.seeds):
            path = args.work / f"{variant}-seed{seed}" / "model.onnx"
            if not path.is_file():
                continue
            model = OnnxRuntimeClassifier(path, threads=1)
            for domain, (crops, _) in domains.items():
                predicted = model.classify(crops).probs.argmax(1)
                shares[domain].append(np.bincount(predicted, minlength=len(pbc.CLASSES)) / len(predicted))
        report["predicted_share"][variant] = {
            d: {c: round(float(v), 3) for c, v in zip(pbc.CLASSES, np.mean(s, axis=0), strict=True) if v >= 0.005}
            for d, s in shares.items() if s}
    pbc.atomic_write_json(args.out, report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

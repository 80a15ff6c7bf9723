"""The diffusion teacher on other microscopes: the same wbc-shift protocol as ``engines.ood``, and how
well each model's own scores tell foreign cells from PBC cells.

    python -m engines.experiments.ood_teacher --teacher .cache/diffusion/teacher.pt \
        --calib .cache/teacher/teacher-calib.json --pbc-errors .cache/teacher/teacher-test.npz \
        --models engines/models/baseline-cnn/model.onnx engines/models/student-v1/model.onnx \
        --out engines/experiments/results/teacher-ood.json

The teacher has no ONNX file or runtime backend (it is ~100 ms per cell on a CPU core), so it is scored
here with its own code (``engines.teacher``), on crops cut exactly as ``engines.ood`` cuts them. Its PBC
side comes from the test-split errors already computed for its card, with the same timesteps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from edge.onnx_backend import OnnxRuntimeClassifier
from engines import evaluate, ood, pbc
from engines.baseline import FIELD_UM
from engines.compare import auroc
from engines.diffusion import load_teacher, to_diffusion_space
from engines.teacher import ScoreConfig, denoising_errors, squash, summarise

WHITE = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")


def teacher_scores(teacher: Path, crops: np.ndarray, timesteps: list[int], chunk: int = 32) -> tuple[np.ndarray, float]:
    """Denoising errors (N, C+1, K) with every class at every timestep (no pruning), and ms per cell."""
    from engines.latent import encode, is_latent_teacher, load_latent_teacher

    if is_latent_teacher(teacher):  # the latent teacher (engines/latent.py) scores the encoded crop
        model, _ = load_latent_teacher(teacher)

        def space(batch: np.ndarray) -> torch.Tensor:
            return encode(model.ae, batch)
    else:
        model, state = load_teacher(teacher)

        def space(batch: np.ndarray) -> torch.Tensor:
            return to_diffusion_space(batch, state["config"]["resolution"])
    cfg = ScoreConfig(timesteps=tuple(timesteps), prune_after=0)
    parts, began = [], time.perf_counter()
    for i in range(0, len(crops), chunk):
        errors, _ = denoising_errors(model, space(crops[i:i + chunk]), cfg)
        parts.append(errors)
    return np.concatenate(parts), (time.perf_counter() - began) / max(len(crops), 1) * 1e3


def figures(probs: np.ndarray, labels: np.ndarray, classes: list[str], review: np.ndarray) -> dict:
    metrics = evaluate.classification_metrics(probs.argmax(1), labels, classes)
    present = [c for c in classes if metrics["support"][c] > 0]
    return {"n": len(labels), "balanced_accuracy": round(metrics["balanced_accuracy"], 4),
            "per_class_recall": {c: round(metrics["per_class_recall"][c], 4) for c in present},
            "ece": round(evaluate.expected_calibration_error(probs, labels), 4),
            "mean_confidence": round(float(probs.max(1).mean()), 4), "review_share": round(float(review.mean()), 4)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.experiments.ood_teacher",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--calib", type=Path, required=True, help="teacher-calib.json (τ and anomaly squash)")
    parser.add_argument("--pbc-errors", type=Path, required=True, help="the teacher's errors on the PBC test split")
    parser.add_argument("--models", type=Path, nargs="*", default=[], help="ONNX models to compare on the same cells")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    for path in (args.teacher, args.calib, args.pbc_errors):
        if not path.is_file():
            print(f"skipped: {path} not found (train and label the teacher first, docs/diffusion.md)", file=sys.stderr)
            return 2
    if not (ood.data_dir(None) / "manifest.csv").is_file():
        print("skipped: no wbc-shift data (set CYTOEDGE_WBC_SHIFT)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    calib = json.loads(args.calib.read_text())
    pbc_lab = np.load(args.pbc_errors)
    classes = [str(c) for c in pbc_lab["classes"]]
    timesteps = [int(t) for t in pbc_lab["timesteps"]]
    q = calib["squash"][calib["primary_anomaly"]]

    def scored(errors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = summarise(errors, calib["tau"])
        anomaly = squash(s[calib["primary_anomaly"]], q["q50"], q["q95"])
        return s["posterior"], anomaly, (s["uncertainty"] > ood.REVIEW_UNCERTAINTY) | (anomaly > ood.REVIEW_ANOMALY)

    white = np.isin(pbc_lab["labels"], [classes.index(c) for c in WHITE])
    pbc_probs, pbc_anomaly, pbc_review = scored(pbc_lab["errors"])
    report: dict = {"teacher": str(args.teacher), "timesteps": timesteps, "tau": calib["tau"],
                    "anomaly": calib["primary_anomaly"], "pbc_test": figures(pbc_probs, pbc_lab["labels"], classes,
                                                                              pbc_review),
                    "domains": {}, "separation_auroc": {}}
    domains, _ = ood.domain_crops(classes, FIELD_UM, 64)
    # Each comparison model on the teacher's very PBC white cells, once.
    models = [OnnxRuntimeClassifier(path, threads=args.threads) for path in args.models]
    homes = [model.classify(evaluate.test_split(path.parent, pbc.data_dir(None))[1][pbc_lab["index"]][white])
             for model, path in zip(models, args.models, strict=True)]
    for domain, (crops, labels) in domains.items():
        errors, ms = teacher_scores(args.teacher, crops, timesteps)
        probs, anomaly, review = scored(errors)
        report["domains"][domain] = {**figures(probs, labels, classes, review), "ms_per_cell": round(ms, 1)}
        # Foreign white cells against PBC white cells: can each score alone tell them apart?
        positive = np.r_[np.zeros(int(white.sum()), bool), np.ones(len(labels), bool)]
        seps = {"teacher anomaly": auroc(np.r_[pbc_anomaly[white], anomaly], positive),
                "teacher 1 - max posterior": auroc(np.r_[1 - pbc_probs[white].max(1), 1 - probs.max(1)], positive)}
        for model, home in zip(models, homes, strict=True):
            away = model.classify(crops)
            name = model.metadata.name
            seps[f"{name} 1 - max softmax"] = auroc(np.r_[1 - home.probs.max(1), 1 - away.probs.max(1)], positive)
            seps[f"{name} anomaly"] = auroc(np.r_[home.anomaly, away.anomaly], positive)
        report["separation_auroc"][domain] = {k: round(float(v), 4) for k, v in seps.items()}
        print(f"{domain}: teacher bal_acc {report['domains'][domain]['balanced_accuracy']:.3f} "
              f"ece {report['domains'][domain]['ece']:.3f} review {report['domains'][domain]['review_share']:.2f} "
              f"({ms:.0f} ms/cell); separation AUROC {report['separation_auroc'][domain]}")
    pbc.atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Self-training with the diffusion teacher as the filter: the site's unlabelled cells, labelled by the
teacher where it is sure, fine-tune the CNN, with no reviewer labels at all.

    python -m engines.teacher_filter engines/models/baseline-robust/model.onnx \
        --teacher .cache/diffusion/teacher.pt --calib .cache/teacher/teacher-calib.json \
        --out docs/adapt-teacher-filter.json

Same wbc-shift protocol as ``python -m engines.adapt experiment`` (the fixed test half, split seed
12345; the pool half is the site's unlabelled cells), so the figures sit beside its table. The
teacher generalises differently from the CNN (docs/robustness.md: 65% against 43% on
cellavision-blog, but 22% on tecom), so two filters are measured: the teacher's most confident half of
each class it predicts (``teacher``), and only the cells where the teacher and the batch-norm-adapted
CNN agree (``agree``). The pseudo-labels' own accuracy is reported (from the true labels, which the
method never sees) to show why a filter worked or not.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from engines import evaluate, pbc
from engines.adapt import METHODS, adapt_model, load_weights, predict_probs, reestimate_batchnorm, replay_set
from engines.ood_teacher import domain_crops, teacher_scores
from engines.teacher import summarise

SPLIT_SEED = 12345  # engines.adapt.experiment's fixed test/pool split
FILTERS = ("teacher", "agree")


def confident_half(labels: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """Indices of the more confident half of each predicted class (at least one per class)."""
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        order = members[np.argsort(-confidence[members])]
        keep.extend(order[: max(1, len(order) // 2)])
    return np.sort(np.array(keep, np.int64))


def pseudo_labels(method: str, teacher_probs: np.ndarray, cnn_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(indices into the pool, their labels) that a filter keeps."""
    teacher_labels = teacher_probs.argmax(1)
    if method == "teacher":
        index = confident_half(teacher_labels, teacher_probs.max(1))
    elif method == "agree":
        index = np.flatnonzero(teacher_labels == cnn_probs.argmax(1))
    else:
        raise ValueError(f"unknown filter {method!r} ({', '.join(FILTERS)})")
    return index, teacher_labels[index]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.teacher_filter", description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="model.onnx with weights.pt beside it")
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    for path in (args.teacher, args.calib):
        if not path.is_file():
            print(f"skipped: {path} not found (train and calibrate the teacher first, docs/diffusion.md)",
                  file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    calib = json.loads(args.calib.read_text())
    base, meta = load_weights(args.model)
    if calib["classes"] != meta.classes:
        print(f"the teacher's classes {calib['classes']} are not the model's {meta.classes}", file=sys.stderr)
        return 2
    pbc_root = pbc.data_dir(None)
    _, pbc_images, pbc_labels = evaluate.test_split(args.model.parent, pbc_root)
    replay = replay_set(pbc_root, meta.classes, 50, meta.input_size)
    method = METHODS["bn+all+replay"]
    report: dict = {"model": str(args.model), "method": "bn+all+replay on pseudo-labels", "seeds": args.seeds,
                    "domains": {}}
    for domain, (crops, labels) in domain_crops(meta.input_size, meta.classes).items():
        order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
        test, pool = order[: len(order) // 2], order[len(order) // 2:]
        errors, ms = teacher_scores(args.teacher, crops[pool], calib["timesteps"])
        teacher_probs = summarise(errors, calib["tau"])["posterior"]
        bn_model = copy.deepcopy(base)
        reestimate_batchnorm(bn_model, crops[pool], meta)
        cnn_probs = predict_probs(bn_model, crops[pool], meta)
        rows = report["domains"].setdefault(domain, {
            "n_test": len(test), "n_pool": len(pool), "teacher_ms_per_cell": round(ms, 1),
            "teacher_pool_balanced_accuracy": round(evaluate.classification_metrics(
                teacher_probs.argmax(1), labels[pool], meta.classes)["balanced_accuracy"], 4),
            "results": []})
        for name in FILTERS:
            index, chosen = pseudo_labels(name, teacher_probs, cnn_probs)
            runs = []
            for seed in range(args.seeds):
                began = time.time()
                model = adapt_model(copy.deepcopy(base), meta, crops[pool], crops[pool][index], chosen,
                                    replace(method, seed=seed), replay, log=lambda *_: None)
                probs = predict_probs(model, crops[test], meta)
                pbc_probs = predict_probs(model, pbc_images, meta)
                runs.append({"seed": seed, "balanced_accuracy": evaluate.classification_metrics(
                    probs.argmax(1), labels[test], meta.classes)["balanced_accuracy"],
                    "ece": evaluate.expected_calibration_error(probs, labels[test]),
                    "pbc_balanced_accuracy": evaluate.classification_metrics(
                        pbc_probs.argmax(1), pbc_labels, meta.classes)["balanced_accuracy"],
                    "seconds": time.time() - began})
            summary = {k: (float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs])))
                       for k in ("balanced_accuracy", "ece", "pbc_balanced_accuracy")}
            rows["results"].append({"filter": name, "pseudo_labels": len(index),
                                    "pseudo_label_accuracy": round(float((chosen == labels[pool][index]).mean()), 4)
                                    if len(index) else None, "runs": runs, "mean_sd": summary})
            print(f"{domain} filter {name}: {len(index)} pseudo-labels "
                  f"({rows['results'][-1]['pseudo_label_accuracy']} right) -> bal_acc "
                  f"{summary['balanced_accuracy'][0]:.3f}±{summary['balanced_accuracy'][1]:.3f} "
                  f"pbc {summary['pbc_balanced_accuracy'][0]:.3f}")
    pbc.atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Self-training with the diffusion teacher as the filter: the site's unlabelled cells, labelled by the
teacher where it is sure, fine-tune the CNN, with no reviewer labels at all.

    python -m engines.experiments.teacher_filter engines/models/baseline-robust/model.onnx \
        --teacher .cache/diffusion/teacher.pt --calib .cache/teacher/teacher-calib.json \
        --out engines/experiments/results/adapt-teacher-filter.json

Same wbc-shift protocol as ``python -m engines.adapt.adaptation_curve`` (the fixed test half, split seed
12345; the pool half is the site's unlabelled cells), so the figures sit beside its table. The
teacher generalises differently from the CNN (docs/robustness.md: 65% against 43% on
cellavision-blog, but 22% on tecom), so two filters are measured: the teacher's most confident half of
each class it predicts (``teacher``), and only the cells where the teacher and the batch-norm-adapted
CNN agree (``agree``). The pseudo-labels' own accuracy is reported (from the true labels, which the
method never sees) to show why a filter worked or not.

With ``n`` reviewer labels (``--shots 20 50``; the same draws as the experiment's), the labels first
*check* the teacher: only if it names at least ``GATE`` of the labelled cells right are the agreeing
pseudo-labels added to them (``gated``); otherwise the labels are used alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from edge.modelmeta import ModelMetadata
from engines import evaluate, pbc
from engines.adapt import (
    METHODS,
    adapt_model,
    curve_split,
    draw_labelled,
    load_weights,
    predict_probs,
    reestimate_batchnorm,
    replay_set,
)
from engines.experiments.ood_teacher import teacher_scores
from engines.ood import domain_crops
from engines.teacher import summarise

SPLIT_SEED = 12345  # engines.adapt.adaptation_curve's fixed test/pool split
FILTERS = ("teacher", "agree")
GATE = 0.5  # the teacher must name at least half of the reviewed cells right before its pseudo-labels count


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


@dataclass
class Site:
    """One domain's cells split as in the experiment, with what the teacher and the AdaBN CNN say of the pool."""

    crops: np.ndarray
    labels: np.ndarray
    test: np.ndarray
    pool: np.ndarray
    teacher_probs: np.ndarray  # over the pool, in pool order
    cnn_probs: np.ndarray


@dataclass
class Setting:
    """The base network and everything a fine-tuning run needs besides the site's cells."""

    base: torch.nn.Module
    meta: ModelMetadata
    replay: tuple[np.ndarray, np.ndarray]
    pbc_images: np.ndarray
    pbc_labels: np.ndarray


def gated_draw(site: Site, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n reviewer labels (the experiment's draw), plus the agreeing pseudo-labels if the teacher names at
    least ``GATE`` of the reviewed cells right; returns (labelled dataset indices, their labels, pool
    positions of the pseudo-labelled cells)."""
    chosen = draw_labelled(site.pool, n, np.random.default_rng([seed, n]))
    position = {cell: k for k, cell in enumerate(site.pool)}
    at = np.array([position[c] for c in chosen], np.int64)
    teacher_right = float((site.teacher_probs[at].argmax(1) == site.labels[chosen]).mean()) if n else 0.0
    agree, _ = pseudo_labels("agree", site.teacher_probs, site.cnn_probs)
    extra = np.setdiff1d(agree, at) if teacher_right >= GATE else np.zeros(0, np.int64)
    return chosen, site.labels[chosen], extra


def run_once(setting: Setting, site: Site, crops: np.ndarray, labels: np.ndarray, seed: int) -> dict:
    """The default fine-tuning (bn+all+replay) on these crops/labels, scored on the test half and PBC."""
    began = time.time()
    cfg = replace(METHODS["bn+all+replay"], seed=seed)
    model = adapt_model(copy.deepcopy(setting.base), setting.meta, site.crops[site.pool], crops, labels, cfg,
                        setting.replay, log=lambda *_: None)
    probs = predict_probs(model, site.crops[site.test], setting.meta)
    pbc_probs = predict_probs(model, setting.pbc_images, setting.meta)
    classes = setting.meta.classes
    return {"seed": seed,
            "balanced_accuracy": evaluate.classification_metrics(probs.argmax(1), site.labels[site.test],
                                                                 classes)["balanced_accuracy"],
            "ece": evaluate.expected_calibration_error(probs, site.labels[site.test]),
            "pbc_balanced_accuracy": evaluate.classification_metrics(pbc_probs.argmax(1), setting.pbc_labels,
                                                                     classes)["balanced_accuracy"],
            "seconds": time.time() - began}


def summarise_runs(name: str, n: int, runs: list[dict], pseudo: list[int], right: list[int]) -> dict:
    summary = {k: (float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs])))
               for k in ("balanced_accuracy", "ece", "pbc_balanced_accuracy")}
    accuracy = round(sum(right) / sum(pseudo), 4) if sum(pseudo) else None
    print(f"n={n} {name}: {np.mean(pseudo):.0f} pseudo-labels ({accuracy} right) -> bal_acc "
          f"{summary['balanced_accuracy'][0]:.3f}±{summary['balanced_accuracy'][1]:.3f} "
          f"pbc {summary['pbc_balanced_accuracy'][0]:.3f}")
    return {"filter": name, "n_labels": n, "pseudo_labels_mean": float(np.mean(pseudo)),
            "pseudo_label_accuracy": accuracy, "runs": runs, "mean_sd": summary}


def measure_site(setting: Setting, site: Site, shots: list[int], seeds: int) -> list[dict]:
    results = []
    pool_labels = site.labels[site.pool]
    for name in FILTERS:  # no reviewer labels at all
        index, chosen = pseudo_labels(name, site.teacher_probs, site.cnn_probs)
        runs = [run_once(setting, site, site.crops[site.pool][index], chosen, seed) for seed in range(seeds)]
        right = int((chosen == pool_labels[index]).sum())
        results.append(summarise_runs(name, 0, runs, [len(index)] * seeds, [right] * seeds))
    for n in (n for n in shots if 0 < n <= len(site.pool)):
        runs, pseudo, right = [], [], []
        for seed in range(seeds):
            chosen, chosen_labels, extra = gated_draw(site, n, seed)
            extra_labels = site.teacher_probs[extra].argmax(1)
            crops = np.concatenate([site.crops[chosen], site.crops[site.pool][extra]])
            runs.append(run_once(setting, site, crops, np.concatenate([chosen_labels, extra_labels]), seed))
            pseudo.append(len(extra))
            right.append(int((extra_labels == pool_labels[extra]).sum()))
        results.append(summarise_runs("gated", n, runs, pseudo, right))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.experiments.teacher_filter",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="model.onnx with weights.pt beside it")
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--calib", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--shots", type=int, nargs="*", default=[20, 50],
                        help="reviewer label counts for the gated method (0 labels: the two filters always run)")
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
    setting = Setting(base, meta, replay_set(pbc_root, meta.classes, 50, meta.input_size), pbc_images, pbc_labels)
    report: dict = {"model": str(args.model), "method": "bn+all+replay on reviewer labels and/or pseudo-labels",
                    "gate": GATE, "seeds": args.seeds, "domains": {}}
    for domain, (crops, labels) in domain_crops(meta.classes, meta.field_um, meta.input_size)[0].items():
        test, pool = curve_split(len(labels), SPLIT_SEED)
        errors, ms = teacher_scores(args.teacher, crops[pool], calib["timesteps"])
        bn_model = copy.deepcopy(base)
        reestimate_batchnorm(bn_model, crops[pool], meta)
        site = Site(crops, labels, test, pool, summarise(errors, calib["tau"])["posterior"],
                    predict_probs(bn_model, crops[pool], meta))
        print(domain)
        report["domains"][domain] = {
            "n_test": len(test), "n_pool": len(pool), "teacher_ms_per_cell": round(ms, 1),
            "teacher_pool_balanced_accuracy": round(evaluate.classification_metrics(
                site.teacher_probs.argmax(1), labels[pool], meta.classes)["balanced_accuracy"], 4),
            "results": measure_site(setting, site, args.shots, args.seeds)}
    pbc.atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How much the normal-control calibration depends on the control donor really having the assumed differential.

    python -m engines.experiments.control_mismatch MODEL.onnx [MODEL.onnx ...] [--donors 20] [--out FILE.json]

``cytoedge adapt --normal-controls`` assumes the control smear shows the midpoints of the adult reference
intervals (engines/differential_prior.py). A real healthy donor is anywhere inside them. Here each simulated
control run follows a donor differential drawn uniformly inside the intervals (then normalised), the
calibration still assumes the midpoints, and the site model is scored on the fixed test half of each wbc-shift
domain (the adaptation curve's split). Two deliberately abnormal controls show what a wrong control costs,
and ``--sizes`` how many control cells the calibration needs (midpoint donor).
Results: ``results/control-mismatch.json``, discussed in docs/robustness.md ("Calibrating on normal control smears").
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge.fileutil import atomic_write_json
from edge.modelmeta import ModelMetadata
from engines import differential_prior, evaluate, ood
from engines.adapt import METHODS, adapt_model, curve_split, load_weights, predict_probs

# Adult reference intervals (fractions of white cells); the calibration's target is their midpoints.
INTERVALS = {"neutrophil": (0.40, 0.75), "lymphocyte": (0.20, 0.45), "monocyte": (0.02, 0.10),
             "eosinophil": (0.01, 0.06), "basophil": (0.0, 0.02)}
# Controls that are not normal at all: what a lab would get from the wrong donor.
ABNORMAL = {"eosinophilia (15% eosinophils)": {"neutrophil": 0.50, "lymphocyte": 0.28, "monocyte": 0.06,
                                               "eosinophil": 0.15, "basophil": 0.01},
            "lymphocytosis (60% lymphocytes)": {"neutrophil": 0.30, "lymphocyte": 0.60, "monocyte": 0.06,
                                                "eosinophil": 0.03, "basophil": 0.01}}


def donor_shares(classes: list[str], differential: dict[str, float]) -> np.ndarray:
    shares = np.array([differential.get(c, differential_prior.RARE_SHARE) for c in classes], np.float64)
    return shares / shares.sum()


def random_donor(classes: list[str], rng: np.random.Generator) -> dict[str, float]:
    return {c: float(rng.uniform(lo, hi)) for c, (lo, hi) in INTERVALS.items() if c in classes}


def score(base, meta, crops, labels, pool, test, shares, seed, size: int | None = None) -> float:
    """Balanced accuracy on the test half of the frames-only site model calibrated on one donor's control run
    (``size`` cells; default as many as the pool holds)."""
    rng = np.random.default_rng(seed)
    run = differential_prior.control_sample(pool, labels, meta.classes, rng, shares)
    if size is not None:
        run = run[:size]
    model = adapt_model(copy.deepcopy(base), meta, crops[run], crops[:0], labels[:0], METHODS["bn+normal"],
                        log=lambda *_: None)
    probs = predict_probs(model, crops[test], meta)
    return evaluate.classification_metrics(probs.argmax(1), labels[test], meta.classes)["balanced_accuracy"]


def sites(model_onnx: Path) -> Iterator[tuple[nn.Module, ModelMetadata, str, np.ndarray, np.ndarray, np.ndarray,
                                              np.ndarray]]:
    """(network, metadata, domain, crops, labels, test half, pool) per wbc-shift domain, split as the adaptation
    curve splits it."""
    base, meta = load_weights(model_onnx)
    cells, _ = ood.domain_crops(meta.classes, meta.field_um, meta.input_size, ood.DOMAINS)
    for domain, (crops, labels) in cells.items():
        yield (base, meta, domain, crops, labels, *curve_split(len(labels)))


def measure_sizes(model_onnx: Path, sizes: list[int], draws: int) -> dict:
    """Balanced accuracy against the number of control white cells (midpoint donor, ``draws`` runs each)."""
    report = {}
    for base, meta, domain, crops, labels, test, pool in sites(model_onnx):
        for size in sizes:
            if size > len(pool):
                continue
            runs = [score(base, meta, crops, labels, pool, test, None, s, size) for s in range(draws)]
            report.setdefault(domain, {})[str(size)] = {"mean": float(np.mean(runs)), "sd": float(np.std(runs))}
            print(f"{meta.name} {domain}: {size} control cells {np.mean(runs):.3f}±{np.std(runs):.3f}", flush=True)
    return report


def measure(model_onnx: Path, donors: int) -> dict:
    """Midpoint donors, donors drawn inside the reference intervals, and the abnormal controls, per domain."""
    report = {}
    for base, meta, domain, crops, labels, test, pool in sites(model_onnx):
        rng = np.random.default_rng(7)
        midpoint = [score(base, meta, crops, labels, pool, test, None, s) for s in range(donors)]
        drawn = [random_donor(meta.classes, rng) for _ in range(donors)]
        inside = [score(base, meta, crops, labels, pool, test, donor_shares(meta.classes, d), s)
                  for s, d in enumerate(drawn)]
        abnormal = {name: float(np.mean([score(base, meta, crops, labels, pool, test,
                                               donor_shares(meta.classes, d), s) for s in range(3)]))
                    for name, d in ABNORMAL.items()}
        report[domain] = {"midpoint_donor": {"mean": float(np.mean(midpoint)), "sd": float(np.std(midpoint))},
                          "donors_inside_intervals": {"mean": float(np.mean(inside)), "sd": float(np.std(inside)),
                                                      "min": float(np.min(inside)), "max": float(np.max(inside)),
                                                      "runs": [{"donor": d, "balanced_accuracy": a}
                                                               for d, a in zip(drawn, inside, strict=True)]},
                          "abnormal_controls": abnormal}
        print(f"{meta.name} {domain}: midpoint donor {np.mean(midpoint):.3f}±{np.std(midpoint):.3f}; donors inside "
              f"the intervals {np.mean(inside):.3f}±{np.std(inside):.3f} (min {np.min(inside):.3f}); "
              + "; ".join(f"{k} {v:.3f}" for k, v in abnormal.items()), flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.experiments.control_mismatch",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="+", help="model.onnx files with weights.pt beside them")
    parser.add_argument("--donors", type=int, default=20, help="simulated control donors per domain")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="instead: balanced accuracy against these numbers of control white cells")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.sizes:
        report = {"sizes": args.sizes, "draws": args.donors, "models": {}}
        for model in args.models:
            report["models"][model.parent.name] = measure_sizes(model, args.sizes, args.donors)
            if args.out:
                atomic_write_json(args.out, report)
        return 0
    report = {"intervals": INTERVALS, "abnormal": ABNORMAL, "donors": args.donors, "models": {}}
    for model in args.models:
        report["models"][model.parent.name] = measure(model, args.donors)
        if args.out:
            atomic_write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

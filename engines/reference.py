"""In-domain reference for the domain alarm: feature distributions of a model on the PBC validation split.

    python -m engines.reference engines/models/baseline-cnn/model.onnx

writes ``reference.json`` beside the model (quantiles of the alarm's features, see edge/drift.py) and
prints how often the alarm fires on held-out PBC cells drawn with a normal blood differential.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from edge.drift import DomainAlarm, Reference, checks_with_alarm, features
from edge.fileutil import atomic_write_bytes
from edge.onnx_backend import OnnxRuntimeClassifier
from engines.pbc import Sample, data_dir, load_crop_bgr, read_manifest, split_pbc

# Normal adult differential (approximate shares of white cells), for realistic in-domain windows.
NORMAL_MIX = {"neutrophil": 0.60, "lymphocyte": 0.30, "monocyte": 0.06, "eosinophil": 0.03, "basophil": 0.01}


def load_crops(pbc: Path, rows: list[Sample], size: int) -> np.ndarray:
    return np.stack([load_crop_bgr(pbc / r.path, size) for r in rows])


def cell_features(classifier: OnnxRuntimeClassifier, crops: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Predicted labels and alarm features, exactly as the running pipeline computes them."""
    parts = [classifier.classify(crops[i : i + 256]) for i in range(0, len(crops), 256)]
    probs = np.concatenate([p.probs for p in parts])
    labels = np.array(classifier.metadata.classes)[probs.argmax(1)]
    return labels, features(
        np.concatenate([p.anomaly for p in parts]), np.concatenate([p.uncertainty for p in parts]), crops
    )


def false_alarm_rate(
    reference: Reference,
    test: tuple[np.ndarray, dict[str, np.ndarray]],
    labels: list[str],
    window: int,
    alpha: float,
    streams: int,
    seed: int = 0,
) -> float:
    """Share of checks with the alarm on, over streams of held-out cells drawn with NORMAL_MIX."""
    rng = np.random.default_rng(seed)
    by_class = {c: np.flatnonzero(np.array(labels) == c) for c in NORMAL_MIX}
    predicted, values = test
    checks = alarms = 0
    for _ in range(streams):
        alarm = DomainAlarm(reference, window=window, min_cells=min(30, window), alpha=alpha)
        classes = rng.choice(list(NORMAL_MIX), size=4 * window, p=list(NORMAL_MIX.values()))
        order = [rng.choice(by_class[name]) for name in classes]
        n, on = checks_with_alarm(alarm, predicted, values, order)
        checks, alarms = checks + n, alarms + on
    return alarms / max(checks, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--window", type=int, default=60)
    parser.add_argument("--alpha", type=float, default=1e-4)
    parser.add_argument("--streams", type=int, default=40)
    args = parser.parse_args(argv)
    pbc = data_dir(args.data)
    rows = read_manifest(pbc)
    split = split_pbc(rows)
    classifier = OnnxRuntimeClassifier(args.model, threads=2)
    size = classifier.metadata.input_size
    white = set(NORMAL_MIX)
    val = [r for r in rows if split[r.path] == "val" and r.label in white]
    test = [r for r in rows if split[r.path] == "test" and r.label in white]
    val_labels, val_features = cell_features(classifier, load_crops(pbc, val, size))
    reference = Reference.from_samples(val_features, val_labels)
    out = args.model.with_name("reference.json")
    payload = {
        **reference.to_json(),
        "model_sha256": classifier.sha256,
        "data": "PBC validation split, white cells",
        "classes": sorted(white),
    }
    atomic_write_bytes(out, json.dumps(payload, indent=1).encode())
    test_features = cell_features(classifier, load_crops(pbc, test, size))
    rate = false_alarm_rate(reference, test_features, [r.label for r in test], args.window, args.alpha, args.streams)
    print(
        f"wrote {out} ({reference.count} validation cells); alarm on in {100 * rate:.2f}% of checks on held-out "
        f"PBC test cells drawn with a normal differential (window {args.window}, alpha {args.alpha:g})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

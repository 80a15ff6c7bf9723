"""`cytoedge classify PATH...`: score single-cell images, so any model can be checked on any labelled folder."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from edge import config as cfg
from edge.classifier import Classifier
from edge.crops import cut_crops
from edge.errors import SourceError
from edge.frames import IMAGE_SUFFIXES, BadImage, read_image
from edge.models import open_configured_classifier

BATCH = 64


def expand(paths: list[str]) -> Iterator[Path]:
    for name in paths:
        path = Path(name)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        else:
            yield path


def to_model_input(image: np.ndarray, classifier: Classifier, um_per_px: float | None) -> np.ndarray:
    """Whole image -> model input, or, with a known scale, the model's physical field cut from the centre."""
    meta = classifier.metadata
    if um_per_px is None:
        return cv2.resize(image, (meta.input_size, meta.input_size), interpolation=cv2.INTER_AREA)
    height, width = image.shape[:2]
    return cut_crops(image, [(0, 0, width, height)], um_per_px, meta.field_um, meta.input_size)[0]


def main(args: argparse.Namespace) -> int:
    config = cfg.with_overrides(cfg.load(args.config), "command line", model__path=args.model)
    classifier = open_configured_classifier(config)
    files = list(expand(args.paths))
    if not files:
        raise SourceError("no images found in " + ", ".join(args.paths))
    failures = 0
    for start in range(0, len(files), BATCH):
        batch_files, crops = [], []
        for file in files[start : start + BATCH]:
            try:
                crops.append(to_model_input(read_image(file), classifier, args.um_per_px))
                batch_files.append(file)
            except BadImage as exc:
                failures += 1
                print(f"cytoedge classify: skipped {exc}", file=sys.stderr)
        if not crops:
            continue
        predictions = classifier.classify(np.stack(crops))
        classes = classifier.metadata.classes
        for row, file in enumerate(batch_files):
            probs = predictions.probs[row]
            result = {
                "path": str(file),
                "label": classes[int(np.argmax(probs))],
                "probs": {c: round(float(p), 6) for c, p in zip(classes, probs, strict=True)},
                "uncertainty": round(float(predictions.uncertainty[row]), 6),
                "anomaly": round(float(predictions.anomaly[row]), 6),
                "model": classifier.model_id,
            }
            if args.json:
                print(json.dumps(result))
            else:
                print(
                    f"{result['label']:<14} p={float(probs.max()):.3f} unc={result['uncertainty']:.3f} "
                    f"anom={result['anomaly']:.3f}  {file}"
                )
    return 1 if failures else 0

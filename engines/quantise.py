"""The INT8 calibration set and Q/DQ model for the shipped classifier: which crops, and how good it is.

    python -m engines.quantise build       # calibration set (.npz + manifest) and the Q/DQ model
    python -m engines.quantise evaluate    # fp32 vs int8 on the PBC test split -> report.md/.json
    python -m engines.quantise bundled     # fp32 vs int8 on the bundled BCCD frames' cells -> bundled.json

The file formats, the Q/DQ quantisation and the report live in ``calibration.int8`` (which the TensorRT
builder's files follow); choosing PBC training crops and scoring on the PBC test split need the dataset
code, so they live here, with the training code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from calibration.int8 import (
    BCCD_CROPS,
    CALIBRATION_MANIFEST,
    CALIBRATION_NPZ,
    GOAL_AGREEMENT,
    GOAL_MAX_LOSS_POINTS,
    OUT_DIR,
    PBC_PER_CLASS,
    QDQ_NAME,
    REPO,
    CalibrationSet,
    bccd_calibration_crops,
    bundled_agreement,
    make_qdq,
    model_metadata,
    render_bundled,
    render_report,
    save_calibration_set,
)
from edge.fileutil import atomic_write_bytes
from edge.modelmeta import ModelMetadata, file_sha256
from engines import pbc
from engines.evaluate import classification_metrics, test_split, time_per_cell


def pbc_calibration_crops(meta: ModelMetadata, per_class: int, data: Path | None = None) -> CalibrationSet:
    """``per_class`` training-split crops per class, chosen by the split's own hash order (stable)."""
    root = pbc.data_dir(data)
    samples = pbc.read_manifest(root)
    split = pbc.split_pbc(samples, pbc.SPLIT_SEED)
    chosen = []
    for label in meta.classes:
        train = [s for s in samples if s.label == label and split[s.path] == "train"]
        train.sort(key=lambda s: hashlib.sha256(f"int8-calibration:{s.path}".encode()).hexdigest())
        chosen.extend(train[:per_class])
    crops = np.stack([pbc.load_crop_bgr(root / s.path, meta.input_size) for s in chosen])
    sources = [{"source": "pbc", "path": s.path, "label": s.label, "split": "train"} for s in chosen]
    return CalibrationSet(crops, sources)


def build_calibration_set(onnx_path: Path, per_class: int = PBC_PER_CLASS, bccd_count: int = BCCD_CROPS,
                          data: Path | None = None, bccd: Path | None = None) -> CalibrationSet:
    """The stratified set: PBC training crops per class plus cell-finder crops from BCCD frames."""
    meta = model_metadata(onnx_path)
    parts = [pbc_calibration_crops(meta, per_class, data)]
    bccd = bccd or REPO.parent / "shared" / "data" / "bccd" / "BCCD"
    if bccd_count > 0 and bccd.is_dir():
        parts.append(bccd_calibration_crops(meta, bccd_count, bccd))
    crops = np.concatenate([p.crops for p in parts])
    return CalibrationSet(crops, [s for p in parts for s in p.sources])


def _predict(path: Path, images: np.ndarray, threads: int) -> np.ndarray:
    from edge.onnx_backend import OnnxRuntimeClassifier

    classifier = OnnxRuntimeClassifier(path, threads=threads)
    return np.concatenate([classifier.classify(images[i : i + 256]).probs for i in range(0, len(images), 256)])


def evaluate(fp32: Path, int8: Path, images: np.ndarray, labels: np.ndarray, classes: Sequence[str],
             threads: int = 2, timing_repeats: int = 20) -> dict[str, Any]:
    """Top-1 agreement (overall, per true class), balanced accuracy and recall, CPU µs per cell."""
    p32, p8 = _predict(fp32, images, threads), _predict(int8, images, threads)
    a32, a8 = p32.argmax(1), p8.argmax(1)
    m32 = classification_metrics(a32, labels, list(classes))
    m8 = classification_metrics(a8, labels, list(classes))
    agree = a32 == a8
    per_class = {c: float(agree[labels == i].mean()) if (labels == i).any() else float("nan")
                 for i, c in enumerate(classes)}
    load_before = os.getloadavg()[0]
    t32 = time_per_cell(fp32, images[:256], repeats=timing_repeats, threads=threads)
    t8 = time_per_cell(int8, images[:256], repeats=timing_repeats, threads=threads)
    loss = (m32["balanced_accuracy"] - m8["balanced_accuracy"]) * 100
    return {
        "n": len(labels),
        "agreement": float(agree.mean()),
        "agreement_per_class": per_class,
        "disagreements": int((~agree).sum()),
        "max_abs_prob_diff": float(np.abs(p32 - p8).max()),
        "mean_abs_prob_diff": float(np.abs(p32 - p8).mean()),
        "fp32": {k: m32[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "per_class_recall", "support")},
        "int8": {k: m8[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "per_class_recall")},
        "balanced_accuracy_loss_points": loss,
        "goal": {"agreement": GOAL_AGREEMENT, "max_loss_points": GOAL_MAX_LOSS_POINTS,
                 "met": bool(agree.mean() >= GOAL_AGREEMENT and loss <= GOAL_MAX_LOSS_POINTS)},
        "timing": {"fp32": t32, "int8": t8},
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "runtime": "ONNX Runtime " + __import__("onnxruntime").__version__ + ", CPUExecutionProvider",
        "fp32_model": {"path": str(fp32.relative_to(REPO)) if fp32.is_relative_to(REPO) else str(fp32),
                       "sha256": file_sha256(fp32), "bytes": fp32.stat().st_size},
        "int8_model": {"path": str(int8.relative_to(REPO)) if int8.is_relative_to(REPO) else str(int8),
                       "sha256": file_sha256(int8), "bytes": int8.stat().st_size},
    }


def main(argv: Sequence[str] | None = None) -> int:
    from edge.models import default_model_path

    parser = argparse.ArgumentParser(prog="python -m engines.quantise", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["build", "evaluate", "bundled"])
    parser.add_argument("--model", type=Path, default=None, help="fp32 ONNX (default: the bundled default model)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default calibration/int8)")
    parser.add_argument("--data", type=Path, default=None, help="PBC folder (default ../shared/data/pbc)")
    parser.add_argument("--bccd", type=Path, default=None, help="BCCD folder (default ../shared/data/bccd/BCCD)")
    parser.add_argument("--per-class", type=int, default=PBC_PER_CLASS)
    parser.add_argument("--bccd-crops", type=int, default=BCCD_CROPS)
    parser.add_argument("--method", default="Entropy", choices=["Entropy", "MinMax", "Percentile"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20, help="timing repeats (median reported)")
    args = parser.parse_args(argv)
    model = args.model or default_model_path()
    qdq = args.out / QDQ_NAME
    if args.command == "build":
        started = time.perf_counter()
        cal = build_calibration_set(model, args.per_class, args.bccd_crops, args.data, args.bccd)
        manifest = save_calibration_set(cal, args.out, model)
        make_qdq(model, cal, qdq, args.method)
        print(f"calibration set {manifest['shape']} ({manifest['npz_bytes']:,} bytes) -> {args.out / CALIBRATION_NPZ}")
        print(f"Q/DQ model ({qdq.stat().st_size:,} bytes, sha256 {file_sha256(qdq)[:16]}) -> {qdq}")
        print(f"done in {time.perf_counter() - started:.1f} s")
        return 0
    if args.command == "bundled":  # the figure docs/tensorrt.md quotes for the bundled frames
        result = bundled_agreement(model, qdq, threads=args.threads)
        atomic_write_bytes(args.out / "bundled.json", (json.dumps(result, indent=1) + "\n").encode())
        print(render_bundled(result))
        return 0
    _, images, labels = test_split(model.parent, args.data)
    meta = model_metadata(model)
    manifest = json.loads((args.out / CALIBRATION_MANIFEST).read_text())
    report = evaluate(model, qdq, images, labels, meta.classes, args.threads, args.repeats)
    report["calibrate_method"] = args.method
    report["calibration_set_sha256"] = manifest["crops_sha256"]
    report["command"] = "python -m engines.quantise evaluate"
    atomic_write_bytes(args.out / "report.json", (json.dumps(report, indent=1) + "\n").encode())
    atomic_write_bytes(args.out / "report.md", render_report(report, manifest).encode())
    print(render_report(report, manifest))
    return 0 if report["goal"]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""INT8 without drift: one calibration set of real crops, a Q/DQ model made from it, and the proof.

Why Q/DQ: TensorRT's implicit INT8 calibrator is deprecated since 10.1 and gone in 11, and its
calibration cache is tied to one GPU. A Q/DQ ONNX carries its quantisation scales in the file, so the
same INT8 model can be checked here with ONNX Runtime on the CPU and then built by TensorRT (any
version >= 10) into an engine whose INT8 scales are the ones measured here.

The same calibration set also feeds TensorRT 10's ``IInt8EntropyCalibrator2`` (edge.trt.builder),
so both INT8 routes see identical data. Both outputs are bound to the fp32 model they were made from (the
manifest's ``model_sha256``, the Q/DQ model's ``cytoedge.source_sha256`` metadata): the builder refuses
them for any other model. The file names are ``edge.trt.plan``'s, the builder's side of the contract
(this module imports the runtime package, never the other way round, and never the training code).
The commands that choose the crops from PBC and measure the result live with the training code::

    python -m engines.quantise build       # calibration set (.npz + manifest) and the Q/DQ model
    python -m engines.quantise evaluate    # fp32 vs int8 on the PBC test split -> report.md/.json
    python -m engines.quantise bundled     # fp32 vs int8 on the bundled BCCD frames' cells -> bundled.json
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.classifier import preprocess
from edge.fileutil import atomic_write_bytes
from edge.modelmeta import ModelMetadata, file_sha256
from edge.trt import plan

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "calibration" / "int8"
CALIBRATION_NPZ = plan.CALIBRATION_NPZ
CALIBRATION_MANIFEST = plan.CALIBRATION_MANIFEST
QDQ_NAME = plan.QDQ_NAME
PBC_PER_CLASS = 40
BCCD_CROPS = 80
BCCD_UM_PER_PX = 0.075
MAX_COMMITTED_NPZ = 3 * 1024 * 1024
BUILD_COMMAND = plan.INT8_BUILD_COMMAND
GOAL_AGREEMENT = 0.99
GOAL_MAX_LOSS_POINTS = 0.5


@dataclass(frozen=True)
class CalibrationSet:
    """uint8 BGR crops (N, S, S, 3) at the model's input size and where each came from."""

    crops: np.ndarray
    sources: list[dict[str, Any]]

    def digest(self) -> str:
        """Checksum of the pixels and their order: keys INT8 engines to the data they were calibrated on."""
        digest = hashlib.sha256(str(self.crops.shape).encode())
        digest.update(np.ascontiguousarray(self.crops).tobytes())
        return digest.hexdigest()


def model_metadata(onnx_path: Path) -> ModelMetadata:
    from edge.onnx_backend import OnnxRuntimeClassifier

    return OnnxRuntimeClassifier(onnx_path, threads=1).metadata


def bccd_calibration_crops(meta: ModelMetadata, count: int, bccd: Path,
                           um_per_px: float = BCCD_UM_PER_PX) -> CalibrationSet:
    """White cells and platelets cut by the runtime's own cell finder from BCCD *train* frames, so the
    INT8 ranges also cover what the microscope shows, not only the PBC analyser's crops."""
    import cv2

    from edge.cellfinder import find_cells
    from edge.crops import cut_crops

    names = (bccd / "ImageSets" / "Main" / "train.txt").read_text().split()
    candidates: dict[str, list[tuple[np.ndarray, dict[str, Any]]]] = {"wbc": [], "platelet": []}
    for name in sorted(names):
        image = cv2.imread(str(bccd / "JPEGImages" / f"{name}.jpg"))
        if image is None:
            continue
        found = [d for d in find_cells(image, um_per_px) if d.kind in candidates]
        crops = cut_crops(image, [d.bbox for d in found], um_per_px, meta.field_um, meta.input_size)
        for detection, crop in zip(found, crops, strict=True):
            source = {"source": "bccd", "frame": f"JPEGImages/{name}.jpg", "kind": detection.kind,
                      "bbox": [int(v) for v in detection.bbox], "um_per_px": um_per_px}
            candidates[detection.kind].append((crop, source))
    # Half white cells, half platelets where possible, spread evenly over the frames.
    picked: list[tuple[np.ndarray, dict[str, Any]]] = []
    platelets = min(count // 2, len(candidates["platelet"]))
    want = {"wbc": count - platelets, "platelet": platelets}
    for kind, items in candidates.items():
        take = min(want[kind], len(items))
        if take:
            idx = np.linspace(0, len(items) - 1, take).round().astype(int)
            picked.extend(items[i] for i in idx)
    if not picked:
        return CalibrationSet(np.zeros((0, meta.input_size, meta.input_size, 3), np.uint8), [])
    return CalibrationSet(np.stack([c for c, _ in picked]), [s for _, s in picked])


def npz_bytes(crops: np.ndarray) -> bytes:
    """A standard .npz (np.load reads it) compressed with LZMA instead of savez_compressed's zlib:
    2.8 MB instead of 3.3 MB for 400 crops, small enough to commit so a Jetson needs no dataset."""
    import io
    import zipfile

    member = io.BytesIO()
    np.lib.format.write_array(member, np.ascontiguousarray(crops), allow_pickle=False)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_LZMA) as archive:
        info = zipfile.ZipInfo("crops.npy", date_time=(1980, 1, 1, 0, 0, 0))  # fixed date: same bytes every build
        info.compress_type = zipfile.ZIP_LZMA
        archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def save_calibration_set(cal: CalibrationSet, out_dir: Path, onnx_path: Path) -> dict[str, Any]:
    """Write the .npz (atomically) and a manifest with counts, checksums and the rebuild command."""
    out_dir.mkdir(parents=True, exist_ok=True)
    blob = npz_bytes(cal.crops)
    atomic_write_bytes(out_dir / CALIBRATION_NPZ, blob)
    counts: dict[str, int] = {}
    for s in cal.sources:
        key = f"pbc/{s['label']}" if s["source"] == "pbc" else f"bccd/{s['kind']}"
        counts[key] = counts.get(key, 0) + 1
    manifest = {
        "format": "cytoedge-int8-calibration/1",
        "model_sha256": file_sha256(onnx_path),
        "shape": list(cal.crops.shape),
        "dtype": "uint8 BGR NHWC (the runtime's crop format; edge.classifier.preprocess applied when used)",
        "crops_sha256": cal.digest(),
        "npz_bytes": len(blob),
        "npz_committed": len(blob) < MAX_COMMITTED_NPZ,
        "counts": counts,
        "rebuild": BUILD_COMMAND,
        "sources": cal.sources,
    }
    atomic_write_bytes(out_dir / CALIBRATION_MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def load_calibration_set(out_dir: Path = OUT_DIR) -> CalibrationSet:
    """Read the set back and verify it is the one its manifest describes (refuse a stale or edited file)."""
    manifest = json.loads((out_dir / CALIBRATION_MANIFEST).read_text())
    npz_path = out_dir / CALIBRATION_NPZ
    if not npz_path.is_file():
        raise FileNotFoundError(f"{npz_path} is missing; rebuild it with `{manifest.get('rebuild', BUILD_COMMAND)}`")
    with np.load(npz_path) as data:
        crops = data["crops"]
    cal = CalibrationSet(crops, manifest["sources"])
    if cal.digest() != manifest["crops_sha256"]:
        raise ValueError(f"{npz_path} does not match {CALIBRATION_MANIFEST} (checksum differs); rebuild it")
    return cal


def batches(crops: np.ndarray, meta: ModelMetadata, size: int) -> Iterator[np.ndarray]:
    """Preprocessed float32 NCHW batches, exactly as the runtime feeds the network."""
    for start in range(0, len(crops), size):
        yield preprocess(crops[start : start + size], meta)


class CropReader:
    """onnxruntime.quantization CalibrationDataReader over the calibration set (duck-typed: get_next/rewind)."""

    def __init__(self, crops: np.ndarray, meta: ModelMetadata, batch: int = 32) -> None:
        # Equal batches only: the histogram calibrators stack every batch's activations into one array.
        batch = max(d for d in range(1, min(batch, max(len(crops), 1)) + 1) if len(crops) % d == 0) if len(crops) else 1
        self.crops, self.meta, self.batch = crops, meta, batch
        self._iter: Iterator[np.ndarray] | None = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iter is None:
            self._iter = batches(self.crops, self.meta, self.batch)
        item = next(self._iter, None)
        return None if item is None else {self.meta.input_name: item}

    def rewind(self) -> None:
        self._iter = None


def copy_metadata(source: Path, target: Path) -> None:
    """Give the Q/DQ model the fp32 model's metadata_props (the runtime refuses a model without them) and
    the fp32 model's sha256 under ``cytoedge.source_sha256``, which the TensorRT builder checks so a Q/DQ
    model is never built in place of another network."""
    import onnx

    original = onnx.load(str(source), load_external_data=False)
    model = onnx.load(str(target))
    del model.metadata_props[:]
    for prop in original.metadata_props:
        if prop.key != plan.QDQ_SOURCE_KEY:
            model.metadata_props.add(key=prop.key, value=prop.value)
    model.metadata_props.add(key=plan.QDQ_SOURCE_KEY, value=file_sha256(source))
    model.doc_string = (original.doc_string + "\n" if original.doc_string else "") + (
        f"INT8 Q/DQ of sha256 {file_sha256(source)} by calibration.int8 (onnxruntime.quantization.quantize_static)"
    )
    atomic_write_bytes(target, model.SerializeToString())


def make_qdq(onnx_path: Path, cal: CalibrationSet, out_path: Path, method: str = "Entropy") -> Path:
    """Static Q/DQ quantisation shaped for TensorRT: symmetric int8 activations and weights,
    per-channel weights, scales from the calibration set through the runtime's preprocessing."""
    import tempfile

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    meta = model_metadata(onnx_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        raw = Path(tmp) / "qdq.onnx"
        quantize_static(
            str(prepared),
            str(raw),
            CropReader(cal.crops, meta),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, method),
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
        copy_metadata(onnx_path, raw)
        atomic_write_bytes(out_path, raw.read_bytes())
    return out_path


# --------------------------------------------------------------------------------------- evaluation
DECISIVE_MARGIN = 0.2
SAMPLES = REPO / "samples" / "bccd"


def bundled_agreement(fp32: Path, int8: Path, samples: Path = SAMPLES, um_per_px: float = BCCD_UM_PER_PX,
                      threads: int = 2) -> dict[str, Any]:
    """fp32 vs int8 top-1 agreement on every cell the runtime classifies in the bundled BCCD frames (another
    microscope), counted per kind (white cells, platelets), overall and where fp32 is decisive (top-two
    probability margin > DECISIVE_MARGIN): the figures docs/tensorrt.md quotes."""
    import cv2

    from edge.analysis import CLASSIFIED_KINDS
    from edge.cellfinder import find_cells
    from edge.crops import cut_crops
    from edge.onnx_backend import OnnxRuntimeClassifier

    reference = OnnxRuntimeClassifier(fp32, threads=threads)
    meta = reference.metadata
    crops, kinds = [], []
    for path in sorted(samples.glob("*.jpg")):
        image = cv2.imread(str(path))
        found = [d for d in find_cells(image, um_per_px) if d.kind in CLASSIFIED_KINDS]
        crops.append(cut_crops(image, [d.bbox for d in found], um_per_px, meta.field_um, meta.input_size))
        kinds.extend(d.kind for d in found)
    images, kind = np.concatenate(crops), np.array(kinds)
    a, b = reference.classify(images).probs, OnnxRuntimeClassifier(int8, threads=threads).classify(images).probs
    agree = a.argmax(1) == b.argmax(1)
    top_two = np.sort(a, axis=1)[:, -2:]
    decisive = top_two[:, 1] - top_two[:, 0] > DECISIVE_MARGIN

    def counts(mask: np.ndarray) -> dict[str, Any]:
        return {"cells": int(mask.sum()), "agree": int(agree[mask].sum()), "decisive": int((mask & decisive).sum()),
                "decisive_agree": int(agree[mask & decisive].sum()),
                "mean_abs_prob_diff": round(float(np.abs(a - b)[mask].mean()), 4) if mask.any() else None}

    return {
        "command": "python -m engines.quantise bundled",
        "frames": len(list(samples.glob("*.jpg"))), "um_per_px": um_per_px, "decisive_margin": DECISIVE_MARGIN,
        "fp32_sha256": file_sha256(fp32), "int8_sha256": file_sha256(int8),
        "all": counts(np.ones(len(kind), bool)),
        **{k: counts(kind == k) for k in CLASSIFIED_KINDS},
    }


def render_bundled(result: dict[str, Any]) -> str:
    """One line per group, the wording docs/tensorrt.md uses."""
    lines = []
    for group, name in (("wbc", "white cells"), ("platelet", "platelets"), ("all", "all classified cells")):
        c = result[group]
        lines.append(f"{name}: int8 agrees with fp32 on {c['agree']} of {c['cells']}; where fp32 is decisive "
                     f"(margin > {result['decisive_margin']}): {c['decisive_agree']} of {c['decisive']}; mean "
                     f"|dp| {c['mean_abs_prob_diff']}")
    return "\n".join(lines)


def render_report(report: dict[str, Any], manifest: dict[str, Any]) -> str:
    """The Markdown twin of report.json, for reviewers."""
    pct = lambda v: f"{v * 100:.2f}%"  # noqa: E731
    fp32_t, int8_t = report["timing"]["fp32"], report["timing"]["int8"]
    counts = ", ".join(f"{k} {v}" for k, v in manifest["counts"].items())
    load = report.get("load_average_1m", ["?", "?"])
    lines = [
        "# INT8 (Q/DQ) vs FP32: PBC test split, ONNX Runtime on the CPU",
        "",
        f"- fp32 model: `{report['fp32_model']['path']}` sha256 `{report['fp32_model']['sha256'][:16]}…`, "
        f"{report['fp32_model']['bytes']:,} bytes",
        f"- int8 model: `{report['int8_model']['path']}` sha256 `{report['int8_model']['sha256'][:16]}…`, "
        f"{report['int8_model']['bytes']:,} bytes (QDQ, symmetric int8, per-channel weights, "
        f"{report.get('calibrate_method', 'Entropy')} calibration)",
        f"- calibration set: {manifest['shape'][0]} crops ({counts}), "
        f"sha256 `{manifest['crops_sha256'][:16]}…`; rebuild: `{manifest['rebuild']}`",
        f"- machine: {report['machine']}, {report['runtime']}; test split n = {report['n']}",
        f"- goal (>= {pct(report['goal']['agreement'])} top-1 agreement, <= {report['goal']['max_loss_points']} point "
        f"balanced-accuracy loss): **{'met' if report['goal']['met'] else 'NOT met'}**",
        "",
        "| measure | fp32 | int8 |",
        "|---|---|---|",
        f"| top-1 agreement with fp32 | — | {pct(report['agreement'])} "
        f"({report['disagreements']} of {report['n']} differ) |",
        f"| accuracy | {pct(report['fp32']['accuracy'])} | {pct(report['int8']['accuracy'])} |",
        f"| balanced accuracy | {pct(report['fp32']['balanced_accuracy'])} | "
        f"{pct(report['int8']['balanced_accuracy'])} "
        f"({-report['balanced_accuracy_loss_points']:+.2f} points) |",
        f"| max / mean abs probability difference | — | {report['max_abs_prob_diff']:.4f} / "
        f"{report['mean_abs_prob_diff']:.5f} |",
        f"| µs per cell, batch 64, {fp32_t['threads']} threads: classify | "
        f"{fp32_t['us_per_cell_classify']:.0f} | {int8_t['us_per_cell_classify']:.0f} |",
        f"| µs per cell, network only | {fp32_t['us_per_cell_network']:.0f} | {int8_t['us_per_cell_network']:.0f} |",
        "",
        "| class | support | agreement | recall fp32 | recall int8 |",
        "|---|---|---|---|---|",
    ]
    for c, support in report["fp32"]["support"].items():
        lines.append(f"| {c} | {support} | {pct(report['agreement_per_class'][c])} | "
                     f"{pct(report['fp32']['per_class_recall'][c])} | {pct(report['int8']['per_class_recall'][c])} |")
    lines += [
        "",
        f"Timing is the median of repeated runs on a shared {report.get('cpus', '?')}-CPU VM whose 1-minute load "
        f"average was {load[0]} before and {load[1]} "
        "after the timing (other jobs were running): indicative only, and slower than on an idle machine. "
        "These are ONNX Runtime CPU",
        "figures for the Q/DQ file; TensorRT INT8 engines built from it on the Jetson are measured by",
        "`deploy/jetson-selftest.sh`, not here.",
        "",
    ]
    return "\n".join(lines)

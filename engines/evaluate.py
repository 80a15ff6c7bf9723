"""Figures for a model card, measured on the exported ONNX file, and the card itself.

Everything is computed from what ONNX Runtime returns for the shipped file, fed through the runtime's
own preprocessing (``edge.classifier.preprocess``), so the card describes what runs on the device and
not a torch model that may differ from it. Reusable for any cytoedge model::

    python -m engines.evaluate engines/models/baseline-cnn            # print the test-split figures
    python -m engines.evaluate engines/models/baseline-cnn --write    # also refresh card.json/card.md
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

from calibration.temperature import nll
from edge.classifier import preprocess, scores_from_outputs, softmax
from edge.modelmeta import ModelMetadata, file_sha256
from engines import card as model_card
from engines import ood_card, pbc

ECE_BINS = 15
EXCLUDE_FRACTIONS = (0.05, 0.10, 0.20)
TIMING_BATCH = 64


# ------------------------------------------------------------------------------------- calibration


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE with equal-width confidence bins: the weighted mean |accuracy - confidence| per bin."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(total)


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score: mean over cells of sum over classes of (p - onehot)^2 (0 best, 2 worst)."""
    onehot = np.eye(probs.shape[1])[labels]
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


# ------------------------------------------------------------------------------------ classification
def classification_metrics(pred: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, balanced accuracy (mean recall), macro F1, per-class recall and the confusion matrix."""
    k = len(classes)
    confusion = np.zeros((k, k), np.int64)
    np.add.at(confusion, (labels, pred), 1)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    tp = np.diag(confusion)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    present = support > 0
    return {
        "n": len(labels),
        "accuracy": float((pred == labels).mean()),
        "balanced_accuracy": float(recall[present].mean()),
        "macro_f1": float(f1[present].mean()),
        "per_class_recall": {c: float(recall[i]) for i, c in enumerate(classes)},
        "per_class_f1": {c: float(f1[i]) for i, c in enumerate(classes)},
        "support": {c: int(support[i]) for i, c in enumerate(classes)},
        "confusion": confusion.tolist(),
    }


def risk_coverage(correct: np.ndarray, uncertainty: np.ndarray,
                  fractions: tuple[float, ...] = EXCLUDE_FRACTIONS) -> dict[str, float]:
    """Accuracy on the cells kept after setting aside the most uncertain fraction (what a lab gets if it
    sends those cells to a human); ties are broken by index so the figure is deterministic."""
    order = np.argsort(uncertainty, kind="stable")
    result = {}
    for fraction in fractions:
        keep = order[: max(1, len(order) - round(fraction * len(order)))]
        result[f"exclude_{round(fraction * 100)}pct"] = float(correct[keep].mean())
    return result


# --------------------------------------------------------------------------------------- onnx access
def open_session(path: Path, threads: int = 2) -> tuple[object, ModelMetadata]:
    import onnxruntime as ort

    from edge.onnx_backend import read_onnx_metadata

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session, read_onnx_metadata(session, Path(path))


def onnx_logits(path: Path, images_bgr: np.ndarray, batch: int = 256) -> np.ndarray:
    """Raw logits of the ONNX file for uint8 BGR crops, via the runtime's preprocessing."""
    session, meta = open_session(path)
    chunks = [
        session.run([meta.logits_output], {meta.input_name: preprocess(images_bgr[i:i + batch], meta)})[0]
        for i in range(0, len(images_bgr), batch)
    ]
    return np.concatenate(chunks).astype(np.float32)


def onnx_macs(path: Path) -> int:
    """Multiply-accumulates per image of the Conv/Gemm/MatMul nodes, from ONNX shape inference."""
    import onnx
    from onnx import numpy_helper

    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    graph = model.graph
    shapes: dict[str, list[int]] = {}
    for info in [*graph.value_info, *graph.output, *graph.input]:
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in info.type.tensor_type.shape.dim]
        shapes[info.name] = dims
    for init in graph.initializer:
        shapes[init.name] = list(numpy_helper.to_array(init).shape)
    total = 0
    for node in graph.node:
        if node.op_type == "Conv":
            out, weight = shapes.get(node.output[0]), shapes.get(node.input[1])
            if out and weight:
                total += int(np.prod(out[1:])) * int(np.prod(weight[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            weight = shapes.get(node.input[1])
            if weight:
                total += int(np.prod(weight))
    return total


def time_per_cell(path: Path, images_bgr: np.ndarray, repeats: int = 20, threads: int = 2) -> dict[str, float]:
    """Median µs per cell at batch 64 through the runtime's classifier (preprocess, network, scores)
    and through the bare network; the machine is shared, so the median of several runs is reported."""
    from edge.onnx_backend import OnnxRuntimeClassifier

    classifier = OnnxRuntimeClassifier(Path(path), threads=threads)
    session, meta = open_session(path, threads)
    reps = max(1, math.ceil(TIMING_BATCH / max(1, len(images_bgr))))
    batch = np.ascontiguousarray(np.concatenate([images_bgr] * reps)[:TIMING_BATCH])
    feed = {meta.input_name: preprocess(batch, meta)}
    for _ in range(3):
        classifier.classify(batch)
        session.run([meta.logits_output], feed)
    full, net = [], []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        classifier.classify(batch)
        t1 = time.perf_counter()
        session.run([meta.logits_output], feed)
        t2 = time.perf_counter()
        full.append(t1 - t0)
        net.append(t2 - t1)
    return {
        "batch": TIMING_BATCH, "threads": threads, "repeats": max(1, repeats),
        "us_per_cell_classify": float(np.median(full) / TIMING_BATCH * 1e6),
        "us_per_cell_network": float(np.median(net) / TIMING_BATCH * 1e6),
        "cpu": platform.processor() or platform.machine(),
    }


def evaluate_onnx(path: Path, images_bgr: np.ndarray, labels: np.ndarray, timing_repeats: int = 20) -> dict:
    """All card figures for one ONNX file on one labelled set of crops (normally the test split)."""
    _, meta = open_session(path)
    logits = onnx_logits(path, images_bgr)
    raw_probs = softmax(logits / np.float32(1.0))
    scores = scores_from_outputs({meta.logits_output: logits}, meta)  # the runtime's calibrated output
    probs = scores.probs
    pred = probs.argmax(axis=1)
    metrics = classification_metrics(pred, labels, meta.classes)
    macs = onnx_macs(path)
    return {
        "model": {"name": meta.name, "version": meta.version, "kind": meta.kind, "sha256": file_sha256(path),
                  "bytes": Path(path).stat().st_size, "macs": macs, "flops": 2 * macs,
                  "temperature": meta.temperature, "classes": meta.classes, "input_size": meta.input_size,
                  "field_um": meta.field_um, "um_per_px": meta.um_per_px, "mean": meta.mean, "std": meta.std},
        **metrics,
        "nll_raw": nll(logits, labels, 1.0),
        "nll_calibrated": nll(logits, labels, meta.temperature),
        "ece_raw": expected_calibration_error(raw_probs, labels),
        "ece_calibrated": expected_calibration_error(probs, labels),
        "ece_bins": ECE_BINS,
        "brier_raw": brier_score(raw_probs, labels),
        "brier_calibrated": brier_score(probs, labels),
        "risk_coverage": {"uncertainty": meta.uncertainty_measure,
                          **risk_coverage(pred == labels, scores.uncertainty)},
        "timing": time_per_cell(path, images_bgr[:TIMING_BATCH], repeats=timing_repeats),
    }


def summary_line(report: dict) -> str:
    return (f"test n={report['n']} accuracy {report['accuracy']:.4f} balanced {report['balanced_accuracy']:.4f} "
            f"macro-F1 {report['macro_f1']:.4f} ECE {report['ece_raw']:.4f} -> {report['ece_calibrated']:.4f} "
            f"(T={report['model']['temperature']}) Brier {report['brier_calibrated']:.4f} "
            f"{report['timing']['us_per_cell_classify']:.0f} µs/cell")


# -------------------------------------------------------------------------------------------- cards
DATA_CITATION = (
    "PBC dataset: Acevedo A., Merino A., Alférez S., Molina Á., Boldú L., Rodellar J. \"A dataset of "
    "microscopic peripheral blood cell images for development of automatic recognition systems\", "
    "Data in Brief 30 (2020) 105474, doi:10.1016/j.dib.2020.105474; Mendeley Data "
    "doi:10.17632/snkd93bnjr.1. Licence: CC BY 4.0."
)

LIMITATIONS = [
    "Trained and tested on one source: a CellaVision DM96 analyser, May Grünwald-Giemsa stain, one "
    "hospital (Barcelona). Test figures are in-domain; expect lower accuracy on other microscopes, "
    "cameras and stains (see data/README: BCCD and wbc-shift are real domain shifts).",
    "Only normal peripheral blood cells of 8 classes. Blasts, smudge cells, abnormal lymphocytes, "
    "giant platelets, clumps and debris have no class: the network will still name one of the 8.",
    "Uncertainty and anomaly scores are baseline measures from the softmax (normalised entropy, "
    "1 - max probability); they are not trained detectors and are weak at spotting unseen cell types.",
    "Input scale matters: crops must cover the stated field (µm) at the stated µm/px; the runtime must "
    "rescale frames from other microscopes accordingly.",
    "Crops in PBC are centred on one cell by the analyser; crops from the edge cell finder may be less "
    "well centred (training used only ±3 px shifts).",
    "Not a medical device; for research and quality-control use only.",
]


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _median_epoch(training: dict) -> float:
    seconds = [row["seconds"] for row in training.get("history", [])]
    return float(np.median(seconds)) if seconds else float("nan")


def render_card_md(card: dict) -> str:
    """The human card, generated from card.json so the two can never disagree."""
    ev, tr, sp, model = card["evaluation"], card["training"], card["split"], card["evaluation"]["model"]
    lines = [
        f"# Model card: {model['name']} {model['version']}",
        "",
        card.get("summary", ""),
        "",
        "## File",
        f"- `model.onnx`, {model['bytes']:,} bytes, sha256 `{model['sha256']}`",
        f"- Input `image` float32 (N, 3, {model['input_size']}, {model['input_size']}) RGB, dynamic batch; "
        f"output `logits` (N, {len(model['classes'])}); metadata under ONNX `metadata_props` key `cytoedge`.",
        f"- Classes: {', '.join(model['classes'])}",
        f"- Temperature {model['temperature']} (fitted on the validation split by minimising NLL).",
        "",
        "## Data",
        f"- {DATA_CITATION}",
        f"- {card['data']['description']}",
        f"- Scale: {card['data']['scale']}",
        "",
        "## Split",
        f"- `{sp['function']}` with seed {sp['seed']}: {sp['method']}.",
        f"- Sizes: train {sp['totals']['train']}, val {sp['totals']['val']}, test {sp['totals']['test']}; "
        f"split sha256 `{sp['sha256']}` (see `split.json`).",
        "",
        "## Preprocessing (identical in training and at runtime)",
        f"- {card['preprocessing']}",
        f"- mean {model['mean']}, std {model['std']} (RGB, of pixel/255, fitted on the training split).",
        "",
        "## Architecture and training",
        f"- {tr['architecture']}",
        f"- {tr['params']:,} parameters, {model['macs'] / 1e6:.1f} M multiply-accumulates "
        f"({model['flops'] / 1e6:.1f} MFLOPs) per cell.",
        f"- {tr['optimiser']}; augmentation: {tr['augmentation']}.",
        f"- Trained on the CPU ({tr['threads']} threads) in {tr['train_seconds'] / 60:.1f} min "
        f"(median {_median_epoch(tr):.1f} s per epoch; the build machine is shared, so slow epochs "
        "mean other jobs were running).",
        f"- Command: `{tr['command']}`",
    ]
    limit = tr.get("config", {}).get("per_class_limit", 0)
    if limit:
        lines.append(f"- Subset run: at most {limit} crops per class and split (figures are not representative).")
    excluded = tr.get("config", {}).get("exclude_classes", [])
    if excluded:
        lines.append(f"- Held out of training, validation and test: {', '.join(excluded)}.")
    lines += [
        "",
        f"## Figures (test split, n = {ev['n']}, measured on the exported ONNX file with ONNX Runtime)",
        "",
        "| measure | value |",
        "|---|---|",
        f"| accuracy | {_pct(ev['accuracy'])} |",
        f"| balanced accuracy | {_pct(ev['balanced_accuracy'])} |",
        f"| macro F1 | {ev['macro_f1']:.4f} |",
        f"| ECE ({ev['ece_bins']} bins), raw → calibrated | {ev['ece_raw']:.4f} → {ev['ece_calibrated']:.4f} |",
        f"| NLL, raw → calibrated | {ev['nll_raw']:.4f} → {ev['nll_calibrated']:.4f} |",
        f"| Brier, raw → calibrated | {ev['brier_raw']:.4f} → {ev['brier_calibrated']:.4f} |",
    ]
    for key, value in ev["risk_coverage"].items():
        if key.startswith("exclude_"):
            pct = key.removeprefix("exclude_").removesuffix("pct")
            lines.append(f"| accuracy with the {pct}% most uncertain excluded | {_pct(value)} |")
    timing = ev["timing"]
    lines += [
        f"| µs per cell, batch {timing['batch']}, {timing['threads']} threads: runtime classify "
        f"| {timing['us_per_cell_classify']:.0f} |",
        f"| µs per cell, network only | {timing['us_per_cell_network']:.0f} |",
        "",
        f"Risk-coverage uses the runtime's uncertainty: {ev['risk_coverage']['uncertainty']}. "
        f"Timing: median of {timing['repeats']} runs on a shared build machine ({timing['cpu']}); indicative only.",
        "",
        "| class | support | recall | F1 |",
        "|---|---|---|---|",
    ]
    for name in model["classes"]:
        lines.append(f"| {name} | {ev['support'][name]} | {_pct(ev['per_class_recall'][name])} "
                     f"| {ev['per_class_f1'][name]:.4f} |")
    if card.get("out_of_domain"):
        lines += ["", ood_card.render_section(card["out_of_domain"], card.get("adaptation"))]
    lines += ["", "## Limitations", *[f"- {item}" for item in card["limitations"]], ""]
    return "\n".join(lines)


def write_card(out: Path, onnx_path: Path, report: dict, training: dict, split_summary: dict,
               summary: str | None = None, keep: dict | None = None) -> dict:
    """Write card.json (machine-readable) and card.md (rendered from it), both atomically."""
    card = {
        "format": model_card.FORMAT,
        "summary": summary or ("Baseline 8-class white-cell/platelet/erythroblast classifier for the cytoedge "
                               "runtime: a small ResNet trained on the CPU; softmax-based uncertainty."),
        "file": Path(onnx_path).name,
        "sha256": report["model"]["sha256"],
        "data": {
            "citation": DATA_CITATION,
            "licence": "CC BY 4.0",
            "description": "14,513 single-cell crops (144x144 px JPEG, the central 360x360 of the 360x363 "
                           "originals, Lanczos) of normal peripheral blood cells; 85% of each class (15% "
                           "held back by the project as an external test set never used here).",
            "scale": training.get("scale", "about 0.25 µm/px in the 144 px crops (36 µm field)"),
        },
        "split": split_summary,
        "preprocessing": ("cv2.imread (BGR) -> cv2.resize to 64x64 with INTER_AREA -> BGR to RGB -> /255 -> "
                          "(x - mean) / std -> NCHW float32 (edge.classifier.preprocess)"),
        "training": training,
        "evaluation": report,
        "limitations": LIMITATIONS,
        **(keep or {}),  # out-of-domain figures measured on this same file survive a refresh
    }
    model_card.save(Path(out), card, render_card_md(card))
    return card


# ---------------------------------------------------------------------------------------------- CLI
def test_split(model_dir: Path, data: Path | None) -> tuple[Path, np.ndarray, np.ndarray]:
    """The shared test split restricted to the model's classes, decoded exactly as at runtime."""
    return pbc_split(model_dir, data, "test")


def pbc_split(model_dir: Path, data: Path | None, which: str) -> tuple[Path, np.ndarray, np.ndarray]:
    """One shared PBC split ("train", "val" or "test") restricted to the model's classes, decoded as at
    runtime (the validation split is what experiments choose by; the test split only reports)."""
    onnx_path = Path(model_dir) / "model.onnx"
    _, meta = open_session(onnx_path)
    root = pbc.data_dir(data)
    samples = pbc.read_manifest(root)
    split = pbc.split_pbc(samples, pbc.SPLIT_SEED)
    chosen = [s for s in samples if split[s.path] == which and s.label in meta.classes]
    images = pbc.load_images(root, chosen, meta.input_size)
    labels = np.array([meta.classes.index(s.label) for s in chosen], np.int64)
    return onnx_path, images, labels


def out_of_domain(model_dir: Path, onnx_path: Path, data: str | None, adapt: bool, seeds: int, threads: int,
                  write: bool) -> int:
    """wbc-shift figures (and, with ``adapt``, the 0/20/50/100-label adaptation curve) for this model.
    A student's card also shows its teacher on the same cells when ``teacher-ood.json`` lies beside it
    (written by ``python -m engines.experiments.ood_teacher``: the teacher is not shipped)."""
    from engines import ood, ood_card

    root = ood.data_dir(None)
    if not (root / "manifest.csv").is_file():
        print(f"out of domain: skipped, no wbc-shift data at {root} (set CYTOEDGE_WBC_SHIFT)", file=sys.stderr)
        return 2
    pbc_root = pbc.data_dir(data)
    report = ood.evaluate_model(onnx_path, root, pbc_root if (pbc_root / "manifest.csv").is_file() else None)
    adaptation = None
    if adapt:
        from engines import adapt as adapting

        if not onnx_path.with_name(adapting.WEIGHTS_FILE).is_file():
            print(f"adaptation: skipped, {onnx_path.parent} ships no {adapting.WEIGHTS_FILE}", file=sys.stderr)
        else:
            import torch

            torch.set_num_threads(threads)
            adaptation = adapting.adaptation_curve(onnx_path, adapting.CURVE_SHOTS, seeds, adapting.METHODS,
                                                   out=None)
    teacher_file = model_dir / "teacher-ood.json"
    teacher_report = json.loads(teacher_file.read_text()) if teacher_file.is_file() else None
    if write:
        ood_card.update_card(model_dir, report, adaptation, teacher_report)
        print(f"wrote the out-of-domain figures into {model_dir / 'card.json'} and {model_dir / 'card.md'}")
    else:
        print(json.dumps({"out_of_domain": ood_card.summarise(report), "adaptation": adaptation}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="folder with model.onnx (and card.json to refresh)")
    parser.add_argument("--data", default=None, help="PBC folder (default $CYTOEDGE_PBC or ../shared/data/pbc)")
    parser.add_argument("--timing-repeats", type=int, default=20)
    parser.add_argument("--write", action="store_true", help="refresh the figures in card.json and card.md")
    parser.add_argument("--ood", action="store_true",
                        help="also measure on other microscopes (wbc-shift, $CYTOEDGE_WBC_SHIFT) with the domain alarm")
    parser.add_argument("--adapt", action="store_true",
                        help="with --ood: also the site-adaptation curve (0/20/50/100 labels; needs weights.pt)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per adaptation setting")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for adaptation")
    parser.add_argument("--ood-only", action="store_true",
                        help="skip the PBC test-split card refresh (for cards written by another engine)")
    args = parser.parse_args(argv)
    onnx_path = args.model_dir / "model.onnx"
    if not args.ood_only:
        onnx_path, images, labels = test_split(args.model_dir, args.data)
        report = evaluate_onnx(onnx_path, images, labels, timing_repeats=args.timing_repeats)
        print(summary_line(report))
        if args.write:
            card = json.loads((args.model_dir / "card.json").read_text())
            write_card(args.model_dir, onnx_path, report, card["training"], card["split"], card.get("summary"),
                       keep={k: card[k] for k in ("out_of_domain", "adaptation") if k in card})
        else:
            print(json.dumps({k: v for k, v in report.items() if k != "confusion"}, indent=2))
    if args.ood or args.ood_only:
        return out_of_domain(args.model_dir, onnx_path, args.data, args.adapt, args.seeds, args.threads, args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

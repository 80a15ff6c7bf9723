"""Out-of-domain evaluation: a PBC-trained classifier on white cells from two other microscopes.

    python -m engines.ood engines/models/baseline-cnn/model.onnx [--out ood.json]

Data: ``wbc-shift/`` (tecom: Motic camera, rapid stain, 120 px crops; cellavision-blog: 300 px
CellaVision crops); see ../shared/data/README.md. Neither set states its µm/px, so, as the runtime
must at a new microscope, the scale is matched first by cell size (:func:`estimate_scales`), then
the model's own field (36 µm) is cut around the crop centre with the runtime's ``cut_crops``
(padding with the background colour) and classified through the runtime's ONNX backend. The same
figures on the PBC test split are reported next to them. Protocol and results: docs/robustness.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edge.classifier import Predictions
from edge.crops import background_colour, cut_crops
from edge.drift import load_reference
from edge.onnx_backend import OnnxRuntimeClassifier
from engines import evaluate, ood_card, pbc

DOMAINS = ("tecom", "cellavision-blog")
# The runtime's default review rule (edge/defaults.toml [review]).
REVIEW_UNCERTAINTY = 0.5
REVIEW_ANOMALY = 0.5
# PBC's scale in its 144 px crops (engines.baseline.SCALE_NOTE: red cells 29.5-31 px, 0.25 µm/px).
PBC_UM_PER_PX = 0.25
PBC_RED_CELL_PX = 30.25
# Re-scaling factors tried around the matched µm/px, to show how much the match matters.
SENSITIVITY = (0.8, 1.25)


@dataclass(frozen=True)
class Cell:
    path: str
    label: str
    domain: str


def data_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where wbc-shift lives ($CYTOEDGE_WBC_SHIFT overrides)."""
    return pbc.shared_dataset("wbc-shift", "CYTOEDGE_WBC_SHIFT", explicit)


def read_manifest(root: Path) -> list[Cell]:
    with open(Path(root) / "manifest.csv", newline="") as handle:
        return [Cell(r["path"], r["label"], r["domain"]) for r in csv.DictReader(handle)]


# ------------------------------------------------------------------------------------------ scale
def white_cell_diameter_px(image: np.ndarray) -> float:
    """Equivalent diameter (px) of the cell under the crop centre: pixels far (Otsu on CIELAB distance)
    from the background colour, the connected part holding the centre. Nucleus plus cytoplasm, so it
    measures what the classifier sees; touching red cells inflate some values, hence medians."""
    bg = background_colour(image).reshape(1, 1, 3)
    lab = cv2.cvtColor(image, cv2.COLOR_BGR2LAB).astype(np.float32)
    bg_lab = cv2.cvtColor(bg, cv2.COLOR_BGR2LAB).astype(np.float32)[0, 0]
    dist = cv2.GaussianBlur(np.linalg.norm(lab - bg_lab, axis=2), (0, 0), 1.5)
    dist8 = np.clip(dist * 2, 0, 255).astype(np.uint8)
    _, mask = cv2.threshold(dist8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    _, labels = cv2.connectedComponents(mask)
    h, w = mask.shape
    centre = labels[h // 2, w // 2]
    if centre == 0:
        return float("nan")
    return float(2.0 * np.sqrt((labels == centre).sum() / np.pi))


def red_cell_diameters_px(image: np.ndarray, low: float, high: float) -> list[float]:
    """Widths of isolated, round, dark-in-green blobs between low and high px: the method of
    ``engines.pbc.measure_red_cell_px`` with the size window as a parameter."""
    green = cv2.GaussianBlur(image[..., 1], (5, 5), 0)
    _, mask = cv2.threshold(green, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask)
    height, width = mask.shape
    found = []
    for x, y, w, h, area in stats[1:count]:
        inside = x > 0 and y > 0 and x + w < width and y + h < height
        if inside and 0.8 < w / h < 1.25 and area > 0.6 * w * h * np.pi / 4 and low < w < high:
            found.append((w + h) / 2.0)
    return found


def estimate_scales(root: Path, cells: Sequence[Cell], pbc_root: Path | None) -> dict[str, dict]:
    """µm/px per domain, each matched to PBC by the same measurement on both sides.

    tecom: the crops hold one white cell and few intact red cells (pale ghosts), so neutrophils are
    measured (nucleus + cytoplasm) and compared with PBC neutrophils measured the same way.
    cellavision-blog: red cells surround the white cell and are measured as in PBC (about 30 px in
    PBC's 144 px crops at 0.25 µm/px). Labels are used only to choose which cells to measure, as a
    technician would calibrate on cells they recognise."""
    scales: dict[str, dict] = {}
    neutrophils = [c for c in cells if c.domain == "tecom" and c.label == "neutrophil"]
    if neutrophils:
        pbc_px = float("nan")
        if pbc_root is not None and (pbc_root / "manifest.csv").is_file():
            ref = [s for s in pbc.read_manifest(pbc_root) if s.label == "neutrophil"][:120]
            pbc_px = float(np.nanmedian([white_cell_diameter_px(cv2.imread(str(pbc_root / s.path))) for s in ref]))
        if not np.isfinite(pbc_px):
            pbc_px = 54.0  # measured on 80 PBC neutrophils with this method when the data was at hand
        tecom_px = float(np.nanmedian([white_cell_diameter_px(cv2.imread(str(root / c.path))) for c in neutrophils]))
        scales["tecom"] = {
            "um_per_px": round(PBC_UM_PER_PX * pbc_px / tecom_px, 4),
            "method": "median neutrophil diameter (nucleus + cytoplasm), matched to PBC neutrophils",
            "domain_px": round(tecom_px, 1), "pbc_px": round(pbc_px, 1), "n": len(neutrophils),
        }
    blog = [c for c in cells if c.domain == "cellavision-blog"]
    if blog:
        widths: list[float] = []
        for c in blog:
            widths += red_cell_diameters_px(cv2.imread(str(root / c.path)), 30, 150)
        rbc_px = float(np.median(widths)) if widths else float("nan")
        scales["cellavision-blog"] = {
            "um_per_px": round(PBC_UM_PER_PX * PBC_RED_CELL_PX / rbc_px, 4),
            "method": "median isolated red-cell width, matched to PBC red cells (30.25 px at 0.25 µm/px)",
            "domain_px": round(rbc_px, 1), "pbc_px": PBC_RED_CELL_PX, "n": len(widths),
        }
    return scales


def cut_field(image: np.ndarray, um_per_px: float, field_um: float, size: int) -> np.ndarray:
    """The model's field centred on the crop, cut exactly as the runtime cuts a found cell."""
    h, w = image.shape[:2]
    return cut_crops(image, [(0, 0, w, h)], um_per_px, field_um, size)[0]


def domain_crops(classes: list[str], field_um: float, size: int, domains: Sequence[str] = DOMAINS
                 ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, dict]]:
    """Each domain's cells (in manifest order) cut at its matched scale as the runtime would cut them,
    with their labels as indices into ``classes``; and the scale estimates. Cells of classes the model
    does not have are left out."""
    root = data_dir(None)
    cells = [c for c in read_manifest(root) if c.domain in DOMAINS and c.label in classes]
    scales = estimate_scales(root, cells, pbc.data_dir(None))
    out = {}
    for domain in domains:
        chosen = [c for c in cells if c.domain == domain]
        crops = np.stack([cut_field(cv2.imread(str(root / c.path), cv2.IMREAD_COLOR), scales[domain]["um_per_px"],
                                    field_um, size) for c in chosen])
        out[domain] = (crops, np.array([classes.index(c.label) for c in chosen], np.int64))
    return out, scales


# ---------------------------------------------------------------------------------------- metrics
RISK_FRACTIONS = (0.0, 0.2, 0.5, 0.8)


def score(model: OnnxRuntimeClassifier, crops: np.ndarray, labels: np.ndarray, pred: Predictions | None = None,
          with_alarm: bool = False) -> dict:
    """Balanced accuracy over the classes present, per-class recall, ECE, review share, predictions;
    with ``with_alarm`` also the service's domain alarm over these cells (ood_card.alarm_stream).
    ``pred``: the model's predictions for ``crops`` if already computed."""
    classes = model.metadata.classes
    pred = model.classify(crops) if pred is None else pred
    predicted = pred.probs.argmax(1)
    metrics = evaluate.classification_metrics(predicted, labels, classes)
    review = (pred.uncertainty > REVIEW_UNCERTAINTY) | (pred.anomaly > REVIEW_ANOMALY)
    kept = ~review
    present = [c for c in classes if metrics["support"][c] > 0]
    result = {
        "n": len(labels),
        "accuracy": round(metrics["accuracy"], 4),
        "balanced_accuracy": round(metrics["balanced_accuracy"], 4),
        "per_class_recall": {c: round(metrics["per_class_recall"][c], 4) for c in present},
        "support": {c: metrics["support"][c] for c in present},
        "ece": round(evaluate.expected_calibration_error(pred.probs, labels), 4),
        "mean_confidence": round(float(pred.probs.max(1).mean()), 4),
        "review_share": round(float(review.mean()), 4),
        "accuracy_not_reviewed": round(float((predicted[kept] == labels[kept]).mean()), 4) if kept.any() else None,
        "predicted": {c: int((predicted == i).sum()) for i, c in enumerate(classes)},
        # Does the uncertainty output rank this microscope's errors? Accuracy of the cells kept when the
        # most uncertain share goes to review (a flat row = the score knows nothing here).
        "risk_coverage": {k: round(v, 4) for k, v in evaluate.risk_coverage(
            predicted == labels, pred.uncertainty, RISK_FRACTIONS).items()},
    }
    if with_alarm:
        reference = load_reference(model.path, model.metadata.reference, model.sha256)
        result["alarm"] = ood_card.alarm_stream(reference, [classes[i] for i in predicted], pred.anomaly,
                                                pred.uncertainty, crops, review)
    return result


def pbc_test(model: OnnxRuntimeClassifier, model_path: Path, pbc_root: Path | None) -> dict | None:
    """In-domain figures on the shared PBC test split: all classes, and only the five white classes."""
    if pbc_root is None or not (pbc_root / "manifest.csv").is_file():
        return None
    _, images, labels = evaluate.test_split(model_path.parent, pbc_root)
    pred = model.classify(images)
    result = score(model, images, labels, pred)
    white = [model.metadata.classes.index(c) for c in ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")
             if c in model.metadata.classes]
    mask = np.isin(labels, white)
    five = score(model, images[mask], labels[mask], Predictions(pred.probs[mask], pred.uncertainty[mask],
                                                                pred.anomaly[mask]), with_alarm=True)
    result["white_five"] = {k: five[k] for k in ("n", "balanced_accuracy", "ece", "review_share", "alarm")}
    return result


def evaluate_model(model_path: Path, root: Path, pbc_root: Path | None,
                   scales: dict[str, dict] | None = None, log=print) -> dict:
    """The whole report for one model; scales can be passed in so several models share one estimate."""
    model = OnnxRuntimeClassifier(model_path)
    meta = model.metadata
    cells = [c for c in read_manifest(root) if c.domain in DOMAINS and c.label in meta.classes]
    scales = scales if scales is not None else estimate_scales(root, cells, pbc_root)
    report: dict = {"model": model.model_id, "path": str(model_path), "field_um": meta.field_um,
                    "input_size": meta.input_size, "review_rule": f"uncertainty > {REVIEW_UNCERTAINTY} or "
                    f"anomaly > {REVIEW_ANOMALY}", "scales": scales, "domains": {}}
    for domain in DOMAINS:
        chosen = [c for c in cells if c.domain == domain]
        if not chosen or domain not in scales:
            continue
        images = [cv2.imread(str(root / c.path), cv2.IMREAD_COLOR) for c in chosen]
        labels = np.array([meta.classes.index(c.label) for c in chosen], np.int64)
        um = scales[domain]["um_per_px"]
        crops = np.stack([cut_field(im, um, meta.field_um, meta.input_size) for im in images])
        result = score(model, crops, labels, with_alarm=True)
        result["um_per_px"] = um
        result["sensitivity"] = {}
        for factor in SENSITIVITY:
            other = np.stack([cut_field(im, um * factor, meta.field_um, meta.input_size) for im in images])
            s = score(model, other, labels)
            result["sensitivity"][f"um_per_px x{factor:g}"] = {k: s[k] for k in ("balanced_accuracy", "ece",
                                                                                   "review_share")}
        report["domains"][domain] = result
        log(f"{domain}: n {result['n']} bal_acc {result['balanced_accuracy']:.3f} ece {result['ece']:.3f} "
            f"review {result['review_share']:.2f} predicted {result['predicted']}")
    report["pbc_test"] = pbc_test(model, model_path, pbc_root)
    if report["pbc_test"]:
        p = report["pbc_test"]
        log(f"pbc test: n {p['n']} bal_acc {p['balanced_accuracy']:.3f} ece {p['ece']:.3f} "
            f"review {p['review_share']:.2f}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.ood", description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="model.onnx exported by engines/")
    parser.add_argument("--data", default=None, help="wbc-shift folder (default $CYTOEDGE_WBC_SHIFT or "
                        "../shared/data/wbc-shift)")
    parser.add_argument("--pbc", default=None, help="PBC folder for the in-domain comparison and the scale match")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    root = data_dir(args.data)
    if not (root / "manifest.csv").is_file():
        print(f"skipped: no wbc-shift data at {root} (set --data or CYTOEDGE_WBC_SHIFT)", file=sys.stderr)
        return 2
    pbc_root = pbc.data_dir(args.pbc)
    report = evaluate_model(args.model, root, pbc_root if (pbc_root / "manifest.csv").is_file() else None)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        pbc.atomic_write_json(args.out, report)
    else:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

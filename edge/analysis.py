"""One frame's detections -> classified cells (shared by the pipeline and `cytoedge annotate`, so a
picture and the stream never disagree).

Split in the three steps the pipeline schedules separately: cells from detections (finder side),
their crops (finder side, so cutting overlaps the previous frame's classification), and the
classifier's answers written into them (model side, possibly for several frames in one batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor

import numpy as np

from edge.cellfinder import Detection
from edge.cells import CLASSIFIED_KINDS, Cell
from edge.classifier import Classifier, Predictions
from edge.crops import cut_crops
from edge.modelmeta import ModelMetadata

__all__ = ["CLASSIFIED_KINDS", "cells_from", "classify_detections", "crops_for", "label_cells"]


def cells_from(detections: Sequence[Detection]) -> list[Cell]:
    return [Cell(index, tuple(int(v) for v in d.bbox), d.kind) for index, d in enumerate(detections)]  # type: ignore[arg-type]


def crops_for(
    image: np.ndarray, cells: Sequence[Cell], meta: ModelMetadata, um_per_px: float, pool: Executor | None = None
) -> np.ndarray:
    """The crops of the cells the model classifies (white cells and platelets), in cell order."""
    boxes = [cell.bbox for cell in cells if cell.classified]
    return cut_crops(image, boxes, um_per_px, meta.field_um, meta.input_size, pool=pool)


def label_cells(
    cells: Sequence[Cell],
    crops: np.ndarray,
    predictions: Predictions,
    meta: ModelMetadata,
    review_uncertainty: float,
    review_anomaly: float,
) -> None:
    """Write the model's answer (row n of ``predictions`` for the n-th classified cell) into the cells."""
    row = 0
    for cell in cells:
        if not cell.classified:
            continue
        probs = predictions.probs[row]
        uncertainty = float(predictions.uncertainty[row])
        anomaly = float(predictions.anomaly[row])
        label = meta.classes[int(np.argmax(probs))]
        cell.label = label
        cell.probs = {name: round(float(p), 5) for name, p in zip(meta.classes, probs, strict=True)}
        cell.uncertainty = round(uncertainty, 5)
        cell.anomaly = round(anomaly, 5)
        cell.review = (
            uncertainty > review_uncertainty or anomaly > review_anomaly or _finder_and_model_disagree(cell.kind, label)
        )
        cell.crop = crops[row]
        row += 1


def classify_detections(
    image: np.ndarray,
    detections: Sequence[Detection],
    classifier: Classifier,
    um_per_px: float,
    review_uncertainty: float,
    review_anomaly: float,
) -> list[Cell]:
    """Classify white cells and platelets in one batch; red cells are counted, not classified.
    Each classified cell keeps the crop the model saw (for thumbnails and the domain alarm)."""
    cells = cells_from(detections)
    crops = crops_for(image, cells, classifier.metadata, um_per_px)
    predictions = classifier.classify(crops)
    label_cells(cells, crops, predictions, classifier.metadata, review_uncertainty, review_anomaly)
    return cells


def _finder_and_model_disagree(kind: str, label: str) -> bool:
    """A white cell the model calls a platelet, or a platelet it calls a white cell: one of the two is
    wrong, so a person should look."""
    return (kind == "wbc") == (label == "platelet")

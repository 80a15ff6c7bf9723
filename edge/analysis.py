"""One frame's detections -> the per-cell records of the `cells` message (shared by the pipeline and
`cytoedge annotate`, so a picture and the stream never disagree)."""

from __future__ import annotations

from typing import Any

import numpy as np

from edge.cellfinder import Detection, cut_crops
from edge.classifier import Classifier

CLASSIFIED_KINDS = ("wbc", "platelet")


def classify_detections(
    image: np.ndarray,
    detections: list[Detection],
    classifier: Classifier,
    um_per_px: float,
    review_uncertainty: float,
    review_anomaly: float,
) -> tuple[list[dict[str, Any]], dict[int, np.ndarray]]:
    """Classify white cells and platelets in one batch; red cells are counted, not classified.

    Returns the cell records and, per classified cell id, the crop the model saw (for thumbnails).
    """
    meta = classifier.metadata
    to_classify = [i for i, d in enumerate(detections) if d.kind in CLASSIFIED_KINDS]
    crops = cut_crops(image, [detections[i].bbox for i in to_classify], um_per_px, meta.field_um, meta.input_size)
    predictions = classifier.classify(crops)
    row_of = {index: row for row, index in enumerate(to_classify)}
    cells = []
    crops_by_cell: dict[int, np.ndarray] = {}
    for index, detection in enumerate(detections):
        cell: dict[str, Any] = {
            "id": index,
            "bbox": [int(v) for v in detection.bbox],
            "kind": detection.kind,
            "label": None,
            "probs": None,
            "uncertainty": None,
            "anomaly": None,
            "review": False,
        }
        row = row_of.get(index)
        if row is not None:
            probs = predictions.probs[row]
            uncertainty = float(predictions.uncertainty[row])
            anomaly = float(predictions.anomaly[row])
            cell.update(
                label=meta.classes[int(np.argmax(probs))],
                probs={name: round(float(p), 5) for name, p in zip(meta.classes, probs, strict=True)},
                uncertainty=round(uncertainty, 5),
                anomaly=round(anomaly, 5),
                review=uncertainty > review_uncertainty
                or anomaly > review_anomaly
                or _finder_and_model_disagree(detection.kind, meta.classes[int(np.argmax(probs))]),
            )
            crops_by_cell[index] = crops[row]
        cells.append(cell)
    return cells, crops_by_cell


def _finder_and_model_disagree(kind: str, label: str) -> bool:
    """A white cell the model calls a platelet, or a platelet it calls a white cell: one of the two is
    wrong, so a person should look."""
    return (kind == "wbc") == (label == "platelet")

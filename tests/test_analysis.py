"""Per-cell records: what goes to review."""

from __future__ import annotations

import cv2
from conftest import SAMPLES

from edge.analysis import classify_detections
from edge.cellfinder import find_cells
from edge.models import open_classifier


def test_cells_where_finder_and_model_disagree_always_go_to_review() -> None:
    classifier = open_classifier(None, "onnxruntime", 1)
    disagreements = 0
    for path in sorted(SAMPLES.glob("*.jpg")):
        image = cv2.imread(str(path))
        # Thresholds of 1.0: nothing is flagged for uncertainty or anomaly, only for disagreement.
        cells = classify_detections(image, find_cells(image, 0.075), classifier, 0.075, 1.0, 1.0)
        for cell in cells:
            if cell.label is None:
                assert cell.kind == "rbc" and cell.review is False
                continue
            disagree = (cell.kind == "wbc") == (cell.label == "platelet")
            disagreements += disagree
            assert cell.review is disagree
    assert disagreements > 0, "the bundled frames include such cells (the baseline is out of domain on BCCD)"

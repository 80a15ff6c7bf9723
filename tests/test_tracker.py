"""Each cell is counted once while it stays in view, and unrelated frames count in full."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import SAMPLES, run_cli

from edge import config as cfg
from edge.analysis import classify_detections
from edge.cellfinder import find_cells
from edge.cells import Cell
from edge.models import open_classifier
from edge.tracker import CellTracker


@pytest.fixture(scope="module")
def classify():  # type: ignore[no-untyped-def]
    classifier = open_classifier(None, "onnxruntime", 1)
    settings = cfg.load(None)

    def run(image: np.ndarray):  # type: ignore[no-untyped-def]
        detections = find_cells(image, 0.075)
        return classify_detections(
            image, detections, classifier, 0.075, settings["review"]["uncertainty"], settings["review"]["anomaly"]
        )

    return run


def test_a_field_held_in_view_is_counted_once(classify) -> None:  # type: ignore[no-untyped-def]
    image = cv2.imread(str(SAMPLES / "BloodImage_00007.jpg"))
    tracker = CellTracker()
    first_seen = []
    for _ in range(10):
        cells = classify(image)
        tracker.assign(cells)
        first_seen.append(sum(c.first_seen for c in cells))
    assert first_seen[0] == len(cells) > 0
    assert first_seen[1:] == [0] * 9


def test_a_slowly_moving_field_keeps_its_tracks(classify) -> None:  # type: ignore[no-untyped-def]
    image = cv2.imread(str(SAMPLES / "BloodImage_00011.jpg"))
    tracker = CellTracker()
    cells = classify(image)
    tracker.assign(cells)
    white = {c.track for c in cells if c.kind == "wbc"}
    shifted = np.roll(image, shift=(4, 6), axis=(0, 1))  # a small stage movement
    cells = classify(shifted)
    tracker.assign(cells)
    assert {c.track for c in cells if c.kind == "wbc"} == white
    assert not any(c.first_seen for c in cells if c.kind == "wbc")


def test_unrelated_frames_count_every_white_cell(classify) -> None:  # type: ignore[no-untyped-def]
    tracker = CellTracker()
    total = new = 0
    for path in sorted(SAMPLES.glob("*.jpg")):
        cells = classify(cv2.imread(str(path)))
        tracker.assign(cells)
        white = [c for c in cells if c.kind == "wbc"]
        total += len(white)
        new += sum(c.first_seen for c in white)
    assert total >= 20 and new == total


def test_tracks_are_forgotten_after_the_cell_leaves() -> None:
    tracker = CellTracker(max_missed=2)
    tracker.assign([Cell(0, (10, 10, 50, 50), "rbc")])
    for _ in range(3):
        tracker.assign([])
    assert len(tracker) == 0
    again = Cell(0, (10, 10, 50, 50), "rbc")
    tracker.assign([again])
    assert again.first_seen is True


def test_watch_style_count_of_a_repeated_frame_replay_matches_one_frame(tmp_path: Path, endpoint: str) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    for index in range(8):
        shutil.copy(SAMPLES / "BloodImage_00007.jpg", frames / f"{index}.jpg")
    audit = tmp_path / "audit.jsonl"
    result = run_cli("replay", str(frames), "--publish", endpoint, "--pace", "max", "--audit", str(audit))
    assert result.returncode == 0, result.stderr
    import json

    messages = [json.loads(line) for line in audit.read_text().splitlines()]
    assert len(messages) == 8
    counted = sum(c["first_seen"] for m in messages for c in m["cells"])
    assert counted == len(messages[0]["cells"])


def test_all_pairs_overlap_matches_the_pair_by_pair_overlap() -> None:
    from edge.tracker import _iou_matrix, iou

    rng = np.random.default_rng(1)
    a = np.column_stack([rng.integers(0, 200, (60, 2)), rng.integers(1, 60, (60, 2))])
    b = np.column_stack([rng.integers(0, 200, (40, 2)), rng.integers(1, 60, (40, 2))])
    matrix = _iou_matrix(a, b)
    expected = [[iou(list(x), list(y)) for y in b.tolist()] for x in a.tolist()]
    assert matrix.tolist() == expected
    assert (matrix > 0).sum() > 50  # the boxes do overlap, so the comparison means something


def test_only_overlapping_pairs_are_listed_with_the_pair_by_pair_overlap() -> None:
    from edge.tracker import _overlapping, iou

    rng = np.random.default_rng(2)
    a = np.column_stack([rng.integers(0, 1900, (130, 2)), rng.integers(1, 200, (130, 2))])
    b = np.column_stack([rng.integers(0, 1900, (600, 2)), rng.integers(1, 200, (600, 2))])
    rows, cols, values = _overlapping(a, b)
    expected = [(i, j, iou(list(x), list(y))) for i, x in enumerate(a.tolist()) for j, y in enumerate(b.tolist())
                if iou(list(x), list(y)) > 0]
    assert list(zip(rows.tolist(), cols.tolist(), values.tolist(), strict=True)) == expected
    assert len(expected) > 100


def test_a_tracker_that_would_match_without_overlap_is_refused() -> None:
    with pytest.raises(ValueError, match="min_iou"):
        CellTracker(min_iou=0.0)

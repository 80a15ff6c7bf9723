"""The quality gate on real BCCD frames: sharp ones pass, blurred, black, white and clipped ones are refused."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.cellfinder import find_cells
from edge.frames import read_image
from edge.quality import QualityParams, assess, measure, no_cells

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "bccd"


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return [read_image(path) for path in sorted(SAMPLES.glob("*.jpg"))]


def test_every_sharp_sample_frame_passes(frames: list[np.ndarray]) -> None:
    assert len(frames) == 20
    assert [assess(frame, QualityParams()) for frame in frames] == [None] * 20


def test_a_blurred_frame_is_out_of_focus(frames: list[np.ndarray]) -> None:
    blurred = cv2.GaussianBlur(frames[0], (0, 0), 6)
    reason = assess(blurred, QualityParams())
    assert reason is not None and reason.startswith("out of focus (sharpness ")
    assert measure(blurred).sharpness < measure(frames[0]).sharpness / 5


def test_black_and_white_frames_fail_on_exposure(frames: list[np.ndarray]) -> None:
    black = np.zeros_like(frames[0])
    white = np.full_like(frames[0], 255)
    assert (assess(black) or "").startswith("too dark")
    assert (assess(white) or "").startswith("too bright")
    dim = (frames[0] * 0.15).astype(np.uint8)
    assert (assess(dim) or "").startswith("too dark")


def test_a_frame_with_burnt_out_areas_fails_on_clipping(frames: list[np.ndarray]) -> None:
    burnt = frames[0].copy()
    burnt[:, : burnt.shape[1] // 5] = 255  # a fifth of the field saturated, mean brightness still normal
    reason = assess(burnt)
    assert reason is not None and "clipped" in reason


def test_gate_can_be_switched_off_or_relaxed(frames: list[np.ndarray]) -> None:
    assert assess(np.zeros_like(frames[0]), QualityParams(enabled=False)) is None
    blurred = cv2.GaussianBlur(frames[0], (0, 0), 6)
    assert assess(blurred, QualityParams(min_sharpness=0)) is None


def test_gate_costs_under_two_milliseconds_per_vga_frame(frames: list[np.ndarray]) -> None:
    frame = frames[0]
    assert frame.shape[:2] == (480, 640)
    timings = []
    for _ in range(50):
        started = time.perf_counter()
        assess(frame)
        timings.append(time.perf_counter() - started)
    assert float(np.median(timings)) < 0.002


def test_no_cells_reason_only_for_an_empty_field(frames: list[np.ndarray]) -> None:
    assert no_cells(find_cells(frames[0], 0.075)) is None
    blank = np.full_like(frames[0], 200)
    assert no_cells(find_cells(blank, 0.075)) == "no cells found"

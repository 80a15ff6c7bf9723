"""The quality gate: normal frames of any shared microscope pass; dark, washed-out, colour-clipped,
blurred and empty ones are refused, each with its reason."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.calibrate import fit_quality
from edge.cellfinder import find_cells
from edge.frames import read_image
from edge.quality import (
    NO_CELLS,
    OUT_OF_FOCUS,
    REJECTION_KINDS,
    TOO_DARK,
    QualityParams,
    assess,
    check,
    check_cells,
    measure,
    no_cells,
)
from engines.finder.data import SOURCES, available
from engines.finder.data import frames as source_frames

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "bccd"
needs_shared = pytest.mark.skipif(not available(), reason="../shared/data (txl-pbc, bccd) is not here")


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return [read_image(path) for path in sorted(SAMPLES.glob("*.jpg"))]


@pytest.fixture(scope="module")
def site(frames: list[np.ndarray]) -> QualityParams:
    return fit_quality(frames).params


def test_every_sample_frame_passes_with_defaults_and_with_fitted_thresholds(
        frames: list[np.ndarray], site: QualityParams) -> None:
    assert len(frames) == 20
    assert [assess(frame) for frame in frames] == [None] * 20
    assert [assess(frame, site) for frame in frames] == [None] * 20


def test_degraded_frames_are_each_refused_with_their_reason(frames: list[np.ndarray], site: QualityParams) -> None:
    frame = frames[0]
    red_gain = frame.astype(np.float32)
    red_gain[..., 2] *= 1.6  # white balance gone: the red channel of the cells saturates
    degraded = {
        "too dark": (frame * 0.2).astype(np.uint8),
        "over-exposed: cells washed out": cv2.convertScaleAbs(frame, alpha=1.6),
        "clipped colour on the cells": np.clip(red_gain, 0, 255).astype(np.uint8),
        "out of focus": cv2.GaussianBlur(frame, (0, 0), 2),
        "no contrast: empty field": np.clip(np.random.default_rng(0).normal(200, 2, frame.shape), 0, 255
                                            ).astype(np.uint8),
    }
    for reason, image in degraded.items():
        assert (assess(image, site) or "").startswith(reason), (reason, assess(image, site))


def test_each_refusal_has_a_stable_kind_while_its_text_carries_the_numbers(
        frames: list[np.ndarray], site: QualityParams) -> None:
    """Status counts refusals by kind: two dark frames give two texts but one kind, the text assess gives."""
    frame = frames[0]
    darker, dark = (frame * 0.1).astype(np.uint8), (frame * 0.3).astype(np.uint8)
    rejections = [check(image, site) for image in (darker, dark, cv2.GaussianBlur(frame, (0, 0), 2))]
    assert [r.kind if r else None for r in rejections] == [TOO_DARK, TOO_DARK, OUT_OF_FOCUS]
    assert rejections[0].text != rejections[1].text  # type: ignore[union-attr]
    assert [r.text if r else None for r in rejections] == [assess(darker, site), assess(dark, site),
                                                           assess(cv2.GaussianBlur(frame, (0, 0), 2), site)]
    assert all(r.kind in REJECTION_KINDS for r in rejections if r)
    assert check(frame, site) is None
    blank = check_cells(find_cells(np.full_like(frame, 200), 0.075))
    assert blank is not None and (blank.kind, blank.text) == (NO_CELLS, "no cells found")


def test_a_bright_white_background_is_not_clipping(frames: list[np.ndarray]) -> None:
    """Another lab's lamp: the plasma is at 255, the cells keep their contrast; the frame is fine."""
    frame = frames[0]
    level = measure(frame).brightness
    white = np.clip(frame.astype(np.float32) * 255 / (level - 8), 0, 255).astype(np.uint8)
    assert measure(white).brightness == 255
    assert assess(white) is None


def test_black_and_white_frames_fail_on_exposure_with_defaults(frames: list[np.ndarray]) -> None:
    assert (assess(np.zeros_like(frames[0])) or "").startswith("too dark")
    assert (assess(np.full_like(frames[0], 255)) or "").startswith("over-exposed")
    assert (assess((frames[0] * 0.15).astype(np.uint8)) or "").startswith("too dark")


def test_focus_does_not_change_with_exposure(frames: list[np.ndarray]) -> None:
    frame = frames[0]
    dimmer = cv2.convertScaleAbs(frame, alpha=0.7)
    assert measure(dimmer).focus == pytest.approx(measure(frame).focus, rel=0.25)
    assert measure(dimmer).sharpness < 0.6 * measure(frame).sharpness  # the raw measure does


def test_gate_can_be_switched_off_or_relaxed(frames: list[np.ndarray], site: QualityParams) -> None:
    assert assess(np.zeros_like(frames[0]), QualityParams(enabled=False)) is None
    blurred = cv2.GaussianBlur(frames[0], (0, 0), 2)
    assert assess(blurred, QualityParams(min_focus=0)) is None


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


@needs_shared
@pytest.mark.parametrize("source", SOURCES)
def test_no_frame_of_a_shared_microscope_is_refused_by_default(source: str) -> None:
    refused = []
    for frame in source_frames(source):
        image = cv2.imread(str(frame.image))
        reason = assess(image)
        if reason:
            refused.append((frame.image.name, reason))
    assert refused == []

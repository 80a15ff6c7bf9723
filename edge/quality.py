"""The frame quality gate: refuse frames that would give wrong answers rather than no answers.

A blurred, dark or burnt-out frame still "contains cells" to a classifier, which then reports
confident nonsense. These checks are cheap (well under 2 ms for 640x480: everything is measured on
a 320-pixel-wide grey copy) so they run on every frame before the cell finder.

Sharpness is the variance of the Laplacian of that copy: high when edges are crisp, falling fast
with defocus. Its level depends on the microscope (magnification, stain, camera), so the threshold
is measured at each microscope with `edge.calibrate.estimate_focus_threshold`
(``cytoedge calibrate focus``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

WORK_WIDTH = 320  # grey copy width the measures are taken on (fixed, so they do not depend on camera size)
CLIP_LOW, CLIP_HIGH = 3, 252  # grey levels counted as clipped (crushed black / saturated white)


@dataclass(frozen=True)
class QualityParams:
    """Gate thresholds. 0 for ``min_sharpness`` turns the focus check off."""

    enabled: bool = True
    min_sharpness: float = 8.0  # variance of the Laplacian at 320 px wide; BCCD frames ~24, blurred (sigma 2) ~5
    min_brightness: float = 40.0  # mean grey level 0..255 (a smear's background is ~180)
    max_brightness: float = 235.0
    max_clipped: float = 0.05  # fraction of pixels at 0..3 or 252..255


@dataclass(frozen=True)
class Measures:
    sharpness: float
    brightness: float
    clipped: float


def _work_grey(image_bgr: np.ndarray) -> np.ndarray:
    grey = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2GRAY) if image_bgr.ndim == 3 else image_bgr
    height, width = grey.shape[:2]
    if width > WORK_WIDTH:
        size = (WORK_WIDTH, max(1, round(height * WORK_WIDTH / width)))
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
    return grey


def measure(image_bgr: np.ndarray) -> Measures:
    """Sharpness, mean brightness and clipped fraction of a BGR (or grey) uint8 frame."""
    if image_bgr.size == 0:
        return Measures(0.0, 0.0, 1.0)
    grey = _work_grey(image_bgr)
    _mean, std = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_32F))
    brightness = float(cv2.mean(grey)[0])
    clipped = float(np.count_nonzero((grey <= CLIP_LOW) | (grey >= CLIP_HIGH))) / grey.size
    return Measures(float(std[0, 0]) ** 2, brightness, clipped)


def sharpness(image_bgr: np.ndarray) -> float:
    return measure(image_bgr).sharpness


def assess(image_bgr: np.ndarray, params: QualityParams = QualityParams()) -> str | None:
    """None when the frame is usable, else a short reason for status and logs.

    Exposure is checked before focus: a black or white frame has no edges, and "too dark" is the
    reason a person at the microscope can act on.
    """
    if not params.enabled:
        return None
    m = measure(image_bgr)
    if m.brightness < params.min_brightness:
        return f"too dark (mean {m.brightness:.0f} < {params.min_brightness:g})"
    if m.brightness > params.max_brightness:
        return f"too bright (mean {m.brightness:.0f} > {params.max_brightness:g})"
    if m.clipped > params.max_clipped:
        return f"over/under-exposed ({m.clipped:.0%} of pixels clipped > {params.max_clipped:.0%})"
    if params.min_sharpness > 0 and m.sharpness < params.min_sharpness:
        return f"out of focus (sharpness {m.sharpness:.1f} < {params.min_sharpness:g})"
    return None


def no_cells(detections: Sequence[object]) -> str | None:
    """The reason to report when the cell finder found nothing (empty field, wrong slide area)."""
    return None if len(detections) else "no cells found"

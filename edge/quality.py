"""The frame quality gate: refuse frames that would give wrong answers rather than no answers.

A blurred, dark or burnt-out frame still "contains cells" to a classifier, which then reports
confident nonsense. The measures are cheap (about 1 ms for 640x480: everything is taken on a
320-pixel-wide copy) so they run on every frame before the cell finder.

Every measure is taken relative to the frame's own background (the plasma between cells, the
90th percentile of grey), because microscopes differ: one lab's background is grey 150, another's
is a bright white 255. So a white background is not "clipped"; what matters is whether the *cells*
keep their contrast and colour:

- background level: too dark when the brightest part of the field is dim (lamp off, shutter);
- cell contrast: (background - 20th percentile) / background; near 0 for an empty field or a
  frame so over-exposed that the cells are washed into the background;
- clipped cells: of the pixels darker than the background (the cells), the fraction with a colour
  channel at 0..3 or 252..255 (their colour, which the classifier needs, is lost);
- focus: variance of the Laplacian divided by the squared cell contrast, so it does not change with
  exposure or stain strength; its level still depends on magnification, so the threshold is measured
  at each microscope (``cytoedge calibrate site`` / ``calibrate focus``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

WORK_WIDTH = 320  # working copy width the measures are taken on (fixed, so they do not depend on camera size)
CLIP_LOW, CLIP_HIGH = 3, 252  # channel levels counted as clipped (crushed black / saturated)
CELL_MARGIN = 0.9  # pixels darker than this fraction of the background count as cells


@dataclass(frozen=True)
class QualityParams:
    """Gate thresholds (the ``[quality]`` section). Defaults pass every frame of the shared data
    (BCCD, TXL-PBC's three microscopes); ``cytoedge calibrate site`` tightens them to the site."""

    enabled: bool = True
    min_sharpness: float = 0.0  # raw variance of the Laplacian (older configs); 0 = off, see min_focus
    min_brightness: float = 40.0  # background (plasma) grey level below this: too dark
    max_brightness: float = 235.0  # cells' grey level (20th percentile) above this: washed out
    max_clipped: float = 0.25  # largest fraction of cell pixels with a clipped colour channel
    min_contrast: float = 0.04  # cell contrast below this: empty field or washed out
    min_focus: float = 0.05  # focus (contrast-normalised sharpness) below this: out of focus; 0 = off


@dataclass(frozen=True)
class Measures:
    sharpness: float  # raw variance of the Laplacian at 320 px wide
    brightness: float  # background level, grey 0..255
    clipped: float  # fraction of cell pixels with a clipped channel
    contrast: float = 0.0  # (background - 20th percentile) / background
    focus: float = 0.0  # sharpness / (background - 20th percentile)^2 * 100
    cell_level: float = 0.0  # 20th percentile grey


def _work_copy(image_bgr: np.ndarray) -> np.ndarray:
    height, width = image_bgr.shape[:2]
    if width > WORK_WIDTH:
        size = (WORK_WIDTH, max(1, round(height * WORK_WIDTH / width)))
        return cv2.resize(image_bgr, size, interpolation=cv2.INTER_AREA)
    return image_bgr


def _work_grey(image_bgr: np.ndarray) -> np.ndarray:
    small = _work_copy(image_bgr)
    return cv2.cvtColor(small, cv2.COLOR_BGR2GRAY) if small.ndim == 3 and small.shape[2] == 3 else small.reshape(
        small.shape[:2])


def _percentiles(grey: np.ndarray, qs: Sequence[float]) -> list[float]:
    """Grey-level percentiles from a 256-bin histogram (much faster than np.percentile)."""
    hist = cv2.calcHist([grey], [0], None, [256], [0, 256]).ravel()
    cumulative = np.cumsum(hist) / max(hist.sum(), 1)
    return [float(np.searchsorted(cumulative, q / 100.0)) for q in qs]


def measure(image_bgr: np.ndarray) -> Measures:
    """The gate's measures of a BGR (or grey) uint8 frame."""
    if image_bgr.size == 0:
        return Measures(0.0, 0.0, 1.0)
    small = _work_copy(image_bgr)
    if small.ndim == 2 or small.shape[2] == 1:
        small = cv2.cvtColor(small.reshape(small.shape[:2]), cv2.COLOR_GRAY2BGR)
    elif small.shape[2] == 4:
        small = cv2.cvtColor(small, cv2.COLOR_BGRA2BGR)
    grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)
    _mean, std = cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_32F))
    raw = float(std[0, 0]) ** 2
    background, cell_level = _percentiles(grey, (90, 20))
    contrast = (background - cell_level) / max(background, 1.0)
    cells = grey < CELL_MARGIN * background
    n_cells = int(np.count_nonzero(cells))
    if n_cells:
        channels = cv2.split(small)
        high = cv2.max(cv2.max(channels[0], channels[1]), channels[2])
        low = cv2.min(cv2.min(channels[0], channels[1]), channels[2])
        bad = (high >= CLIP_HIGH) | (low <= CLIP_LOW)
        clipped = float(np.count_nonzero(bad & cells)) / n_cells
    else:
        clipped = float(np.count_nonzero(grey <= CLIP_LOW)) / grey.size
    focus = raw / max(background - cell_level, 1.0) ** 2 * 100.0
    return Measures(raw, background, clipped, contrast, focus, cell_level)


def sharpness(image_bgr: np.ndarray) -> float:
    """Raw variance of the Laplacian (kept for older configs that set ``min_sharpness``)."""
    return measure(image_bgr).sharpness


def focus(image_bgr: np.ndarray) -> float:
    """Exposure-independent focus measure the gate uses (``min_focus``)."""
    return measure(image_bgr).focus


# Stable keys for why a frame was refused: status counts rejected frames by these (the text of a
# reason carries the measured numbers and changes from frame to frame; these never do).
TOO_DARK = "too_dark"
OVER_EXPOSED = "over_exposed"
NO_CONTRAST = "no_contrast"
CLIPPED_COLOUR = "clipped_colour"
OUT_OF_FOCUS = "out_of_focus"
NO_CELLS = "no_cells"
REJECTION_KINDS = (TOO_DARK, OVER_EXPOSED, NO_CONTRAST, CLIPPED_COLOUR, OUT_OF_FOCUS, NO_CELLS)


@dataclass(frozen=True)
class Rejection:
    """Why a frame was refused: ``kind`` (one of REJECTION_KINDS) to count by, ``text`` for a person."""

    kind: str
    text: str

    def __str__(self) -> str:
        return self.text


def check(image_bgr: np.ndarray, params: QualityParams = QualityParams()) -> Rejection | None:
    """None when the frame is usable, else why not (a stable kind and a short text with the numbers).

    Exposure is checked before focus: a black or white frame has no edges, and "too dark" is the
    reason a person at the microscope can act on.
    """
    if not params.enabled:
        return None
    m = measure(image_bgr)
    if m.brightness < params.min_brightness:
        return Rejection(TOO_DARK, f"too dark (background {m.brightness:.0f} < {params.min_brightness:g})")
    if m.contrast < params.min_contrast:
        if m.brightness >= CLIP_HIGH:
            return Rejection(OVER_EXPOSED, f"over-exposed: cells washed out (contrast {m.contrast:.2f} < "
                                           f"{params.min_contrast:g})")
        return Rejection(NO_CONTRAST, f"no contrast: empty field or no smear (contrast {m.contrast:.2f} < "
                                      f"{params.min_contrast:g})")
    if m.cell_level > params.max_brightness:
        return Rejection(OVER_EXPOSED, f"over-exposed: cells washed out (cell level {m.cell_level:.0f} > "
                                       f"{params.max_brightness:g})")
    if m.clipped > params.max_clipped:
        return Rejection(CLIPPED_COLOUR, f"clipped colour on the cells ({m.clipped:.0%} of cell pixels > "
                                         f"{params.max_clipped:.0%})")
    if params.min_focus > 0 and m.focus < params.min_focus:
        return Rejection(OUT_OF_FOCUS, f"out of focus (focus {m.focus:.2f} < {params.min_focus:g})")
    if params.min_sharpness > 0 and m.sharpness < params.min_sharpness:
        return Rejection(OUT_OF_FOCUS, f"out of focus (sharpness {m.sharpness:.1f} < {params.min_sharpness:g})")
    return None


def assess(image_bgr: np.ndarray, params: QualityParams = QualityParams()) -> str | None:
    """None when the frame is usable, else the short reason for status and logs (``check``'s text)."""
    rejection = check(image_bgr, params)
    return None if rejection is None else rejection.text


def check_cells(detections: Sequence[object]) -> Rejection | None:
    """The rejection when the cell finder found nothing (empty field, wrong slide area)."""
    return None if len(detections) else Rejection(NO_CELLS, "no cells found")


def no_cells(detections: Sequence[object]) -> str | None:
    """The reason to report when the cell finder found nothing (``check_cells``'s text)."""
    rejection = check_cells(detections)
    return None if rejection is None else rejection.text

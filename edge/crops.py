"""Cutting the classifier's crops out of a frame: one square of the model's physical field per cell.

The model was trained on crops of a fixed width in micrometres (``field_um``) resized to its input
size, so every caller (the pipeline, `cytoedge annotate` and `classify`, site data, INT8 calibration,
the experiments) must cut them the same way; this is that one way. Square positions are computed for
all cells at once; only the squares that reach past the frame edge are padded, with the frame's
background colour (not black) so an edge cell looks like the training crops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import Executor
from fractions import Fraction

import cv2
import numpy as np


def as_bgr(image: np.ndarray) -> np.ndarray:
    """Accept the layouts a camera or file can give (grey, BGR, BGRA); reject non-images."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got dtype {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.size else image[..., None].repeat(3, 2)
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must be HxW, HxWx1, HxWx3 or HxWx4, got shape {image.shape}")
    if image.shape[2] == 3:
        return image
    if image.size == 0:
        return np.zeros((*image.shape[:2], 3), np.uint8)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)


def background_colour(image_bgr: np.ndarray) -> np.ndarray:
    """The frame's background (the brightest 30% of pixels are mostly plasma between cells): its median BGR."""
    image = as_bgr(image_bgr)
    if image.size == 0:
        return np.zeros(3, np.uint8)
    step = max(1, int(math.sqrt(image.shape[0] * image.shape[1] / 4096)))  # ~4k pixels are plenty
    sample = image[::step, ::step].reshape(-1, 3)
    grey = sample.astype(np.int32).sum(1)
    bright = sample[grey >= np.percentile(grey, 70)]
    return np.median(bright, axis=0).astype(np.uint8)


def square_corners(boxes: Sequence[tuple[int, int, int, int]], side: int) -> np.ndarray:
    """(N, 2) top-left corners of ``side``-pixel squares centred on each box (Python's round, as before)."""
    if not len(boxes):
        return np.zeros((0, 2), np.int64)
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    centres = b[:, :2] + b[:, 2:] / 2 - side / 2
    return np.rint(centres).astype(np.int64)  # rint rounds half to even, exactly like round()


def cut_crops(image_bgr: np.ndarray, boxes: Sequence[tuple[int, int, int, int]], um_per_px: float, field_um: float,
              size: int, pool: Executor | None = None) -> np.ndarray:
    """Cut a field_um-wide square around each box centre and resize it to size x size (INTER_AREA).

    Parts of the square outside the frame are the frame's background colour. Returns uint8
    (N, size, size, 3) BGR. ``pool``: resize the squares on its threads too (OpenCV releases the GIL),
    so a frame with many cells uses a core the rest of the pipeline leaves idle; same crops either way.
    """
    image = as_bgr(image_bgr)
    scale = float(um_per_px)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"um_per_px must be a positive number, got {um_per_px!r}")
    if not (math.isfinite(field_um) and field_um > 0):
        raise ValueError(f"field_um must be a positive number, got {field_um!r}")
    if int(size) < 1:
        raise ValueError(f"size must be >= 1, got {size!r}")
    size = int(size)
    out = np.empty((len(boxes), size, size, 3), np.uint8)
    if not len(boxes):
        return out
    height, width = image.shape[:2]
    side = max(1, round(field_um / scale))
    corners = square_corners(boxes, side)
    x0, y0 = corners[:, 0], corners[:, 1]
    xa, ya = np.maximum(x0, 0), np.maximum(y0, 0)
    xb, yb = np.minimum(x0 + side, width), np.minimum(y0 + side, height)
    inside = (xa == x0) & (ya == y0) & (xb == x0 + side) & (yb == y0 + side)
    fill = None if inside.all() else background_colour(image)

    def cut(rows: range) -> None:
        for n in rows:
            _cut_one(image, out, n, (x0[n], y0[n], xa[n], ya[n], xb[n], yb[n]), bool(inside[n]), side, fill)

    if pool is None or len(boxes) < 4:
        cut(range(len(boxes)))
    else:
        half = len(boxes) // 2
        pending = pool.submit(cut, range(half, len(boxes)))
        cut(range(half))
        pending.result()
    return out


def _cut_one(image: np.ndarray, out: np.ndarray, n: int, square_at: tuple[int, ...], inside: bool, side: int,
             fill: np.ndarray | None) -> None:
    """Crop ``n``: the square (corner x0, y0; its part inside the frame xa..xb, ya..yb) resized into out[n]."""
    x0, y0, xa, ya, xb, yb = (int(v) for v in square_at)
    size = out.shape[1]
    if inside:
        out[n] = cv2.resize(image[y0 : y0 + side, x0 : x0 + side], (size, size), interpolation=cv2.INTER_AREA)
        return
    out[n] = fill  # the square misses the frame entirely, or these are the output pixels of pure padding
    if xb <= xa or yb <= ya:
        return
    period, cells = area_period(side, size)
    # Only whole periods of the area grid that touch the frame are resampled: an output pixel whose
    # whole footprint is padding averages the fill colour back to itself exactly (float error < 1e-3).
    top, bottom = (ya - y0) // period * period, -(-(yb - y0) // period) * period
    left, right = (xa - x0) // period * period, -(-(xb - x0) // period) * period
    part = cv2.copyMakeBorder(
        image[ya:yb, xa:xb], ya - y0 - top, bottom - (yb - y0), xa - x0 - left, right - (xb - x0),
        cv2.BORDER_CONSTANT, value=[int(v) for v in fill],  # type: ignore[union-attr]
    )
    rows = slice(top // period * cells, bottom // period * cells)
    cols = slice(left // period * cells, right // period * cells)
    out[n, rows, cols] = cv2.resize(part, (cols.stop - cols.start, rows.stop - rows.start),
                                    interpolation=cv2.INTER_AREA)


def area_period(side: int, size: int) -> tuple[int, int]:
    """(source pixels, output pixels) of one period of INTER_AREA's grid from ``side`` to ``size``: a
    window starting and ending on period boundaries resizes to exactly the same output pixels as the
    whole square does there (same footprints, weights and summation order), provided OpenCV's scale
    (1 / (size / side)) is exactly side / size, so every boundary falls on the same float value.
    Otherwise the period is the whole square (no window is cut)."""
    scale = 1.0 / (size / side)
    if Fraction(scale) != Fraction(side, size):
        return side, size
    common = math.gcd(side, size)
    return side // common, size // common

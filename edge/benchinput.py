"""A reproducible camera-sized benchmark input made from the bundled frames.

Microscope cameras deliver 1920x1080 or more; the bundled BCCD frames are 640x480. Tiling 3x3 of them
(and cutting to the target size) gives frames of real cells at the same microscope scale, about nine
BCCD frames' worth of cells each. Frame k starts its tiles at bundled frame k, so consecutive frames
differ, as when the stage moves. Written as JPEG files (quality 95), so replaying them also costs the
decode an MJPEG camera's frames cost.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from edge.errors import ConfigError, SourceError
from edge.frames import IMAGE_SUFFIXES, BadImage, read_image


def parse_size(text: str) -> tuple[int, int]:
    """'1920x1080' -> (1920, 1080); one clear error for anything else."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"frame size {text!r} is not WIDTHxHEIGHT, e.g. 1920x1080") from None
    if not (64 <= width <= 8192 and 64 <= height <= 8192):
        raise ConfigError(f"frame size {text!r} must be between 64x64 and 8192x8192")
    return width, height


def tiled_frame(tiles: list[np.ndarray], first: int, size: tuple[int, int]) -> np.ndarray:
    """One ``size`` (width, height) frame tiled row by row from ``tiles``, starting at tile ``first``."""
    width, height = size
    tile_h, tile_w = tiles[0].shape[:2]
    columns, rows = math.ceil(width / tile_w), math.ceil(height / tile_h)
    grid = [
        np.hstack([cv2.resize(tiles[(first + r * columns + c) % len(tiles)], (tile_w, tile_h)) for c in range(columns)])
        for r in range(rows)
    ]
    return np.ascontiguousarray(np.vstack(grid)[:height, :width])


def write_tiled(source: Path, out: Path, size: tuple[int, int] = (1920, 1080), count: int = 30) -> list[Path]:
    """Write ``count`` tiled frames to ``out`` (created); returns their paths, in replay order."""
    files = sorted(p for p in Path(source).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SourceError(f"no images in {source} to tile")
    try:
        tiles = [read_image(p) for p in files]
    except BadImage as exc:
        raise SourceError(str(exc)) from None
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for k in range(count):
        path = out / f"frame-{k:03d}.jpg"
        ok, data = cv2.imencode(".jpg", tiled_frame(tiles, k, size), [cv2.IMWRITE_JPEG_QUALITY, 95])
        if not ok:
            raise SourceError("JPEG encoding failed")
        path.write_bytes(data.tobytes())
        written.append(path)
    return written

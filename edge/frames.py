"""Frames as they travel through the pipeline, and careful decoding of image files.

OpenCV happily returns a half-grey image for a truncated JPEG; a lab would then classify garbage.
So files are checked for their end marker before decoding, and refused with a reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

_JPEG_START = b"\xff\xd8"
_JPEG_END = b"\xff\xd9"
_PNG_START = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"


@dataclass
class Frame:
    image: np.ndarray  # BGR uint8, H x W x 3
    frame_id: int
    captured_at: float  # Unix time (s) of capture, or of reading for sources without timestamps
    source: str
    read_at: float = field(default_factory=time.monotonic)  # for end-to-end latency


class BadImage(ValueError):
    """A file that is not a complete, decodable image."""


def decode_image(data: bytes, name: str, max_pixels: int = 40_000_000) -> np.ndarray:
    """Decode bytes into a BGR image, refusing truncated, empty, huge or undecodable files."""
    if not data:
        raise BadImage(f"{name}: empty file")
    if data.startswith(_JPEG_START) and _JPEG_END not in data[-64:]:
        raise BadImage(f"{name}: truncated JPEG (no end-of-image marker)")
    if data.startswith(_PNG_START) and not data.rstrip(b"\0").endswith(_PNG_END):
        raise BadImage(f"{name}: truncated PNG (no IEND chunk)")
    buffer = np.frombuffer(data, dtype=np.uint8)
    _check_declared_size(data[: 64 * 1024], name, max_pixels)
    image = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise BadImage(f"{name}: not a readable image")
    if image.shape[0] * image.shape[1] > max_pixels:
        raise BadImage(f"{name}: {image.shape[1]}x{image.shape[0]} exceeds the {max_pixels}-pixel limit")
    return image


def _check_declared_size(header: bytes, name: str, max_pixels: int) -> None:
    """Refuse images whose header declares a huge size before OpenCV allocates for it."""
    ok, width, height = _header_size(header)
    if ok and width * height > max_pixels:
        raise BadImage(f"{name}: declared {width}x{height} exceeds the {max_pixels}-pixel limit")


def _header_size(data: bytes) -> tuple[bool, int, int]:
    if data.startswith(_PNG_START) and len(data) >= 24:
        return True, int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data.startswith(_JPEG_START):
        index = 2
        while index + 9 < len(data):
            if data[index] != 0xFF:
                index += 1
                continue
            marker = data[index + 1]
            length = int.from_bytes(data[index + 2 : index + 4], "big")
            if marker in (0xC0, 0xC1, 0xC2):
                height = int.from_bytes(data[index + 5 : index + 7], "big")
                width = int.from_bytes(data[index + 7 : index + 9], "big")
                return True, width, height
            index += 2 + length
    return False, 0, 0


def read_image(path: Path, max_pixels: int = 40_000_000) -> np.ndarray:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadImage(f"{path}: cannot read ({exc.strerror or exc})") from None
    return decode_image(data, str(path), max_pixels)

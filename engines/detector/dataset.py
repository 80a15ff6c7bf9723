"""Training samples for the detector: boxed frames at a jittered physical scale, new-microscope looks.

Frames come from ``engines.finder.data`` (TXL-PBC's three microscopes, every cell boxed). Each
sample resamples a frame to the network's µm/px times a random factor (cell sizes and calibration
error differ between labs), imitates another microscope (defocus, noise, gamma, and in optical
density a random stain mix and strength), cuts a random square and flips/rotates it. Targets are
CenterNet's: a Gaussian per cell centre in its class's heat map, log box size (µm) and centre
offset at the centre cell. BCCD's own VOC boxes are not used for training: they are the same
frames as TXL-PBC's ``bccd`` with fewer red cells boxed, and TXL-PBC frames that duplicate a BCCD
VOC val/test frame are dropped so that benchmark stays unseen (``duplicates_of_held_out``).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edge.learnedfinder import CLASSES, optical_density
from engines.detector.model import STRIDE
from engines.finder.data import Frame, frames
from engines.finder.scale import true_um_per_px

Box = tuple[int, int, int, int]
TXL_SOURCES = ("bccd", "bcd", "raabin")
MICROSCOPE_OF = {"bccd": "BCCD", "bcd": "BCD", "raabin": "Raabin"}


@dataclass
class Labelled:
    """One frame in memory with its boxes and the source's true scale."""

    source: str
    image: np.ndarray
    um_per_px: float
    boxes: dict[str, list[Box]]


def _signature(image: np.ndarray) -> np.ndarray:
    small = cv2.resize(image, (32, 24), interpolation=cv2.INTER_AREA)
    grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY).astype(np.float32)
    return (grey - grey.mean()) / (grey.std() + 1e-6)


def duplicates_of_held_out(candidates: list[Frame]) -> set[str]:
    """TXL-PBC bccd frames that are (re-annotated) copies of a BCCD VOC val or test frame."""
    held = [_signature(cv2.imread(str(f.image))) for f in frames("bccd-voc") if f.split != "train"]
    out = set()
    for frame in candidates:
        if frame.source != "bccd":
            continue
        sig = _signature(cv2.imread(str(frame.image)))
        if min(float(np.mean((sig - h) ** 2)) for h in held) < 0.05:
            out.add(str(frame.image))
    return out


def load(split: str, sources: tuple[str, ...] = TXL_SOURCES, limit: int | None = None) -> list[Labelled]:
    """Frames of ``split`` from ``sources``, each with its source's true µm/px (red-cell boxes)."""
    out: list[Labelled] = []
    for source in sources:
        every = frames(source)
        scale, _ = true_um_per_px([f for f in every if f.split == "train"])
        chosen = [f for f in every if f.split == split][:limit]
        if split == "train":
            dropped = duplicates_of_held_out(chosen)
            chosen = [f for f in chosen if str(f.image) not in dropped]
        for frame in chosen:
            image = cv2.imread(str(frame.image))
            if image is not None:
                out.append(Labelled(source, image, scale, frame.boxes((image.shape[1], image.shape[0]))))
    return out


def look_of_another_microscope(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Optics and camera changes on the uint8 frame: defocus, gamma, white balance, noise."""
    out = image
    if rng.random() < 0.5:
        out = cv2.GaussianBlur(out, (0, 0), float(rng.uniform(0.3, 1.5)))
    if rng.random() < 0.5:
        gamma = float(rng.uniform(0.7, 1.4))
        lut = np.clip(255.0 * (np.arange(256) / 255.0) ** gamma, 0, 255).astype(np.uint8)
        out = lut[out]
    if rng.random() < 0.5:
        gains = rng.uniform(0.85, 1.15, 3)
        out = np.clip(out.astype(np.float32) * gains, 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        out = np.clip(out.astype(np.float32) + rng.normal(0, rng.uniform(1, 6), out.shape), 0, 255).astype(np.uint8)
    return out


def stain_of_another_lab(od: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """In optical density: a random stain mix (3x3 near identity), strength and desaturation."""
    mix = np.eye(3, dtype=np.float32) + rng.normal(0, 0.12, (3, 3)).astype(np.float32)
    mix *= float(rng.uniform(0.6, 1.4))
    out = np.tensordot(mix, od, axes=1)
    if rng.random() < 0.3:
        grey = out.mean(0, keepdims=True)
        out = grey + float(rng.uniform(0.4, 1.0)) * (out - grey)
    return out.astype(np.float32)


def targets(boxes: dict[str, list[tuple[float, float, float, float]]], out_size: int, work_um: float
            ) -> tuple[np.ndarray, ...]:
    """CenterNet targets at 1/STRIDE for float (x, y, w, h) boxes in work pixels."""
    heat = np.zeros((len(CLASSES), out_size, out_size), np.float32)
    size = np.zeros((2, out_size, out_size), np.float32)
    offset = np.zeros((2, out_size, out_size), np.float32)
    mask = np.zeros((out_size, out_size), np.float32)
    grid = np.arange(out_size, dtype=np.float32) + 0.5
    for index, kind in enumerate(CLASSES):
        for x, y, w, h in boxes.get(kind, []):
            cx, cy = (x + w / 2) / STRIDE, (y + h / 2) / STRIDE
            ix, iy = int(cx), int(cy)
            if not (0 <= ix < out_size and 0 <= iy < out_size):
                continue
            sigma = max(0.6, min(w, h) / STRIDE / 6)
            gauss = np.exp(-((grid[None, :] - cx) ** 2 + (grid[:, None] - cy) ** 2) / (2 * sigma**2))
            np.maximum(heat[index], gauss, out=heat[index])
            heat[index, iy, ix] = 1.0
            size[:, iy, ix] = np.log(max(w, 1.0) * work_um), np.log(max(h, 1.0) * work_um)
            offset[:, iy, ix] = cx - ix - 0.5, cy - iy - 0.5
            mask[iy, ix] = 1.0
    return heat, size, offset, mask


def sample(item: Labelled, rng: np.random.Generator, work_um: float, crop: int, augment: bool = True
           ) -> tuple[np.ndarray, ...]:
    """One training square: OD input (3, crop, crop) and its CenterNet targets."""
    factor = item.um_per_px / work_um * (float(np.exp(rng.uniform(np.log(0.8), np.log(1.25)))) if augment else 1.0)
    height, width = item.image.shape[:2]
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    image = cv2.resize(item.image, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
    sx, sy = size[0] / width, size[1] / height
    if augment:
        image = look_of_another_microscope(image, rng)
    od = optical_density(image)
    if augment:
        od = stain_of_another_lab(od, rng)
    canvas = np.zeros((3, crop, crop), np.float32)
    x0 = int(rng.integers(0, max(1, size[0] - crop + 1))) if augment else 0
    y0 = int(rng.integers(0, max(1, size[1] - crop + 1))) if augment else 0
    part = od[:, y0:y0 + crop, x0:x0 + crop]
    canvas[:, :part.shape[1], :part.shape[2]] = part
    boxes = {kind: [(x * sx - x0, y * sy - y0, w * sx, h * sy) for x, y, w, h in item.boxes.get(kind, [])]
             for kind in CLASSES}
    heat, box_size, offset, mask = targets(boxes, crop // STRIDE, work_um)
    if augment:
        k = int(rng.integers(0, 4))
        flip = bool(rng.random() < 0.5)
        canvas, heat, mask = (_turn(a, k, flip) for a in (canvas, heat, mask))
        box_size, offset = _turn(box_size, k, flip), _turn(offset, k, flip)
        if k % 2:
            box_size = box_size[::-1]  # width and height swap under a quarter turn
        offset = _turned_offset(offset, k, flip)
    return tuple(np.ascontiguousarray(a) for a in (canvas, heat, box_size, offset, mask))


def _turn(array: np.ndarray, k: int, flip: bool) -> np.ndarray:
    out = np.rot90(array, k, axes=(-2, -1))
    return out[..., ::-1] if flip else out


def _turned_offset(offset: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """Offsets are vectors: rotate them with the image (np.rot90 turns counter-clockwise)."""
    dx, dy = offset[0], offset[1]
    for _ in range(k):
        dx, dy = dy, -dx
    if flip:
        dx = -dx
    return np.stack([dx, dy])

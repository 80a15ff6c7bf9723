"""Drawing boxes on frames: the preview a bench display shows and the README picture.

The preview is drawn on the already downscaled frame (boxes scaled to it): drawing on a 1920x1080
frame and then shrinking it cost more than the rest of a frame's publishing.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from edge.cells import Cell

# BGR colours, chosen to be told apart on a purple-pink smear.
CLASS_COLOURS = {
    "basophil": (160, 32, 240),
    "eosinophil": (0, 140, 255),
    "erythroblast": (0, 0, 200),
    "ig": (255, 0, 255),
    "lymphocyte": (255, 128, 0),
    "monocyte": (0, 200, 0),
    "neutrophil": (255, 255, 0),
    "platelet": (0, 215, 255),
}
RBC_COLOUR = (90, 90, 220)
REVIEW_COLOUR = (0, 0, 255)


def annotate(
    image_bgr: np.ndarray, cells: Sequence[Cell], show_rbc: bool = False, scale: float = 1.0
) -> np.ndarray:
    """A copy of the frame (resized by ``scale``) with each cell's box and label; review cells get a
    thick red frame. Line widths follow the frame's original width, so a preview looks like a shrunk
    full-size drawing."""
    if scale != 1.0:
        size = (max(1, round(image_bgr.shape[1] * scale)), max(1, round(image_bgr.shape[0] * scale)))
        canvas = cv2.resize(image_bgr, size, interpolation=cv2.INTER_AREA)
    else:
        canvas = image_bgr.copy()
    full = max(1, round(image_bgr.shape[1] / 320))
    thickness = max(1, round(full * scale))
    for cell in cells:
        x, y, w, h = (round(v * scale) for v in cell.bbox)
        if cell.kind == "rbc":
            if show_rbc:
                cv2.rectangle(canvas, (x, y), (x + w, y + h), RBC_COLOUR, 1)
            continue
        colour = CLASS_COLOURS.get(cell.label or "", (255, 255, 255))
        if cell.review:
            cv2.rectangle(
                canvas,
                (x - 3 * thickness, y - 3 * thickness),
                (x + w + 3 * thickness, y + h + 3 * thickness),
                REVIEW_COLOUR,
                2 * thickness,
            )
        cv2.rectangle(canvas, (x, y), (x + w, y + h), colour, thickness)
        top = max(cell.probs.values()) if cell.probs else 0.0
        text = f"{cell.label} {top:.2f}" + (" ?" if cell.review else "")
        origin = (x, max(12, y - 4))
        font = 0.45 * full * scale
        cv2.putText(canvas, text, origin, cv2.FONT_HERSHEY_SIMPLEX, font, (0, 0, 0), 3 * thickness)
        cv2.putText(canvas, text, origin, cv2.FONT_HERSHEY_SIMPLEX, font, colour, thickness)
    return canvas


def preview_jpeg(
    image_bgr: np.ndarray, cells: Sequence[Cell], width: int, quality: int = 75
) -> tuple[bytes, int, int, float]:
    """Annotated, downscaled JPEG for the `preview` topic."""
    scale = min(1.0, width / image_bgr.shape[1])
    canvas = annotate(image_bgr, cells, scale=scale)
    ok, data = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return data.tobytes(), canvas.shape[1], canvas.shape[0], scale


def thumb_jpeg(crop_bgr: np.ndarray, quality: int = 85) -> bytes:
    ok, data = cv2.imencode(".jpg", crop_bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return data.tobytes()

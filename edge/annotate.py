"""Drawing boxes on frames: the preview a bench display shows and the README picture."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

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


def annotate(image_bgr: np.ndarray, cells: list[dict[str, Any]], show_rbc: bool = False) -> np.ndarray:
    """A copy of the frame with each cell's box and label; review cells get a thick red frame."""
    canvas = image_bgr.copy()
    thickness = max(1, round(canvas.shape[1] / 320))
    for cell in cells:
        x, y, w, h = cell["bbox"]
        if cell["kind"] == "rbc":
            if show_rbc:
                cv2.rectangle(canvas, (x, y), (x + w, y + h), RBC_COLOUR, 1)
            continue
        colour = CLASS_COLOURS.get(cell["label"] or "", (255, 255, 255))
        if cell["review"]:
            cv2.rectangle(
                canvas,
                (x - 3 * thickness, y - 3 * thickness),
                (x + w + 3 * thickness, y + h + 3 * thickness),
                REVIEW_COLOUR,
                2 * thickness,
            )
        cv2.rectangle(canvas, (x, y), (x + w, y + h), colour, thickness)
        text = f"{cell['label']} {max(cell['probs'].values()):.2f}" + (" ?" if cell["review"] else "")
        origin = (x, max(12, y - 4))
        cv2.putText(canvas, text, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.45 * thickness, (0, 0, 0), 3 * thickness)
        cv2.putText(canvas, text, origin, cv2.FONT_HERSHEY_SIMPLEX, 0.45 * thickness, colour, thickness)
    return canvas


def preview_jpeg(
    image_bgr: np.ndarray, cells: list[dict[str, Any]], width: int, quality: int = 75
) -> tuple[bytes, int, int, float]:
    """Annotated, downscaled JPEG for the `preview` topic."""
    scale = min(1.0, width / image_bgr.shape[1])
    canvas = annotate(image_bgr, cells)
    if scale < 1.0:
        canvas = cv2.resize(canvas, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return data.tobytes(), canvas.shape[1], canvas.shape[0], scale


def thumb_jpeg(crop_bgr: np.ndarray, quality: int = 85) -> bytes:
    ok, data = cv2.imencode(".jpg", crop_bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return data.tobytes()

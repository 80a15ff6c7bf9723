"""The one interface every classifier backend implements, and what all backends share.

Backends (ONNX Runtime on the CPU, TensorRT on the Jetson) differ only in how they run the network;
preprocessing and turning network outputs into probabilities, uncertainty and anomaly scores live
here, so a model gives the same answers whichever backend runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from edge.modelmeta import ModelMetadata


@dataclass(frozen=True)
class Predictions:
    probs: np.ndarray  # (N, C) calibrated class probabilities
    uncertainty: np.ndarray  # (N,) 0 = sure .. 1 = unsure
    anomaly: np.ndarray  # (N,) 0 = typical .. 1 = unlike the training classes

    @classmethod
    def empty(cls, num_classes: int) -> Predictions:
        return cls(np.zeros((0, num_classes), np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32))

    def __len__(self) -> int:
        return len(self.probs)


class Classifier(Protocol):
    metadata: ModelMetadata
    model_id: str
    path: Path

    def classify(self, crops_bgr: np.ndarray) -> Predictions:
        """Classify a batch of crops (N, S, S, 3) uint8 BGR at the model's input size and scale."""
        ...


def check_batch(crops_bgr: np.ndarray, size: int) -> None:
    """Refuse a wrongly shaped batch with a message that says what was expected."""
    if not isinstance(crops_bgr, np.ndarray) or crops_bgr.dtype != np.uint8:
        raise ValueError("crops must be a uint8 numpy array")
    if crops_bgr.ndim != 4 or crops_bgr.shape[1:] != (size, size, 3):
        raise ValueError(f"crops must have shape (N, {size}, {size}, 3); got {tuple(crops_bgr.shape)}")


def hide_context(crops_bgr: np.ndarray, radius: float) -> np.ndarray:
    """Paint everything outside a centred disc (``radius`` × the crop side, soft 2 px edge) with each
    crop's plasma colour (the median of its brightest fifth). The centred cell is what is being named;
    its neighbours differ between labs (PBC's ring of red cells, a white cell alone on plasma
    elsewhere), so a model that declares ``context_radius`` never sees them, in training or here."""
    crops = np.asarray(crops_bgr)
    if len(crops) == 0:
        return crops.copy()
    n, h, w = crops.shape[:3]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    distance = np.hypot(xx - (w - 1) / 2, yy - (h - 1) / 2)
    keep = np.clip((radius * min(h, w) - distance) / 2.0 + 0.5, 0.0, 1.0)[None, :, :, None]
    grey = crops.astype(np.float32).mean(axis=3).reshape(n, -1)
    bright = grey >= np.percentile(grey, 80, axis=1, keepdims=True)
    flat = crops.reshape(n, -1, 3)
    plasma = np.stack([np.median(flat[i][bright[i]], axis=0) for i in range(n)]).astype(np.float32)
    out = crops.astype(np.float32) * keep + plasma[:, None, None, :] * (1.0 - keep)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def preprocess(crops_bgr: np.ndarray, meta: ModelMetadata) -> np.ndarray:
    """uint8 BGR NHWC -> normalised float32 NCHW in the model's channel order."""
    if meta.context_radius:
        crops_bgr = hide_context(crops_bgr, meta.context_radius)
    n, height, width = crops_bgr.shape[:3]
    if n == 0 or crops_bgr.shape[3] != 3:
        return _normalise(crops_bgr, meta)
    # every uint8 level's normalised value, per BGR channel: a lookup replaces a multiply and a subtract
    # per value (the table holds the very float32 results the arithmetic gives)
    table = _normalise(np.arange(256, dtype=np.uint8).reshape(1, 256, 1, 1).repeat(3, axis=3), meta)
    table = table[0, :, :, 0].T if meta.channel_order != "RGB" else table[0, ::-1, :, 0].T
    looked_up = cv2.LUT(np.ascontiguousarray(crops_bgr).reshape(n * height, width, 3),
                        np.ascontiguousarray(table).reshape(1, 256, 3))
    nhwc = looked_up.reshape(n, height, width, 3)
    return np.ascontiguousarray((nhwc[..., ::-1] if meta.channel_order == "RGB" else nhwc).transpose(0, 3, 1, 2))


def _normalise(crops_bgr: np.ndarray, meta: ModelMetadata) -> np.ndarray:
    """The normalisation itself, value by value: uint8 BGR NHWC -> float32 NCHW in the model's order."""
    batch = crops_bgr[..., ::-1] if meta.channel_order == "RGB" else crops_bgr
    scale = 1.0 / (255.0 * np.asarray(meta.std, np.float32))
    offset = np.asarray(meta.mean, np.float32) / np.asarray(meta.std, np.float32)
    normalised = batch.astype(np.float32) * scale - offset
    return np.ascontiguousarray(normalised.transpose(0, 3, 1, 2))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def scores_from_outputs(outputs: dict[str, np.ndarray], meta: ModelMetadata) -> Predictions:
    """Calibrated probabilities plus uncertainty/anomaly: from the model's heads when it has them,
    otherwise the baseline measures (normalised entropy, 1 - max probability)."""
    logits = outputs[meta.logits_output].astype(np.float32)
    probs = softmax(logits / np.float32(meta.temperature))
    if meta.uncertainty_output:
        uncertainty = np.clip(outputs[meta.uncertainty_output].reshape(-1), 0.0, 1.0)
    else:
        entropy = -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=1)
        uncertainty = entropy / np.log(probs.shape[1])
    if meta.anomaly_output:
        anomaly = np.clip(outputs[meta.anomaly_output].reshape(-1), 0.0, 1.0)
    else:
        anomaly = 1.0 - probs.max(axis=1)
    return Predictions(probs.astype(np.float32), uncertainty.astype(np.float32), anomaly.astype(np.float32))

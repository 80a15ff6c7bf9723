"""Domain-level colour matching (Reinhard et al. 2001): move a site's CIELAB mean and spread onto PBC's.

One fixed affine map per CIELAB channel, fitted once on the site's unlabelled crops (whole crops,
background included) against the PBC replay crops, then applied to every crop from that site. Measured
in ``python -m engines.experiments.adapt_methods`` only: the runtime does not apply it yet (it would have to be
stored with the site model and applied before the network, on the device).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class LabStats:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _lab(crops_bgr: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 BGR to float32 CIELAB (L 0..100, a and b about -128..127)."""
    flat = crops_bgr.reshape(-1, crops_bgr.shape[-2], 3).astype(np.float32) / 255.0
    return cv2.cvtColor(flat, cv2.COLOR_BGR2Lab).reshape(crops_bgr.shape)


def lab_stats(crops_bgr: np.ndarray) -> LabStats:
    lab = _lab(crops_bgr).reshape(-1, 3).astype(np.float64)
    mean, std = lab.mean(0), lab.std(0)
    return LabStats(tuple(float(v) for v in mean), tuple(float(max(v, 1e-3)) for v in std))


def match(crops_bgr: np.ndarray, source: LabStats, target: LabStats) -> np.ndarray:
    """Crops with each CIELAB channel standardised by ``source`` and rescaled to ``target``; uint8 BGR."""
    if not len(crops_bgr):
        return crops_bgr
    lab = _lab(crops_bgr)
    mean_s, std_s = np.array(source.mean, np.float32), np.array(source.std, np.float32)
    mean_t, std_t = np.array(target.mean, np.float32), np.array(target.std, np.float32)
    lab = (lab - mean_s) / std_s * std_t + mean_t
    lab[..., 0] = np.clip(lab[..., 0], 0.0, 100.0)
    flat = lab.reshape(-1, crops_bgr.shape[-2], 3).astype(np.float32)
    bgr = cv2.cvtColor(flat, cv2.COLOR_Lab2BGR)
    return (np.clip(bgr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).reshape(crops_bgr.shape)

"""Fitting the cell finder to a site's frames, without labels (part of ``cytoedge calibrate site``).

The finder's stain measure (edge.cellfinder._od_stain) already adapts to each frame's lamp, camera
and red-cell colour. What is left to fit is the *noise* of that measure at this microscope: on the
shared microscopes three quarters of red-cell pixels stay under 10 stain units, and the thresholds
(nucleus 28, cytoplasm 10, platelet 10/24) sit above that. A camera with more colour noise or
chromatic fringes raises that level, and the thresholds are raised in proportion, so red cells do
not turn into "white cells" and "platelets". Sizes need no fitting: they are in micrometres.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from edge.cellfinder import FinderParams, _od_stain, find_cells

REFERENCE_NOISE = 10.0  # 75th percentile of the stain on red-cell pixels, shared microscopes: 6..10
STAIN_KEYS = ("nucleus_delta", "cyto_delta", "platelet_delta", "platelet_peak")


@dataclass(frozen=True)
class FinderFit:
    params: FinderParams
    noise: float  # 75th percentile of the stain on red-cell pixels at this site
    factor: float  # how much the stain thresholds were raised (1 = defaults kept)
    per_frame: dict[str, float]  # cells found per frame by kind, with the fitted parameters
    frames: int

    def changed(self) -> dict[str, float]:
        """The [finder] keys that differ from the defaults (what ``--write`` stores)."""
        base = FinderParams()
        return {k: getattr(self.params, k) for k in STAIN_KEYS if getattr(self.params, k) != getattr(base, k)}

    def summary(self) -> str:
        counts = ", ".join(f"{kind} {self.per_frame.get(kind, 0.0):.1f}" for kind in ("wbc", "platelet", "rbc"))
        action = "defaults kept" if self.factor == 1 else f"stain thresholds raised x{self.factor:.2f}"
        return (f"finder: stain noise on red cells {self.noise:.1f} (reference {REFERENCE_NOISE:g}; {action}); "
                f"cells per frame: {counts}; {self.frames} frame(s)")


def stain_noise(frames: Sequence[np.ndarray], um_per_px: float, params: FinderParams | None = None) -> float:
    """75th percentile of the stain measure over red-cell pixels (darker than the plasma in green)."""
    params = params or FinderParams()
    values = []
    for image in frames:
        scale = min(1.0, um_per_px / params.work_um_per_px)
        small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else image
        small = cv2.GaussianBlur(small, (3, 3), 0)
        green = small[:, :, 1]
        bright = green >= np.percentile(green, params.background_percentile)
        stain = _od_stain(small, bright)
        red_cells = green < np.percentile(green, 90) - params.rbc_delta
        values.append(stain[red_cells])
    pooled = np.concatenate(values) if values else np.empty(0)
    return float(np.percentile(pooled, 75)) if len(pooled) else 0.0


def fit_finder(frames: Sequence[np.ndarray], um_per_px: float, params: FinderParams | None = None) -> FinderFit:
    """Raise the stain thresholds when this site's red cells are noisier than the shared microscopes'."""
    params = params or FinderParams()
    noise = stain_noise(frames, um_per_px, params)
    factor = round(max(1.0, noise / REFERENCE_NOISE), 2)
    if factor > 1:
        params = dataclasses.replace(params, **{k: round(getattr(params, k) * factor, 1) for k in STAIN_KEYS})
    counts: Counter[str] = Counter()
    for image in frames:
        counts.update(d.kind for d in find_cells(image, um_per_px, params))
    per_frame = {kind: counts[kind] / max(1, len(frames)) for kind in ("wbc", "platelet", "rbc")}
    return FinderFit(params, noise, factor, per_frame, len(frames))

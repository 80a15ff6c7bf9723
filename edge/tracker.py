"""Cell identity across frames, so each cell on the slide is counted once.

A camera sends the same field many times a second; a differential that counted every frame's cells
would count a white cell that sits in view for two seconds sixty times. Each cell gets a track id
that persists while it stays in view (box overlap with the previous sighting, and for classified
cells a similar-looking crop), and ``first_seen`` is true only on its first frame. Unrelated
frames (a replayed folder of different fields) almost never pass both tests, so they count in full.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np


def iou(a: list[int], b: list[int]) -> float:
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    overlap_w = min(ax1, bx1) - max(a[0], b[0])
    overlap_h = min(ay1, by1) - max(a[1], b[1])
    if overlap_w <= 0 or overlap_h <= 0:
        return 0.0
    inter = overlap_w * overlap_h
    return inter / float(a[2] * a[3] + b[2] * b[3] - inter)


def signature(crop_bgr: np.ndarray) -> np.ndarray:
    """A small zero-mean, unit-norm grey thumbnail: cheap to compare, insensitive to brightness."""
    grey = cv2.cvtColor(cv2.resize(crop_bgr, (16, 16), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2GRAY)
    vector = grey.astype(np.float32).ravel()
    vector -= vector.mean()
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


@dataclass
class _Track:
    track_id: int
    kind: str
    bbox: list[int]
    signature: np.ndarray | None
    missed: int = 0


class CellTracker:
    """Greedy frame-to-frame matching. State is bounded: tracks unseen for ``max_missed`` frames go."""

    def __init__(self, min_iou: float = 0.4, min_similarity: float = 0.75, max_missed: int = 5) -> None:
        self.min_iou = min_iou
        self.min_similarity = min_similarity
        self.max_missed = max_missed
        self._tracks: list[_Track] = []
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._tracks)

    def assign(self, cells: list[dict[str, Any]], crops: dict[int, np.ndarray]) -> None:
        """Set ``track`` and ``first_seen`` on each cell record, in place."""
        signatures = {cell_id: signature(crop) for cell_id, crop in crops.items()}
        pairs = []
        for cell_index, cell in enumerate(cells):
            for track_index, track in enumerate(self._tracks):
                if track.kind != cell["kind"]:
                    continue
                overlap = iou(cell["bbox"], track.bbox)
                if overlap < self.min_iou:
                    continue
                own = signatures.get(cell["id"])
                if own is not None and track.signature is not None and self._different(own, track.signature):
                    continue
                pairs.append((overlap, cell_index, track_index))
        pairs.sort(reverse=True)
        matched_cells: dict[int, int] = {}
        used_tracks: set[int] = set()
        for _overlap, cell_index, track_index in pairs:
            if cell_index in matched_cells or track_index in used_tracks:
                continue
            matched_cells[cell_index] = track_index
            used_tracks.add(track_index)
        survivors = []
        for track_index, track in enumerate(self._tracks):
            if track_index not in used_tracks:
                track.missed += 1
                if track.missed <= self.max_missed:
                    survivors.append(track)
        for cell_index, cell in enumerate(cells):
            own = signatures.get(cell["id"])
            if cell_index in matched_cells:
                track = self._tracks[matched_cells[cell_index]]
                track.bbox, track.missed = cell["bbox"], 0
                if own is not None:
                    track.signature = own
                cell["track"], cell["first_seen"] = track.track_id, False
                survivors.append(track)
            else:
                track = _Track(self._next_id, cell["kind"], cell["bbox"], own)
                self._next_id += 1
                cell["track"], cell["first_seen"] = track.track_id, True
                survivors.append(track)
        self._tracks = survivors

    def _different(self, one: np.ndarray, other: np.ndarray) -> bool:
        return float(one @ other) < self.min_similarity

    def reset(self) -> None:
        self._tracks.clear()

"""Cell identity across frames, so each cell on the slide is counted once.

A camera sends the same field many times a second; a differential that counted every frame's cells
would count a white cell that sits in view for two seconds sixty times. Each cell gets a track id
that persists while it stays in view (box overlap with the previous sighting, and for classified
cells a similar-looking crop), and ``first_seen`` is true only on its first frame. Unrelated
frames (a replayed folder of different fields) almost never pass both tests, so they count in full.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edge.cells import Cell


def iou(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int]) -> float:
    ax1, ay1, bx1, by1 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    overlap_w = min(ax1, bx1) - max(a[0], b[0])
    overlap_h = min(ay1, by1) - max(a[1], b[1])
    if overlap_w <= 0 or overlap_h <= 0:
        return 0.0
    inter = overlap_w * overlap_h
    return inter / float(a[2] * a[3] + b[2] * b[3] - inter)


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` (N, 4) with every box in ``b`` (M, 4), as ``iou`` computes it."""
    rows, cols, values = _overlapping(a, b)
    matrix = np.zeros((len(a), len(b)))
    matrix[rows, cols] = values
    return matrix


def _overlapping(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs of boxes of ``a`` (N, 4) and ``b`` (M, 4) that overlap, in row-major order, with their
    IoU as ``iou`` computes it. A 1080p frame's ~130 cells meet ~600 tracks but overlap only a few,
    so the division and everything after it runs on those few pairs only."""
    a32, b32 = np.asarray(a, np.int32), np.asarray(b, np.int32)  # frame pixels: no overflow
    overlap_w = (np.minimum((a32[:, 0] + a32[:, 2])[:, None], (b32[:, 0] + b32[:, 2])[None])
                 - np.maximum(a32[:, 0][:, None], b32[:, 0][None]))
    overlap_h = (np.minimum((a32[:, 1] + a32[:, 3])[:, None], (b32[:, 1] + b32[:, 3])[None])
                 - np.maximum(a32[:, 1][:, None], b32[:, 1][None]))
    rows, cols = np.nonzero((overlap_w > 0) & (overlap_h > 0))
    inter = overlap_w[rows, cols].astype(np.int64) * overlap_h[rows, cols]
    union = (a[rows, 2] * a[rows, 3]).astype(np.int64) + b[cols, 2] * b[cols, 3] - inter
    return rows, cols, inter / union.astype(np.float64)


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
    bbox: tuple[int, ...]
    signature: np.ndarray | None
    missed: int = 0


class CellTracker:
    """Greedy frame-to-frame matching. State is bounded: tracks unseen for ``max_missed`` frames go."""

    def __init__(self, min_iou: float = 0.4, min_similarity: float = 0.75, max_missed: int = 5) -> None:
        if not min_iou > 0:  # a match needs some overlap: only overlapping pairs are ever compared
            raise ValueError(f"min_iou must be > 0, got {min_iou!r}")
        self.min_iou = min_iou
        self.min_similarity = min_similarity
        self.max_missed = max_missed
        self._tracks: list[_Track] = []
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._tracks)

    def assign(self, cells: list[Cell]) -> None:
        """Set ``track`` and ``first_seen`` on each cell, in place (classified cells are also
        compared by how their crop looks)."""
        signatures = {cell.id: signature(cell.crop) for cell in cells if cell.crop is not None}
        pairs = self._candidates(cells, signatures)
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
            own = signatures.get(cell.id)
            if cell_index in matched_cells:
                track = self._tracks[matched_cells[cell_index]]
                track.bbox, track.missed = cell.bbox, 0
                if own is not None:
                    track.signature = own
                cell.track, cell.first_seen = track.track_id, False
                survivors.append(track)
            else:
                track = _Track(self._next_id, cell.kind, cell.bbox, own)
                self._next_id += 1
                cell.track, cell.first_seen = track.track_id, True
                survivors.append(track)
        self._tracks = survivors

    def _candidates(self, cells: list[Cell], signatures: dict[int, np.ndarray]) -> list[tuple[float, int, int]]:
        """(overlap, cell index, track index) of every cell-track pair that may match, best first.

        All pairs at once with numpy (a 1080p frame has ~130 cells, each against as many tracks);
        the same overlaps and order as comparing pair by pair."""
        if not cells or not self._tracks:
            return []
        boxes = np.array([cell.bbox for cell in cells], np.int64).reshape(-1, 4)
        held = np.array([track.bbox for track in self._tracks], np.int64).reshape(-1, 4)
        rows, cols, overlap = _overlapping(boxes, held)
        pairs = []
        for cell_index, track_index, value in zip(rows.tolist(), cols.tolist(), overlap.tolist(), strict=True):
            track = self._tracks[track_index]
            if value < self.min_iou or cells[cell_index].kind != track.kind:
                continue
            own = signatures.get(cells[cell_index].id)
            if own is not None and track.signature is not None and self._different(own, track.signature):
                continue
            pairs.append((value, cell_index, track_index))
        pairs.sort(reverse=True)
        return pairs

    def _different(self, one: np.ndarray, other: np.ndarray) -> bool:
        return float(one @ other) < self.min_similarity

    def reset(self) -> None:
        self._tracks.clear()

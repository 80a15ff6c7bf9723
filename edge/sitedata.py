"""A site's own cells, gathered for `cytoedge adapt`: reviewed crops with their labels, and the
unlabelled crops the classifier would see in that microscope's recorded frames.

Both come out exactly as the running service makes them (same cell finder, same physical field,
same crop size), so a site model learns from what it will later be shown. Damaged inputs are
skipped and counted, never fatal: one unreadable crop must not throw away a day of reviewing.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from edge.analysis import CLASSIFIED_KINDS
from edge.crops import cut_crops
from edge.finders import FindFn


@dataclass
class Reviewed:
    """Crops (N, S, S, 3) uint8 BGR and the reviewer's class for each."""

    crops: np.ndarray
    labels: list[str]
    sessions: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


@dataclass
class Unlabelled:
    """Crops the classifier would see, and the finder's kind (wbc / platelet) of each."""

    crops: np.ndarray
    kinds: list[str]
    frames: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


# Platelets' share of the crops the shipped models were trained on (pbc/manifest.csv: 2,007 of 14,513).
TRAINING_PLATELET_SHARE = 0.138


def batchnorm_pool(unlabelled: Unlabelled, platelet_share: float = TRAINING_PLATELET_SHARE, seed: int = 0
                   ) -> tuple[np.ndarray, int]:
    """The crops batch-norm statistics are re-estimated on, and how many platelets were left out: every white
    cell, platelets only up to the share they had in training. A smear frame can hold more platelets than
    white cells (120 BCCD frames: 161 to 130); statistics re-estimated on that mix would move with the class
    mix as well as with the microscope, and the adaptation was measured on white cells (docs/robustness.md)."""
    kinds = np.array(unlabelled.kinds)
    white, platelets = np.flatnonzero(kinds != "platelet"), np.flatnonzero(kinds == "platelet")
    keep = int(platelet_share / (1.0 - platelet_share) * len(white))
    dropped = max(0, len(platelets) - keep)
    if dropped:
        platelets = np.random.default_rng(seed).choice(platelets, size=keep, replace=False)
    return unlabelled.crops[np.sort(np.concatenate([white, platelets]))], dropped


# Lines the display and `cytoedge report --sign` add to a session file besides decisions.
SLIDE_EVENTS = ("slide-end", "signoff")


def _decisions(session: Path, skipped: Counter[str]) -> dict[tuple[str, int, int], dict]:
    """The last decision per cell (a later click replaces an earlier one, as on the display)."""
    latest: dict[tuple[str, int, int], dict] = {}
    for line in session.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") in SLIDE_EVENTS:
                continue  # the slide's end and its sign-off: not a decision, nothing wrong with them
            key = (str(record["run"]), int(record["frame_id"]), int(record["cell_id"]))
        except (ValueError, KeyError, TypeError):
            skipped["unreadable session line"] += 1
            continue
        latest[key] = record
    return latest


def read_reviews(folders: Iterable[Path], classes: list[str], size: int) -> Reviewed:
    """Every decided cell with a saved crop in the display's session files (``slide-*.jsonl``)."""
    crops: list[np.ndarray] = []
    labels: list[str] = []
    skipped: Counter[str] = Counter()
    sessions = 0
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"review folder not found: {folder}")
        for session in sorted(folder.glob("slide-*.jsonl")):
            sessions += 1
            for record in _decisions(session, skipped).values():
                label = record.get("reviewer_label")
                crop_name = record.get("crop")
                if label not in classes:
                    skipped["class the model does not have"] += 1
                    continue
                if not isinstance(crop_name, str) or ".." in Path(crop_name).parts:
                    skipped["no crop saved"] += 1
                    continue
                image = cv2.imread(str(folder / crop_name), cv2.IMREAD_COLOR)
                if image is None:
                    skipped["unreadable crop"] += 1
                    continue
                if image.shape[:2] != (size, size):
                    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
                crops.append(image)
                labels.append(label)
    array = np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)
    return Reviewed(array, labels, sessions, skipped)


def crops_from_frames(
    sources: Iterable[Path],
    um_per_px: float,
    find: FindFn,
    field_um: float,
    size: int,
    max_crops: int = 5000,
) -> Unlabelled:
    """Run the service's cell finder over recorded frames and cut what the classifier would see."""
    from edge.replay import ReplaySource

    crops: list[np.ndarray] = []
    kinds: list[str] = []
    skipped: Counter[str] = Counter()
    frames = 0
    stop = threading.Event()
    for path in sources:
        if len(crops) >= max_crops:
            break
        source = ReplaySource(Path(path), pace="max")
        for frame in source.frames(stop):
            frames += 1
            try:
                found = [d for d in find(frame.image, um_per_px) if d.kind in CLASSIFIED_KINDS]
            except (cv2.error, ValueError):
                skipped["frame the cell finder could not read"] += 1
                continue
            if found:
                crops.extend(cut_crops(frame.image, [d.bbox for d in found], um_per_px, field_um, size))
                kinds.extend(d.kind for d in found)
            if len(crops) >= max_crops:
                break
        if source.stats.skipped:
            skipped["unreadable frame"] += source.stats.skipped
    array = np.stack(crops[:max_crops]) if crops else np.zeros((0, size, size, 3), np.uint8)
    return Unlabelled(array, kinds[:max_crops], frames, skipped)

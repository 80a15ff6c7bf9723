"""The speed-ups of issue 19 must not change what is found: digests of the quality gate's measures, the
cell finder's detections and the cut crops, recorded with the finder as it was before them.

Covers the bundled frames, camera-sized frames tiled from them (1920x1080 and 3840x2160) and, where
../shared/data is present, a fixed sample of TXL-PBC frames from its three microscopes at two scales
each. Both stain measures (optical density and B - R) are checked. Re-record only for a deliberate
change of the finder's output: ``python -m tests.test_finder_unchanged --record``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.benchinput import tiled_frame
from edge.cellfinder import FinderParams, find_cells
from edge.crops import cut_crops
from edge.quality import measure
from tests.conftest import SAMPLES, SHARED_DATA

DIGESTS = Path(__file__).parent / "data" / "finder-digests.json"
TXL = SHARED_DATA / "txl-pbc"
SHARED_FRAMES = 200
SCALES = {"bundled": (0.075,), "tiled": (0.075,), "raabin": (0.03, 0.075), "bccd": (0.075, 0.2), "bcd": (0.1, 0.4)}
FIELD_UM, CROP_SIZE = 36.0, 64  # the bundled models' crops


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:20]


def frame_digests(image: np.ndarray, scales: tuple[float, ...]) -> dict[str, str]:
    """Digests of one frame's gate measures and, per scale and stain measure, its cells and crops."""
    out = {"gate": _digest(repr(measure(image)).encode())}
    for um_per_px in scales:
        for stain_od in (True, False):
            found = find_cells(image, um_per_px, FinderParams(stain_od=stain_od))
            crops = cut_crops(image, [d.bbox for d in found], um_per_px, FIELD_UM, CROP_SIZE)
            key = f"{um_per_px:g}/{'od' if stain_od else 'br'}"
            out[f"{key}/cells"] = _digest(repr(found).encode())
            out[f"{key}/crops"] = _digest(crops.tobytes())
    return out


def bundled_frames() -> Iterator[tuple[str, np.ndarray, tuple[float, ...]]]:
    """The bundled frames, then frames tiled from them at camera sizes."""
    files = sorted(SAMPLES.glob("*.jpg"))
    tiles = [cv2.imread(str(p)) for p in files]
    for path, image in zip(files, tiles, strict=True):
        yield f"bundled/{path.name}", image, SCALES["bundled"]
    for first in range(3):
        yield f"tiled-1920x1080/{first}", tiled_frame(tiles, first, (1920, 1080)), SCALES["tiled"]
    yield "tiled-3840x2160/0", tiled_frame(tiles, 0, (3840, 2160)), SCALES["tiled"]


def shared_frames() -> Iterator[tuple[str, np.ndarray, tuple[float, ...]]]:
    """Every n-th TXL-PBC frame of the manifest (all three microscopes), SHARED_FRAMES in all."""
    with open(TXL / "manifest.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows[:: max(1, len(rows) // SHARED_FRAMES)][:SHARED_FRAMES]:
        yield f"txl-pbc/{row['image']}", cv2.imread(str(TXL / row["image"])), SCALES[row["source"]]


def recorded() -> dict[str, dict[str, str]]:
    return json.loads(DIGESTS.read_text(encoding="utf-8"))


def changed(frames: Iterator[tuple[str, np.ndarray, tuple[float, ...]]], expected: dict[str, dict[str, str]]
            ) -> list[str]:
    """The frame/part keys whose digest differs from the recorded one."""
    differ = []
    for name, image, scales in frames:
        got = frame_digests(image, scales)
        differ += [f"{name} {part}" for part, value in got.items() if expected[name].get(part) != value]
    return differ


@pytest.mark.unit
def test_bundled_and_tiled_frames_find_the_same_cells_and_crops_as_before_the_speed_ups() -> None:
    assert changed(bundled_frames(), recorded()) == []


@pytest.mark.data
def test_shared_txl_frames_find_the_same_cells_and_crops_as_before_the_speed_ups() -> None:
    if not (TXL / "manifest.csv").is_file():
        pytest.skip(f"TXL-PBC data not found at {TXL} (set CYTOEDGE_SHARED_DATA)")
    assert changed(shared_frames(), recorded()) == []


def record() -> None:
    """Write the digests of the finder as it is now (bundled, tiled and, when present, shared frames)."""
    frames = list(bundled_frames()) + (list(shared_frames()) if (TXL / "manifest.csv").is_file() else [])
    digests = {name: frame_digests(image, scales) for name, image, scales in frames}
    DIGESTS.write_text(json.dumps(digests, indent=0, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote digests of {len(digests)} frames to {DIGESTS}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        raise SystemExit("usage: python -m tests.test_finder_unchanged --record")
    record()

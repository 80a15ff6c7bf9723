"""Scale and focus calibration on the bundled BCCD frames, and the config file edit that stores them."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge import config as config_module
from edge.calibrate import (
    CalibrationError,
    estimate_focus_threshold,
    estimate_um_per_px,
    grab_frames,
    set_toml_value,
)
from edge.frames import read_image
from edge.quality import QualityParams, assess
from edge.replay import ReplaySource

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "bccd"


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return [read_image(path) for path in sorted(SAMPLES.glob("*.jpg"))[:8]]


def test_scale_from_red_cells_matches_the_bundled_frames(frames: list[np.ndarray]) -> None:
    estimate = estimate_um_per_px(frames)
    assert estimate.um_per_px == pytest.approx(0.072, rel=0.07)  # annotated red-cell boxes: 0.072
    assert estimate.count >= 20 and estimate.frames == 8
    assert 90 < estimate.median_px < 115 and estimate.iqr_px > 0
    assert "um_per_px = 0.07" in estimate.summary() and "confidence" in estimate.summary()


@pytest.mark.parametrize("factor", [0.5, 0.7])
def test_scale_of_smaller_frames_needs_no_starting_guess(frames: list[np.ndarray], factor: float) -> None:
    """Another magnification: the same smear at a coarser scale gives a proportionally larger µm/px."""
    small = [cv2.resize(f, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA) for f in frames]
    estimate = estimate_um_per_px(small, current_um_per_px=0.5)
    assert estimate.um_per_px == pytest.approx(0.072 / factor, rel=0.08)


def test_pale_centred_cells_are_sized_whole() -> None:
    """A ring with a pale centre counts as one cell of its outer size, not a small dark annulus."""
    canvas = np.full((480, 640, 3), (200, 215, 225), np.uint8)
    for row in range(4):
        for col in range(6):
            centre = (60 + col * 100, 70 + row * 110)
            cv2.circle(canvas, centre, 35, (150, 140, 190), -1)
            cv2.circle(canvas, centre, 15, (195, 210, 222), -1)  # central pallor almost as bright as plasma
    estimate = estimate_um_per_px([canvas])
    assert estimate.method == "isolated" and estimate.count == 24
    assert estimate.median_px == pytest.approx(71 * 1.12, rel=0.05)


def test_scale_is_refused_when_the_frames_cannot_tell(frames: list[np.ndarray]) -> None:
    blank = [np.full_like(frames[0], 190)] * 3
    with pytest.raises(CalibrationError, match=r"only 0 red cell\(s\) found in 3 frame\(s\)"):
        estimate_um_per_px(blank)
    with pytest.raises(CalibrationError, match="no frames"):
        estimate_um_per_px([])
    noise = [np.random.default_rng(i).integers(0, 255, frames[0].shape, dtype=np.uint8) for i in range(3)]
    with pytest.raises(CalibrationError):
        estimate_um_per_px(noise)


def test_focus_threshold_passes_good_frames_and_fails_soft_ones(frames: list[np.ndarray]) -> None:
    estimate = estimate_focus_threshold(frames)
    assert 0 < estimate.threshold < estimate.low  # every good frame is above it
    params = QualityParams(min_focus=estimate.threshold)
    assert all(assess(f, params) is None for f in frames)
    soft = [cv2.GaussianBlur(f, (0, 0), 2) for f in frames]
    assert all((assess(f, params) or "").startswith("out of focus") for f in soft)


def test_grab_frames_takes_frames_from_any_source() -> None:
    source = ReplaySource(SAMPLES, pace="max")
    grabbed = grab_frames(source, count=3, every=2)
    assert len(grabbed) == 3 and grabbed[0].shape == (480, 640, 3)
    assert source.stats.read == 5  # frames 0, 2 and 4 kept


CONFIG = """# lab microscope 2
[source]
kind = "replay"   # for now
path = "/data/run1"

[microscope]
um_per_px = 0.1   # measured 2023 with a stage micrometer

[audit]
path = ""
"""


def test_toml_edit_changes_only_the_key_and_keeps_comments(tmp_path: Path) -> None:
    path = tmp_path / "cytoedge.toml"
    path.write_text(CONFIG, encoding="utf-8")
    set_toml_value(path, "microscope", "um_per_px", 0.0752)
    text = path.read_text(encoding="utf-8")
    assert text == CONFIG.replace("um_per_px = 0.1   #", "um_per_px = 0.0752   #")
    assert config_module.load(path)["microscope"]["um_per_px"] == 0.0752
    assert [p.name for p in tmp_path.iterdir()] == ["cytoedge.toml"]  # no temp file left behind


def test_toml_edit_adds_missing_keys_and_sections(tmp_path: Path) -> None:
    path = tmp_path / "cytoedge.toml"
    path.write_text(CONFIG, encoding="utf-8")
    set_toml_value(path, "source", "pace", "max")
    set_toml_value(path, "quality", "min_sharpness", 9.5)
    set_toml_value(path, "camera", "colour_gains", [1.8, 1.4])
    parsed = tomllib.loads(path.read_text(encoding="utf-8"))
    assert parsed["source"] == {"kind": "replay", "path": "/data/run1", "pace": "max"}
    assert parsed["quality"] == {"min_sharpness": 9.5}
    assert parsed["camera"] == {"colour_gains": [1.8, 1.4]}
    assert parsed["microscope"] == {"um_per_px": 0.1} and "# measured 2023" in path.read_text(encoding="utf-8")
    fresh = tmp_path / "new" / "cytoedge.toml"
    set_toml_value(fresh, "microscope", "um_per_px", 0.15)
    assert tomllib.loads(fresh.read_text(encoding="utf-8")) == {"microscope": {"um_per_px": 0.15}}

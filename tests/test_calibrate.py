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
    estimate = estimate_um_per_px(frames, current_um_per_px=0.075)
    assert estimate.um_per_px == pytest.approx(0.075, rel=0.07)
    assert estimate.count >= 100 and estimate.frames == 8
    assert 80 < estimate.median_px < 115 and estimate.iqr_px > 0
    assert "um_per_px = 0.07" in estimate.summary()


@pytest.mark.parametrize("start", [0.075, 0.2, 0.05])
def test_scale_of_half_size_frames_is_found_from_a_wrong_start(frames: list[np.ndarray], start: float) -> None:
    half = [cv2.resize(f, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA) for f in frames]
    estimate = estimate_um_per_px(half, current_um_per_px=start)
    assert estimate.um_per_px == pytest.approx(0.15, rel=0.07)


def test_scale_is_refused_without_enough_red_cells(frames: list[np.ndarray]) -> None:
    blank = [np.full_like(frames[0], 190)] * 3
    with pytest.raises(CalibrationError, match=r"only 0 red cell\(s\) found in 3 frame\(s\)"):
        estimate_um_per_px(blank, current_um_per_px=0.075)
    with pytest.raises(CalibrationError, match="no frames"):
        estimate_um_per_px([], current_um_per_px=0.075)


def test_focus_threshold_passes_good_frames_and_fails_soft_ones(frames: list[np.ndarray]) -> None:
    estimate = estimate_focus_threshold(frames)
    assert 0 < estimate.threshold < estimate.low  # every good frame is above it
    params = QualityParams(min_sharpness=estimate.threshold)
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

"""A microscope none of the data comes from, as issue 14 met it: the plasma is a saturated white.

Made from the bundled BCCD frames by raising the gain until the plasma reaches 255. Before issue 14
the gate refused such frames as "clipped" and the finder, at a wrong scale, found thousands of
false cells; after `calibrate site` on them, every frame passes and each white cell is found.
"""

from __future__ import annotations

import numpy as np
import pytest

from edge.calibrate import estimate_um_per_px, fit_quality
from edge.cellfinder import find_cells
from edge.finders import bundled_detector_path
from edge.frames import read_image
from edge.learnedfinder import LearnedFinder
from edge.quality import assess, measure
from edge.sitefit import fit_finder
from engines.finder.bccd import match, read_voc
from tests.conftest import SAMPLES


def _white_plasma(image: np.ndarray) -> np.ndarray:
    gain = 255.0 / max(1.0, measure(image).brightness - 5)
    return np.clip(image.astype(np.float32) * gain, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def site() -> list[tuple[str, np.ndarray]]:
    return [(p.stem, _white_plasma(read_image(p))) for p in sorted(SAMPLES.glob("*.jpg"))]


def test_after_calibrate_site_every_white_plasma_frame_passes_the_gate(site: list) -> None:
    frames = [image for _name, image in site]
    assert all(measure(f).brightness >= 252 for f in frames)
    gate = fit_quality(frames).params
    assert [assess(f, gate) for f in frames] == [None] * len(frames)


def test_after_calibrate_site_each_white_cell_is_found_and_little_else(site: list) -> None:
    frames = [image for _name, image in site]
    scale = estimate_um_per_px(frames).um_per_px
    assert scale == pytest.approx(0.072, rel=0.10)
    params = fit_finder(frames, scale).params
    hits = truth = found = 0
    for name, image in site:
        boxes = read_voc(SAMPLES / "annotations" / f"{name}.xml")["wbc"]
        white = [d for d in find_cells(image, scale, params) if d.kind == "wbc"]
        hits += match(white, boxes)
        truth += len(boxes)
        found += len(white)
    assert hits / truth >= 0.9
    assert hits / found >= 0.9


def test_the_learned_finder_at_the_calibrated_scale_finds_each_white_cell_and_little_else(site: list) -> None:
    """The learned finder sees optical density relative to the plasma, so a saturated plasma is no new case."""
    frames = [image for _name, image in site]
    finder = LearnedFinder(bundled_detector_path())
    scale = estimate_um_per_px(frames).um_per_px
    hits = truth = found = 0
    for name, image in site:
        boxes = read_voc(SAMPLES / "annotations" / f"{name}.xml")["wbc"]
        white = [d for d in finder.find(image, scale) if d.kind == "wbc"]
        hits += match(white, boxes)
        truth += len(boxes)
        found += len(white)
    assert hits / truth >= 0.9
    assert hits / found >= 0.9

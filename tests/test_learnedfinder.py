"""The learned cell finder (engines/models/detector-v1): its contract, decoding and input, on real frames."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from edge import config as cfg
from edge.errors import ModelError
from edge.finders import bundled_detector_path, configured_finder
from edge.learnedfinder import DetectorMetadata, LearnedFinder, decode, optical_density
from edge.models import default_model_path
from engines.finder import bccd as eval_finder
from tests.conftest import SAMPLES

UM_PER_PX = 0.075  # bundled BCCD frames
FRAMES = sorted(SAMPLES.glob("*.jpg"))
META = DetectorMetadata(name="t", version="1", classes=["wbc", "rbc", "platelet"], work_um_per_px=0.3, stride=4,
                        thresholds={"wbc": 0.3, "rbc": 0.3, "platelet": 0.3})


@pytest.fixture(scope="module")
def finder() -> LearnedFinder:
    return LearnedFinder(bundled_detector_path())


def test_shipped_detector_finds_the_bundled_frames_white_cells(finder: LearnedFinder) -> None:
    """BCCD frames (the microscope of part of its training data): white cells found at IoU 0.5."""
    hits = truth = reported = 0
    for path in FRAMES:
        found = [d for d in finder.find(cv2.imread(str(path)), UM_PER_PX) if d.kind == "wbc"]
        boxes = eval_finder.read_voc(SAMPLES / "annotations" / f"{path.stem}.xml")["wbc"]
        hits += eval_finder.match(found, boxes)
        truth += len(boxes)
        reported += len(found)
    assert truth >= 20
    assert hits / truth >= 0.9 and hits / reported >= 0.9


def test_detections_are_known_kinds_inside_the_frame_with_scores_in_0_1(finder: LearnedFinder) -> None:
    image = cv2.imread(str(FRAMES[0]))
    found = finder.find(image, UM_PER_PX)
    assert found
    height, width = image.shape[:2]
    for d in found:
        x, y, w, h = d.bbox
        assert d.kind in {"wbc", "rbc", "platelet"} and 0 <= d.score <= 1
        assert x >= 0 and y >= 0 and w >= 1 and h >= 1 and x + w <= width and y + h <= height


@pytest.mark.parametrize("frame", [np.full((480, 640, 3), 255, np.uint8), np.zeros((480, 640, 3), np.uint8),
                                   np.full((3, 5, 3), 128, np.uint8), np.zeros((0, 0, 3), np.uint8)],
                         ids=["blank", "black", "tiny", "empty"])
def test_odd_frames_give_no_cells_and_do_not_raise(finder: LearnedFinder, frame: np.ndarray) -> None:
    assert finder.find(frame, UM_PER_PX) == []


def test_non_images_and_bad_scales_raise_value_error(finder: LearnedFinder) -> None:
    with pytest.raises(ValueError, match="image must be"):
        finder.find(np.zeros((8, 8, 3), np.float32), UM_PER_PX)
    with pytest.raises(ValueError, match="um_per_px"):
        finder.find(cv2.imread(str(FRAMES[0])), 0.0)


def test_half_size_frame_at_double_scale_finds_the_same_white_cells(finder: LearnedFinder) -> None:
    """The network works in micrometres: the same smear at half the pixels gives the same cells."""
    image = cv2.imread(str(FRAMES[1]))
    full = sorted(d.bbox for d in finder.find(image, UM_PER_PX) if d.kind == "wbc")
    half = cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2), interpolation=cv2.INTER_AREA)
    halved = sorted(d.bbox for d in finder.find(half, 2 * UM_PER_PX) if d.kind == "wbc")
    assert len(full) == len(halved) >= 1
    for a, b in zip(full, halved, strict=True):
        assert eval_finder.iou(a, tuple(2 * v for v in b)) >= 0.7


def test_one_heat_peak_decodes_to_one_box_of_the_predicted_size_in_frame_pixels() -> None:
    heat = np.zeros((3, 30, 40), np.float32)
    heat[0, 10, 20] = 0.9
    heat[0, 10, 21] = 0.5  # a neighbour of the peak, not a second cell
    size = np.full((2, 30, 40), math.log(12.0), np.float32)  # a 12 µm cell
    offset = np.zeros((2, 30, 40), np.float32)
    scale = 0.25  # work pixels per frame pixel (0.075 µm/px frame, 0.3 µm/px network)
    (cell,) = decode(heat, size, offset, META, scale, (480, 640))
    x, y, w, h = cell.bbox
    assert cell.kind == "wbc" and cell.score == pytest.approx(0.9)
    assert w == pytest.approx(12 / 0.075, abs=2) and h == pytest.approx(12 / 0.075, abs=2)
    assert x + w / 2 == pytest.approx((20.5 * 4) / scale, abs=2) and y + h / 2 == pytest.approx(10.5 * 4 / scale, abs=2)


def test_a_second_peak_inside_a_white_cell_is_not_a_second_white_cell() -> None:
    heat = np.zeros((3, 30, 40), np.float32)
    heat[0, 10, 20], heat[0, 10, 24] = 0.9, 0.6  # two lobes of one 12 µm cell, 4.8 µm apart
    heat[0, 25, 5] = 0.5  # a separate cell
    size = np.full((2, 30, 40), math.log(12.0), np.float32)
    cells = decode(heat, size, np.zeros((2, 30, 40), np.float32), META, 0.25, (480, 640))
    assert sorted(c.score for c in cells) == [pytest.approx(0.5), pytest.approx(0.9)]


def test_peaks_under_the_class_threshold_are_not_cells() -> None:
    heat = np.zeros((3, 10, 10), np.float32)
    heat[2, 5, 5] = 0.29
    assert decode(heat, np.zeros((2, 10, 10), np.float32), np.zeros((2, 10, 10), np.float32), META, 0.25,
                  (160, 160)) == []


def test_optical_density_is_zero_on_plasma_and_ignores_the_lamp_brightness() -> None:
    """The network's input does not change when the lamp is turned down (same smear, darker frame)."""
    image = cv2.imread(str(FRAMES[2]))
    dim = (image.astype(np.float32) * 0.7).round().astype(np.uint8)
    od, od_dim = optical_density(image), optical_density(dim)
    plasma = image[..., 1] >= np.percentile(image[..., 1], 90)
    assert abs(float(np.median(od[:, plasma]))) < 0.05
    stained = od.sum(0) > 1.0
    assert float(np.median(np.abs(od - od_dim)[:, stained])) < 0.1


def test_a_classifier_file_is_refused_as_a_detector_with_the_reason() -> None:
    with pytest.raises(ModelError, match="not a cytoedge detector"):
        LearnedFinder(default_model_path())


def test_detector_metadata_of_another_format_is_refused(tmp_path: Path) -> None:
    model = onnx.load(str(bundled_detector_path()))
    for prop in model.metadata_props:
        if prop.key == "cytoedge.detector":
            prop.value = '{"format": "something-else/9"}'
    path = tmp_path / "other.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelError, match="not a cytoedge-detector/1 model"):
        LearnedFinder(path)


def test_config_picks_the_finder_and_refuses_an_unknown_method() -> None:
    image = cv2.imread(str(FRAMES[0]))
    learned = cfg.with_overrides(cfg.defaults(), "test", detector__method="learned")
    assert configured_finder(learned)(image, UM_PER_PX) == LearnedFinder(bundled_detector_path()).find(image, UM_PER_PX)
    classic = configured_finder(cfg.defaults())(image, UM_PER_PX)
    assert any(d.kind == "wbc" for d in classic)
    with pytest.raises(cfg.ConfigError, match=r"detector\.method"):
        cfg.validate({"detector": {"method": "magic"}}, "test")

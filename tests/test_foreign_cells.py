"""Unlabelled white cells of other microscopes (engines/foreign.py): boxes, scale and the label-free spread."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from engines import foreign


def test_yolo_boxes_become_pixel_boxes(tmp_path: Path) -> None:
    labels = tmp_path / "f.txt"
    labels.write_text("0 0.5 0.5 0.25 0.5\n1 0.1 0.2 0.1 0.1\n\nbad line\n")
    boxes = foreign.read_boxes(labels, 400, 200)
    assert boxes == [(0, (150, 50, 100, 100)), (1, (20, 30, 40, 20))]


def test_scale_comes_from_the_median_red_cell_and_ignores_cells_on_the_edge(tmp_path: Path) -> None:
    (tmp_path / "l").mkdir()
    rows = []
    for i in range(3):
        # three whole red cells of 50 px and one clipped by the frame edge (it would pull the median down)
        (tmp_path / "l" / f"{i}.txt").write_text("1 0.5 0.5 0.25 0.25\n1 0.25 0.25 0.25 0.25\n1 0.01 0.5 0.02 0.1\n")
        rows.append({"labels": f"l/{i}.txt", "width": "200", "height": "200", "source": "scope"})
    scales = foreign.source_scales(tmp_path, rows)
    assert scales["scope"]["red_cell_px"] == pytest.approx(50.0)
    assert scales["scope"]["um_per_px"] == pytest.approx(7.5 / 50.0)


def test_white_cells_are_cut_around_their_boxes_at_the_models_field(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    frame = np.full((240, 320, 3), 230, np.uint8)
    cv2.circle(frame, (100, 120), 20, (120, 40, 90), -1)  # a "white cell" 40 px across
    for x in (40, 200, 260):
        cv2.circle(frame, (x, 60), 12, (80, 80, 200), -1)  # red cells 24 px across
    cv2.imwrite(str(tmp_path / "images" / "a.png"), frame)
    (tmp_path / "labels" / "a.txt").write_text(
        f"0 {100 / 320} 0.5 {40 / 320} {40 / 240}\n" + "".join(f"1 {x / 320} 0.25 {24 / 320} {24 / 240}\n"
                                                                  for x in (40, 200, 260)))
    (tmp_path / "manifest.csv").write_text("image,labels,split,source,width,height\n"
                                           "images/a.png,labels/a.txt,train,scope,320,240\n")
    cells = foreign.white_cells(tmp_path, field_um=36.0, size=64)
    assert cells["crops"].shape == (1, 64, 64, 3) and list(cells["source"]) == ["scope"]
    crop = cells["crops"][0]
    # 7.5 µm over 24 px = 0.3125 µm/px: the 36 µm field is 115 px, so the 40 px cell spans ~22 of 64 px.
    dark = (crop.mean(2) < 150)
    assert dark[32, 32] and not dark[32, 5] and 16 < dark[32].sum() < 28


def test_collapse_is_zero_for_a_normal_differential_and_large_for_one_class() -> None:
    assert foreign.collapse(dict(foreign.NORMAL_MIX)) == 0.0
    assert foreign.collapse({"eosinophil": 1.0}) == pytest.approx(0.97)
    shares = foreign.spread(np.array([0, 0, 1, 1]), ["a", "b", "c"])
    assert shares == {"a": 0.5, "b": 0.5, "c": 0.0}

"""Crops: the same squares whichever way they are cut."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
from conftest import SAMPLES

from edge.cellfinder import find_cells
from edge.crops import cut_crops


def test_crops_cut_on_two_threads_equal_crops_cut_on_one() -> None:
    image = cv2.imread(str(SAMPLES / "BloodImage_00007.jpg"))
    boxes = [d.bbox for d in find_cells(image, 0.075)][:40]
    boxes += [(0, 0, 5, 5), (630, 470, 10, 10), (5000, 5000, 4, 4)]  # at the edges and outside the frame
    serial = cut_crops(image, boxes, 0.075, 36.0, 64)
    with ThreadPoolExecutor(1) as pool:
        parallel = cut_crops(image, boxes, 0.075, 36.0, 64, pool=pool)
    assert len(serial) == len(boxes) > 10
    np.testing.assert_array_equal(parallel, serial)


def test_a_square_centred_half_way_rounds_like_python() -> None:
    """Square corners are computed for all cells at once; they must round exactly as round() did."""
    from edge.crops import square_corners

    boxes = [(0, 0, 1, 1), (1, 1, 1, 1), (2, 3, 5, 7), (10, 10, 3, 3)]
    for side in (4, 5, 480):
        expected = [(round(x + w / 2 - side / 2), round(y + h / 2 - side / 2)) for x, y, w, h in boxes]
        assert [tuple(c) for c in square_corners(boxes, side).tolist()] == expected

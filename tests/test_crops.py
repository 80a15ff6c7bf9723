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


def whole_square_crop(image: np.ndarray, corner: tuple[int, int], side: int, size: int, fill: np.ndarray) -> np.ndarray:
    """The plain way: pad the whole square with the fill colour, then resize all of it."""
    x0, y0 = corner
    height, width = image.shape[:2]
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + side, width), min(y0 + side, height)
    if xb <= xa or yb <= ya:
        return np.broadcast_to(fill, (size, size, 3))
    square = cv2.copyMakeBorder(image[ya:yb, xa:xb], ya - y0, y0 + side - yb, xa - x0, x0 + side - xb,
                                cv2.BORDER_CONSTANT, value=[int(v) for v in fill])
    return cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)


def test_squares_past_the_edge_resample_only_the_frames_part_and_give_the_whole_squares_pixels() -> None:
    from edge.crops import area_period, background_colour, square_corners

    rng = np.random.default_rng(19)
    image = cv2.GaussianBlur(rng.integers(0, 256, (300, 420, 3), dtype=np.uint8), (5, 5), 0)
    fill = background_colour(image)
    # (field, µm/px, size): 480 -> 64 (the bundled models at BCCD scale), 180 -> 64, 90 -> 64, 437 -> 64 (no period)
    for field_um, um_per_px, size in ((36.0, 0.075, 64), (36.0, 0.2, 64), (36.0, 0.4, 64), (43.7, 0.1, 64)):
        side = round(field_um / um_per_px)
        corners = [(int(x), int(y)) for x, y in rng.integers(-side, 420, (60, 2))] + [(-side + 1, -side + 1)]
        boxes = [(x + side // 2, y + side // 2, 0, 0) for x, y in corners]
        got = cut_crops(image, boxes, um_per_px, field_um, size)
        for crop, corner in zip(got, square_corners(boxes, side), strict=True):
            np.testing.assert_array_equal(crop, whole_square_crop(image, tuple(corner), side, size, fill))
    assert area_period(480, 64) == (15, 2) and area_period(437, 64) == (437, 64)

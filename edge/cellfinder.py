"""Classic image processing cell finder: white cells, platelets and red cells in a stained smear frame.

No training: white-cell nuclei and platelets take up the purple/blue stain, so blue minus red (B - R)
is high on them, near zero on the background and negative on red cells. Everything is done on a
copy of the frame scaled to a fixed working resolution (``work_um_per_px``), and every size is
given in micrometres, so the same parameters work at any microscope scale. Method and measured
accuracy on BCCD: ``docs/cellfinder.md`` (``python -m engines.finder.bccd``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import cv2
import numpy as np

from edge.crops import as_bgr

KINDS = ("wbc", "rbc", "platelet")
MAX_PARTS = 64  # most stained fragments considered for white cells in one frame


@dataclass(frozen=True)
class FinderParams:
    """Tunables of `find_cells` (also the ``[finder]`` section of the service config; all >= 0).

    Sizes are micrometres at the sample, so they hold at any microscope scale; stain levels are
    B - R grey levels (0..255) above the frame's background level (the median B - R of its
    brightest pixels, i.e. the plasma between cells). Defaults tuned on BCCD train+val."""

    work_um_per_px: float = 0.3  # resolution the finder works at (frames are downscaled to it, never up)
    background_percentile: float = 75.0  # pixels brighter (in green) than this percentile are background
    nucleus_delta: float = 28.0  # stain above background that marks white-cell nucleus pixels
    merge_um: float = 2.0  # closing diameter that joins the lobes of one nucleus
    wbc_min_nucleus_um2: float = 10.0  # smallest stained area that counts as a white-cell nucleus
    wbc_min_part_um2: float = 4.0  # smallest stained fragment that may be joined to a nucleus
    lobe_gap_um: float = 3.0  # fragments this close (box to box) belong to one nucleus ...
    wbc_max_nucleus_um: float = 18.0  # ... as long as the joined nucleus is no wider than this
    wbc_max_diameter_um: float = 16.0  # largest white cell (limits how far the cell body may grow)
    cyto_delta: float = 10.0  # stain above background that marks white-cell cytoplasm
    wbc_min_grow: float = 1.15  # the cell box is at least the nucleus box times this, per side
    wbc_box_scale: float = 1.0  # final cell box = segmented cell box times this (palest rim of cytoplasm)
    platelet_delta: float = 10.0  # stain above background that outlines a platelet
    platelet_peak: float = 24.0  # ... and that its most stained pixel must reach
    platelet_min_um: float = 1.0  # platelet stained-blob equivalent diameter range
    platelet_max_um: float = 4.5
    platelet_box_um: float = 2.2  # smallest platelet box side (the stained blob is its granulomere only)
    platelet_box_grow: float = 1.2  # platelet box = stained blob box times this, if larger
    platelet_wbc_margin_um: float = 0.0  # blobs this close to a white-cell box are its granules, not platelets
    rbc_delta: float = 18.0  # green-channel darkening below background that marks red-cell pixels
    rbc_min_diameter_um: float = 5.0  # red-cell diameter range (distance-transform peaks outside it are dropped)
    rbc_max_diameter_um: float = 10.0
    rbc_box_grow: float = 1.3  # red-cell box half side = distance-transform peak times this (the mask is eroded)
    find_rbc: bool = True  # red cells are only counted downstream; turn off to save ~1 ms a frame
    stain_od: bool = True  # stain = optical density off the red-cell colour (any microscope); false = B - R
    pink_rbc_max: float = 3.0  # red cells whose median B - R stays under this are "pink": platelets use B - R
    platelet_br_delta: float = 22.0  # ... and then these B - R levels outline a platelet
    platelet_br_peak: float = 28.0


@dataclass(frozen=True)
class Detection:
    """One found cell. ``score`` is 0..1: for white cells and platelets how strongly and how
    typically sized the stained blob is; for red cells how round/isolated the cell is (distance
    transform peak over the nominal radius). It ranks detections, it is not a calibrated probability."""

    kind: str  # "wbc" | "rbc" | "platelet"
    bbox: tuple[int, int, int, int]  # x, y, width, height in frame pixels, inside the frame
    score: float


def _check_scale(um_per_px: float) -> float:
    value = float(um_per_px)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"um_per_px must be a positive number, got {um_per_px!r}")
    return value


def _disc(diameter_px: float) -> np.ndarray:
    size = max(1, round(diameter_px)) | 1  # odd, so the disc is centred
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def components8(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """8-connected components with stats, as ``cv2.connectedComponentsWithStats(mask, connectivity=8)``
    gives them (same labels, stats, centroids), by BBDT: on one OpenCV thread, as the pipeline runs it,
    2.5x faster than the default Spaghetti with stats."""
    return cv2.connectedComponentsWithStatsWithAlgorithm(mask, 8, cv2.CV_32S, cv2.CCL_BBDT)


def _clip_box(x0: float, y0: float, x1: float, y1: float, width: int, height: int) -> tuple[int, int, int, int] | None:
    """Float corner box -> integer (x, y, w, h) inside the frame; None when nothing is left."""
    xa, ya = max(0, math.floor(x0)), max(0, math.floor(y0))
    xb, yb = min(width, math.ceil(x1)), min(height, math.ceil(y1))
    if xb - xa < 1 or yb - ya < 1:
        return None
    return int(xa), int(ya), int(xb - xa), int(yb - ya)


def find_cells(image_bgr: np.ndarray, um_per_px: float, params: FinderParams = FinderParams()) -> list[Detection]:
    """Find white cells, platelets and red cells; boxes are in the frame's own pixels.

    Odd frames of the right dtype (blank, black, tiny, grey, BGRA) give [] or what is found;
    only non-images (wrong dtype or shape) and a non-positive scale raise ValueError.
    """
    image = as_bgr(image_bgr)
    um_per_px = _check_scale(um_per_px)
    height, width = image.shape[:2]
    scale = min(1.0, um_per_px / max(params.work_um_per_px, 1e-6))
    small_w, small_h = max(1, round(width * scale)), max(1, round(height * scale))
    if small_w < 8 or small_h < 8:
        return []  # too small to hold a cell at the working resolution
    small = cv2.resize(image, (small_w, small_h), interpolation=cv2.INTER_AREA) if scale < 1 else image
    small = cv2.GaussianBlur(small, (3, 3), 0)
    sx, sy = width / small_w, height / small_h  # frame pixels per working pixel
    px_um = um_per_px * (sx + sy) / 2  # micrometres per working pixel
    channels = _channels(small)
    green = channels[1]
    background_level, plasma_level = percentiles_u8(green, (min(100.0, params.background_percentile), 90.0))
    bright = green >= background_level
    stain = cv2.subtract(channels[0], channels[2], dtype=cv2.CV_16S)
    # background level of the stain: plasma between cells is the brightest part of a smear, so take
    # the median over the brightest pixels (the plain median drifts towards red cells in crowded frames)
    stain_bg = stain_median(stain, bright if bright.any() else None)
    blue_minus_red = stain.astype(np.float32) - stain_bg
    excess = _od_stain(small, bright, channels) if params.stain_od else blue_minus_red
    platelet_excess, platelet_params = excess, params
    if params.stain_od and _pink_red_cells((stain, stain_bg), green, plasma_level, params):
        # faint platelets stand out better in B - R, which is safe where red cells are pink (not bluish)
        platelet_excess = blue_minus_red
        platelet_params = dataclasses.replace(params, platelet_delta=params.platelet_br_delta,
                                              platelet_peak=params.platelet_br_peak)

    detections: list[Detection] = []
    nucleus = (excess > params.nucleus_delta).astype(np.uint8)
    if params.merge_um > 0:
        nucleus = cv2.morphologyEx(nucleus, cv2.MORPH_CLOSE, _disc(params.merge_um / px_um))
    _count, labels, stats, _centroids = components8(nucleus)
    px_area = px_um * px_um
    groups = _group_nuclei(stats, px_um, params)
    cell_mask = None  # cytoplasm mask, built only when there is a white cell
    wbc_boxes: list[tuple[float, float, float, float]] = []  # working-pixel corners, for the other kinds
    for members in groups:
        if cell_mask is None:
            cell_mask = (excess > params.cyto_delta).astype(np.uint8)
            cell_mask = cv2.morphologyEx(cell_mask, cv2.MORPH_OPEN, _disc(1.0 / px_um))
        x0 = min(stats[i, 0] for i in members)
        y0 = min(stats[i, 1] for i in members)
        x1 = max(stats[i, 0] + stats[i, 2] for i in members)
        y1 = max(stats[i, 1] + stats[i, 3] for i in members)
        mask = np.isin(labels[y0:y1, x0:x1], members)
        box = _wbc_extent(mask, (int(x0), int(y0), int(x1 - x0), int(y1 - y0)), cell_mask, px_um, params)
        wbc_boxes.append(box)
        area_um2 = float(mask.sum()) * px_area
        contrast = float(excess[y0:y1, x0:x1][mask].mean()) / (2 * max(params.nucleus_delta, 1e-6))
        size = min(1.0, area_um2 / (2 * max(params.wbc_min_nucleus_um2, 1e-6)))
        score = float(np.clip(0.5 * min(1.0, contrast) + 0.5 * size, 0, 1))
        clipped = _clip_box(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy, width, height)
        if clipped:
            detections.append(Detection("wbc", clipped, round(score, 4)))

    detections.extend(_platelets(platelet_excess, wbc_boxes, px_um, (sx, sy), (width, height), platelet_params))

    if params.find_rbc:
        detections.extend(_red_cells((green, plasma_level), nucleus, wbc_boxes, px_um, (sx, sy), (width, height),
                                     params))
    return detections


def percentiles_u8(values: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """``np.percentile(values, q)`` (linear method) for each q of a uint8 image, bit for bit, from one
    256-bin histogram instead of a partial sort per call (a tenth of the time on a 480x270 plane)."""
    if values.size < 2**24:  # the histogram's float32 bins count exactly up to here
        counts = cv2.calcHist([np.ascontiguousarray(values)], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    else:
        counts = np.bincount(values.ravel(), minlength=256)
    cumulative = np.cumsum(counts)
    return [_sorted_percentile(cumulative, q) for q in qs]


def _sorted_percentile(cumulative: np.ndarray, q: float) -> float:
    """numpy's linear-method percentile, taken from cumulative counts of the values 0..255."""
    n = int(cumulative[-1])
    virtual = (n - 1) * (q / 100)
    if virtual >= n - 1:
        return float(np.searchsorted(cumulative, n - 1, side="right"))
    if virtual < 0:
        return float(np.searchsorted(cumulative, 0, side="right"))
    below = math.floor(virtual)
    low, high = (int(v) for v in np.searchsorted(cumulative, [below, below + 1], side="right"))
    gamma, diff = virtual - below, high - low
    return float(high - diff * (1 - gamma)) if gamma >= 0.5 else float(low + diff * gamma)


def _pink_red_cells(stain_and_bg: tuple[np.ndarray, float], green: np.ndarray, plasma_level: float,
                    params: FinderParams) -> bool:
    """True when this frame's red cells are no bluer than the plasma (B - R stays low on them).
    ``stain_and_bg``: B - R (int16) and its background level; ``plasma_level``: green's 90th percentile.
    The median of B - R minus the background over the red cells, as numpy computes it in float32: the
    subtraction keeps the order of the values, so the two middle B - R values give it."""
    stain, stain_bg = stain_and_bg
    middle = _middle_values(stain, green < plasma_level - params.rbc_delta)
    if middle is None:
        return False
    return float(np.median(np.array(middle, np.int16).astype(np.float32) - stain_bg)) <= params.pink_rbc_max


def stain_median(stain: np.ndarray, mask: np.ndarray | None = None) -> float:
    """``float(np.median(stain[mask]))`` of B - R (int16, -255..255), bit for bit, from a histogram
    (the mean of the two middle values is exact in float64)."""
    low, high = _middle_values(stain, mask) or (0, 0)
    return (low + high) / 2


def _middle_values(stain: np.ndarray, mask: np.ndarray | None) -> tuple[int, int] | None:
    """The lower and upper middle of the B - R values where ``mask`` (all when None); None if none."""
    shifted = stain.view(np.uint16) + np.uint16(255)  # -255..255 -> 0..510 (uint16 wraps around)
    cumulative = np.cumsum(np.bincount((shifted if mask is None else shifted[mask]).ravel(), minlength=511))
    n = int(cumulative[-1])
    if n == 0:
        return None
    low, high = np.searchsorted(cumulative, [(n - 1) // 2, n // 2], side="right")
    return int(low) - 255, int(high) - 255


_LOG = np.log(np.arange(256, dtype=np.float32).clip(1, None))  # ln of each grey level (0 read as 1)
RBC_OD_DIRECTION = np.array([0.46, 0.79, 0.40], np.float32)  # B, G, R optical density of a red cell (BCCD)


def _channels(image: np.ndarray) -> list[np.ndarray]:
    """The B, G, R planes of a BGR image (cv2.extractChannel: several times faster than cv2.split)."""
    return [cv2.extractChannel(image, c) for c in range(3)]


def _od_stain(small: np.ndarray, bright: np.ndarray, channels: list[np.ndarray] | None = None) -> np.ndarray:
    """How much of each pixel's colour is *not* red-cell colour, in 1/100 optical-density units.

    Optical density (OD = ln(background / pixel), per channel) is what a stain adds, whatever the lamp
    and camera. A red cell's OD points in one direction (haemoglobin + eosin), thicker cells just
    further along it; nuclei and platelets (azure / methylene blue) point elsewhere. So the length of
    the OD left after removing the red-cell direction marks nuclei and platelets at any microscope,
    even where red cells look bluish (Raabin) and blue minus red fails. The direction is measured per
    frame (median direction of the absorbing pixels, mostly red cells); the background is the median
    colour of the brightest pixels. ``channels``: the B, G, R planes of ``small`` when already at hand.
    """
    pixels = small.reshape(-1, 3)
    plasma = np.flatnonzero(bright) if bright.any() else np.arange(len(pixels))
    background = np.median(pixels[plasma[:: max(1, len(plasma) // 2000)]], axis=0)  # ~2k pixels are plenty
    table = _od_table(background)
    od = cv2.LUT(small, table.reshape(1, 256, 3))  # the OD of every pixel, as (rows, cols, 3)
    flat = od.reshape(-1, 3)
    direction = _red_cell_direction(flat[:: max(1, len(flat) // 4000)])
    planes = [cv2.LUT(plane, table[:, c].copy()) for c, plane in enumerate(channels or _channels(small))]
    return _off_direction_length(planes, flat @ direction, direction)


def _od_table(background: np.ndarray) -> np.ndarray:
    """(256, 3) OD of each grey level per channel: the same float32 values as ln(background) - ln(pixel)
    taken per pixel, so a lookup replaces a logarithm per pixel."""
    return np.ascontiguousarray(np.log(np.maximum(background, 1.0)).astype(np.float32)[None, :] - _LOG[:, None])


def _red_cell_direction(sample: np.ndarray) -> np.ndarray:
    """Unit OD direction of this frame's red cells: median direction of the absorbing sampled pixels."""
    absorbing = sample[sample.sum(axis=1) > 0.3]
    if len(absorbing) >= 50:
        unit = absorbing / np.linalg.norm(absorbing, axis=1, keepdims=True)
        median = np.median(unit, axis=0)
        if np.linalg.norm(median) > 0:
            return (median / np.linalg.norm(median)).astype(np.float32)
    return RBC_OD_DIRECTION


def _off_direction_length(planes: list[np.ndarray], along: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """|OD - (OD . direction) direction| * 100, per pixel, on whole channel planes (several times
    faster than on (N, 3) rows; the float32 operations and their order are the same, so are the values)."""
    total = None
    for channel, plane in enumerate(planes):
        residual = plane.ravel() - along * direction[channel]
        residual *= residual
        total = residual if total is None else np.add(total, residual, out=total)
    length = np.sqrt(total, out=total)
    length *= np.float32(100.0)
    return length.reshape(planes[0].shape)


def _group_nuclei(stats: np.ndarray, px_um: float, params: FinderParams) -> list[list[int]]:
    """Join the separate lobes / fragments of one nucleus: components whose boxes lie within
    ``lobe_gap_um`` of each other while the joined box stays within ``wbc_max_nucleus_um``.
    A group is a white cell when its stained area reaches ``wbc_min_nucleus_um2``."""
    px_area = px_um * px_um
    min_part = params.wbc_min_part_um2 / px_area
    parts = [i for i in range(1, len(stats)) if stats[i, 4] >= min_part]
    parts = sorted(parts, key=lambda i: -stats[i, 4])[:MAX_PARTS]  # bounded work on a pathological frame
    boxes = {i: [float(stats[i, 0]), float(stats[i, 1]), float(stats[i, 0] + stats[i, 2]),
                 float(stats[i, 1] + stats[i, 3])] for i in parts}
    area = {i: float(stats[i, 4]) for i in parts}
    members = {i: [i] for i in parts}
    gap = params.lobe_gap_um / px_um
    span = params.wbc_max_nucleus_um / px_um
    merged = True
    while merged:
        merged = False
        keys = sorted(members, key=lambda k: -area[k])
        for a_index, a in enumerate(keys):
            for b in keys[a_index + 1:]:
                ba, bb = boxes[a], boxes[b]
                dx = max(0.0, max(ba[0], bb[0]) - min(ba[2], bb[2]))
                dy = max(0.0, max(ba[1], bb[1]) - min(ba[3], bb[3]))
                joined = [min(ba[0], bb[0]), min(ba[1], bb[1]), max(ba[2], bb[2]), max(ba[3], bb[3])]
                if math.hypot(dx, dy) <= gap and max(joined[2] - joined[0], joined[3] - joined[1]) <= span:
                    boxes[a] = joined
                    area[a] += area.pop(b)
                    members[a] += members.pop(b)
                    boxes.pop(b)
                    merged = True
                    break
            if merged:
                break
    min_area = params.wbc_min_nucleus_um2 / px_area
    return [sorted(m) for k, m in members.items() if area[k] >= min_area]


def _wbc_extent(nucleus: np.ndarray, box: tuple[int, int, int, int], cell_mask: np.ndarray, px_um: float,
                params: FinderParams) -> tuple[float, float, float, float]:
    """Grow a nucleus (``nucleus``: its mask inside ``box``) to its whole cell: the cytoplasm is
    faintly stained too, so take the stained region connected to the nucleus, no further than a
    white cell's largest radius from the nucleus centre. VOC boxes and classifier crops are whole cells."""
    x, y, w, h = box
    cx, cy = x + w / 2, y + h / 2
    radius = max(params.wbc_max_diameter_um / px_um / 2, w / 2, h / 2)
    rows, cols = cell_mask.shape
    xa, ya = max(0, int(cx - radius)), max(0, int(cy - radius))
    xb, yb = min(cols, math.ceil(cx + radius) + 1), min(rows, math.ceil(cy + radius) + 1)
    roi = cell_mask[ya:yb, xa:xb].copy()
    yy, xx = np.ogrid[ya:yb, xa:xb]
    roi[(xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 > radius * radius] = 0
    seed = np.zeros_like(roi, dtype=bool)
    seed[y - ya:y - ya + h, x - xa:x - xa + w] = nucleus
    roi[seed] = 1
    _n, labels = cv2.connectedComponents(roi, connectivity=8)
    ids = np.unique(labels[seed])
    ys, xs = np.nonzero(np.isin(labels, ids[ids > 0]))
    bx0, bx1, by0, by1 = xs.min() + xa, xs.max() + xa + 1, ys.min() + ya, ys.max() + ya + 1
    grow = params.wbc_min_grow
    bx0, bx1 = min(bx0, cx - w * grow / 2), max(bx1, cx + w * grow / 2)
    by0, by1 = min(by0, cy - h * grow / 2), max(by1, cy + h * grow / 2)
    # the segmented body misses the palest rim of cytoplasm: widen by a measured factor
    mx, my = (bx0 + bx1) / 2, (by0 + by1) / 2
    half_w, half_h = (bx1 - bx0) * params.wbc_box_scale / 2, (by1 - by0) * params.wbc_box_scale / 2
    return float(mx - half_w), float(my - half_h), float(mx + half_w), float(my + half_h)


def _platelets(excess: np.ndarray, wbc_boxes: list[tuple[float, float, float, float]], px_um: float,
               frame_per_work: tuple[float, float], frame_size: tuple[int, int], params: FinderParams
               ) -> list[Detection]:
    """Platelets are small, often faint stained blobs: outline at a low stain level, keep those of
    platelet size whose core is clearly stained, away from white cells (their granules and lobes)."""
    mask = (excess > params.platelet_delta).astype(np.uint8)
    count, labels, stats, _centroids = components8(mask)
    if count <= 1:
        return []
    inside = np.flatnonzero(mask)  # only labelled pixels can raise a blob's peak (label 0 is never read)
    peak = np.zeros(count, np.float32)
    np.maximum.at(peak, labels.ravel()[inside], excess.ravel()[inside])
    diameter = 2 * np.sqrt(stats[:, 4] / math.pi) * px_um
    sized = (peak >= params.platelet_peak) & (params.platelet_min_um <= diameter) & (diameter <= params.platelet_max_um)
    sized[0] = False  # the background
    sx, sy = frame_per_work
    width, height = frame_size
    found = []
    min_side = params.platelet_box_um / px_um
    margin = params.platelet_wbc_margin_um / px_um
    for i in np.flatnonzero(sized):
        x, y, w, h, _area = (int(v) for v in stats[i])
        cx, cy = x + w / 2, y + h / 2
        if any(b[0] - margin <= cx <= b[2] + margin and b[1] - margin <= cy <= b[3] + margin for b in wbc_boxes):
            continue  # a granule or lobe of a white cell
        half = max(min_side, max(w, h) * params.platelet_box_grow) / 2
        clipped = _clip_box((cx - half) * sx, (cy - half) * sy, (cx + half) * sx, (cy + half) * sy, width, height)
        if clipped:
            score = float(np.clip(peak[i] / (2 * max(params.platelet_peak, 1e-6)), 0, 1))
            found.append(Detection("platelet", clipped, round(score, 4)))
    return found


def _red_cells(green_and_level: tuple[np.ndarray, float], stained: np.ndarray,
               wbc_boxes: list[tuple[float, float, float, float]], px_um: float, frame_per_work: tuple[float, float],
               frame_size: tuple[int, int], params: FinderParams) -> list[Detection]:
    """Red cells absorb green: mask darker-than-background pixels, fill the pale centres, split
    touching cells at the peaks of the distance transform. ``green_and_level``: the green plane and
    its 90th percentile (the plasma's level)."""
    green, background = green_and_level
    mask = (green.astype(np.float32) < background - params.rbc_delta).astype(np.uint8)
    mask[stained > 0] = 0
    for x0, y0, x1, y1 in wbc_boxes:
        mask[max(0, int(y0)):math.ceil(y1), max(0, int(x0)):math.ceil(x1)] = 0
    min_r = params.rbc_min_diameter_um / px_um / 2
    max_r = params.rbc_max_diameter_um / px_um / 2
    # fill central pallor: holes smaller than a red cell
    inverse = 1 - mask
    count, labels, stats, _c = cv2.connectedComponentsWithStats(inverse, connectivity=4)
    rows, cols = mask.shape
    x, y, w, h, area = stats.T
    small_hole = (area < math.pi * max_r * max_r * 0.6) & (x > 0) & (y > 0) & (x + w < cols) & (y + h < rows)
    small_hole[0] = False  # the red cells themselves
    if small_hole.any():
        mask[small_hole[labels]] = 1
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _disc(1.0 / px_um))
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
    peaks = (dist >= cv2.dilate(dist, _disc(min_r * 1.5))) & (dist >= min_r * 0.6)
    count, _labels, stats, centroids = components8(peaks.astype(np.uint8))
    sx, sy = frame_per_work
    width, height = frame_size
    found = []
    nominal = (min_r + max_r) / 2
    for i in range(1, count):
        cx, cy = centroids[i]
        r = float(dist[min(rows - 1, int(cy + 0.5)), min(cols - 1, int(cx + 0.5))])
        half = min(max(r * params.rbc_box_grow, min_r), max_r)  # np.clip's arithmetic, without its overhead
        clipped = _clip_box((cx - half) * sx, (cy - half) * sy, (cx + half) * sx, (cy + half) * sy, width, height)
        if clipped:
            found.append(Detection("rbc", clipped, round(float(min(1.0, r / nominal)), 4)))
    return found

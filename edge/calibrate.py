"""Setting up a new microscope: image scale (um per pixel) and the focus threshold, from real frames.

Scale matters because the cell finder and the classifier's crops work in micrometres. Red cells
are a built-in ruler: they are about 7.5 um across and there are dozens per field, so the median
red-cell size over a few frames gives the scale to a few percent without a stage micrometer.
Results are written into the TOML config file with a line edit that keeps comments and layout.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge.cellfinder import FinderParams
from edge.errors import CytoedgeError
from edge.fileutil import atomic_write_bytes
from edge.quality import Measures, QualityParams, focus, measure

RBC_DIAMETER_UM = 7.5
MIN_RED_CELLS = 20
MIN_CELL_WORK_PX = 16  # smallest red cell sized, on the sizing copy (1/25 of the field: ~0.3 µm/px at 640 px)
SIZING_WIDTH = 400  # red cells are sized on a copy this many pixels on its longest side (fast, scale-free)
# A box drawn around a red cell (the truth the estimate is checked against) is this much wider than the
# dark, Otsu-segmented body: the pale rim falls outside the threshold. Fitted once on the train+val
# frames of BCCD and TXL-PBC (python -m engines.finder.scale --fit: 1.08..1.14 per source).
RIM_FACTOR = 1.12
# In clumps a cell's size is twice its distance-transform peak; overlaps lower some peaks, so the
# 70th percentile is taken and scaled to box size (fitted on train frames: 1.16..1.22 per source).
CROWDED_PERCENTILE = 70.0
CROWDED_FACTOR = 1.18
MAX_SPREAD = 0.35  # refuse when the cells used spread (IQR / median) more than this: no clear size


class CalibrationError(CytoedgeError):
    """The frames cannot support an estimate; the message says what to do instead."""


@dataclass(frozen=True)
class ScaleEstimate:
    um_per_px: float
    median_px: float  # red-cell diameter in frame pixels (median of the cells used)
    iqr_px: float  # interquartile range of the diameters of the cells used
    count: int  # red cells used (isolated, round, near the size mode)
    frames: int
    passes: int = 1  # kept for callers of the earlier iterative version
    candidates: int = 0  # cells measured before keeping those near the most common size
    method: str = "isolated"  # isolated cells, or "crowded" (distance-transform peaks in clumps)

    @property
    def spread(self) -> float:
        return self.iqr_px / self.median_px if self.median_px else float("inf")

    @property
    def confidence(self) -> str:
        """high / medium / low, from the spread of the sizes and how many cells support them."""
        if self.count >= 100 and self.spread <= 0.15:
            return "high"
        if self.count >= 50 and self.spread <= 0.25:
            return "medium"
        return "low"

    def summary(self) -> str:
        return (
            f"um_per_px = {self.um_per_px:.4f} (red cell {self.median_px:.1f} px, IQR {self.iqr_px:.1f} px, "
            f"{self.count} {self.method} cells of {self.candidates} measured in {self.frames} frame(s); "
            f"confidence {self.confidence})"
        )


@dataclass(frozen=True)
class FocusEstimate:
    threshold: float
    median: float
    low: float  # focus of the least sharp good frame
    high: float
    count: int

    def summary(self) -> str:
        return (
            f"min_focus = {self.threshold:.3f} (good frames: median {self.median:.3f}, "
            f"range {self.low:.3f}..{self.high:.3f}, {self.count} frame(s))"
        )


def _red_cell_mask(image_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
    """Red cells (pale centres filled) and white-cell stain on a ~400 px copy, and that copy's scale.

    Needs no scale: red cells absorb green, so Otsu's threshold on green splits cells from plasma at
    any magnification and exposure. Pale centres are enclosed holes and are filled."""
    image = image_bgr if image_bgr.ndim == 3 and image_bgr.shape[2] == 3 else None
    if image is None or image.size == 0 or min(image.shape[:2]) < 16:
        return None
    height, width = image.shape[:2]
    f = min(1.0, SIZING_WIDTH / max(height, width))
    small = cv2.resize(image, (round(width * f), round(height * f)), interpolation=cv2.INTER_AREA) if f < 1 else image
    small = cv2.GaussianBlur(small, (3, 3), 0)
    blue, green, red = cv2.split(small)
    if int(green.max()) - int(green.min()) < 20:
        return None  # a flat field has no cells to size
    level, _ = cv2.threshold(green, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = (green < level).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    rows, cols = mask.shape
    # fill enclosed holes (pale centres), not the plasma: holes touching the border or large stay open
    count, labels, stats, _c = cv2.connectedComponentsWithStats(1 - mask, connectivity=4)
    inner = np.zeros(count, bool)
    for i in range(1, count):
        x, y, w, h, area = stats[i]
        inner[i] = x > 0 and y > 0 and x + w < cols and y + h < rows and area < 0.02 * rows * cols
    mask[inner[labels]] = 1
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    stain = cv2.subtract(blue, red, dtype=cv2.CV_16S)
    stain_bg = float(np.median(stain[mask == 0])) if (mask == 0).any() else 0.0
    nuclei = ((stain - stain_bg) > 40).astype(np.uint8)
    return mask, nuclei, f


def red_cell_sizes(image_bgr: np.ndarray) -> np.ndarray:
    """Diameters (frame pixels, box-like: mean of width and height) of the isolated, round red cells.

    Touching or overlapping cells make non-convex blobs and are skipped (a solidity test), as are
    cut-off cells at the border and blobs with white-cell stain (B - R well above the plasma)."""
    found = _red_cell_mask(image_bgr)
    if found is None:
        return np.empty(0)
    mask, nuclei, f = found
    rows, cols = mask.shape
    count, labels, stats, _c = cv2.connectedComponentsWithStats(mask, connectivity=8)
    sizes = []
    for i in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[i])
        at_border = x <= 0 or y <= 0 or x + w >= cols or y + h >= rows
        if at_border or min(w, h) < MIN_CELL_WORK_PX or min(w, h) < 0.8 * max(w, h):
            continue
        blob = (labels[y:y + h, x:x + w] == i).astype(np.uint8)
        contours, _h = cv2.findContours(blob, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        hull = cv2.contourArea(cv2.convexHull(max(contours, key=cv2.contourArea)))
        if hull <= 0 or area / hull < 0.9:
            continue  # touching or overlapping cells, or a ragged clump
        if float(np.mean(nuclei[y:y + h, x:x + w][blob > 0])) > 0.05:
            continue  # a white cell (stained nucleus)
        sizes.append((w + h) / 2 / f)
    return np.asarray(sizes, dtype=np.float64)


def crowded_cell_sizes(image_bgr: np.ndarray) -> np.ndarray:
    """Diameters (frame pixels) of the red cells in clumps too: twice the distance-transform peak at
    each cell centre, which a touching neighbour does not change (an overlapping one lowers it, so the
    estimate takes an upper percentile of these). Used when too few cells lie alone."""
    found = _red_cell_mask(image_bgr)
    if found is None:
        return np.empty(0)
    mask, nuclei, f = found
    rows, cols = mask.shape
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
    count, labels, _stats, _c = cv2.connectedComponentsWithStats(mask, connectivity=8)
    blob_peak = np.zeros(count, np.float32)
    np.maximum.at(blob_peak, labels.ravel(), dist.ravel())
    typical = blob_peak[1:][blob_peak[1:] >= MIN_CELL_WORK_PX / 2]
    if not len(typical):
        return np.empty(0)
    window = max(3, int(np.median(typical))) | 1  # peaks at least ~a radius apart: one per cell
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (window, window))
    peaks = (dist >= cv2.dilate(dist, disc)) & (dist >= MIN_CELL_WORK_PX / 2)
    _n, _labels, _s, centres = cv2.connectedComponentsWithStats(peaks.astype(np.uint8), connectivity=8)
    sizes = []
    for cx, cy in centres[1:]:
        r = float(dist[min(rows - 1, int(cy + 0.5)), min(cols - 1, int(cx + 0.5))])
        if cx - r < 1 or cy - r < 1 or cx + r > cols - 2 or cy + r > rows - 2:
            continue  # the cell may run out of the frame
        if float(np.mean(nuclei[int(cy - r):int(cy + r) + 1, int(cx - r):int(cx + r) + 1])) > 0.05:
            continue
        sizes.append((2 * r + 1) / f)
    return np.asarray(sizes, dtype=np.float64)


def _near_mode(sizes: np.ndarray) -> np.ndarray:
    """The sizes within 25% of the most common size (a smoothed log-size histogram's peak): platelets,
    dust, white cells without much stain and leftover pairs fall outside."""
    logs = np.log(sizes)
    edges = np.arange(logs.min(), logs.max() + 0.1, 0.05)
    if len(edges) < 3:
        return sizes
    hist, edges = np.histogram(logs, bins=edges)
    smooth = np.convolve(np.pad(hist, 2), [1, 2, 3, 2, 1], "valid")
    peak = int(np.argmax(smooth))
    centre = math.exp((edges[peak] + edges[peak + 1]) / 2)
    return sizes[(sizes > centre / 1.25) & (sizes < centre * 1.25)]


def estimate_um_per_px(
    frames: Sequence[np.ndarray],
    current_um_per_px: float | None = None,
    rbc_diameter_um: float = RBC_DIAMETER_UM,
    params: FinderParams | None = None,
    min_cells: int = MIN_RED_CELLS,
) -> ScaleEstimate:
    """Scale from the typical diameter of isolated red cells (nominally ``rbc_diameter_um``).

    Needs no starting scale (``current_um_per_px`` and ``params`` are accepted for older callers).
    Isolated round cells are the best ruler; when fewer than ``min_cells`` lie alone (crowded fields,
    few frames) the cells in clumps are sized instead. Raises CalibrationError when the frames cannot
    tell: too few red cells (empty field, thick area) or sizes spread too widely for one red-cell size.
    """
    del current_um_per_px, params
    if not frames:
        raise CalibrationError("no frames to calibrate from")
    alone = np.concatenate([red_cell_sizes(frame) for frame in frames])
    used = _near_mode(alone) if len(alone) else alone
    method, factor, measured, pick = "isolated", RIM_FACTOR, len(alone), 50.0
    if len(used) < min_cells:
        crowded = np.concatenate([crowded_cell_sizes(frame) for frame in frames])
        used = _near_mode(crowded) if len(crowded) else crowded
        method, factor, measured, pick = "crowded", CROWDED_FACTOR, len(crowded), CROWDED_PERCENTILE
    if len(used) < min_cells:
        raise CalibrationError(
            f"only {len(used)} red cell(s) found in {len(frames)} frame(s) (need {min_cells}); "
            "point the camera at a thin, well-spread part of a blood smear, check focus and "
            "exposure, or give more frames"
        )
    q1, typical, q3 = np.percentile(used, [25, pick, 75])
    if (q3 - q1) / typical > MAX_SPREAD:
        raise CalibrationError(
            f"red-cell sizes spread too widely (IQR {q3 - q1:.0f} px around {typical:.0f} px) to give a scale; "
            "use a thinner area of the smear or a stage micrometer (--stage-micrometer)"
        )
    diameter = float(typical) * factor
    return ScaleEstimate(round(rbc_diameter_um / diameter, 5), diameter, float(q3 - q1) * factor, len(used),
                         len(frames), 1, measured, method)


def estimate_focus_threshold(frames: Iterable[np.ndarray], fraction: float = 0.5) -> FocusEstimate:
    """A focus threshold from frames a person judged sharp: ``fraction`` of their 5th-percentile focus.

    The focus measure (edge.quality) falls steeply with defocus (a Gaussian blur of sigma 2 px at
    640x480 divides it by ~3), so half the level of the softer good frames passes them all while a
    visibly soft frame fails. A low percentile rather than the median, because a site's fields vary.
    """
    values = np.asarray([focus(frame) for frame in frames], dtype=np.float64)
    if len(values) == 0:
        raise CalibrationError("no frames to measure focus on")
    median = float(np.median(values))
    if median <= 0:
        raise CalibrationError("the frames have no detail at all (blank field or lens cap on?)")
    threshold = fraction * float(np.percentile(values, 5))
    return FocusEstimate(round(threshold, 4), median, float(values.min()), float(values.max()), len(values))


@dataclass(frozen=True)
class QualityFit:
    """Gate thresholds fitted to a site's good frames, and the levels they came from."""

    params: QualityParams
    frames: int
    background: float  # median background grey level
    contrast: float  # median cell contrast
    focus: float  # median focus

    def summary(self) -> str:
        p = self.params
        return (
            f"quality: background {self.background:.0f} (too dark below {p.min_brightness:.0f}), cell contrast "
            f"{self.contrast:.2f} (empty / washed out below {p.min_contrast:.3f}), focus {self.focus:.3f} "
            f"(out of focus below {p.min_focus:.3f}), cells washed out above grey {p.max_brightness:.0f}, "
            f"clipped cell colour above {p.max_clipped:.0%}; {self.frames} frame(s)"
        )


def fit_quality(frames: Sequence[np.ndarray], min_frames: int = 5) -> QualityFit:
    """Thresholds from frames of a normal smear at this microscope: each well outside the spread of
    the good frames (0.4 x the lowest contrast, half the 5th-percentile focus, half the dimmest
    background, halfway from the palest cells to white, twice the most clipped + 0.1), so every such frame
    passes and a degraded one does not."""
    measures: list[Measures] = [measure(frame) for frame in frames]
    if len(measures) < min_frames:
        raise CalibrationError(f"need at least {min_frames} frames to fit the quality gate, got {len(measures)}")
    background = np.array([m.brightness for m in measures])
    contrast = np.array([m.contrast for m in measures])
    focus_values = np.array([m.focus for m in measures])
    clipped = np.array([m.clipped for m in measures])
    cells = np.array([m.cell_level for m in measures])
    if float(np.median(contrast)) < 0.03:
        raise CalibrationError("the frames show no cells (contrast too low): point the camera at a blood smear")
    palest = float(cells.max())
    params = QualityParams(
        enabled=True,
        min_sharpness=0.0,
        min_brightness=round(max(20.0, 0.5 * float(np.percentile(background, 1))), 1),
        max_brightness=round(min(252.0, palest + 0.5 * (255.0 - palest)), 1),
        max_clipped=round(float(np.clip(2 * clipped.max() + 0.1, 0.1, 0.6)), 3),
        min_contrast=round(max(0.02, 0.4 * float(contrast.min())), 4),
        min_focus=round(0.5 * float(np.percentile(focus_values, 5)), 4),
    )
    return QualityFit(params, len(measures), float(np.median(background)), float(np.median(contrast)),
                      float(np.median(focus_values)))


def grab_frames(
    source: Any, count: int, stop: threading.Event | None = None, timeout_s: float = 60.0, every: int = 1
) -> list[np.ndarray]:
    """The next ``count`` frames of any source (camera or replay), keeping every ``every``-th one so a
    live camera gives frames a little apart; stops early at the end of a replay or after ``timeout_s``."""
    stop = stop or threading.Event()
    frames: list[np.ndarray] = []
    deadline = time.monotonic() + timeout_s
    with closing(source.frames(stop)) as stream:
        for index, frame in enumerate(stream):
            if index % max(1, every) == 0:
                frames.append(frame.image)
            if len(frames) >= count or time.monotonic() > deadline:
                break
    return frames


# -- writing one value into a TOML config file ------------------------------------------------

_SECTION = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]\s*(#.*)?$")
_KEY = r"^(\s*){key}\s*=\s*"


def toml_value(value: Any) -> str:
    """A TOML literal for a bool, number, string or flat list of those."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{value!r} cannot be written to TOML here")
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def set_toml_value(path: str | Path, section: str, key: str, value: Any) -> None:
    """Set ``key = value`` in ``[section]`` of a TOML file, keeping every other line and comment.

    Adds the key (at the end of the section) or the section (at the end of the file) when missing;
    creates the file if it does not exist. The file is replaced atomically (temp file + os.replace),
    so a crash leaves the old config or the new one. A trailing comment on the edited line is kept.
    """
    set_toml_values(path, {section: {key: value}})


def set_toml_values(path: str | Path, values: dict[str, dict[str, Any]]) -> None:
    """Several ``[section] key = value`` edits in one atomic replacement of the file (all or none)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    for section, keys in values.items():
        for key, value in keys.items():
            text = _edit_toml(text, section, key, value)
    _atomic_write_text(path, text)


def _edit_toml(text: str, section: str, key: str, value: Any) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]+", key) or not re.fullmatch(r"[A-Za-z0-9_.-]+", section):
        raise ValueError(f"unsupported TOML name: [{section}] {key}")
    lines = text.splitlines()
    literal = toml_value(value)
    key_line = re.compile(_KEY.format(key=re.escape(key)) + r"(.*)$")
    current: str | None = None
    section_end: int | None = None  # index after the last non-blank line of the wanted section
    for index, line in enumerate(lines):
        header = _SECTION.match(line)
        if header:
            current = header.group(1)
            if current == section:
                section_end = index + 1
            continue
        if current != section:
            continue
        found = key_line.match(line)
        if found:
            lines[index] = f"{found.group(1)}{key} = {literal}{_trailing_comment(found.group(2))}"
            return "\n".join(lines) + "\n"
        if line.strip():
            section_end = index + 1
    if section_end is None:
        if lines and lines[-1].strip():
            lines.append("")
        lines += [f"[{section}]", f"{key} = {literal}"]
    else:
        lines.insert(section_end, f"{key} = {literal}")
    return "\n".join(lines) + "\n"


def _trailing_comment(rest: str) -> str:
    """The `  # comment` after a simple value, if any (values with '#' inside strings keep none)."""
    match = re.match(r'^(?:"[^"#]*"|[^"#\[]*?|\[[^"#]*\])(\s*#.*)$', rest)
    return match.group(1) if match else ""


def _atomic_write_text(path: Path, text: str) -> None:
    """Keep the config file's own permissions (it may be 0640 root:cytoedge)."""
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)

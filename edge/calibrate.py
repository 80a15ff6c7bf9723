"""Setting up a new microscope: image scale (um per pixel) and the focus threshold, from real frames.

Scale matters because the cell finder and the classifier's crops work in micrometres. Red cells
are a built-in ruler: they are about 7.5 um across and there are dozens per field, so the median
red-cell size over a few frames gives the scale to a few percent without a stage micrometer.
Results are written into the TOML config file with a line edit that keeps comments and layout.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
import time
from collections.abc import Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.cellfinder import FinderParams, find_cells
from edge.errors import CytoedgeError
from edge.fileutil import atomic_write_bytes
from edge.quality import sharpness

RBC_DIAMETER_UM = 7.5
MIN_RED_CELLS = 30
# While searching, accept red cells from 1/3 to 3x the nominal size, so a scale that is wrong by
# up to ~3x still finds the cells (the finder's own range, 5..10 um, would clip them).
_SEARCH_RATIO = 3.0
_MAX_PASSES = 5


class CalibrationError(CytoedgeError):
    """The frames cannot support an estimate; the message says what to do instead."""


@dataclass(frozen=True)
class ScaleEstimate:
    um_per_px: float
    median_px: float  # median red-cell diameter in pixels
    iqr_px: float  # interquartile range of the diameters (spread; large = mixed cells or clumps)
    count: int  # red cells measured
    frames: int
    passes: int

    def summary(self) -> str:
        return (
            f"um_per_px = {self.um_per_px:.4f} (median red cell {self.median_px:.1f} px, "
            f"IQR {self.iqr_px:.1f} px, {self.count} cells in {self.frames} frame(s))"
        )


@dataclass(frozen=True)
class FocusEstimate:
    threshold: float
    median: float
    low: float  # sharpness of the least sharp good frame
    high: float
    count: int

    def summary(self) -> str:
        return (
            f"min_sharpness = {self.threshold:.1f} (good frames: median {self.median:.1f}, "
            f"range {self.low:.1f}..{self.high:.1f}, {self.count} frame(s))"
        )


def _red_cell_diameters(
    frames: Sequence[np.ndarray], um_per_px: float, params: FinderParams, rbc_diameter_um: float
) -> np.ndarray:
    search = dataclasses.replace(
        params,
        rbc_min_diameter_um=rbc_diameter_um / _SEARCH_RATIO,
        rbc_max_diameter_um=rbc_diameter_um * _SEARCH_RATIO,
    )
    sizes = [
        (d.bbox[2] + d.bbox[3]) / 2.0
        for frame in frames
        for d in find_cells(frame, um_per_px, search)
        if d.kind == "rbc"
    ]
    return np.asarray(sizes, dtype=np.float64)


def estimate_um_per_px(
    frames: Sequence[np.ndarray],
    current_um_per_px: float,
    rbc_diameter_um: float = RBC_DIAMETER_UM,
    params: FinderParams | None = None,
    min_cells: int = MIN_RED_CELLS,
) -> ScaleEstimate:
    """Scale from the median red-cell diameter found by the cell finder.

    The finder needs a scale to look for cells, so this iterates from ``current_um_per_px`` until the
    estimate stops moving (within 1%); a start that is off by up to ~3x converges. Raises
    CalibrationError when too few red cells are found (wrong slide area, empty field, no smear).
    """
    if not frames:
        raise CalibrationError("no frames to calibrate from")
    if not (math.isfinite(current_um_per_px) and current_um_per_px > 0):
        raise CalibrationError(f"the starting um_per_px must be > 0, got {current_um_per_px!r}")
    params = params or FinderParams()
    um_per_px = float(current_um_per_px)
    sizes = np.empty(0)
    passes = 0
    for passes in range(1, _MAX_PASSES + 1):  # noqa: B007 - the last value is reported
        sizes = _red_cell_diameters(frames, um_per_px, params, rbc_diameter_um)
        if len(sizes) < min_cells:
            raise CalibrationError(
                f"only {len(sizes)} red cell(s) found in {len(frames)} frame(s) (need {min_cells}); "
                "point the camera at a thin, well-spread part of a blood smear, check focus and "
                "exposure, or give more frames"
            )
        estimate = rbc_diameter_um / float(np.median(sizes))
        settled = abs(estimate - um_per_px) / um_per_px < 0.01
        um_per_px = estimate
        if settled:
            break
    q1, median, q3 = np.percentile(sizes, [25, 50, 75])
    return ScaleEstimate(round(um_per_px, 5), float(median), float(q3 - q1), len(sizes), len(frames), passes)


def estimate_focus_threshold(frames: Iterable[np.ndarray], fraction: float = 0.4) -> FocusEstimate:
    """A focus threshold from frames a person judged sharp: ``fraction`` of their median sharpness.

    Sharpness falls steeply with defocus (a Gaussian blur of sigma 2 px at 640x480 divides it by ~5),
    so 0.4 of the median passes every good frame while a visibly soft one fails.
    """
    values = np.asarray([sharpness(frame) for frame in frames], dtype=np.float64)
    if len(values) == 0:
        raise CalibrationError("no frames to measure focus on")
    median = float(np.median(values))
    if median <= 0:
        raise CalibrationError("the frames have no detail at all (blank field or lens cap on?)")
    threshold = fraction * median
    return FocusEstimate(round(threshold, 2), median, float(values.min()), float(values.max()), len(values))


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
    if not re.fullmatch(r"[A-Za-z0-9_-]+", key) or not re.fullmatch(r"[A-Za-z0-9_.-]+", section):
        raise ValueError(f"unsupported TOML name: [{section}] {key}")
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
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
            _atomic_write_text(path, "\n".join(lines) + "\n")
            return
        if line.strip():
            section_end = index + 1
    if section_end is None:
        if lines and lines[-1].strip():
            lines.append("")
        lines += [f"[{section}]", f"{key} = {literal}"]
    else:
        lines.insert(section_end, f"{key} = {literal}")
    _atomic_write_text(path, "\n".join(lines) + "\n")


def _trailing_comment(rest: str) -> str:
    """The `  # comment` after a simple value, if any (values with '#' inside strings keep none)."""
    match = re.match(r'^(?:"[^"#]*"|[^"#\[]*?|\[[^"#]*\])(\s*#.*)$', rest)
    return match.group(1) if match else ""


def _atomic_write_text(path: Path, text: str) -> None:
    """Keep the config file's own permissions (it may be 0640 root:cytoedge)."""
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)

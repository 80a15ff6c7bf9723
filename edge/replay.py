"""Replay sources: a folder of images, a video file, or a recorded session folder.

Replays drive the same pipeline as a live camera, so they are how the service is tested. They are
deterministic: the same input gives the same frames in the same order, and a file that cannot be
read is skipped, counted and reported instead of stopping the run.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from edge.errors import SourceError
from edge.frames import IMAGE_SUFFIXES, BadImage, Frame, read_image

log = logging.getLogger(__name__)

SESSION_INDEX = "index.jsonl"
SESSION_META = "session.json"
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mjpeg", ".mjpg")


@dataclass
class SourceStats:
    read: int = 0
    skipped: int = 0
    warnings: list[str] = field(default_factory=list)

    def skip(self, reason: str, keep: int = 20) -> None:
        """Count a bad item; keep the first few reasons so status can say what went wrong."""
        self.skipped += 1
        log.warning("skipped: %s", reason)
        if len(self.warnings) < keep:
            self.warnings.append(reason)


@dataclass
class _Item:
    """One raw item from a reader: an image or the reason it could not be had."""

    image: np.ndarray | None
    offset_s: float | None  # time since the first frame, when the source recorded it
    captured_at: float | None
    origin: str = ""
    problem: str | None = None


def _natural_key(path: Path) -> list[object]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


class ReplaySource:
    """Plays a recorded input once or in a loop, at the recorded pace or as fast as it is consumed."""

    live = False

    def __init__(
        self, path: Path, pace: str = "recorded", fps: float = 5.0, loop: bool = False, max_pixels: int = 40_000_000
    ) -> None:
        self.path = Path(path)
        self.pace = pace
        self.fps = fps
        self.loop = loop
        self.max_pixels = max_pixels
        self.stats = SourceStats()
        self.state = "streaming"
        self._reader = _open_reader(self.path, fps, max_pixels)

    @property
    def name(self) -> str:
        return str(self.path)

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        frame_id = 0
        started = time.monotonic()
        while not stop.is_set():
            produced = 0
            last_offset: float | None = None
            for item in self._reader.items():
                if stop.is_set():
                    return
                if item.problem is not None:
                    self.stats.skip(item.problem)
                    continue
                if self.pace == "recorded" and item.offset_s is not None:
                    delay = started + item.offset_s - time.monotonic()
                    if delay > 0 and stop.wait(delay):
                        return
                self.stats.read += 1
                produced += 1
                last_offset = item.offset_s
                captured = item.captured_at if item.captured_at is not None else time.time()
                yield Frame(item.image, frame_id, captured, item.origin)
                frame_id += 1
            if not self.loop or produced == 0:
                break
            started = _next_loop_start(started, last_offset, produced)
        self.state = "ended"


def _next_loop_start(started: float, last_offset: float | None, produced: int) -> float:
    """When a paced replay starts over, its first frame comes one frame interval after the last one, as
    a camera's would; restarting the clock at once sent two frames back to back at every loop, and a
    live (drop-oldest) pipeline dropped one each time."""
    if last_offset is None:
        return time.monotonic()
    gap = last_offset / (produced - 1) if produced > 1 else 0.0
    return started + last_offset + gap


class _Reader:
    def items(self) -> Iterator[_Item]:
        raise NotImplementedError


class _FolderReader(_Reader):
    def __init__(self, folder: Path, fps: float, max_pixels: int) -> None:
        self.files = sorted(
            (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()), key=_natural_key
        )
        if not self.files:
            raise SourceError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {folder}")
        self.period = 1.0 / fps
        self.max_pixels = max_pixels

    def items(self) -> Iterator[_Item]:
        for index, file in enumerate(self.files):
            try:
                image = read_image(file, self.max_pixels)
            except BadImage as exc:
                yield _Item(None, None, None, problem=str(exc))
                continue
            yield _Item(image, index * self.period, None, str(file))


class _VideoReader(_Reader):
    def __init__(self, path: Path, max_pixels: int) -> None:
        self.path = path
        self.max_pixels = max_pixels
        capture = cv2.VideoCapture(str(path))
        if not capture.isOpened():
            raise SourceError(f"cannot open video {path} (unsupported or damaged file)")
        capture.release()

    def items(self) -> Iterator[_Item]:
        capture = cv2.VideoCapture(str(self.path))
        try:
            declared = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
            fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
            index = 0
            while True:
                ok, image = capture.read()
                if not ok or image is None:
                    break
                if image.shape[0] * image.shape[1] > self.max_pixels:
                    yield _Item(None, None, None, problem=f"{self.path} frame {index}: exceeds the pixel limit")
                else:
                    offset = index / fps if fps > 0 else capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
                    yield _Item(image, offset, None, str(self.path))
                index += 1
            if declared > index:
                yield _Item(
                    None,
                    None,
                    None,
                    problem=f"{self.path}: video ended after {index} of {declared} frames (truncated?)",
                )
            elif index == 0:
                yield _Item(None, None, None, problem=f"{self.path}: no decodable frames")
        finally:
            capture.release()


class _SessionReader(_Reader):
    """A folder written by `cytoedge record`: index.jsonl lines of {"frame": file, "t": unix time}."""

    def __init__(self, folder: Path, max_pixels: int) -> None:
        self.folder = folder
        self.max_pixels = max_pixels
        self.index = folder / SESSION_INDEX

    def items(self) -> Iterator[_Item]:
        first_t: float | None = None
        try:
            handle = self.index.open(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise SourceError(f"cannot read {self.index}: {exc.strerror or exc}") from None
        with handle:
            for number, line in enumerate(handle, start=1):
                entry = _parse_index_line(line)
                if entry is None:
                    if line.strip():
                        yield _Item(None, None, None, problem=f"{self.index}:{number}: not a valid index entry")
                    continue
                name, stamp = entry
                try:
                    file = (self.folder / name).resolve()
                except (OSError, ValueError):  # e.g. an embedded NUL byte
                    file = self.folder
                if self.folder.resolve() not in file.parents:
                    yield _Item(
                        None, None, None, problem=f"{self.index}:{number}: frame path leaves the session folder"
                    )
                    continue
                try:
                    image = read_image(file, self.max_pixels)
                except BadImage as exc:
                    yield _Item(None, None, None, problem=str(exc))
                    continue
                if first_t is None:
                    first_t = stamp
                yield _Item(image, max(0.0, stamp - first_t), stamp, str(file))


def _parse_index_line(line: str) -> tuple[str, float] | None:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict):
        return None
    name, stamp = entry.get("frame"), entry.get("t")
    if not isinstance(name, str) or not isinstance(stamp, (int, float)) or isinstance(stamp, bool):
        return None
    return name, float(stamp)


def _open_reader(path: Path, fps: float, max_pixels: int) -> _Reader:
    if not path.exists():
        raise SourceError(f"replay path not found: {path}")
    if path.is_dir():
        if (path / SESSION_INDEX).is_file():
            return _SessionReader(path, max_pixels)
        return _FolderReader(path, fps, max_pixels)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise SourceError(f"{path} is a single image; replay a folder of frames (use `cytoedge classify` for cells)")
    return _VideoReader(path, max_pixels)

"""Recording a session from any source, in the folder format `edge.replay.ReplaySource` plays back.

Layout: ``frames/000000.png`` ..., ``index.jsonl`` (one ``{"frame": ..., "t": captured_at}`` line per
frame, in order) and ``session.json``. Each frame file is complete on disk (temp name, then
os.replace) before its index line is written and flushed, so killing the recorder at any moment
(SIGKILL, power button) loses at most the frame in flight and never leaves an index line that
points at half a file. A recorded session replays at the original pace, frame for frame (PNG is
lossless; JPEG is smaller but not the same pixels).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2

from edge.errors import CytoedgeError
from edge.fileutil import atomic_write_bytes
from edge.frames import Frame
from edge.replay import SESSION_INDEX, SESSION_META

log = logging.getLogger(__name__)

SESSION_FORMAT = "cytoedge-session/1"
FRAMES_DIR = "frames"


class RecordError(CytoedgeError):
    """Cannot record where asked (folder not empty, disk problem)."""


@dataclass
class RecordSummary:
    out_dir: Path
    frames: int
    started_at: float
    ended_at: float
    bytes_written: int

    def summary(self) -> str:
        seconds = max(0.0, self.ended_at - self.started_at)
        return (
            f"recorded {self.frames} frame(s) in {seconds:.1f} s to {self.out_dir} ({self.bytes_written / 1e6:.1f} MB)"
        )


def _encode(image: Any, fmt: str, quality: int) -> bytes:
    if fmt == "png":
        ok, data = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    else:
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RecordError(f"could not encode a {image.shape} frame as {fmt}")
    return data.tobytes()


def _write_frame(path: Path, data: bytes) -> None:
    """Whole file or nothing under the final name (no fsync per frame: SD cards are slow)."""
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "wb") as out:
        out.write(data)
    os.replace(temp, path)


def record(
    source: Any,
    out_dir: str | Path,
    stop: threading.Event,
    max_frames: int | None = None,
    fmt: str = "png",
    quality: int = 95,
    settings: dict[str, Any] | None = None,
    um_per_px: float | None = None,
    max_seconds: float | None = None,
    on_frame: Callable[[Frame, int], None] | None = None,
) -> RecordSummary:
    """Record frames from ``source`` (anything with ``frames(stop)``) until ``stop`` is set, the
    source ends, ``max_frames`` are written or ``max_seconds`` have passed (which sets ``stop``).

    ``settings`` (camera kind, device, size, exposure ...) and ``um_per_px`` are stored in
    session.json so a recording says how it was made. ``out_dir`` must be new or empty.
    """
    fmt = fmt.lower().lstrip(".")
    fmt = "jpg" if fmt == "jpeg" else fmt
    if fmt not in ("png", "jpg"):
        raise RecordError(f"format must be 'png' or 'jpg', got {fmt!r}")
    if not 1 <= int(quality) <= 100:
        raise RecordError(f"JPEG quality must be 1..100, got {quality}")
    if max_frames is not None and max_frames < 1:
        raise RecordError(f"max_frames must be >= 1, got {max_frames}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RecordError(f"{out} exists and is not an empty folder; choose a new folder for the session")
    frames_dir = out / FRAMES_DIR
    try:
        frames_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RecordError(f"cannot create {frames_dir}: {exc.strerror or exc}") from None

    started_at = time.time()
    meta: dict[str, Any] = {
        "format": SESSION_FORMAT,
        "started_at": started_at,
        "source": getattr(source, "name", str(source)),
        "um_per_px": um_per_px,
        "camera": dict(settings or {}),
        "image_format": fmt,
    }
    _write_meta(out, meta)
    count = 0
    written = 0
    timer = None
    if max_seconds is not None:  # a timer, not a check per frame: a camera that delivers nothing still stops
        timer = threading.Timer(max_seconds, stop.set)
        timer.daemon = True
        timer.start()
    try:
        with open(out / SESSION_INDEX, "a", encoding="utf-8") as index, closing(source.frames(stop)) as stream:
            for frame in stream:
                name = f"{FRAMES_DIR}/{count:06d}.{fmt}"
                data = _encode(frame.image, fmt, int(quality))
                _write_frame(out / name, data)
                index.write(json.dumps({"frame": name, "t": frame.captured_at}) + "\n")
                index.flush()
                count += 1
                written += len(data)
                if on_frame is not None:
                    on_frame(frame, count)
                if max_frames is not None and count >= max_frames:
                    break
    except OSError as exc:
        raise RecordError(f"recording to {out} failed after {count} frame(s): {exc.strerror or exc}") from None
    finally:
        if timer is not None:
            timer.cancel()
        ended_at = time.time()
        meta.update(ended_at=ended_at, frames=count)
        try:
            _write_meta(out, meta)
        except OSError as exc:
            log.error("could not finish %s: %s", out / SESSION_META, exc)
    log.info("recorded %d frame(s) to %s", count, out)
    return RecordSummary(out, count, started_at, ended_at, written)


def _write_meta(out: Path, meta: dict[str, Any]) -> None:
    atomic_write_bytes(out / SESSION_META, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))

"""Recording sessions and playing them back: frame for frame, at the recorded pace, and safe against kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.capture import OpenCVSource, ReconnectPolicy
from edge.errors import CytoedgeError
from edge.frames import read_image
from edge.record import SESSION_FORMAT, record
from edge.replay import ReplaySource

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "bccd"


def image_folder(folder: Path, count: int = 6) -> Path:
    """Real frames (BCCD crops, each different) as PNG files, the input a replay folder takes."""
    folder.mkdir()
    for index, path in enumerate(sorted(SAMPLES.glob("*.jpg"))[:count]):
        image = read_image(path)[index * 7 : index * 7 + 200, 10:310]
        cv2.imwrite(str(folder / f"{index:03d}.png"), image)
    return folder


def replayed(path: Path, pace: str = "max") -> tuple[list[np.ndarray], list[float], ReplaySource]:
    source = ReplaySource(path, pace=pace)
    frames = list(source.frames(threading.Event()))
    return [f.image for f in frames], [f.captured_at for f in frames], source


def test_png_session_replays_identical_frames_and_timestamps(tmp_path: Path) -> None:
    originals, _stamps, _ = replayed(image_folder(tmp_path / "in"))
    recorded: list[tuple[np.ndarray, float]] = []
    summary = record(
        ReplaySource(tmp_path / "in", pace="max"),
        tmp_path / "session",
        threading.Event(),
        settings={"kind": "opencv", "device": "/dev/video0", "exposure_us": 8000},
        um_per_px=0.075,
        on_frame=lambda frame, _n: recorded.append((frame.image, frame.captured_at)),
    )
    assert summary.frames == 6
    images, stamps, source = replayed(tmp_path / "session")
    assert source.stats.skipped == 0 and len(images) == 6
    for got, original, (seen, _t) in zip(images, originals, recorded, strict=True):
        assert np.array_equal(got, original) and np.array_equal(seen, original)
    assert stamps == [t for _image, t in recorded]
    meta = json.loads((tmp_path / "session" / "session.json").read_text())
    assert meta["format"] == SESSION_FORMAT and meta["um_per_px"] == 0.075 and meta["frames"] == 6
    assert meta["camera"]["exposure_us"] == 8000 and meta["started_at"] <= meta["ended_at"]
    lines = (tmp_path / "session" / "index.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"frame": "frames/000000.png", "t": recorded[0][1]}


def test_session_replays_at_the_recorded_pace(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "in", count=5)
    record(ReplaySource(folder, pace="recorded", fps=10.0), tmp_path / "session", threading.Event())
    _images, stamps, _ = replayed(tmp_path / "session")
    assert stamps[-1] - stamps[0] == pytest.approx(0.4, abs=0.1)  # recorded at 10 fps
    started = time.monotonic()
    replayed(tmp_path / "session", pace="recorded")
    assert time.monotonic() - started == pytest.approx(stamps[-1] - stamps[0], abs=0.1)


def test_jpeg_session_is_smaller_and_close_to_the_original(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "in", count=3)
    record(ReplaySource(folder, pace="max"), tmp_path / "session", threading.Event(), fmt="jpg", quality=90)
    originals, _, _ = replayed(folder)
    images, _, _ = replayed(tmp_path / "session")
    assert sorted(p.name for p in (tmp_path / "session" / "frames").iterdir()) == [
        "000000.jpg",
        "000001.jpg",
        "000002.jpg",
    ]
    for got, original in zip(images, originals, strict=True):
        assert np.abs(got.astype(int) - original).mean() < 3


def test_recording_refuses_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "index.jsonl").write_text("")
    with pytest.raises(CytoedgeError, match="not an empty folder"):
        record(ReplaySource(SAMPLES), tmp_path / "old", threading.Event())
    with pytest.raises(CytoedgeError, match="format"):
        record(ReplaySource(SAMPLES), tmp_path / "new", threading.Event(), fmt="bmp")


def _write_video(path: Path, count: int) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 25.0, (320, 240))
    for index in range(count):
        writer.write(np.full((240, 320, 3), 10 + 7 * (index % 35), np.uint8))
    writer.release()


def test_recording_a_live_camera_stops_at_max_frames_and_releases_it(tmp_path: Path) -> None:
    _write_video(tmp_path / "cam.avi", 4)  # shorter than the recording: the camera "reconnects" midway
    source = OpenCVSource(str(tmp_path / "cam.avi"), policy=ReconnectPolicy(initial_s=0.05, max_s=0.1))
    summary = record(source, tmp_path / "session", threading.Event(), max_frames=7, settings={"kind": "opencv"})
    assert summary.frames == 7
    images, stamps, replay = replayed(tmp_path / "session")
    assert len(images) == 7 and replay.stats.skipped == 0 and stamps == sorted(stamps)
    time.sleep(0.1)
    assert not [t for t in threading.enumerate() if t.name.startswith("grab ")], "camera left open"


def test_max_seconds_ends_a_recording_even_without_frames(tmp_path: Path) -> None:
    source = OpenCVSource(str(tmp_path / "absent.avi"), policy=ReconnectPolicy(initial_s=0.05, max_s=0.1))
    started = time.monotonic()
    summary = record(source, tmp_path / "session", threading.Event(), max_seconds=0.5)
    assert summary.frames == 0 and time.monotonic() - started < 2.0


RECORDER = """
import sys, threading
from edge.capture import OpenCVSource, ReconnectPolicy
from edge.record import record
record(OpenCVSource(sys.argv[1], policy=ReconnectPolicy(initial_s=0.01, max_s=0.01)), sys.argv[2], threading.Event())
"""


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_kill_9_while_recording_leaves_a_replayable_session(tmp_path: Path) -> None:
    _write_video(tmp_path / "cam.avi", 40)
    out = tmp_path / "session"
    child = subprocess.Popen([sys.executable, "-c", RECORDER, str(tmp_path / "cam.avi"), str(out)], cwd=REPO)
    index = out / "index.jsonl"
    try:
        deadline = time.monotonic() + 60
        while not (index.exists() and len(index.read_text().splitlines()) >= 25):
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    lines = index.read_text().splitlines()
    assert len(lines) >= 25 and all(json.loads(line)["frame"].endswith(".png") for line in lines)
    images, _stamps, replay = replayed(out)
    assert replay.stats.skipped == 0 and len(images) == len(lines)  # every indexed frame is whole
    on_disk = [p for p in (out / "frames").iterdir() if not p.name.startswith(".")]
    assert len(on_disk) - len(lines) in (0, 1)  # at most the frame in flight is lost

"""Replay sources on real files: folders, videos and recorded sessions, with bad files among them."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import SAMPLES

from edge.errors import SourceError
from edge.frames import BadImage, decode_image
from edge.replay import ReplaySource


def collect(source: ReplaySource, limit: int = 1000) -> list:
    stop = threading.Event()
    frames = []
    for frame in source.frames(stop):
        frames.append(frame)
        if len(frames) >= limit:
            stop.set()
    return frames


def write_video(path: Path, count: int, fps: float = 10.0) -> list[np.ndarray]:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (160, 120))
    images = []
    for index in range(count):
        image = np.full((120, 160, 3), (40 + 7 * index) % 256, np.uint8)
        cv2.circle(image, (80, 60), 20 + index, (200, 50, 120), -1)
        writer.write(image)
        images.append(image)
    writer.release()
    return images


def test_folder_replays_in_natural_order_and_names_each_file(tmp_path: Path) -> None:
    for name in ("frame10.jpg", "frame2.jpg", "frame1.jpg"):
        shutil.copy(SAMPLES / "BloodImage_00007.jpg", tmp_path / name)
    frames = collect(ReplaySource(tmp_path, pace="max"))
    assert [Path(f.source).name for f in frames] == ["frame1.jpg", "frame2.jpg", "frame10.jpg"]
    assert [f.frame_id for f in frames] == [0, 1, 2]


def test_unreadable_and_truncated_files_are_skipped_counted_and_reported(tmp_path: Path) -> None:
    good = (SAMPLES / "BloodImage_00007.jpg").read_bytes()
    (tmp_path / "a.jpg").write_bytes(good)
    (tmp_path / "b.jpg").write_bytes(b"this is not an image")
    (tmp_path / "c.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "d.png").write_bytes(b"")
    (tmp_path / "e.jpg").write_bytes(good)
    source = ReplaySource(tmp_path, pace="max")
    frames = collect(source)
    assert [Path(f.source).name for f in frames] == ["a.jpg", "e.jpg"]
    assert source.stats.skipped == 3
    assert any("truncated JPEG" in w for w in source.stats.warnings)
    assert source.state == "ended"


def test_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no images"):
        ReplaySource(tmp_path)


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not found"):
        ReplaySource(tmp_path / "nothing")


def test_loop_keeps_counting_frame_ids(tmp_path: Path) -> None:
    shutil.copy(SAMPLES / "BloodImage_00007.jpg", tmp_path / "a.jpg")
    shutil.copy(SAMPLES / "BloodImage_00011.jpg", tmp_path / "b.jpg")
    frames = collect(ReplaySource(tmp_path, pace="max", loop=True), limit=5)
    assert [f.frame_id for f in frames] == [0, 1, 2, 3, 4]
    assert [Path(f.source).name for f in frames] == ["a.jpg", "b.jpg", "a.jpg", "b.jpg", "a.jpg"]


def test_a_paced_loop_keeps_the_frame_interval_across_the_restart(tmp_path: Path) -> None:
    """Like a camera: the first frame of the next pass comes one interval after the last, not at once."""
    import time

    shutil.copy(SAMPLES / "BloodImage_00007.jpg", tmp_path / "a.jpg")
    shutil.copy(SAMPLES / "BloodImage_00011.jpg", tmp_path / "b.jpg")
    stop = threading.Event()
    arrivals = []
    for _frame in ReplaySource(tmp_path, pace="recorded", fps=20.0, loop=True).frames(stop):
        arrivals.append(time.monotonic())
        if len(arrivals) == 6:
            stop.set()
    gaps = np.diff(arrivals)
    assert gaps.min() > 0.03  # 50 ms apart; the old restart gave ~0 ms at each pass
    assert abs((arrivals[-1] - arrivals[0]) - 5 * 0.05) < 0.05


def test_replay_is_deterministic(tmp_path: Path) -> None:
    first = collect(ReplaySource(SAMPLES, pace="max"))
    second = collect(ReplaySource(SAMPLES, pace="max"))
    assert len(first) == 20
    assert all(np.array_equal(a.image, b.image) and a.source == b.source for a, b in zip(first, second, strict=True))


def test_video_file_replays_every_frame(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    write_video(path, 12)
    frames = collect(ReplaySource(path, pace="max"))
    assert len(frames) == 12
    assert frames[0].image.shape == (120, 160, 3)


def test_truncated_video_plays_what_it_can_and_reports_the_loss(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    write_video(path, 30)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    source = ReplaySource(path, pace="max")
    frames = collect(source)
    assert 0 < len(frames) < 30
    assert source.stats.skipped >= 1
    assert any("truncated" in w or "no decodable" in w for w in source.stats.warnings)


def test_unopenable_video_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(SourceError, match="cannot open video"):
        ReplaySource(path)


def test_session_replays_recorded_timestamps_and_skips_bad_index_lines(tmp_path: Path) -> None:
    (tmp_path / "frames").mkdir()
    shutil.copy(SAMPLES / "BloodImage_00007.jpg", tmp_path / "frames" / "0.jpg")
    shutil.copy(SAMPLES / "BloodImage_00011.jpg", tmp_path / "frames" / "1.jpg")
    lines = [
        json.dumps({"frame": "frames/0.jpg", "t": 1000.0}),
        "{broken",
        json.dumps({"frame": "../x.jpg", "t": 1}),
        json.dumps({"frame": "frames/1.jpg", "t": 1000.05}),
    ]
    (tmp_path / "index.jsonl").write_text("\n".join(lines) + "\n")
    source = ReplaySource(tmp_path, pace="recorded")
    frames = collect(source)
    assert [f.captured_at for f in frames] == [1000.0, 1000.05]
    assert source.stats.skipped == 2


def test_decoder_refuses_images_declaring_huge_dimensions() -> None:
    ok, data = cv2.imencode(".png", np.zeros((100, 100, 3), np.uint8))
    assert ok
    with pytest.raises(BadImage, match="exceeds"):
        decode_image(data.tobytes(), "big.png", max_pixels=5000)

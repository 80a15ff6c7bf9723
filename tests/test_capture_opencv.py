"""The OpenCV live source against real video files made with cv2.VideoWriter: end of stream, frozen
frames, a device that disappears and comes back, giving up, and stopping promptly."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.capture import OpenCVSource, ReconnectPolicy, jetson_csi_pipeline, open_camera, parse_device
from edge.capture.opencv_source import _StampClock
from edge.errors import ConfigError, SourceError
from edge.frames import Frame

FAST = {"initial_s": 0.05, "max_s": 0.2, "stall_timeout_s": 2.0, "open_timeout_s": 5.0}


def write_video(path: Path, count: int, identical: bool = False, size: tuple[int, int] = (160, 120)) -> Path:
    """An MJPG .avi whose frame i is uniformly grey at level 10 + 7*(i % 35) (readable back after JPEG)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 25.0, size)
    assert writer.isOpened()
    for index in range(count):
        level = 10 if identical else 10 + 7 * (index % 35)
        writer.write(np.full((size[1], size[0], 3), level, np.uint8))
    writer.release()
    return path


def frame_number(frame: Frame) -> int:
    return round((float(frame.image.mean()) - 10) / 7)


class Running:
    """Consumes a source in a thread, as the pipeline's capture thread does, recording frames and states."""

    def __init__(self, source: OpenCVSource, per_frame_s: float = 0.0) -> None:
        self.source = source
        self.per_frame_s = per_frame_s  # how long the consumer takes per frame (a camera's pace)
        self.stop = threading.Event()
        self.frames: list[Frame] = []
        self.states: list[tuple[str, str, float]] = []
        self.error: Exception | None = None
        source.on_state = lambda state, reason: self.states.append((state, reason, time.monotonic()))
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            for frame in self.source.frames(self.stop):
                self.frames.append(frame)
                time.sleep(self.per_frame_s)
        except Exception as exc:
            self.error = exc

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive(), "the source did not honour stop"

    def wait_for(self, condition: Callable[[], bool], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out; states {[s[:2] for s in self.states]}, {len(self.frames)} frames")
            time.sleep(0.01)

    def state_names(self) -> list[str]:
        return [state for state, _reason, _t in self.states]


def test_file_that_ends_counts_as_a_vanished_device_and_is_reopened(tmp_path: Path) -> None:
    video = write_video(tmp_path / "five.avi", 5)
    source = OpenCVSource(str(video), policy=ReconnectPolicy(**FAST))
    assert source.live and source.state == "connecting"
    with Running(source) as run:
        run.wait_for(lambda: len(run.frames) >= 12)
    names = run.state_names()
    assert names[:3] == ["streaming", "reconnecting", "streaming"]
    assert "end of stream" in run.states[1][1]
    assert [frame_number(f) for f in run.frames[:12]] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert [f.frame_id for f in run.frames] == list(range(len(run.frames)))  # ids keep counting
    assert source.stats.read == len(run.frames)
    assert all(f.source == str(video) for f in run.frames)


def test_frames_carry_the_wall_clock_time_they_were_read(tmp_path: Path) -> None:
    video = write_video(tmp_path / "clock.avi", 8)
    before = time.time()
    with Running(OpenCVSource(str(video), policy=ReconnectPolicy(**FAST))) as run:
        run.wait_for(lambda: len(run.frames) >= 8)
    stamps = [f.captured_at for f in run.frames[:8]]
    assert before <= stamps[0] and stamps[-1] <= time.time()
    assert stamps == sorted(stamps)


def test_identical_frames_are_a_stall_then_a_reconnect(tmp_path: Path) -> None:
    video = write_video(tmp_path / "frozen.avi", 30, identical=True)
    policy = ReconnectPolicy(**FAST, frozen_frames=5)
    with Running(OpenCVSource(str(video), policy=policy)) as run:
        run.wait_for(lambda: run.state_names().count("reconnecting") >= 2)
    names = run.state_names()
    assert names[:3] == ["streaming", "stalled", "reconnecting"]
    assert "same image 6 times" in run.states[1][1]
    # the repeats carry no information and are not passed on: one frame per connection
    assert len(run.frames) == names.count("streaming")


def test_device_that_vanishes_mid_stream_and_comes_back_resumes_streaming(tmp_path: Path) -> None:
    video = write_video(tmp_path / "camera.avi", 30)
    hidden = tmp_path / "unplugged.avi"
    policy = ReconnectPolicy(**FAST)
    source = OpenCVSource(str(video), policy=policy)
    with Running(source, per_frame_s=0.02) as run:  # 25 fps: 30 frames last 0.6 s
        run.wait_for(lambda: len(run.frames) >= 5)
        video.rename(hidden)  # the open handle still reads to its end, then the device is "gone"
        run.wait_for(lambda: source.capture.failures >= 3)  # attempts at the capped 0.2 s backoff
        gone_at = len(run.frames)
        assert gone_at == 30, "the frames already read out of the device still arrive"
        assert source.state == "reconnecting" and "not found" in source.capture.last_problem
        time.sleep(0.3)
        assert len(run.frames) == gone_at, "no frames while the device is missing"
        hidden.rename(video)
        run.wait_for(lambda: len(run.frames) >= gone_at + 5)
    assert run.state_names() == ["streaming", "reconnecting", "streaming"]
    assert source.state == "streaming" and source.capture.failures == 0
    assert [frame_number(f) for f in run.frames[gone_at : gone_at + 5]] == [0, 1, 2, 3, 4]  # from the start again


def test_limited_reconnects_end_in_failed_with_a_source_error(tmp_path: Path) -> None:
    policy = ReconnectPolicy(**{**FAST, "max_attempts": 3})
    with Running(OpenCVSource(str(tmp_path / "absent.avi"), policy=policy)) as run:
        run.thread.join(timeout=10)
    assert isinstance(run.error, SourceError)
    assert "gave up after 3 failed attempt(s)" in str(run.error) and "not found" in str(run.error)
    assert run.source.state == "failed"
    assert run.state_names() == ["reconnecting", "failed"]


def test_missing_v4l2_device_is_retried_like_an_unplugged_camera() -> None:
    policy = ReconnectPolicy(**{**FAST, "max_attempts": 2})
    with Running(OpenCVSource("/dev/video63", policy=policy)) as run:
        run.thread.join(timeout=10)
    assert isinstance(run.error, SourceError) and "/dev/video63 not found" in str(run.error)


def test_stop_is_honoured_at_once_while_waiting_to_reconnect(tmp_path: Path) -> None:
    policy = ReconnectPolicy(initial_s=30.0, max_s=60.0)
    source = OpenCVSource(str(tmp_path / "absent.avi"), policy=policy)
    run = Running(source)
    with run:
        run.wait_for(lambda: source.state == "reconnecting")
        heartbeat = source.heartbeat
        time.sleep(0.4)
        assert source.heartbeat > heartbeat, "the loop shows it is alive while it waits"
        started = time.monotonic()
    assert time.monotonic() - started < 1.0


def test_state_changes_are_logged_once_not_per_frame(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    video = write_video(tmp_path / "long.avi", 400)
    caplog.set_level(logging.INFO, logger="edge.capture")
    with Running(OpenCVSource(str(video), policy=ReconnectPolicy(**FAST))) as run:
        run.wait_for(lambda: len(run.frames) >= 50)
    changes = [r for r in caplog.records if " -> " in r.getMessage()]
    assert [r.getMessage().split(" -> ")[1].split(" ")[0] for r in changes] == ["streaming"]


def test_device_strings_pick_the_right_backend() -> None:
    assert parse_device(0).kind == "v4l2" and parse_device(0).api == cv2.CAP_V4L2
    assert parse_device("2").target == 2 and parse_device(2).label == "/dev/video2"
    assert parse_device("/dev/video1").kind == "v4l2"
    csi = jetson_csi_pipeline(0, 1920, 1080, 30)
    assert parse_device(csi).kind == "gstreamer" and parse_device(csi).api == cv2.CAP_GSTREAMER
    assert "appsink drop=1 max-buffers=1 sync=false" in csi and "nvarguscamerasrc sensor-id=0" in csi
    rtsp = parse_device("rtsp://admin:secret@10.0.0.5:554/stream1")
    assert rtsp.kind == "url" and rtsp.label == "rtsp://admin:***@10.0.0.5:554/stream1"
    assert parse_device("clip.avi").kind == "file"
    with pytest.raises(ValueError):
        parse_device("")


def test_v4l2_timestamps_map_from_the_monotonic_clock_and_stream_clocks_are_anchored() -> None:
    now, mono = 1_700_000_000.0, 5_000.0
    v4l2 = _StampClock("v4l2")
    assert v4l2.unix((mono - 0.040) * 1000, now, mono) == pytest.approx(now - 0.040)
    assert v4l2.unix(123.0, now, mono) == now  # not on the monotonic clock: use the read time
    stream = _StampClock("gstreamer")
    assert stream.unix(1000.0, now, mono) == now
    assert stream.unix(1100.0, now + 0.105, mono) == pytest.approx(now + 0.100)  # camera spacing kept
    assert _StampClock("file").unix(5000.0, now, mono) == now


def test_open_camera_builds_an_opencv_source_from_config(tmp_path: Path) -> None:
    video = write_video(tmp_path / "cfg.avi", 3)
    source = open_camera(
        {
            "kind": "opencv",
            "device": str(video),
            "stall_timeout_s": 1.5,
            "reconnect_initial_s": 0.1,
            "reconnect_max_s": 2.0,
            "frozen_frames": 7,
        }
    )
    assert isinstance(source, OpenCVSource)
    assert source.policy.stall_timeout_s == 1.5 and source.policy.frozen_frames == 7 and source.policy.max_s == 2.0
    with pytest.raises(ConfigError, match="kind"):
        open_camera({"kind": "webcam"})
    with pytest.raises(ConfigError, match="reconnect"):
        open_camera({"kind": "opencv", "device": 0, "reconnect_initial_s": 5.0, "reconnect_max_s": 1.0})

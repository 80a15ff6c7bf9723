"""Picamera2Source against a stand-in for picamera2, the one fake in the test suite: the real library
needs libcamera and a Pi camera, neither of which exists here.

The fake implements the part of picamera2's documented API the source uses (Picamera2(camera_num),
create_video_configuration, configure, set_controls, start, stop, close, capture_request; request
make_array / get_metadata / release) and, like the real one, lets only one Picamera2 own a camera and
fails loudly when a released request is used.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import pytest

from edge.capture import Picamera2Source, ReconnectPolicy
from edge.capture.picamera2_source import sensor_to_unix
from edge.errors import SourceError
from edge.frames import Frame

FAST = {"initial_s": 0.05, "max_s": 0.2, "stall_timeout_s": 0.5, "open_timeout_s": 2.0}


class FakeRequest:
    def __init__(self, camera: FakePicamera2, number: int) -> None:
        self.camera, self.number, self.released = camera, number, False

    def make_array(self, name: str) -> np.ndarray:
        assert not self.released, "array made from a released request"
        assert name == "main"
        if self.number in self.camera.fail_make_array:
            raise RuntimeError("buffer mapping failed")
        width, height = self.camera.config["main"]["size"]
        image = np.zeros((height, width, 3), np.uint8)
        image[..., 0] = self.number % 256  # every frame differs, as a real sensor's noise does
        image[0, 0, 1] = self.number // 256
        return image

    def get_metadata(self) -> dict[str, Any]:
        assert not self.released
        return {
            "SensorTimestamp": self.camera.sensor_ns,
            "ExposureTime": 12345,
            "AnalogueGain": 2.0,
            "ColourGains": (1.91, 1.52),
        }

    def release(self) -> None:
        assert not self.released, "request released twice"
        self.released = True
        self.camera.released += 1


class FakePicamera2:
    """One camera; a second Picamera2 for the same number fails like libcamera's "camera in use"."""

    in_use: ClassVar[set[int]] = set()

    def __init__(self, camera_num: int = 0) -> None:
        if camera_num in FakePicamera2.in_use:
            raise RuntimeError("Camera __init__ sequence did not complete.")
        FakePicamera2.in_use.add(camera_num)
        self.camera_num = camera_num
        self.config: dict[str, Any] = {}
        self.controls: dict[str, Any] = {}
        self.started = False
        self.closed = False
        self.stops = 0
        self.requests = 0
        self.released = 0
        self.fail_make_array: set[int] = set()
        self.hang = threading.Event()  # while set, capture_request blocks like a camera that stopped
        self.hung = threading.Event()
        self.sensor_age_ns = 20_000_000

    @property
    def sensor_ns(self) -> int:
        return time.monotonic_ns() - self.sensor_age_ns

    def create_video_configuration(
        self,
        main: dict | None = None,
        lores: dict | None = None,
        raw: dict | None = None,
        transform: Any = None,
        colour_space: Any = None,
        buffer_count: int = 6,
        controls: dict | None = None,
        display: str | None = "main",
        encode: str | None = "main",
        queue: bool = True,
    ) -> dict[str, Any]:
        main = {"format": "XBGR8888", "size": (1280, 720), **(main or {})}
        return {
            "use_case": "video",
            "main": main,
            "lores": lores,
            "raw": raw,
            "buffer_count": buffer_count,
            "queue": queue,
            "controls": dict(controls or {}),
            "display": display,
            "encode": encode,
        }

    def configure(self, config: dict[str, Any]) -> None:
        width, height = config["main"]["size"]
        if not isinstance(config["main"]["size"], tuple) or width % 2 or height % 2:
            raise RuntimeError("size in main stream should be (width, height) and even")
        self.config = config

    def set_controls(self, controls: dict[str, Any]) -> None:
        self.controls.update(controls)

    def start(self) -> None:
        assert self.config, "start before configure"
        self.started = True

    def stop(self) -> None:
        self.stops += 1
        self.started = False

    def close(self) -> None:
        self.closed = True
        FakePicamera2.in_use.discard(self.camera_num)

    def capture_request(self) -> FakeRequest:
        assert self.started and not self.closed
        while self.hang.is_set():
            self.hung.set()
            time.sleep(0.01)
        self.requests += 1
        return FakeRequest(self, self.requests)


class Cameras:
    """The factory handed to Picamera2Source: remembers every camera it opened."""

    def __init__(self, fail_first: int = 0, prepare: Callable[[FakePicamera2], None] | None = None) -> None:
        self.opened: list[FakePicamera2] = []
        self.attempts: list[float] = []
        self.fail_first = fail_first
        self.prepare = prepare

    def __call__(self, camera_num: int) -> FakePicamera2:
        self.attempts.append(time.monotonic())
        if len(self.attempts) <= self.fail_first:
            raise RuntimeError("Camera(s) not found (Do not forget to disable legacy camera with raspi-config).")
        camera = FakePicamera2(camera_num)
        if self.prepare is not None:
            self.prepare(camera)
        self.opened.append(camera)
        return camera


@pytest.fixture(autouse=True)
def _free_cameras() -> None:
    FakePicamera2.in_use.clear()


class Running:
    def __init__(self, source: Picamera2Source) -> None:
        self.source, self.stop = source, threading.Event()
        self.frames: list[Frame] = []
        self.states: list[tuple[str, str]] = []
        self.error: Exception | None = None
        source.on_state = lambda state, reason: self.states.append((state, reason))
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            for frame in self.source.frames(self.stop):
                self.frames.append(frame)
                time.sleep(0.005)
        except Exception as exc:
            self.error = exc

    def __enter__(self) -> Running:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive()

    def wait_for(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out; states {self.states}, {len(self.frames)} frames")
            time.sleep(0.01)


def locked_source(cameras: Cameras, **overrides: Any) -> Picamera2Source:
    settings: dict[str, Any] = {
        "width": 640,
        "height": 480,
        "fps": 10.0,
        "exposure_us": 8000,
        "analogue_gain": 1.5,
        "colour_gains": [1.8, 1.4],
        "factory": cameras,
        "policy": ReconnectPolicy(**FAST),
    }
    return Picamera2Source(0, **{**settings, **overrides})


@pytest.mark.skipif(importlib.util.find_spec("picamera2") is not None, reason="picamera2 is installed here")
def test_missing_picamera2_says_exactly_what_to_install() -> None:
    with pytest.raises(SourceError) as error:
        Picamera2Source(0)
    message = str(error.value)
    assert "sudo apt install python3-picamera2" in message and "--system-site-packages" in message


def test_configuration_locks_exposure_gain_white_balance_and_frame_rate() -> None:
    cameras = Cameras()
    with Running(locked_source(cameras)) as run:
        run.wait_for(lambda: len(run.frames) >= 3)
    camera = cameras.opened[0]
    assert camera.config["buffer_count"] >= 4 and camera.config["queue"] is False
    assert camera.config["main"] == {"format": "RGB888", "size": (640, 480)}
    expected = {
        "AeEnable": False,
        "ExposureTime": 8000,
        "AnalogueGain": 1.5,
        "AwbEnable": False,
        "ColourGains": (1.8, 1.4),
        "FrameDurationLimits": (100_000, 100_000),
    }
    assert camera.config["controls"] == expected
    assert camera.controls == expected
    assert run.frames[0].image.shape == (480, 640, 3) and run.frames[0].image.flags.c_contiguous
    assert run.frames[0].source == "picamera2:0"


def test_every_request_is_released_and_the_camera_closed_on_stop() -> None:
    cameras = Cameras()
    with Running(locked_source(cameras)) as run:
        run.wait_for(lambda: len(run.frames) >= 10)
    camera = cameras.opened[0]
    assert camera.requests >= 10 and camera.released == camera.requests
    assert camera.closed and camera.stops >= 1


def test_a_failing_request_is_still_released_and_the_camera_reopened() -> None:
    cameras = Cameras(prepare=lambda camera: camera.fail_make_array.add(4) if not cameras.opened else None)
    with Running(locked_source(cameras)) as run:
        run.wait_for(lambda: len(cameras.opened) >= 2 and len(run.frames) >= 6)
    first = cameras.opened[0]
    assert first.released == first.requests == 4
    assert first.closed
    assert [s for s, _r in run.states][:3] == ["streaming", "reconnecting", "streaming"]
    assert "buffer mapping failed" in run.states[1][1]


def test_sensor_timestamps_become_unix_capture_times() -> None:
    cameras = Cameras(prepare=lambda camera: setattr(camera, "sensor_age_ns", 30_000_000))
    with Running(locked_source(cameras)) as run:
        run.wait_for(lambda: len(run.frames) >= 3)
        read_at = time.time()
    frame = run.frames[-1]
    assert read_at - 1.0 < frame.captured_at < read_at
    now, mono = 1_700_000_000.0, 10_000_000_000
    assert sensor_to_unix(mono - 30_000_000, now, mono) == pytest.approx(now - 0.030)
    assert sensor_to_unix(123, now, mono) is None  # not on this clock: the caller uses the read time


def test_a_hung_capture_is_a_stall_and_the_camera_comes_back_when_it_returns() -> None:
    cameras = Cameras()
    with Running(locked_source(cameras)) as run:
        run.wait_for(lambda: len(run.frames) >= 3)
        first = cameras.opened[0]
        first.hang.set()
        run.wait_for(lambda: ("stalled", "no frame for 0.5 s") in run.states)
        run.wait_for(lambda: run.source.capture.failures >= 2)  # reopening fails: the hung call holds the camera
        assert run.source.state == "reconnecting" and len(cameras.opened) == 1
        first.hang.clear()  # the driver call returns; its request is released and the camera closed
        run.wait_for(lambda: len(cameras.opened) == 2 and run.source.state == "streaming")
        count = len(run.frames)
        run.wait_for(lambda: len(run.frames) >= count + 3)
    assert first.closed and first.released == first.requests
    assert [s for s, _r in run.states][:3] == ["streaming", "stalled", "reconnecting"]


def test_a_camera_that_cannot_be_opened_is_retried_with_growing_pauses() -> None:
    cameras = Cameras(fail_first=3)
    policy = ReconnectPolicy(initial_s=0.1, max_s=1.0, stall_timeout_s=1.0, open_timeout_s=2.0)
    with Running(locked_source(cameras, policy=policy)) as run:
        run.wait_for(lambda: len(run.frames) >= 1)
    gaps = np.diff(cameras.attempts)
    assert len(gaps) == 3
    assert gaps[0] == pytest.approx(0.1, abs=0.08) and gaps[1] == pytest.approx(0.2, abs=0.08)
    assert gaps[2] == pytest.approx(0.4, abs=0.1)
    assert "legacy camera" in run.states[0][1]
    assert [s for s, _r in run.states] == ["reconnecting", "streaming"]


def test_exposure_longer_than_a_frame_or_odd_sizes_are_refused() -> None:
    with pytest.raises(SourceError, match="does not fit in a frame"):
        locked_source(Cameras(), exposure_us=200_000)
    with pytest.raises(SourceError, match="even"):
        locked_source(Cameras(), width=641)


def test_automatic_mode_logs_the_values_to_lock(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edge.capture")
    cameras = Cameras()
    source = locked_source(cameras, exposure_us=0, analogue_gain=0.0, colour_gains=None)
    assert source.controls() == {"FrameDurationLimits": (100_000, 100_000)}
    with Running(source) as run:
        run.wait_for(lambda: len(run.frames) >= 3)
    hints = [r.getMessage() for r in caplog.records if "to lock" in r.getMessage()]
    assert len(hints) == 1
    assert "camera.exposure_us = 12345" in hints[0] and "camera.colour_gains = [1.91, 1.52]" in hints[0]

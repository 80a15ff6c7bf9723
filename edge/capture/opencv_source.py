"""Cameras OpenCV can open: V4L2 devices (USB/UVC cameras), GStreamer pipelines (Jetson CSI cameras),
RTSP/HTTP streams and video files.

The source never ends by itself: end of stream, a failed read, a stall or a frozen image all mean
"the device went away", and it reconnects with backoff (see `edge.capture.health`). So a video file
configured as a live camera replays again after each reconnect; use `ReplaySource` to play a file once.

Jetson CSI camera (nvarguscamerasrc) as a GStreamer pipeline ending in a BGR appsink that keeps
only the newest frame::

    nvarguscamerasrc sensor-id=0 ! video/x-raw(memory:NVMM),width=1920,height=1080,framerate=30/1
      ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR
      ! appsink drop=1 max-buffers=1 sync=false
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import cv2

from edge.capture.health import Device, Grab, LiveSource, ReconnectPolicy, StateCallback

log = logging.getLogger(__name__)

JETSON_CSI_PIPELINE = (
    "nvarguscamerasrc sensor-id={sensor} ! video/x-raw(memory:NVMM),width={width},height={height},"
    "framerate={fps}/1 ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! "
    "appsink drop=1 max-buffers=1 sync=false"
)

# How far a V4L2 buffer timestamp may lie behind "now" and still be taken as CLOCK_MONOTONIC.
_MONOTONIC_WINDOW_S = 5.0
# A stream clock (GStreamer/RTSP) that drifts this far behind the wall clock is re-anchored.
_STREAM_CLOCK_LAG_S = 2.0


def jetson_csi_pipeline(sensor_id: int = 0, width: int = 1920, height: int = 1080, fps: int = 30) -> str:
    """The GStreamer pipeline string for a Jetson CSI camera, for `camera.device`."""
    return JETSON_CSI_PIPELINE.format(sensor=sensor_id, width=width, height=height, fps=fps)


@dataclass(frozen=True)
class DeviceSpec:
    """What `camera.device` names, and the OpenCV backend that opens it."""

    kind: str  # "v4l2" | "gstreamer" | "url" | "file"
    target: int | str
    api: int

    @property
    def label(self) -> str:
        """A printable name with any password in a URL hidden (it is published in status messages)."""
        if self.kind == "v4l2" and isinstance(self.target, int):
            return f"/dev/video{self.target}"
        if self.kind == "url":
            return re.sub(r"://([^:/@]+):[^@/]*@", r"://\1:***@", str(self.target))
        return str(self.target)


def parse_device(device: int | str) -> DeviceSpec:
    """Classify `camera.device`: 0 or "0" or "/dev/video0" (V4L2), a pipeline with "!" (GStreamer),
    "rtsp://..." and other URLs, else a file path."""
    if isinstance(device, bool):
        raise ValueError(f"camera.device must be an index, a path, a pipeline or a URL, got {device!r}")
    if isinstance(device, int):
        if device < 0:
            raise ValueError(f"camera.device index must be >= 0, got {device}")
        return DeviceSpec("v4l2", device, cv2.CAP_V4L2)
    text = str(device).strip()
    if not text:
        raise ValueError("camera.device is empty")
    if text.isdigit():
        return DeviceSpec("v4l2", int(text), cv2.CAP_V4L2)
    if text.startswith("/dev/"):
        return DeviceSpec("v4l2", text, cv2.CAP_V4L2)
    if "!" in text:
        return DeviceSpec("gstreamer", text, cv2.CAP_GSTREAMER)
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", text):
        return DeviceSpec("url", text, cv2.CAP_FFMPEG)
    return DeviceSpec("file", str(Path(text).expanduser()), cv2.CAP_ANY)


class _StampClock:
    """Turns CAP_PROP_POS_MSEC into Unix time when the backend gives a real capture time.

    V4L2 reports the buffer's kernel timestamp (CLOCK_MONOTONIC, ms): mapped exactly. GStreamer and
    FFmpeg streams report a stream clock with an arbitrary start: anchored to the wall clock at the
    first frame, so spacing between frames is the camera's, re-anchored if it drifts. Files report a
    position in the video, which says nothing about when the frame was read: not used.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._offset: float | None = None

    def device_stamp(self, pos_ms: float) -> float | None:
        return pos_ms if math.isfinite(pos_ms) and pos_ms > 0 else None

    def unix(self, pos_ms: float, grabbed: float, grabbed_mono: float) -> float:
        if self.kind == "file" or not math.isfinite(pos_ms) or pos_ms < 0:
            return grabbed
        stamp_s = pos_ms / 1000.0
        if self.kind == "v4l2":
            behind = grabbed_mono - stamp_s
            return grabbed - behind if 0 <= behind < _MONOTONIC_WINDOW_S else grabbed
        if self._offset is None:
            self._offset = grabbed - stamp_s
        captured = self._offset + stamp_s
        if captured > grabbed or captured < grabbed - _STREAM_CLOCK_LAG_S:
            self._offset = grabbed - stamp_s
            captured = grabbed
        return captured


class _OpenCVDevice:
    """One open cv2.VideoCapture. Used only from the capture worker thread."""

    def __init__(self, capture: cv2.VideoCapture, spec: DeviceSpec) -> None:
        self.capture = capture
        self.clock = _StampClock(spec.kind)

    def read(self) -> Grab | None:
        ok, image = self.capture.read()
        grabbed, grabbed_mono = time.time(), time.monotonic()
        if not ok or image is None:
            return None
        pos_ms = float(self.capture.get(cv2.CAP_PROP_POS_MSEC))
        return Grab(image, self.clock.unix(pos_ms, grabbed, grabbed_mono), self.clock.device_stamp(pos_ms))

    def close(self) -> None:
        self.capture.release()


class OpenCVSource(LiveSource):
    """A live camera through cv2.VideoCapture that survives unplugging, stalls and frozen frames."""

    def __init__(
        self,
        device: int | str,
        *,
        width: int = 0,
        height: int = 0,
        fps: float = 0.0,
        exposure_us: int = 0,
        analogue_gain: float = 0.0,
        colour_gains: tuple[float, float] | list[float] | None = None,
        policy: ReconnectPolicy | None = None,
        on_state: StateCallback | None = None,
        max_pixels: int = 40_000_000,
    ) -> None:
        """``width``/``height``/``fps``/``exposure_us``/``analogue_gain``: 0 = leave the device's own
        setting; applied to V4L2 devices only (put them in the pipeline string for GStreamer)."""
        self.spec = parse_device(device)
        self.width, self.height, self.fps = int(width), int(height), float(fps)
        self.exposure_us, self.analogue_gain = int(exposure_us), float(analogue_gain)
        self.colour_gains = tuple(colour_gains) if colour_gains else None
        super().__init__(self.spec.label, policy or ReconnectPolicy(), on_state, max_pixels)
        if self.spec.kind != "v4l2" and (width or height or fps or exposure_us or analogue_gain or colour_gains):
            log.info(
                "camera %s: size/fps/exposure settings apply to V4L2 devices only; set them in the "
                "GStreamer pipeline or at the stream's server",
                self.name,
            )

    def _open(self) -> Device:
        spec = self.spec
        if spec.kind == "file" and not os.path.exists(spec.target):
            raise OSError(f"{spec.target} not found")
        if spec.kind == "v4l2" and isinstance(spec.target, str) and not os.path.exists(spec.target):
            raise OSError(f"{spec.target} not found (unplugged?)")
        params: list[int] = []
        if spec.kind == "url":
            timeout_ms = int(self.policy.stall_timeout_s * 1000)
            params = [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
                int(self.policy.open_timeout_s * 1000),
                cv2.CAP_PROP_READ_TIMEOUT_MSEC,
                timeout_ms,
            ]
        capture = cv2.VideoCapture(spec.target, spec.api, params)
        if not capture.isOpened():
            capture.release()
            backend = {"v4l2": "V4L2", "gstreamer": "GStreamer", "url": "FFmpeg"}.get(spec.kind, "OpenCV")
            raise OSError(f"{backend} could not open {self.name}")
        if spec.kind == "v4l2":
            self._apply_v4l2_settings(capture)
        return _OpenCVDevice(capture, spec)

    def _apply_v4l2_settings(self, capture: cv2.VideoCapture) -> None:
        """Best effort: UVC cameras accept different subsets; report what did not stick, once per open."""
        wanted: list[tuple[str, int, float]] = []
        if self.width and self.height:
            wanted.append(("FOURCC", cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*"MJPG")))
            wanted += [
                ("width", cv2.CAP_PROP_FRAME_WIDTH, self.width),
                ("height", cv2.CAP_PROP_FRAME_HEIGHT, self.height),
            ]
        if self.fps:
            wanted.append(("fps", cv2.CAP_PROP_FPS, self.fps))
        if self.exposure_us:
            # V4L2 auto-exposure menu: 1 = manual; exposure_absolute is in units of 100 us
            wanted += [
                ("manual exposure", cv2.CAP_PROP_AUTO_EXPOSURE, 1),
                ("exposure", cv2.CAP_PROP_EXPOSURE, max(1, round(self.exposure_us / 100))),
            ]
        if self.analogue_gain:
            wanted.append(("gain", cv2.CAP_PROP_GAIN, self.analogue_gain))
        if self.colour_gains:
            wanted.append(("white balance lock", cv2.CAP_PROP_AUTO_WB, 0))
        refused = [label for label, prop, value in wanted if not capture.set(prop, value)]
        if refused:
            log.warning("camera %s refused: %s", self.name, ", ".join(refused))
        if self.width and self.height:
            got = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
            if got != (self.width, self.height):
                log.warning(
                    "camera %s delivers %dx%d, not the configured %dx%d", self.name, *got, self.width, self.height
                )

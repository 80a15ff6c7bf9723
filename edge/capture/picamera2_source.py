"""Raspberry Pi CSI cameras through picamera2 (libcamera), with the image settings locked.

A classifier trained on smears is sensitive to brightness and colour, so exposure, gain, white
balance and frame rate are fixed from config rather than left to the camera's automatics, which
drift with what is in the field of view. Each frame comes from its own capture request, so its
metadata (SensorTimestamp) belongs to exactly that image, and every request goes back to the
camera (``release()``) whatever happens, or the camera runs out of buffers and stops.

picamera2 facts relied on (picamera2 0.3.x, the Raspberry Pi OS package):
- ``Picamera2(camera_num)`` opens the camera (RuntimeError if absent or busy);
- ``create_video_configuration(main={"size": (w, h), "format": ...}, buffer_count=..., controls=...,
  queue=...)``; ``queue=False`` stops the library keeping a finished frame ready for the next capture
  call, so a captured frame never predates the call; sizes must be even;
- format ``"RGB888"`` gives arrays in B, G, R byte order (libcamera names formats by the packed
  little-endian word), which is OpenCV's BGR;
- ``capture_request()`` blocks until a frame is done and returns a CompletedRequest with
  ``make_array("main")`` (a copy), ``get_metadata()`` and ``release()``;
- metadata ``SensorTimestamp`` is nanoseconds on the kernel's CLOCK_MONOTONIC / CLOCK_BOOTTIME
  (equal on a device that never suspends), comparable with ``time.monotonic_ns()``;
- controls ``AeEnable``, ``ExposureTime`` (us), ``AnalogueGain``, ``AwbEnable``, ``ColourGains``
  (red, blue) and ``FrameDurationLimits`` (min, max us).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edge.capture.health import Device, Grab, LiveSource, ReconnectPolicy, StateCallback
from edge.errors import SourceError

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "picamera2 is not installed in this Python environment. On Raspberry Pi OS install it with "
    "`sudo apt install python3-picamera2` (it needs libcamera, so it is not installable with pip), and "
    "create the virtual environment with `python3 -m venv --system-site-packages` so it can see it"
)
MIN_BUFFERS = 4
# A SensorTimestamp further than this from "now" is on some other clock: fall back to the read time.
_STAMP_WINDOW_S = 5.0


def _load_picamera2() -> Callable[[int], Any]:
    """The Picamera2 class, imported only when a Pi camera is really used."""
    try:
        from picamera2 import Picamera2  # type: ignore[import-not-found]
    except ImportError as exc:
        raise SourceError(f"{INSTALL_HINT} ({exc})") from None
    return Picamera2


def sensor_to_unix(sensor_ns: int, now_unix: float | None = None, now_mono_ns: int | None = None) -> float | None:
    """Map a SensorTimestamp (monotonic ns) to Unix time; None when it cannot be on that clock."""
    now_unix = time.time() if now_unix is None else now_unix
    now_mono_ns = time.monotonic_ns() if now_mono_ns is None else now_mono_ns
    age_s = (now_mono_ns - int(sensor_ns)) / 1e9
    if not -0.001 <= age_s < _STAMP_WINDOW_S:
        return None
    return now_unix - age_s


class _PiDevice:
    """One started Picamera2; used only from the capture worker thread."""

    def __init__(self, camera: Any, name: str, report_auto: bool) -> None:
        self.camera = camera
        self.name = name
        self._report_auto = report_auto
        self._warned_clock = False

    def read(self) -> Grab | None:
        request = self.camera.capture_request()
        try:
            image = np.ascontiguousarray(request.make_array("main"))
            metadata = request.get_metadata() or {}
        finally:
            request.release()
        read_at = time.time()
        sensor_ns = metadata.get("SensorTimestamp")
        captured = sensor_to_unix(sensor_ns) if isinstance(sensor_ns, int) else None
        if captured is None:
            if not self._warned_clock:
                log.warning(
                    "camera %s: SensorTimestamp %r is not on the monotonic clock; using read time", self.name, sensor_ns
                )
                self._warned_clock = True
            captured = read_at
        if self._report_auto:
            self._report_auto = False
            log.warning(
                "camera %s runs with automatic exposure/white balance; to lock the current values set "
                "camera.exposure_us = %s, camera.analogue_gain = %s, camera.colour_gains = %s",
                self.name,
                metadata.get("ExposureTime"),
                _round(metadata.get("AnalogueGain")),
                _round(metadata.get("ColourGains")),
            )
        return Grab(image, captured, float(sensor_ns) if isinstance(sensor_ns, int) else None)

    def close(self) -> None:
        try:
            self.camera.stop()
        finally:
            self.camera.close()


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, (tuple, list)):
        return [_round(v) for v in value]
    return value


class Picamera2Source(LiveSource):
    """A Raspberry Pi camera with locked exposure, gain, white balance and frame rate."""

    def __init__(
        self,
        camera_num: int = 0,
        *,
        width: int = 1280,
        height: int = 960,
        fps: float = 10.0,
        exposure_us: int = 0,
        analogue_gain: float = 0.0,
        colour_gains: tuple[float, float] | list[float] | None = None,
        buffer_count: int = 6,
        policy: ReconnectPolicy | None = None,
        on_state: StateCallback | None = None,
        max_pixels: int = 40_000_000,
        factory: Callable[[int], Any] | None = None,
    ) -> None:
        """``exposure_us``/``analogue_gain`` 0 and ``colour_gains`` empty = automatic (logged, with the
        values to lock). ``factory(camera_num)`` builds the camera; default: picamera2.Picamera2."""
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise SourceError(f"camera width and height must be positive and even, got {width}x{height}")
        if not fps > 0:
            raise SourceError(f"camera.fps must be > 0 for a Pi camera, got {fps}")
        frame_us = round(1_000_000 / fps)
        if exposure_us < 0 or exposure_us > frame_us:
            raise SourceError(
                f"camera.exposure_us = {exposure_us} does not fit in a frame at {fps:g} fps "
                f"(at most {frame_us} us); lower it or the frame rate"
            )
        if colour_gains and (len(colour_gains) != 2 or not all(0 < g <= 32 for g in colour_gains)):
            raise SourceError(f"camera.colour_gains must be [red, blue] gains in (0, 32], got {colour_gains!r}")
        self.camera_num = int(camera_num)
        self.width, self.height, self.fps = int(width), int(height), float(fps)
        self.exposure_us, self.analogue_gain = int(exposure_us), float(analogue_gain)
        self.colour_gains = (float(colour_gains[0]), float(colour_gains[1])) if colour_gains else None
        self.buffer_count = max(MIN_BUFFERS, int(buffer_count))
        self._factory = factory if factory is not None else _load_picamera2()
        super().__init__(f"picamera2:{self.camera_num}", policy or ReconnectPolicy(), on_state, max_pixels)

    def controls(self) -> dict[str, Any]:
        """The libcamera controls sent with the configuration: fixed frame rate, locked where configured."""
        frame_us = round(1_000_000 / self.fps)
        controls: dict[str, Any] = {"FrameDurationLimits": (frame_us, frame_us)}
        if self.exposure_us:
            controls["AeEnable"] = False
            controls["ExposureTime"] = self.exposure_us
            controls["AnalogueGain"] = self.analogue_gain or 1.0
        elif self.analogue_gain:
            controls["AnalogueGain"] = self.analogue_gain  # fixed gain; the AGC varies only the exposure
        if self.colour_gains:
            controls["AwbEnable"] = False
            controls["ColourGains"] = self.colour_gains
        return controls

    @property
    def locked(self) -> bool:
        return bool(self.exposure_us and self.colour_gains)

    def _open(self) -> Device:
        try:
            camera = self._factory(self.camera_num)
        except Exception as exc:
            raise OSError(f"no Pi camera {self.camera_num} (absent, cable loose or in use): {exc}") from exc
        try:
            controls = self.controls()
            config = camera.create_video_configuration(
                main={"size": (self.width, self.height), "format": "RGB888"},
                buffer_count=self.buffer_count,
                queue=False,
                controls=controls,
            )
            camera.configure(config)
            camera.set_controls(controls)
            camera.start()
        except BaseException:
            try:
                camera.close()
            except Exception as exc:
                log.debug("closing the camera after a failed start failed: %s", exc)
            raise
        return _PiDevice(camera, self.name, report_auto=not self.locked)

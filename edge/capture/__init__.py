"""Live cameras: OpenCV (V4L2, GStreamer, RTSP, files) and picamera2, behind the replay source protocol.

`open_camera` builds the configured camera from the ``[camera]`` config section.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edge.capture.health import LiveSource, ReconnectPolicy, StateCallback
from edge.capture.opencv_source import OpenCVSource, jetson_csi_pipeline, parse_device
from edge.capture.picamera2_source import Picamera2Source
from edge.errors import ConfigError

__all__ = [
    "LiveSource",
    "OpenCVSource",
    "Picamera2Source",
    "ReconnectPolicy",
    "jetson_csi_pipeline",
    "open_camera",
    "parse_device",
    "policy_from_config",
]


def policy_from_config(camera: Mapping[str, Any]) -> ReconnectPolicy:
    """The reconnect policy from a ``[camera]`` section (missing keys take the defaults)."""
    defaults = ReconnectPolicy()
    try:
        return ReconnectPolicy(
            stall_timeout_s=float(camera.get("stall_timeout_s", defaults.stall_timeout_s)),
            open_timeout_s=float(camera.get("open_timeout_s", defaults.open_timeout_s)),
            initial_s=float(camera.get("reconnect_initial_s", defaults.initial_s)),
            max_s=float(camera.get("reconnect_max_s", defaults.max_s)),
            max_attempts=int(camera.get("max_reconnects", defaults.max_attempts)),
            frozen_frames=int(camera.get("frozen_frames", defaults.frozen_frames)),
        )
    except ValueError as exc:
        raise ConfigError(f"[camera]: {exc}") from None


def open_camera(
    camera: Mapping[str, Any], on_state: StateCallback | None = None, max_pixels: int = 40_000_000
) -> LiveSource:
    """Build the camera named by ``camera["kind"]`` ("opencv" or "picamera2"). Nothing is opened yet:
    the device is opened (and reopened) by ``frames()``; a missing picamera2 fails here, at once."""
    kind = camera.get("kind", "opencv")
    policy = policy_from_config(camera)
    settings = {
        "width": int(camera.get("width", 0)),
        "height": int(camera.get("height", 0)),
        "fps": float(camera.get("fps", 0.0)),
        "exposure_us": int(camera.get("exposure_us", 0)),
        "analogue_gain": float(camera.get("analogue_gain", 0.0)),
        "colour_gains": list(camera.get("colour_gains") or []) or None,
        "policy": policy,
        "on_state": on_state,
        "max_pixels": max_pixels,
    }
    device = camera.get("device", 0)
    if kind == "opencv":
        try:
            return OpenCVSource(device, **settings)
        except ValueError as exc:
            raise ConfigError(f"[camera]: {exc}") from None
    if kind == "picamera2":
        if isinstance(device, str) and not device.strip().isdigit():
            raise ConfigError(f"[camera]: device for picamera2 is the camera number (0, 1), got {device!r}")
        for key, fallback in (("width", 1280), ("height", 960), ("fps", 10.0)):
            settings[key] = settings[key] or fallback
        return Picamera2Source(int(device), **settings)
    raise ConfigError(f"[camera]: kind = {kind!r} is not a camera; use 'opencv' or 'picamera2'")

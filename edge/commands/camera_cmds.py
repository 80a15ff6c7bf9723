"""`cytoedge record` and `cytoedge calibrate scale|focus`: working with the configured camera."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from types import FrameType

from edge import config as cfg
from edge.calibrate import estimate_focus_threshold, estimate_um_per_px, grab_frames, set_toml_value
from edge.errors import ConfigError
from edge.record import record as record_session
from edge.sources import open_source


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return stop


def record(args: argparse.Namespace) -> int:
    config = cfg.load(args.config)
    if args.frames is None and args.seconds is None and config["source"]["kind"] == "replay":
        config["source"]["loop"] = False  # a replay ends by itself; a camera needs --frames, --seconds or Ctrl-C
    source = open_source(config)
    camera_settings = dict(config["camera"]) if config["source"]["kind"] != "replay" else {}
    summary = record_session(
        source,
        Path(args.out),
        _stop_on_signals(),
        max_frames=args.frames,
        fmt=args.format,
        quality=args.quality,
        settings={"source": config["source"], **camera_settings},
        um_per_px=config["microscope"]["um_per_px"],
        max_seconds=args.seconds,
    )
    print(summary.summary())
    return 0


def _frames(config: cfg.Config, count: int) -> list:
    return grab_frames(open_source(config), count, _stop_on_signals(), timeout_s=60.0, every=3)


def _write(args: argparse.Namespace, section: str, key: str, value: float) -> None:
    if not args.write:
        return
    if not args.config:
        raise ConfigError("--write needs --config FILE (the file to update)")
    set_toml_value(args.config, section, key, value)
    print(f"wrote {section}.{key} = {value:g} to {args.config}")


def calibrate_scale(args: argparse.Namespace) -> int:
    config = cfg.load(args.config)
    if args.stage_micrometer is not None:
        if not args.stage_micrometer > 0:
            raise ConfigError("--stage-micrometer must be a positive number of µm per pixel")
        print(f"stage micrometer: {args.stage_micrometer:g} µm/px")
        _write(args, "microscope", "um_per_px", args.stage_micrometer)
        return 0
    estimate = estimate_um_per_px(_frames(config, args.frames), config["microscope"]["um_per_px"])
    print(estimate.summary())
    _write(args, "microscope", "um_per_px", round(estimate.um_per_px, 5))
    return 0


def calibrate_focus(args: argparse.Namespace) -> int:
    config = cfg.load(args.config)
    estimate = estimate_focus_threshold(_frames(config, args.frames))
    print(estimate.summary())
    _write(args, "quality", "min_sharpness", round(estimate.threshold, 3))
    return 0

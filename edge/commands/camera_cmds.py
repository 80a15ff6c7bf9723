"""`cytoedge record` and `cytoedge calibrate scale|focus|site`: working with the configured camera."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from types import FrameType

from edge import config as cfg
from edge.calibrate import (
    CalibrationError,
    estimate_focus_threshold,
    estimate_um_per_px,
    fit_quality,
    grab_frames,
    set_toml_value,
    set_toml_values,
)
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
    _write(args, "quality", "min_focus", round(estimate.threshold, 4))
    return 0


def learned_summary(frames: list, um_per_px: float, config: dict) -> str:
    """Cells per frame by the learned finder at the new scale: a second opinion beside the classic
    finder's line (two finders that disagree on a site's white cells are worth a look before trusting either)."""
    from edge.errors import ModelError
    from edge.finders import configured_finder

    try:
        find = configured_finder({**config, "detector": {**config["detector"], "method": "learned"}})
    except ModelError as exc:
        return f"learned finder: not available ({exc})"
    counts: dict[str, int] = {"wbc": 0, "platelet": 0, "rbc": 0}
    for image in frames:
        for d in find(image, um_per_px):
            counts[d.kind] += 1
    n = max(1, len(frames))
    used = " (in use: [detector] method = learned)" if config["detector"]["method"] == "learned" else ""
    return (f"learned finder{used}: cells per frame: " + ", ".join(f"{k} {v / n:.1f}" for k, v in counts.items())
            + f"; {len(frames)} frame(s)")


def calibrate_site(args: argparse.Namespace) -> int:
    """Scale, quality gate and finder from one set of frames; one atomic config write at the end."""
    from edge.sitefit import fit_finder

    config = cfg.load(args.config)
    if args.write and not args.config:
        raise ConfigError("--write needs --config FILE (the file to update)")
    if args.frames < 5:
        raise ConfigError("--frames must be at least 5")
    if args.frames_from:
        if not Path(args.frames_from).exists():
            raise ConfigError(f"--from {args.frames_from}: no such file or folder")
        config["source"] = {**config["source"], "kind": "replay", "path": args.frames_from, "pace": "max",
                            "loop": False}
    frames = grab_frames(open_source(config), args.frames, _stop_on_signals(), timeout_s=120.0,
                         every=1 if args.frames_from else 3)
    print(f"{len(frames)} frame(s) from {args.frames_from or config['source']['kind']}")
    try:
        scale = estimate_um_per_px(frames)
    except CalibrationError as error:
        raise CalibrationError(f"scale: {error}") from None
    print(scale.summary())
    quality = fit_quality(frames)
    print(quality.summary())
    finder = fit_finder(frames, scale.um_per_px)
    print(finder.summary())
    print(learned_summary(frames, scale.um_per_px, config))
    if scale.confidence == "low":
        print(f"note: scale confidence is low; give more frames (--frames {2 * len(frames)}) or check once "
              "with a stage micrometer (calibrate scale --stage-micrometer)")
    values: dict[str, dict[str, object]] = {
        "microscope": {"um_per_px": round(scale.um_per_px, 5)},
        "quality": {k: getattr(quality.params, k) for k in
                    ("min_sharpness", "min_brightness", "max_brightness", "max_clipped", "min_contrast", "min_focus")},
    }
    if finder.changed():
        values["finder"] = finder.changed()
    if args.write:
        set_toml_values(args.config, values)
        print(f"wrote {', '.join(f'{s}.{k}' for s, keys in values.items() for k in keys)} to {args.config}")
    else:
        print("(nothing written: add --write --config FILE to store these)")
    return 0

"""`cytoedge replay` and `cytoedge run`: the pipeline, from flags or from the service config."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge import config as cfg
from edge.service import Reloader, build_pipeline, run_pipeline


def replay(args: argparse.Namespace) -> int:
    config = cfg.load(args.config)
    config = cfg.with_overrides(
        config,
        "command line",
        source__kind="replay",
        source__path=str(Path(args.path)),
        source__pace=args.pace,
        source__fps=args.fps,
        source__loop=args.loop,
        publish__endpoint=args.publish,
        model__path=args.model,
        audit__path=args.audit,
    )
    return run_pipeline(build_pipeline(config))


def run(args: argparse.Namespace) -> int:
    """The service entry point: systemd readiness/watchdog when under systemd, SIGHUP reloads."""
    from edge.sdnotify import Notifier

    overrides = {"model__path": args.model} if args.model else {}
    config = cfg.with_overrides(cfg.load(args.config), "command line", **overrides)
    notifier = Notifier()
    pipeline = build_pipeline(config, notifier=notifier)
    reloader = Reloader(pipeline, args.config, config, notifier, overrides)
    try:
        return run_pipeline(pipeline, on_reload=reloader.request)
    finally:
        reloader.close()

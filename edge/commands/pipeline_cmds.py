"""`cytoedge replay` and `cytoedge run`: the pipeline, from flags or from the service config."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from edge import config as cfg
from edge.errors import CytoedgeError
from edge.models import open_classifier, resolve_model_path
from edge.pipeline import Pipeline, Settings
from edge.service import build_alarm, build_pipeline, run_pipeline

log = logging.getLogger(__name__)


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

    config = cfg.with_overrides(cfg.load(args.config), "command line", model__path=args.model)
    notifier = Notifier()
    pipeline = build_pipeline(config, notifier=notifier)
    return run_pipeline(pipeline, on_reload=lambda: reload(pipeline, args.config, config, notifier))


def reload(pipeline: Pipeline, config_path: str | None, current: cfg.Config, notifier: object) -> None:
    """Re-read the config and swap model and settings between frames; a bad one leaves the old running."""
    getattr(notifier, "reloading", lambda: None)()
    try:
        new = cfg.load(config_path)
        fixed = [
            f"{section}.{key}"
            for section in ("source", "publish")
            for key in new[section]
            if new[section][key] != current[section][key]
        ]
        if fixed:
            log.warning("reload: %s change(s) need a restart and were not applied", ", ".join(fixed))
        classifier = None
        model = new["model"]
        # `cytoedge models use|rollback` changes the model without changing the config: compare the file too.
        path = resolve_model_path(model["path"], model["store"])
        if model != current["model"] or path != pipeline.classifier.path:
            classifier = open_classifier(path, model["backend"], model["threads"], new["tensorrt"])
        alarm = build_alarm(classifier or pipeline.classifier, new)
        pipeline.request_swap(classifier=classifier, settings=Settings.from_config(new), alarm=alarm)
        current.update({k: v for k, v in new.items() if k not in ("source", "publish")})
        log.info("reload: configuration from %s applied", config_path or "defaults")
    except CytoedgeError as exc:
        log.error("reload rejected, still running the previous configuration: %s", exc)
    except Exception:
        log.exception("reload failed, still running the previous configuration")
    finally:
        getattr(notifier, "ready", lambda: None)()

"""Assembling a running pipeline from a config: the one path shared by `run`, `replay` and `bench`.

Everything that can fail because of the user's input (config, model, source, port) is opened
before the first message is published, so a bad start publishes nothing at all.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from edge.audit import AuditLog
from edge.classifier import Classifier
from edge.config import Config
from edge.drift import DomainAlarm, load_reference
from edge.models import open_configured_classifier
from edge.pipeline import Notifier, Pipeline, Settings
from edge.publisher import Publisher
from edge.sources import open_source

log = logging.getLogger(__name__)


def build_alarm(classifier: Classifier, config: Config) -> DomainAlarm | None:
    """The model's in-domain reference decides what 'unlike the training data' means; no reference, no alarm."""
    drift = config["drift"]
    if not drift["enabled"]:
        return None
    try:
        reference = load_reference(classifier.path, classifier.metadata.reference, getattr(classifier, "sha256", ""))
    except (ValueError, KeyError, TypeError, OSError) as exc:
        log.warning("domain alarm off: the model's reference is unusable (%s)", exc)
        return None
    if reference is None:
        log.warning("domain alarm off: model %s has no in-domain reference", classifier.model_id)
        return None
    return DomainAlarm(reference, window=drift["window"], min_cells=min(30, drift["window"]), alpha=drift["alpha"],
                       flag_until_checked=drift["flag_until_checked"])


def build_pipeline(
    config: Config, notifier: Notifier | None = None, source: object | None = None, latency_window: int = 1000
) -> Pipeline:
    settings = Settings.from_config(config)
    classifier = open_configured_classifier(config)
    frame_source = source if source is not None else open_source(config)
    audit = AuditLog(Path(config["audit"]["path"])) if config["audit"]["path"] else None
    security = config["security"]
    curve = (Path(security["server_key"]), Path(security["authorized_keys"])) if security["curve"] else None
    publisher = Publisher(config["publish"]["endpoint"], config["publish"]["send_hwm"], curve=curve)
    # ZeroMQ's slow joiner: a subscriber that was already waiting needs a moment to finish connecting.
    time.sleep(config["publish"]["warmup_s"])
    return Pipeline(
        frame_source,
        classifier,
        publisher,
        settings,
        audit=audit,
        notifier=notifier,  # type: ignore[arg-type]
        latency_window=latency_window,
        alarm=build_alarm(classifier, config),
    )


def run_pipeline(pipeline: Pipeline, on_reload: Callable[[], None] | None = None) -> int:
    """Run with SIGINT/SIGTERM finishing the frame in flight, and SIGHUP calling ``on_reload``."""

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: finishing the frame in flight", signal.Signals(signum).name)
        pipeline.request_stop()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    if on_reload is not None:
        # Loading a model can take a while (an engine build, minutes): do it off the loop, then swap.
        def reload(_signum: int, _frame: FrameType | None) -> None:
            threading.Thread(target=on_reload, name="reload", daemon=True).start()

        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, reload)
    try:
        return pipeline.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pipeline.audit is not None:
            pipeline.audit.close()
        pipeline.publisher.close()

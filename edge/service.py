"""Assembling a running pipeline from a config: the one path shared by `run`, `replay` and `bench`;
and the service's reload (SIGHUP) and shutdown.

Everything that can fail because of the user's input (config, model, source, port) is opened
before the first message is published, so a bad start publishes nothing at all. A reload applies what
can change between frames, refuses loudly what needs a restart, and tells systemd READY=1 only once the
loop thread has swapped the new model and settings in; the replaced classifier is closed then.
"""

from __future__ import annotations

import copy
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from edge import config as cfg
from edge.audit import AuditLog
from edge.classifier import Classifier
from edge.config import Config
from edge.drift import DomainAlarm, load_reference
from edge.errors import CytoedgeError
from edge.models import close_classifier, open_configured_classifier, resolve_model_path
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
    """Run with SIGINT/SIGTERM finishing the frame in flight, and SIGHUP calling ``on_reload`` (which must
    return at once: :meth:`Reloader.request`). The classifier is closed when the loop has ended."""

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: finishing the frame in flight", signal.Signals(signum).name)
        pipeline.request_stop()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    if on_reload is not None:
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda _signum, _frame: on_reload())
    try:
        return pipeline.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pipeline.audit is not None:
            pipeline.audit.close()
        pipeline.publisher.close()
        # On the thread that ran the loop, after its last frame: the classifier is never used again.
        close_classifier(pipeline.classifier)
        log.info("closed classifier %s", pipeline.classifier.model_id)


# What a reload applies between frames; every other key is read only at start and needs a restart.
ALL = "*"
RELOADABLE: dict[str, Any] = {
    "microscope": ALL, "finder": ALL, "detector": ALL, "quality": ALL, "review": ALL, "drift": ALL,
    "model": ALL, "tensorrt": ALL,  # a change reopens the classifier
    "publish": {"status_interval_s", "preview_interval_s", "preview_width", "thumbs"},
    "pipeline": {"max_cells_per_frame"},
}
APPLY_POLL_S = 0.02


def reloadable(section: str, key: str) -> bool:
    keys = RELOADABLE.get(section, ())
    return keys == ALL or key in keys


def changed_keys(old: Config, new: Config) -> list[str]:
    """Every ``section.key`` whose value differs, over every section of either config."""
    return [f"{section}.{key}" for section in sorted(set(old) | set(new))
            for key in sorted(set(old.get(section, {})) | set(new.get(section, {})))
            if old.get(section, {}).get(key) != new.get(section, {}).get(key)]


class Reloader:
    """SIGHUP handling for the service: one reload at a time, on one worker thread, and the latest wins.

    :meth:`request` (safe in a signal handler: it sets a flag) asks for a reload; the worker re-reads the
    file *after* taking the request, so SIGHUPs that arrive during a reload cause exactly one more, with
    the newest file. Opening a model can take minutes (a TensorRT build), so it happens here, off the
    loop; the loop thread swaps it in between frames, then the worker closes the replaced classifier
    and sends READY=1.
    """

    def __init__(self, pipeline: Pipeline, config_path: str | Path | None, current: Config,
                 notifier: object | None = None, overrides: dict[str, Any] | None = None) -> None:
        self.pipeline = pipeline
        self.config_path = config_path
        self.current = copy.deepcopy(current)
        self.notifier = notifier
        self.overrides = overrides or {}  # command-line flags (`run --model`) that outrank the file
        self.completed = 0
        self.pending_restart: list[str] = []
        self._wanted = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="reload", daemon=True)
        self._thread.start()

    def request(self) -> None:
        """Ask for a reload (SIGHUP). Never blocks; repeated requests during a reload collapse into one."""
        self._wanted.set()

    def close(self) -> None:
        self._closing = True
        self._wanted.set()

    def _work(self) -> None:
        while True:
            self._wanted.wait()
            if self._closing:
                return
            self._wanted.clear()
            self.reload_once()

    def _notify(self, what: str) -> None:
        getattr(self.notifier, what, lambda: None)()

    def reload_once(self) -> None:
        """Re-read the config and apply it; a bad file (or model) leaves everything as it was."""
        self._notify("reloading")
        try:
            applied = self._apply(self._read())
        except CytoedgeError as exc:
            log.error("reload rejected, still running the previous configuration: %s", exc)
        except Exception:
            log.exception("reload failed, still running the previous configuration")
        else:
            if not applied:  # the pipeline ended before the swap: no READY, systemd sees STOPPING
                return
        self._notify("ready")
        self.completed += 1

    def _read(self) -> Config:
        new = cfg.load(self.config_path)
        return cfg.with_overrides(new, "command line", **self.overrides) if self.overrides else new

    def _apply(self, new: Config) -> bool:
        """Open what changed, hand it to the loop, wait until the loop has swapped it in; False when the
        pipeline ended first (the new classifier is closed then, never used)."""
        pipeline = self.pipeline
        changes = changed_keys(self.current, new)
        restart = [name for name in changes if not reloadable(*name.split(".", 1))]
        target = copy.deepcopy(self.current)  # what runs after this reload: the file, minus what needs a restart
        for name in changes:
            section, key = name.split(".", 1)
            if reloadable(section, key):
                target.setdefault(section, {})[key] = new[section][key]
        model = target["model"]
        # `cytoedge models use|rollback` changes the model without changing the config: compare the file too.
        path = resolve_model_path(model["path"], model["store"])
        reopen = (model != self.current["model"] or path != pipeline.classifier.path
                  or (model["backend"] == "tensorrt" and target["tensorrt"] != self.current["tensorrt"]))
        classifier = open_configured_classifier(target) if reopen else None
        alarm = build_alarm(classifier or pipeline.classifier, target)
        settings = Settings.from_config(target)
        old = pipeline.classifier
        pipeline.request_swap(classifier=classifier, settings=settings, alarm=alarm)
        if not self._wait_applied(classifier, settings, alarm):
            if classifier is not None:
                close_classifier(classifier)
            log.warning("reload not applied: the pipeline stopped first")
            return False
        if classifier is not None and classifier is not old:
            close_classifier(old)  # the loop has switched; nothing uses the old one any more
            log.info("closed classifier %s", old.model_id)
        self.current = target
        self.pending_restart = restart
        applied = [name for name in changes if name not in restart]
        if restart:
            log.error("reload: NOT applied, these need a restart (systemctl restart cytoedge): %s; applied: %s",
                      ", ".join(restart), ", ".join(applied) or "nothing else")
        else:
            log.info("reload: configuration from %s applied (%s)", self.config_path or "defaults",
                     ", ".join(applied) or "no changes")
        return True

    def _wait_applied(self, classifier: Classifier | None, settings: Settings, alarm: object) -> bool:
        """True once the loop thread has swapped these in (it does so between frames); False if it ended."""
        pipeline = self.pipeline
        while True:
            # request_swap's parts are applied together, classifier first and alarm last.
            if (pipeline.settings is settings and pipeline.alarm is alarm
                    and (classifier is None or pipeline.classifier is classifier)):
                return True
            if pipeline.state in ("finished", "stopped"):
                return False
            time.sleep(APPLY_POLL_S)

"""The service's main loop: capture thread -> frame queue -> find cells -> classify -> publish.

Capture runs in its own thread so a camera is never blocked; everything that touches the ZeroMQ
socket or the model runs in the calling thread, which owns both. One bad frame is logged and
counted, never fatal. A stop request finishes the frame in flight and publishes a final status.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from edge.analysis import CLASSIFIED_KINDS, classify_detections
from edge.annotate import preview_jpeg, thumb_jpeg
from edge.audit import AuditLog
from edge.cellfinder import FinderParams, find_cells
from edge.classifier import Classifier
from edge.config import Config
from edge.drift import ALARM_TEXT, DomainAlarm, features
from edge.framequeue import FrameQueue
from edge.frames import Frame
from edge.messages import TOPIC_CELLS, TOPIC_PREVIEW, TOPIC_STATUS, TOPIC_THUMB
from edge.publisher import Publisher
from edge.quality import QualityParams, assess, no_cells
from edge.stats import LatencyWindow, RateMeter
from edge.tracker import CellTracker

log = logging.getLogger(__name__)

# A live source's capture loop updates `heartbeat` (time.monotonic()) on every attempt, frame or not.
HEARTBEAT_FRESH_S = 5.0
KEEP = object()  # request_swap: leave this part as it is


class FrameSource(Protocol):
    live: bool
    state: str
    name: str
    stats: Any

    def frames(self, stop: threading.Event) -> Any: ...


class Notifier(Protocol):
    def ready(self) -> Any: ...
    def watchdog(self) -> Any: ...
    def status(self, text: str) -> Any: ...
    def stopping(self) -> Any: ...


@dataclass
class Settings:
    """The parts of the config the loop reads on every frame, resolved once."""

    um_per_px: float
    finder: FinderParams
    review_uncertainty: float
    review_anomaly: float
    status_interval_s: float
    preview_interval_s: float
    preview_width: int
    thumbs: bool
    queue_size: int
    max_cells: int
    quality: QualityParams

    @classmethod
    def from_config(cls, config: Config) -> Settings:
        return cls(
            um_per_px=config["microscope"]["um_per_px"],
            finder=FinderParams(**config["finder"]),
            review_uncertainty=config["review"]["uncertainty"],
            review_anomaly=config["review"]["anomaly"],
            status_interval_s=config["publish"]["status_interval_s"],
            preview_interval_s=config["publish"]["preview_interval_s"],
            preview_width=config["publish"]["preview_width"],
            thumbs=config["publish"]["thumbs"],
            queue_size=config["pipeline"]["queue_size"],
            max_cells=config["pipeline"]["max_cells_per_frame"],
            quality=QualityParams(**config["quality"]),
        )


@dataclass
class Counters:
    published: int = 0
    errors: int = 0
    truncated_cells: int = 0
    rejected: int = 0
    last_rejection: str = ""
    warnings: list[str] = field(default_factory=list)


class Pipeline:
    def __init__(
        self,
        source: FrameSource,
        classifier: Classifier,
        publisher: Publisher,
        settings: Settings,
        audit: AuditLog | None = None,
        notifier: Notifier | None = None,
        latency_window: int = 1000,
        alarm: DomainAlarm | None = None,
    ) -> None:
        self.source = source
        self.classifier = classifier
        self.publisher = publisher
        self.settings = settings
        self.audit = audit
        self.notifier = notifier
        self.alarm = alarm
        self.tracker = CellTracker()
        # A camera reports state changes from its own thread; the loop publishes them (it owns the socket).
        self._state_changes: deque[tuple[str, str]] = deque(maxlen=100)
        if hasattr(source, "on_state"):
            source.on_state = lambda state, reason: self._state_changes.append((state, reason))
        self.queue = FrameQueue(settings.queue_size, drop_oldest=source.live)
        self.latency = LatencyWindow(latency_window)
        self.rate = RateMeter()
        self.counters = Counters()
        self.state = "starting"
        self.stop_requested = threading.Event()
        self._stopped_by_request = False
        self._capture_done = threading.Event()
        self._capture_error: str | None = None
        self._started = time.monotonic()
        self._last_status = 0.0
        self._last_preview = 0.0
        self._last_source_state = source.state
        self._ready_sent = False
        self._pending: dict[str, Any] = {}
        self._pending_lock = threading.Lock()

    # -- control ---------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Safe from a signal handler: only sets a flag the loop checks between frames."""
        self._stopped_by_request = True
        self.stop_requested.set()

    def request_swap(
        self, classifier: Classifier | None = None, settings: Settings | None = None, alarm: object = KEEP
    ) -> None:
        """Queue a new model/settings; applied between frames by the loop thread, which owns them."""
        with self._pending_lock:
            if classifier is not None:
                self._pending["classifier"] = classifier
            if settings is not None:
                self._pending["settings"] = settings
            if alarm is not KEEP:
                self._pending["alarm"] = alarm

    # -- main loop -------------------------------------------------------------------------
    def run(self) -> int:
        """Run until the source ends or a stop is requested; returns an exit code."""
        capture = threading.Thread(target=self._capture, name="capture", daemon=True)
        capture.start()
        self._publish_status()
        try:
            while not self.stop_requested.is_set():
                self._apply_pending()
                frame = self.queue.get(timeout_s=min(0.1, self.settings.status_interval_s))
                if frame is not None:
                    self._process_safely(frame)
                elif self._capture_done.is_set() and len(self.queue) == 0:
                    break
                elif self.notifier is not None and self._source_is_alive():
                    self.notifier.watchdog()
                while self._state_changes:
                    state, reason = self._state_changes.popleft()
                    self._publish_status(source_state=state, reason=reason)
                source_changed = self.source.state != self._last_source_state
                if source_changed or time.monotonic() - self._last_status >= self.settings.status_interval_s:
                    self._publish_status()
        finally:
            self.stop_requested.set()
            self.queue.close()
            capture.join(timeout=5.0)
            if self.notifier is not None:
                self.notifier.stopping()
            ended = self._capture_done.is_set() and not self._capture_error and not self._stopped_by_request
            self.state = "finished" if ended else "stopped"
            self._publish_status(final=True)
        return 1 if self._capture_error else 0

    def _capture(self) -> None:
        try:
            for frame in self.source.frames(self.stop_requested):
                if not self.queue.put(frame, self.stop_requested):
                    break
        except Exception as exc:  # a source failing must end the run cleanly, with the reason published
            self._capture_error = str(exc)
            self.counters.warnings.append(f"source failed: {exc}")
            self.source.state = "failed"
            log.error("source failed: %s", exc)
        finally:
            self._capture_done.set()

    def _apply_pending(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        if "classifier" in pending:
            self.classifier = pending["classifier"]
            log.info("now classifying with %s", self.classifier.model_id)
        if "settings" in pending:
            self.settings = pending["settings"]
        if "alarm" in pending:
            self.alarm = pending["alarm"]

    def _process_safely(self, frame: Frame) -> None:
        try:
            self.process(frame)
        except Exception:
            self.counters.errors += 1
            log.exception("frame %s from %s could not be processed; skipped", frame.frame_id, frame.source)

    # -- one frame -------------------------------------------------------------------------
    def process(self, frame: Frame) -> dict[str, Any] | None:
        """Classify and publish one frame; None when the quality gate turned it away (counted)."""
        settings = self.settings
        started = time.monotonic()
        queue_ms = (started - frame.read_at) * 1000.0
        problem = assess(frame.image, settings.quality)
        if problem is None:
            detections = find_cells(frame.image, settings.um_per_px, settings.finder)
            problem = no_cells(detections) if settings.quality.enabled else None
        if problem is not None:
            self.counters.rejected += 1
            self.counters.last_rejection = problem
            self._progress()
            return None
        # The cap bounds what is classified: red cells are only counted, so they never use it up.
        over = [i for i, d in enumerate(detections) if d.kind in CLASSIFIED_KINDS][settings.max_cells :]
        if over:
            self.counters.truncated_cells += len(over)
            dropped = set(over)
            detections = [d for i, d in enumerate(detections) if i not in dropped]
        detected = time.monotonic()
        cells, crops = classify_detections(
            frame.image,
            detections,
            self.classifier,
            settings.um_per_px,
            settings.review_uncertainty,
            settings.review_anomaly,
        )
        self.tracker.assign(cells, crops)
        alarm_on = self._check_domain(cells, crops)
        classified = time.monotonic()
        message = self.publisher.publish(
            TOPIC_CELLS,
            {
                "frame_id": frame.frame_id,
                "captured_at": frame.captured_at,
                "source": frame.source,
                "model": self.classifier.model_id,
                "frame_size": [int(frame.image.shape[1]), int(frame.image.shape[0])],
                "domain_alarm": alarm_on,
                "domain_checked": self.alarm is None or self.alarm.checked,
                "cells": cells,
                "latency_ms": {
                    "queue": round(queue_ms, 3),
                    "detect": round((detected - started) * 1000, 3),
                    "classify": round((classified - detected) * 1000, 3),
                },
            },
        )
        self._publish_images(frame, cells, crops, message["seq"])
        done = time.monotonic()
        timings = {
            "queue": queue_ms,
            "detect": (detected - started) * 1000.0,
            "classify": (classified - detected) * 1000.0,
            "publish": (done - classified) * 1000.0,
            "total": (done - frame.read_at) * 1000.0,
        }
        self.latency.add(timings)
        self.rate.tick(done)
        self.counters.published += 1
        if self.audit is not None:
            self.audit.write(message)
        self._progress()
        return message

    def _check_domain(self, cells: list[dict[str, Any]], crops: dict[int, np.ndarray]) -> bool:
        """Feed the white cells to the domain alarm; while it is on, every cell goes to review."""
        if self.alarm is None:
            return False
        # Each cell once: a cell held in view must not outvote the rest of the slide.
        white = [c for c in cells if c["kind"] == "wbc" and c["first_seen"] and c["id"] in crops]
        if white:
            was_on = self.alarm.active
            self.alarm.update(
                [c["label"] for c in white],
                features(
                    np.array([c["anomaly"] for c in white]),
                    np.array([c["uncertainty"] for c in white]),
                    np.stack([crops[c["id"]] for c in white]),
                ),
            )
            if self.alarm.active != was_on:
                log.warning(
                    "domain alarm %s: %s",
                    "ON" if self.alarm.active else "cleared",
                    ", ".join(f"{k} {v:.2f}" for k, v in self.alarm.last_distances.items()),
                )
        if self.alarm.flags_cells:
            for cell in cells:
                if cell["label"] is not None:
                    cell["review"] = True
        return self.alarm.active

    def _publish_images(
        self, frame: Frame, cells: list[dict[str, Any]], crops: dict[int, np.ndarray], cells_seq: int
    ) -> None:
        settings = self.settings
        if settings.thumbs:
            for cell in cells:
                if cell["review"] and cell["first_seen"] and cell["id"] in crops:
                    top = sorted(cell["probs"].items(), key=lambda item: -item[1])[:3]
                    self.publisher.publish(
                        TOPIC_THUMB,
                        {
                            "frame_id": frame.frame_id,
                            "cell_id": cell["id"],
                            "cells_seq": cells_seq,
                            "label": cell["label"],
                            "top": [[name, p] for name, p in top],
                            "uncertainty": cell["uncertainty"],
                            "anomaly": cell["anomaly"],
                            "jpeg": thumb_jpeg(crops[cell["id"]]),
                        },
                    )
        now = time.monotonic()
        if settings.preview_interval_s > 0 and now - self._last_preview >= settings.preview_interval_s:
            self._last_preview = now
            jpeg, width, height, scale = preview_jpeg(frame.image, cells, settings.preview_width)
            self.publisher.publish(
                TOPIC_PREVIEW,
                {"frame_id": frame.frame_id, "jpeg": jpeg, "width": width, "height": height, "scale": round(scale, 5)},
            )

    def _progress(self) -> None:
        """Called once per published frame: the proof of progress systemd's watchdog wants."""
        if self.state == "starting":
            self.state = "running"
        if self.notifier is None:
            return
        if not self._ready_sent:
            self.notifier.ready()
            self._ready_sent = True
        self.notifier.watchdog()

    def _source_is_alive(self) -> bool:
        """A live source that is reconnecting still proves the capture loop is not hung; a replay has no
        heartbeat, so with no frames there is no progress to report."""
        heartbeat = getattr(self.source, "heartbeat", None)
        return heartbeat is not None and time.monotonic() - heartbeat < HEARTBEAT_FRESH_S

    # -- status ----------------------------------------------------------------------------
    def status_payload(self, final: bool = False) -> dict[str, Any]:
        source_stats = self.source.stats
        warnings = list(self.counters.warnings)
        if self.alarm is not None and self.alarm.active:
            warnings.insert(0, ALARM_TEXT)
        if source_stats.skipped:
            warnings.append(f"{source_stats.skipped} unreadable frame(s) skipped")
        if self.counters.errors:
            warnings.append(f"{self.counters.errors} frame(s) failed to process")
        if self.counters.rejected:
            warnings.append(
                f"{self.counters.rejected} frame(s) rejected by the quality gate (last: {self.counters.last_rejection})"
            )
        if self.counters.truncated_cells:
            warnings.append(f"{self.counters.truncated_cells} cell(s) over the per-frame cap not classified")
        return {
            "state": self.state,
            "source_state": self.source.state,
            "source": self.source.name,
            "fps": self.rate.rate(),
            "frames": {
                "read": source_stats.read,
                "published": self.counters.published,
                "dropped": self.queue.dropped,
                "skipped": source_stats.skipped,
                "rejected": self.counters.rejected,
                "errors": self.counters.errors,
            },
            "latency_ms": self.latency.summary(),
            "queue_depth": len(self.queue),
            "model": self.classifier.model_id,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "warnings": warnings + list(source_stats.warnings[:5]),
            "final": final,
        }

    def _publish_status(self, final: bool = False, source_state: str | None = None, reason: str = "") -> None:
        self._last_status = time.monotonic()
        self._last_source_state = self.source.state
        payload = self.status_payload(final)
        if source_state is not None:  # a queued change: report that state, even if it has moved on since
            payload["source_state"] = source_state
            payload["source_reason"] = reason
        self.publisher.publish(TOPIC_STATUS, payload)
        if self.notifier is not None:
            self.notifier.status(
                f"{self.state}, source {payload['source_state']}, {payload['fps']:.1f} fps, "
                f"{payload['frames']['published']} frames, {payload['frames']['dropped']} dropped"
            )

"""The service's main loop: capture thread -> frame queue -> finder thread -> classify -> publish.

Capture runs in its own thread so a camera is never blocked. The finder side of a frame (quality
gate, cell finder, cutting the crops) runs in a second thread, so on a 2-core device it overlaps
the model working on the frame before; frames go from one thread to the next in order through
bounded queues, so a replay keeps its exact order and a live source keeps its drop-oldest queue at
the front. Everything that touches the ZeroMQ socket or the model runs in the calling thread, which
owns both; when several found frames are waiting it classifies their crops in one batch (the model's
answer for a crop does not depend on what else is in the batch), then tracks and publishes them one
by one, in order. One bad frame is logged and counted, never fatal. A stop request finishes the
frames in flight on the model side and publishes a final status.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import cv2
import numpy as np

from edge.analysis import cells_from, crops_for, label_cells
from edge.annotate import preview_jpeg, thumb_jpeg
from edge.audit import AuditLog
from edge.cellfinder import Detection
from edge.cells import CLASSIFIED_KINDS, Cell
from edge.classifier import Classifier, Predictions
from edge.config import Config
from edge.drift import ALARM_TEXT, DomainAlarm, features
from edge.finders import FindFn, configured_finder
from edge.framequeue import FrameQueue
from edge.frames import Frame
from edge.messages import (
    TOPIC_CELLS,
    TOPIC_PREVIEW,
    TOPIC_STATUS,
    TOPIC_THUMB,
    cells_payload,
    preview_payload,
    status_payload,
    thumb_payload,
)
from edge.publisher import Publisher
from edge.quality import QualityParams, Rejection, check, check_cells
from edge.stats import LatencyWindow, RateMeter
from edge.tracker import CellTracker

log = logging.getLogger(__name__)

# A live source's capture loop updates `heartbeat` (time.monotonic()) on every attempt, frame or not.
HEARTBEAT_FRESH_S = 5.0
KEEP = object()  # request_swap: leave this part as it is
HANDOFF_FRAMES = 1  # found frames waiting for the model: each one waiting adds a frame period of latency
MAX_BATCH_FRAMES = 4  # most frames classified in one model call
# Where a frame's time goes, per stage (ms), for `cytoedge bench`: the finder thread's gate, finder and
# crop cutting; the model's share of its batch; tracker and domain alarm; building and sending messages.
BREAKDOWN = ("gate", "finder", "crop", "classify", "track", "publish")
# OpenCV's own worker threads (one per core by default): the pipeline's threads already keep the cores
# busy, and on a loaded 2-core machine OpenCV splitting each resize and filter cost 15-20% more wall
# time and ~10% more CPU in the finder and crop cutting. 0 leaves OpenCV's setting alone.
OPENCV_THREADS = 1


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
    find: FindFn  # the configured cell finder (edge.finders)
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
            find=configured_finder(config),
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
class Found:
    """One frame after the finder thread: its cells and crops, or why it goes no further."""

    frame: Frame
    cells: list[Cell] = field(default_factory=list)
    crops: np.ndarray | None = None  # the classified cells' crops, in cell order
    cut_for: tuple[float, int] = (0.0, 0)  # (field_um, input_size) of the model they were cut for
    truncated: int = 0  # classified-kind cells over the per-frame cap, left out
    rejection: Rejection | None = None  # the quality gate's reason
    failed: bool = False
    queue_ms: float = 0.0
    gate_ms: float = 0.0
    finder_ms: float = 0.0
    crop_ms: float = 0.0
    found_at: float = 0.0  # time.monotonic() when the finder thread handed it on


def cap_classified(detections: list[Detection], max_cells: int) -> tuple[list[Detection], int]:
    """Keep every red cell (counted, never classified) and the first ``max_cells`` cells the model
    would classify; returns the kept detections, in finder order, and how many were left out."""
    kept, classified, left_out = [], 0, 0
    for detection in detections:
        if detection.kind in CLASSIFIED_KINDS:
            if classified >= max_cells:
                left_out += 1
                continue
            classified += 1
        kept.append(detection)
    return kept, left_out


@dataclass
class Counters:
    published: int = 0
    errors: int = 0
    truncated_cells: int = 0
    rejected: int = 0
    last_rejection: str = ""
    # Rejected frames per Rejection.kind: the last reason alone hides a gate that refuses for two reasons.
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
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
        self._found: queue.Queue[Found] = queue.Queue(maxsize=HANDOFF_FRAMES)
        # A second pair of hands for cutting crops: on a crowded frame the finder thread is the slowest
        # stage, and the model's thread leaves a core idle between calls.
        self._crop_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crops")
        self.latency = LatencyWindow(latency_window)
        self.breakdown = LatencyWindow(latency_window, BREAKDOWN)
        self.model_calls = 0  # with frames_classified: how much batching happened (for `cytoedge bench`)
        self.frames_classified = 0
        self.rate = RateMeter()
        self.counters = Counters()
        self.state = "starting"
        self.stop_requested = threading.Event()
        self._stopped_by_request = False
        self._capture_done = threading.Event()
        self._finder_done = threading.Event()
        self._finder_busy_since: float | None = None
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
        if OPENCV_THREADS:
            cv2.setNumThreads(OPENCV_THREADS)
        capture = threading.Thread(target=self._capture, name="capture", daemon=True)
        finder = threading.Thread(target=self._find_frames, name="finder", daemon=True)
        capture.start()
        finder.start()
        self._publish_status()
        try:
            while not self.stop_requested.is_set():
                self._apply_pending()
                batch = self._next_batch(timeout_s=min(0.1, self.settings.status_interval_s))
                if batch:
                    self._publish_batch(batch)
                elif self._finder_done.is_set() and self._found.empty():
                    break
                elif self.notifier is not None and self._source_is_alive() and not self._finder_stuck():
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
            finder.join(timeout=5.0)
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

    def _find_frames(self) -> None:
        """The finder thread: frame queue -> gate, finder, crops -> the model's queue, in order."""
        try:
            while not self.stop_requested.is_set():
                frame = self.queue.get(timeout_s=0.1)
                if frame is None:
                    if self._capture_done.is_set() and len(self.queue) == 0:
                        return
                    continue
                self._finder_busy_since = time.monotonic()
                try:
                    found = self.find(frame)
                except Exception:
                    log.exception("frame %s from %s could not be processed; skipped", frame.frame_id, frame.source)
                    found = Found(frame, failed=True)
                finally:
                    self._finder_busy_since = None
                while not self.stop_requested.is_set():
                    try:
                        self._found.put(found, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        finally:
            self._finder_done.set()

    def _finder_stuck(self) -> bool:
        busy_since = self._finder_busy_since
        return busy_since is not None and time.monotonic() - busy_since > HEARTBEAT_FRESH_S

    def _next_batch(self, timeout_s: float) -> list[Found]:
        """The next found frame and, when more are already waiting, up to MAX_BATCH_FRAMES in all."""
        try:
            batch = [self._found.get(timeout=timeout_s)]
        except queue.Empty:
            return []
        while len(batch) < MAX_BATCH_FRAMES:
            try:
                batch.append(self._found.get_nowait())
            except queue.Empty:
                break
        return batch

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

    # -- the finder side of a frame ----------------------------------------------------------
    def find(self, frame: Frame) -> Found:
        """Quality gate, cell finder and crops for one frame (the finder thread's work)."""
        settings = self.settings
        meta = self.classifier.metadata
        started = time.monotonic()
        found = Found(frame, queue_ms=(started - frame.read_at) * 1000.0)
        problem = check(frame.image, settings.quality)
        gated = time.monotonic()
        found.gate_ms = (gated - started) * 1000.0
        if problem is None:
            detections = settings.find(frame.image, settings.um_per_px)
            problem = check_cells(detections) if settings.quality.enabled else None
        detected = time.monotonic()
        found.finder_ms = (detected - gated) * 1000.0
        if problem is not None:
            found.rejection = problem
            found.found_at = detected
            return found
        detections, found.truncated = cap_classified(detections, settings.max_cells)
        found.cells = cells_from(detections)
        found.crops = crops_for(frame.image, found.cells, meta, settings.um_per_px, self._crop_pool)
        found.cut_for = (meta.field_um, meta.input_size)
        found.found_at = time.monotonic()
        found.crop_ms = (found.found_at - detected) * 1000.0
        return found

    # -- the model side: classify a batch, then track and publish frame by frame ------------------
    def process(self, frame: Frame) -> dict[str, Any] | None:
        """Classify and publish one frame in the calling thread; None when it was turned away."""
        return self._publish_batch([self.find(frame)])[0]

    def _publish_batch(self, batch: list[Found]) -> list[dict[str, Any] | None]:
        """Classify the batch's crops in one call, then track and publish each frame in order."""
        started = time.monotonic()
        usable = [f for f in batch if not f.failed and f.rejection is None]
        try:
            predictions = self._classify(usable)
        except Exception:  # one bad frame must not take its batch-mates with it: try each alone
            predictions = []
            for found in usable:
                try:
                    predictions.extend(self._classify([found]))
                except Exception:
                    found.failed = True
                    log.exception("frame %s from %s could not be processed; skipped", found.frame.frame_id,
                                  found.frame.source)
        classified = time.monotonic()
        total_crops = max(1, sum(len(f.crops) for f in usable if f.crops is not None))
        if usable:
            self.model_calls += 1
            self.frames_classified += len(usable)
        messages: list[dict[str, Any] | None] = []
        shares = iter(predictions)
        for found in batch:
            if found.failed:
                self.counters.errors += 1
                messages.append(None)
                continue
            if found.rejection is not None:
                self.counters.rejected += 1
                self.counters.last_rejection = found.rejection.text
                by_reason = self.counters.rejected_by_reason
                by_reason[found.rejection.kind] = by_reason.get(found.rejection.kind, 0) + 1
                self._progress()
                messages.append(None)
                continue
            share = (classified - started) * 1000.0 * len(found.crops) / total_crops  # type: ignore[arg-type]
            try:
                messages.append(self._publish_frame(found, next(shares), started, classified, share))
            except Exception:
                self.counters.errors += 1
                messages.append(None)
                log.exception("frame %s from %s could not be processed; skipped", found.frame.frame_id,
                              found.frame.source)
        return messages

    def _classify(self, batch: list[Found]) -> list[Predictions]:
        """One model call for all the batch's crops; each frame gets its own rows back."""
        meta = self.classifier.metadata
        for found in batch:
            if found.cut_for != (meta.field_um, meta.input_size):  # the model changed under the finder
                found.crops = crops_for(found.frame.image, found.cells, meta, self.settings.um_per_px)
                found.cut_for = (meta.field_um, meta.input_size)
        crops = [f.crops for f in batch]
        if not batch:
            return []
        joined = np.concatenate(crops) if len(crops) > 1 else crops[0]
        answer = self.classifier.classify(joined)  # type: ignore[arg-type]
        result, start = [], 0
        for part in crops:
            end = start + len(part)  # type: ignore[arg-type]
            rows = slice(start, end)
            result.append(Predictions(answer.probs[rows], answer.uncertainty[rows], answer.anomaly[rows]))
            start = end
        return result

    def _publish_frame(
        self, found: Found, predictions: Predictions, batch_started: float, classified: float, share_ms: float
    ) -> dict[str, Any]:
        settings = self.settings
        frame = found.frame
        cells = found.cells
        label_cells(cells, found.crops, predictions, self.classifier.metadata,  # type: ignore[arg-type]
                    settings.review_uncertainty, settings.review_anomaly)
        self.counters.truncated_cells += found.truncated
        tracked_from = time.monotonic()
        self.tracker.assign(cells)
        alarm_on = self._check_domain(cells)
        tracked = time.monotonic()
        queue_ms = found.queue_ms + (batch_started - found.found_at) * 1000.0
        classify_ms = found.crop_ms + (classified - batch_started + tracked - tracked_from) * 1000.0
        message = self.publisher.publish(
            TOPIC_CELLS,
            cells_payload(
                frame_id=frame.frame_id,
                captured_at=frame.captured_at,
                source=frame.source,
                model=self.classifier.model_id,
                frame_size=(frame.image.shape[1], frame.image.shape[0]),
                domain_alarm=alarm_on,
                domain_checked=self.alarm is None or self.alarm.checked,
                cells=cells,
                latency_ms={"queue": queue_ms, "detect": found.gate_ms + found.finder_ms, "classify": classify_ms},
            ),
        )
        self._publish_images(frame, cells, message["seq"])
        done = time.monotonic()
        self.latency.add(
            {
                "queue": queue_ms,
                "detect": found.gate_ms + found.finder_ms,
                "classify": classify_ms,
                "publish": (done - tracked) * 1000.0,
                "total": (done - frame.read_at) * 1000.0,
            }
        )
        self.breakdown.add(
            {
                "gate": found.gate_ms,
                "finder": found.finder_ms,
                "crop": found.crop_ms,
                "classify": share_ms,
                "track": (tracked - tracked_from) * 1000.0,
                "publish": (done - tracked) * 1000.0,
            }
        )
        self.rate.tick(done)
        self.counters.published += 1
        if self.audit is not None:
            self.audit.write(message)
        self._progress()
        return message

    def _check_domain(self, cells: list[Cell]) -> bool:
        """Feed the white cells to the domain alarm; while it is on, every cell goes to review."""
        if self.alarm is None:
            return False
        # Each cell once: a cell held in view must not outvote the rest of the slide.
        white = [c for c in cells if c.kind == "wbc" and c.first_seen and c.crop is not None]
        if white:
            was_on = self.alarm.active
            self.alarm.update(
                [c.label for c in white],
                features(
                    np.array([c.anomaly for c in white]),
                    np.array([c.uncertainty for c in white]),
                    np.stack([c.crop for c in white]),  # type: ignore[misc]
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
                if cell.label is not None:
                    cell.review = True
        return self.alarm.active

    def _publish_images(self, frame: Frame, cells: list[Cell], cells_seq: int) -> None:
        settings = self.settings
        if settings.thumbs:
            for cell in cells:
                if cell.review and cell.first_seen and cell.crop is not None:
                    self.publisher.publish(
                        TOPIC_THUMB, thumb_payload(frame.frame_id, cell, cells_seq, thumb_jpeg(cell.crop))
                    )
        now = time.monotonic()
        if settings.preview_interval_s > 0 and now - self._last_preview >= settings.preview_interval_s:
            self._last_preview = now
            jpeg, width, height, scale = preview_jpeg(frame.image, cells, settings.preview_width)
            self.publisher.publish(TOPIC_PREVIEW, preview_payload(frame.frame_id, jpeg, width, height, scale))

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
        return status_payload(
            state=self.state,
            source_state=self.source.state,
            source=self.source.name,
            fps=self.rate.rate(),
            frames={
                "read": source_stats.read,
                "published": self.counters.published,
                "dropped": self.queue.dropped,
                "skipped": source_stats.skipped,
                "rejected": self.counters.rejected,
                "rejected_by_reason": dict(sorted(self.counters.rejected_by_reason.items())),
                "errors": self.counters.errors,
            },
            latency_ms=self.latency.summary(),
            queue_depth=len(self.queue) + self._found.qsize(),
            model=self.classifier.model_id,
            uptime_s=time.monotonic() - self._started,
            warnings=warnings + list(source_stats.warnings[:5]),
            final=final,
        )

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

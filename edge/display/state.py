"""What the bench display knows: the running differential of one slide, the review queue, the latest
preview and publisher health. Pure logic (plus one append-only session file) so the counting rules
can be tested without sockets, threads or a browser; the server wraps it in a lock.

Counting rules (docs/display.md):

* every `cells` message adds its cells: red cells (`kind` rbc) and platelets (`kind` platelet) are
  counted by kind, white cells (`kind` wbc) by the model's `label` — the same tally as
  `cytoedge watch`;
* a reviewer's decision on a cell (named by run, frame_id, cell_id) replaces the model's label:
  the cell is then counted by the reviewer's class — `platelet` goes to the platelet count, any other
  class to that white-cell class. `accept` confirms the model's label, `correct` moves the one count
  from the old class to the new one. A later decision on the same cell replaces the earlier one;
* "new slide" starts from zero with a new session file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.fileutil import atomic_write_bytes
from edge.messages import (
    TOPIC_CELLS,
    TOPIC_PREVIEW,
    TOPIC_STATUS,
    TOPIC_THUMB,
    MessageError,
    decode,
    rejected_by_reason,
)

PLATELETS = "platelets"  # count buckets outside the white-cell differential
RED_CELLS = "red_cells"
PLATELET_CLASS = "platelet"  # the model's class name that means "this is a platelet"
TARGETS = (100, 200)
ACTIONS = ("accept", "correct")
MAX_CELLS_REMEMBERED = 5_000  # cells a decision may refer to, per slide (oldest forgotten first); bounds memory
MAX_QUEUE = 60  # review cards kept; the oldest (decided ones first) are dropped beyond this
MAX_FRAMES_REMEMBERED = 10_000  # (run, frame_id) pairs remembered to ignore a repeated cells message
RECENT_DECISIONS = 8

CellKey = tuple[str, int, int]  # (run, frame_id, cell_id)
log = logging.getLogger(__name__)


class DecisionError(ValueError):
    """A reviewer decision the display cannot apply (unknown cell or class, bad action): HTTP 400."""


@dataclass
class CellRecord:
    kind: str
    model_label: str | None
    reviewer_label: str | None = None

    @property
    def bucket(self) -> str:
        """Where this cell is counted now: a white-cell class, PLATELETS or RED_CELLS."""
        if self.reviewer_label is not None:
            return PLATELETS if self.reviewer_label == PLATELET_CLASS else self.reviewer_label
        if self.kind == "rbc":
            return RED_CELLS
        if self.kind == "platelet":
            return PLATELETS
        return str(self.model_label)


@dataclass
class ReviewItem:
    """One card in the review queue (from a `thumb` message)."""

    serial: int  # names the thumbnail URL; never reused while the server runs
    key: CellKey
    label: str
    top: list[tuple[str, float]]
    uncertainty: float | None
    anomaly: float | None
    jpeg: bytes
    received_at: float
    decision: str | None = None  # reviewer's class once decided

    def public(self) -> dict[str, Any]:
        run, frame_id, cell_id = self.key
        return {
            "serial": self.serial,
            "run": run,
            "frame_id": frame_id,
            "cell_id": cell_id,
            "label": self.label,
            "top": [[name, p] for name, p in self.top],
            "uncertainty": self.uncertainty,
            "anomaly": self.anomaly,
            "decision": self.decision,
            "thumb": f"/thumb/{self.serial}.jpg",  # serials restart with the server; the page adds the cell
        }


@dataclass
class Decision:
    time: float
    run: str
    frame_id: int
    cell_id: int
    model_label: str | None
    reviewer_label: str
    action: str
    crop: str | None = None  # the crop the model saw, relative to the session file's folder

    def as_json(self) -> dict[str, Any]:
        record = {
            "time": self.time,
            "run": self.run,
            "frame_id": self.frame_id,
            "cell_id": self.cell_id,
            "model_label": self.model_label,
            "reviewer_label": self.reviewer_label,
            "action": self.action,
        }
        if self.crop is not None:
            record["crop"] = self.crop
        return record


class SessionLog:
    """Append-only JSON Lines file of one slide's decisions; each line is flushed and fsynced so a
    power cut at the bench loses at most the click in progress. Created on the first decision."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def save_crop(self, key: CellKey, jpeg: bytes) -> str:
        """Keep the reviewed cell's crop beside the session (`slide-…/<run>-<frame>-<cell>.jpg`, written
        then renamed) so `cytoedge adapt` can learn from it; returns the path relative to the session's folder."""
        run, frame_id, cell_id = key
        safe_run = re.sub(r"[^A-Za-z0-9._-]", "_", run)[:64] or "run"
        relative = f"{self.path.stem}/{safe_run}-{frame_id}-{cell_id}.jpg"
        atomic_write_bytes(self.path.parent / relative, jpeg)
        return relative

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record, sort_keys=True) + "\n")
            out.flush()
            os.fsync(out.fileno())


_NAMES_GIVEN: set[Path] = set()  # session files are created lazily, so "exists" alone cannot tell


def new_session_path(directory: Path, now: float) -> Path:
    """`slide-YYYYmmdd-HHMMSS.jsonl` (local time, what the bench clock shows), never an existing name
    nor one already given to another slide (two new slides within one second get `-2`, `-3`, ...)."""
    stem = "slide-" + time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    path = directory / f"{stem}.jsonl"
    n = 2
    while path.exists() or path.resolve() in _NAMES_GIVEN:
        path = directory / f"{stem}-{n}.jsonl"
        n += 1
    _NAMES_GIVEN.add(path.resolve())
    return path


@dataclass
class Slide:
    """Counts, known cells and decisions of the slide under the microscope."""

    slide_id: str
    session: SessionLog
    started_at: float
    white: Counter[str] = field(default_factory=Counter)
    platelets: int = 0
    red_cells: int = 0
    frames: int = 0
    flagged: int = 0
    classes: list[str] = field(default_factory=list)  # the model's classes, in the model's order
    cells: OrderedDict[CellKey, CellRecord] = field(default_factory=OrderedDict)
    frames_seen: OrderedDict[tuple[str, int], None] = field(default_factory=OrderedDict)
    decisions: int = 0
    corrections: int = 0
    recent: deque[Decision] = field(default_factory=lambda: deque(maxlen=RECENT_DECISIONS))
    frame_range: dict[str, list[int]] = field(default_factory=dict)  # run -> [first, last] frame_id counted

    def end_record(self, ended_at: float, target: int) -> dict[str, Any]:
        """The session's last line: which frames made this slide, so `cytoedge report` and the lab collector
        count exactly them (a live run goes on across slides)."""
        return {"event": "slide-end", "slide": self.slide_id, "started_at": self.started_at, "ended_at": ended_at,
                "frames": self.frame_range, "target": target}

    def add(self, bucket: str, n: int = 1) -> None:
        if bucket == PLATELETS:
            self.platelets += n
        elif bucket == RED_CELLS:
            self.red_cells += n
        else:
            self.white[bucket] += n
            if self.white[bucket] <= 0:
                del self.white[bucket]

    def learn_classes(self, names: Iterable[str]) -> None:
        for name in names:
            if name not in self.classes:
                self.classes.append(name)

    def white_classes(self) -> list[str]:
        """Rows of the differential: every white-cell class the model knows, then any other label seen."""
        rows = [name for name in self.classes if name != PLATELET_CLASS]
        rows += sorted(name for name in self.white if name not in rows)
        return rows

    def differential(self) -> list[dict[str, Any]]:
        total = sum(self.white.values())
        return [
            {
                "class": name,
                "count": self.white.get(name, 0),
                "percent": round(100.0 * self.white.get(name, 0) / total, 1) if total else 0.0,
            }
            for name in self.white_classes()
        ]


class DisplayState:
    """Everything the page shows; every method is called with the server's lock held."""

    def __init__(
        self,
        sessions_dir: Path,
        target: int = 100,
        stale_after_s: float = 3.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}")
        self.sessions_dir = Path(sessions_dir)
        self.target = target
        self.stale_after_s = stale_after_s
        self.clock = clock
        self.malformed = 0  # payloads that failed edge.messages.decode or the checks below
        self.rejected_by_decoder = 0  # malformed payloads the server's Subscriber skipped before handle()
        self.received = 0
        self.missed = 0  # from seq gaps (filled in by the server from its Subscriber)
        self.last_message_at: float | None = None
        self.status: dict[str, Any] | None = None
        self.domain_alarm = False
        self.domain_checked = True
        self.run: str | None = None
        self.preview: dict[str, Any] | None = None
        self.preview_jpeg: bytes | None = None
        self.queue: deque[ReviewItem] = deque()
        self._serial = 0
        self.version = 0  # bumped on every change, so the server pushes only when something moved
        self.slide = self._new_slide()

    # -- slides ------------------------------------------------------------------------------
    def _new_slide(self) -> Slide:
        now = self.clock()
        path = new_session_path(self.sessions_dir, now)
        return Slide(slide_id=path.stem, session=SessionLog(path), started_at=now)

    def new_slide(self) -> Slide:
        """Zero the counts, forget the old slide's cells and review cards, start a new session file.
        The old slide's session file (if it has decisions) is closed with its `slide-end` line."""
        if self.slide.session.path.exists():
            try:
                self.slide.session.append(self.slide.end_record(self.clock(), self.target))
            except OSError as exc:  # a full disk must not stop the bench; the report then counts whole runs
                log.warning("could not close %s with its slide-end line: %s", self.slide.session.path, exc)
        classes = list(self.slide.classes)
        self.slide = self._new_slide()
        self.slide.classes = classes  # the model did not change with the slide
        self.queue.clear()
        self.version += 1
        return self.slide

    # -- messages ----------------------------------------------------------------------------
    def handle_raw(self, topic: bytes, data: bytes) -> bool:
        """Decode and apply one wire message; a malformed one is counted and skipped."""
        try:
            payload = decode(topic, data)
        except MessageError:
            self.malformed += 1
            self.version += 1
            return False
        return self.handle(topic, payload)

    def handle(self, topic: bytes, payload: dict[str, Any]) -> bool:
        """Apply one decoded message; False (and the malformed count +1) when its content is unusable."""
        try:
            if topic == TOPIC_CELLS:
                self._on_cells(payload)
            elif topic == TOPIC_STATUS:
                self._on_status(payload)
            elif topic == TOPIC_PREVIEW:
                self._on_preview(payload)
            elif topic == TOPIC_THUMB:
                self._on_thumb(payload)
            else:
                raise MessageError(f"unexpected topic {topic!r}")
        except (MessageError, TypeError, ValueError, KeyError, AttributeError):
            self.malformed += 1
            self.version += 1
            return False
        self.received += 1
        self.last_message_at = self.clock()
        if isinstance(payload.get("run"), str):
            self.run = payload["run"]
        self.version += 1
        return True

    def _on_cells(self, payload: dict[str, Any]) -> None:
        run, frame_id = _text(payload["run"]), _integer(payload["frame_id"])
        records: list[tuple[int, CellRecord]] = []
        classes: list[str] = []
        for cell in payload["cells"]:
            kind, label, probs = cell["kind"], cell["label"], cell["probs"]
            if kind != "rbc" and not isinstance(label, str):
                raise MessageError(f"a {kind} cell has no label")
            if isinstance(probs, dict):
                classes.extend(str(name) for name in probs)
            if cell.get("first_seen", True) is not False:  # a cell still in view was counted when first seen
                records.append((_integer(cell["id"]), CellRecord(kind, label if kind != "rbc" else None)))
        # Checked the whole message before counting any of it: a bad cell skips the message, not half of it.
        self.domain_alarm = bool(payload.get("domain_alarm", False))
        self.domain_checked = bool(payload.get("domain_checked", True))
        slide = self.slide
        if (run, frame_id) in slide.frames_seen:
            return  # the same frame twice (a re-sent message) is counted once
        slide.frames_seen[(run, frame_id)] = None
        if len(slide.frames_seen) > MAX_FRAMES_REMEMBERED:
            slide.frames_seen.popitem(last=False)
        slide.learn_classes(classes)
        slide.frames += 1
        span = slide.frame_range.setdefault(run, [frame_id, frame_id])
        span[0], span[1] = min(span[0], frame_id), max(span[1], frame_id)
        for cell_id, record in records:
            slide.add(record.bucket)
            if record.kind != "rbc":  # red cells are never reviewed; no need to remember them
                slide.cells[(run, frame_id, cell_id)] = record
        slide.flagged += sum(
            bool(cell["review"]) for cell in payload["cells"] if cell.get("first_seen", True) is not False
        )
        while len(slide.cells) > MAX_CELLS_REMEMBERED:
            slide.cells.popitem(last=False)

    def _on_status(self, payload: dict[str, Any]) -> None:
        frames, latency = payload["frames"], payload["latency_ms"]
        if not isinstance(frames, dict) or not isinstance(latency, dict):
            raise MessageError("status frames/latency_ms must be maps")
        float(payload["fps"])
        warnings = payload.get("warnings", [])
        if not isinstance(warnings, list):
            raise MessageError("status warnings must be a list")
        self.status = payload

    def _on_preview(self, payload: dict[str, Any]) -> None:
        jpeg = payload["jpeg"]
        if not isinstance(jpeg, bytes):
            raise MessageError("preview jpeg must be bytes")
        self.preview_jpeg = jpeg
        self.preview = {
            "run": _text(payload["run"]),
            "seq": _integer(payload["seq"]),
            "frame_id": _integer(payload["frame_id"]),
            "width": _integer(payload["width"]),
            "height": _integer(payload["height"]),
        }

    def _on_thumb(self, payload: dict[str, Any]) -> None:
        jpeg, label = payload["jpeg"], payload["label"]
        if not isinstance(jpeg, bytes) or not isinstance(label, str):
            raise MessageError("thumb needs a str label and jpeg bytes")
        top = [(str(name), float(p)) for name, p in payload["top"]][:3]
        key = (_text(payload["run"]), _integer(payload["frame_id"]), _integer(payload["cell_id"]))
        self.slide.learn_classes(name for name, _ in top)
        if key not in self.slide.cells:
            return  # its cells message never arrived (dropped, or before this slide): nothing to correct
        self._serial += 1
        self.queue.appendleft(
            ReviewItem(
                serial=self._serial,
                key=key,
                label=label,
                top=top,
                uncertainty=_maybe_float(payload.get("uncertainty")),
                anomaly=_maybe_float(payload.get("anomaly")),
                jpeg=jpeg,
                received_at=self.clock(),
            )
        )
        while len(self.queue) > MAX_QUEUE:
            decided = next((item for item in reversed(self.queue) if item.decision is not None), None)
            self.queue.remove(decided) if decided is not None else self.queue.pop()

    # -- review ------------------------------------------------------------------------------
    def decide(self, run: Any, frame_id: Any, cell_id: Any, action: Any, label: Any = None) -> Decision:
        """Apply a reviewer's decision, log it to the session file and return it; DecisionError if not possible."""
        if action not in ACTIONS:
            raise DecisionError(f"action must be one of {', '.join(ACTIONS)}, not {action!r}")
        if not (isinstance(run, str) and _is_int(frame_id) and _is_int(cell_id)):
            raise DecisionError("a decision needs run (string), frame_id and cell_id (integers)")
        slide = self.slide
        key = (run, int(frame_id), int(cell_id))
        record = slide.cells.get(key)
        if record is None:
            raise DecisionError(
                f"unknown cell run={run} frame_id={frame_id} cell_id={cell_id}: not counted on this slide"
            )
        if action == "accept":
            if label is not None and label != record.model_label:
                raise DecisionError(f"accept confirms the model's label {record.model_label!r}, not {label!r}")
            new_label = record.model_label
        else:
            new_label = label
        if not isinstance(new_label, str) or new_label not in slide.classes:
            known = ", ".join(slide.classes) or "none received yet"
            raise DecisionError(f"unknown class {new_label!r}; the model's classes are: {known}")
        jpeg = next((item.jpeg for item in self.queue if item.key == key), None)
        crop = slide.session.save_crop(key, jpeg) if jpeg is not None else None
        decision = Decision(self.clock(), key[0], key[1], key[2], record.model_label, new_label, action, crop)
        slide.session.append(decision.as_json())  # logged before counted: a failed write changes nothing
        slide.add(record.bucket, -1)
        record.reviewer_label = new_label
        slide.add(record.bucket, +1)
        slide.decisions += 1
        slide.corrections += action == "correct"
        slide.recent.appendleft(decision)
        for item in self.queue:
            if item.key == key:
                item.decision = new_label
        self.version += 1
        return decision

    # -- output ------------------------------------------------------------------------------
    def csv(self) -> str:
        """The slide's differential: one row per white-cell class (percent of white cells), then totals."""
        slide = self.slide
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["class", "count", "percent"])
        for row in slide.differential():
            writer.writerow([row["class"], row["count"], f"{row['percent']:.1f}"])
        total = sum(slide.white.values())
        writer.writerow(["white_cells_total", total, "100.0" if total else "0.0"])
        writer.writerow([PLATELETS, slide.platelets, ""])
        writer.writerow([RED_CELLS, slide.red_cells, ""])
        return buffer.getvalue()

    def thumb(self, serial: int) -> bytes | None:
        return next((item.jpeg for item in self.queue if item.serial == serial), None)

    def snapshot(self, queue_limit: int = 24) -> dict[str, Any]:
        """The JSON the page renders (no image bytes: those are fetched by URL)."""
        now = self.clock()
        slide = self.slide
        status = self.status or {}
        latency = status.get("latency_ms", {}).get("total", {}) if isinstance(status.get("latency_ms"), dict) else {}
        frames = status.get("frames") if isinstance(status.get("frames"), dict) else {}
        warnings = [str(w) for w in status.get("warnings", [])][:10] if status else []
        total = sum(slide.white.values())
        age = None if self.last_message_at is None else max(0.0, now - self.last_message_at)
        return {
            "server_time": now,
            "version": self.version,
            "slide": {
                "id": slide.slide_id,
                "session_file": str(slide.session.path),
                "started_at": slide.started_at,
                "frames": slide.frames,
                "flagged": slide.flagged,
                "decisions": slide.decisions,
                "corrections": slide.corrections,
                "recent": [d.as_json() for d in slide.recent],
            },
            "differential": slide.differential(),
            "white_total": total,
            "target": self.target,
            "platelets": slide.platelets,
            "red_cells": slide.red_cells,
            "classes": list(slide.classes),
            "queue": [item.public() for item in list(self.queue)[:queue_limit]],
            "queue_pending": sum(item.decision is None for item in self.queue),
            "preview": self.preview,
            "health": {
                "state": status.get("state"),
                "source_state": status.get("source_state"),
                "source": status.get("source"),
                "fps": status.get("fps"),
                "latency_p50_ms": latency.get("p50") if isinstance(latency, dict) else None,
                "latency_p99_ms": latency.get("p99") if isinstance(latency, dict) else None,
                "dropped": frames.get("dropped"),
                "rejected": frames.get("rejected"),
                "rejected_by_reason": rejected_by_reason(status),  # most frequent first; {} from older publishers
                "model": status.get("model"),
                "queue_depth": status.get("queue_depth"),
                "final": bool(status.get("final", False)),
                "domain_alarm": self.domain_alarm,  # from the latest `cells`: shown on its own, not as a warning
                "domain_checked": self.domain_checked,
                "warnings": warnings,
                "malformed": self.malformed + self.rejected_by_decoder,
                "missed": self.missed,
                "received": self.received,
                "run": self.run,
            },
            "last_message_age_s": age,
            "stale_after_s": self.stale_after_s,
            "stale": age is None or age > self.stale_after_s,
        }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(value: Any) -> int:
    if not _is_int(value):
        raise MessageError(f"expected an integer, got {type(value).__name__}")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise MessageError(f"expected a string, got {type(value).__name__}")
    return value


def _maybe_float(value: Any) -> float | None:
    return None if value is None else float(value)

"""One slide's content, built from its `cells` messages (an audit log or the collector's database) and the
reviewer's decisions (the display's session file): the same counting rules as the display, so the
report says what the bench showed."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.errors import ConfigError, CytoedgeError

SCHEMA = "cytoedge.report/1"
PLATELET_CLASS = "platelet"
TARGETS = (100, 200)

CellKey = tuple[str, int, int]


class ReportError(CytoedgeError):
    """The inputs cannot make a report (nothing on the slide, a refused signature): exit 1."""


@dataclass
class SignOff:
    name: str
    time: float


@dataclass
class GalleryCell:
    run: str
    frame_id: int
    cell_id: int
    kind: str
    model_label: str | None
    reviewer_label: str | None
    action: str | None
    flagged: bool
    source: str | None
    bbox: list[int] | None
    crop: str | None = None  # saved by the display beside the session file, relative to its folder
    crop_jpeg: bytes | None = None  # the same crop as shipped to the lab collector

    @property
    def shown_label(self) -> str:
        return self.reviewer_label or self.model_label or self.kind


@dataclass
class Slide:
    """What the report prints; `as_json` is the JSON twin of the PDF."""

    slide_id: str
    microscope: str
    runs: list[str]
    started_at: float | None
    ended_at: float | None
    model: str | None
    card_sha256: str | None
    target: int
    white: Counter[str] = field(default_factory=Counter)
    classes: list[str] = field(default_factory=list)
    platelets: int = 0
    red_cells: int = 0
    frames: int = 0
    flagged: int = 0
    reviewed: int = 0
    corrected: int = 0
    unreviewed: int = 0
    alarm_history: list[dict[str, Any]] = field(default_factory=list)
    gallery: list[GalleryCell] = field(default_factory=list)
    signoff: SignOff | None = None

    @property
    def white_total(self) -> int:
        return sum(self.white.values())

    @property
    def target_reached(self) -> bool:
        return self.white_total >= self.target

    @property
    def unchecked_frames(self) -> int:
        return sum(seg["frames"] for seg in self.alarm_history if seg["state"] != "checked")

    @property
    def banner(self) -> str | None:
        """The unmissable line when the domain alarm did not vouch for every frame."""
        alarm = sum(seg["frames"] for seg in self.alarm_history if seg["state"] == "alarm")
        unchecked = sum(seg["frames"] for seg in self.alarm_history if seg["state"] == "unchecked")
        if not alarm and not unchecked:
            return None
        parts = []
        if alarm:
            parts.append(f"the domain alarm was ON for {alarm} frame(s)")
        if unchecked:
            parts.append(f"{unchecked} frame(s) were NOT CHECKED by the domain alarm")
        return (
            f"RUN NOT CHECKED: {' and '.join(parts)} of {self.frames}; the model may not fit these images — "
            "every cell was sent to review"
        )

    def differential(self) -> list[dict[str, Any]]:
        total = self.white_total
        rows = [name for name in self.classes if name != PLATELET_CLASS]
        rows += sorted(name for name in self.white if name not in rows)
        return [
            {
                "class": name,
                "count": self.white.get(name, 0),
                "percent": round(100.0 * self.white.get(name, 0) / total, 1) if total else 0.0,
            }
            for name in rows
        ]

    def sign(self, name: str, when: float | None = None) -> None:
        """Refused while any flagged cell waits for a reviewer: a signature vouches for every flagged cell."""
        name = name.strip()
        if not name:
            raise ReportError("the reviewer's name is empty")
        if self.unreviewed:
            raise ReportError(
                f"slide {self.slide_id} cannot be signed: {self.unreviewed} of {self.flagged} flagged cell(s) "
                "are still unreviewed (decide them on the display first)"
            )
        self.signoff = SignOff(name, time.time() if when is None else when)

    def as_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "slide_id": self.slide_id,
            "microscope": self.microscope,
            "runs": self.runs,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "model": {"id": self.model, "card_sha256": self.card_sha256},
            "target": self.target,
            "target_reached": self.target_reached,
            "white_total": self.white_total,
            "differential": self.differential(),
            "platelets": self.platelets,
            "red_cells": self.red_cells,
            "frames": self.frames,
            "review": {
                "flagged": self.flagged,
                "reviewed": self.reviewed,
                "corrected": self.corrected,
                "unreviewed": self.unreviewed,
            },
            "domain_alarm": {"banner": self.banner, "history": self.alarm_history},
            "gallery": [
                {
                    "run": c.run,
                    "frame_id": c.frame_id,
                    "cell_id": c.cell_id,
                    "kind": c.kind,
                    "model_label": c.model_label,
                    "reviewer_label": c.reviewer_label,
                    "action": c.action,
                    "flagged": c.flagged,
                    "crop": c.crop,
                }
                for c in self.gallery
            ],
            "signoff": None if self.signoff is None else {"name": self.signoff.name, "time": self.signoff.time},
        }


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Whole JSON objects, one a line; a torn last line (a crash mid-write) is dropped, as audit.py promises."""
    try:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) or (number == len(lines) - 1 and not lines[-1]):
                continue  # torn last line
            raise ReportError(f"{path}:{number}: not a JSON object") from None
        if not isinstance(record, dict):
            raise ReportError(f"{path}:{number}: not a JSON object")
        yield record


def latest_decisions(records: Iterable[dict[str, Any]]) -> dict[CellKey, dict[str, Any]]:
    """The last decision per cell (a later decision replaces an earlier one, docs/display.md)."""
    latest: dict[CellKey, dict[str, Any]] = {}
    for record in records:
        try:
            key = (str(record["run"]), int(record["frame_id"]), int(record["cell_id"]))
        except (KeyError, TypeError, ValueError):
            continue  # not a decision line (e.g. a future record type)
        if isinstance(record.get("reviewer_label"), str):
            latest[key] = record
    return latest


def recorded_signoff(records: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The last sign-off line `cytoedge report --sign` appended to a session file, if any."""
    found = [r for r in records if r.get("event") == "signoff" and isinstance(r.get("name"), str)]
    return found[-1] if found else None


def slide_end(records: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The display's `slide-end` line (written at "new slide"): the frames and times of this slide."""
    found = [r for r in records if r.get("event") == "slide-end" and isinstance(r.get("frames"), dict)]
    return found[-1] if found else None


def signoff_record(signoff: SignOff) -> dict[str, Any]:
    return {"event": "signoff", "name": signoff.name, "time": signoff.time}


def _crop_bytes(decision: dict[str, Any] | None) -> bytes | None:
    encoded = (decision or {}).get("crop_jpeg_b64")
    if not isinstance(encoded, str):
        return None
    try:
        return base64.b64decode(encoded, validate=True)
    except ValueError:
        return None


def card_checksum(model_id: str | None, models_root: Path | None = None) -> str | None:
    """sha256 of the model card (card.md) of the model whose file hash the id ends with; None if not found."""
    if not model_id or "@" not in model_id:
        return None
    short = model_id.rsplit("@", 1)[1]
    root = models_root or Path(__file__).resolve().parents[2] / "engines" / "models"
    for card in sorted(root.glob("*/card.md")):
        onnx = card.parent / "model.onnx"
        if onnx.is_file() and _sha256(onnx).startswith(short):
            return _sha256(card)
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build(
    messages: Iterable[dict[str, Any]],
    decisions: dict[CellKey, dict[str, Any]],
    slide_id: str,
    microscope: str,
    target: int = 100,
    runs: Iterable[str] | None = None,
    card_sha256: str | None = None,
    end: dict[str, Any] | None = None,
) -> Slide:
    """Count the slide's `cells` messages and apply the decisions. Which messages: the frames the display's
    ``end`` record names when there is one, else every frame of ``runs`` (every run when None)."""
    spans: dict[str, tuple[int, int]] = {}
    if end is not None:
        spans = {str(run): (int(span[0]), int(span[1])) for run, span in end["frames"].items()}
        runs = list(spans)
    wanted = set(runs) if runs is not None else None
    slide = Slide(slide_id, microscope, [], None, None, None, card_sha256, target)
    seen_frames: set[tuple[str, int]] = set()
    flagged_keys: set[CellKey] = set()
    counted: set[CellKey] = set()  # white cells and platelets on this slide: what a decision may apply to
    gallery: dict[CellKey, GalleryCell] = {}
    segment: dict[str, Any] | None = None
    for message in messages:
        run = message.get("run")
        if not isinstance(message.get("cells"), list):
            continue  # not a cells message (e.g. a session file given as the audit log)
        if not isinstance(run, str) or (wanted is not None and run not in wanted):
            continue
        frame_id = message.get("frame_id")
        if not isinstance(frame_id, int) or (run, frame_id) in seen_frames:
            continue  # a frame counts once, as on the display
        if spans and not spans[run][0] <= frame_id <= spans[run][1]:
            continue  # before or after this slide on a run that goes on
        seen_frames.add((run, frame_id))
        if run not in slide.runs:
            slide.runs.append(run)
        stamp = message.get("published_at")
        if isinstance(stamp, (int, float)):
            slide.started_at = stamp if slide.started_at is None else min(slide.started_at, stamp)
            slide.ended_at = stamp if slide.ended_at is None else max(slide.ended_at, stamp)
        if isinstance(message.get("model"), str):
            slide.model = message["model"]
        slide.frames += 1
        state = (
            "alarm"
            if message.get("domain_alarm")
            else "checked"
            if message.get("domain_checked", True)
            else "unchecked"
        )
        if segment is None or segment["state"] != state or segment["run"] != run:
            segment = {"run": run, "state": state, "from_frame": frame_id, "to_frame": frame_id, "frames": 0}
            slide.alarm_history.append(segment)
        segment["to_frame"] = frame_id
        segment["frames"] += 1
        for cell in message.get("cells") or []:
            if cell.get("first_seen", True) is False:
                continue
            kind, label = cell.get("kind"), cell.get("label")
            if isinstance(cell.get("probs"), dict):
                slide.classes.extend(n for n in cell["probs"] if n not in slide.classes)
            if kind == "rbc":
                slide.red_cells += 1
                continue
            key = (run, frame_id, int(cell.get("id", -1)))
            counted.add(key)
            decision = decisions.get(key)
            final = decision["reviewer_label"] if decision else label
            if (decision is None and kind == "platelet") or final == PLATELET_CLASS:
                slide.platelets += 1
            else:
                slide.white[str(final)] += 1
            flagged = bool(cell.get("review"))
            if flagged:
                flagged_keys.add(key)
            corrected = bool(decision) and decision.get("action") == "correct"
            if flagged or corrected:
                gallery[key] = GalleryCell(
                    run, frame_id, key[2], str(kind), label,
                    decision["reviewer_label"] if decision else None,
                    decision.get("action") if decision else None,
                    flagged, message.get("source"), cell.get("bbox"),
                    decision.get("crop") if decision else None,
                    _crop_bytes(decision),
                )
    if not slide.frames:
        raise ReportError("no cells messages for this slide (wrong audit log or run?)")
    if end is not None:  # the slide's own times (the display's clock), not its first and last frame's
        slide.started_at = float(end.get("started_at") or slide.started_at or 0.0)
        slide.ended_at = float(end.get("ended_at") or slide.ended_at or 0.0)
    applied = [key for key in decisions if key in counted]
    slide.reviewed = len(applied)
    slide.corrected = sum(decisions[key].get("action") == "correct" for key in applied)
    slide.flagged = len(flagged_keys)
    slide.unreviewed = sum(key not in decisions for key in flagged_keys)
    slide.gallery = list(gallery.values())
    return slide

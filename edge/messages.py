"""The wire contract between the publisher and every subscriber (see docs/messages.md).

Each message is a ZeroMQ multipart ``[topic, msgpack payload]``. Payloads are plain maps of
strings, numbers, lists, booleans, None and (for images) bytes: no pickle on the wire.
The payload builders below are the only place the maps are laid out: field names and their order
(subscribers that compare bytes, and the audit log, see the same order on every run).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

from edge.cells import Cell

TOPIC_CELLS = b"cells"
TOPIC_STATUS = b"status"
TOPIC_PREVIEW = b"preview"
TOPIC_THUMB = b"thumb"
TOPICS = (TOPIC_CELLS, TOPIC_STATUS, TOPIC_PREVIEW, TOPIC_THUMB)

SCHEMA_CELLS = "cytoedge.cells/1"
SCHEMA_STATUS = "cytoedge.status/1"
SCHEMA_PREVIEW = "cytoedge.preview/1"
SCHEMA_THUMB = "cytoedge.thumb/1"
SCHEMA_BY_TOPIC = {
    TOPIC_CELLS: SCHEMA_CELLS,
    TOPIC_STATUS: SCHEMA_STATUS,
    TOPIC_PREVIEW: SCHEMA_PREVIEW,
    TOPIC_THUMB: SCHEMA_THUMB,
}

# Fields a subscriber may rely on; anything else is optional and may grow within a schema version.
REQUIRED_FIELDS = {
    SCHEMA_CELLS: ("schema", "run", "seq", "frame_id", "captured_at", "published_at", "source", "model", "cells"),
    SCHEMA_STATUS: (
        "schema",
        "run",
        "seq",
        "published_at",
        "state",
        "source_state",
        "fps",
        "frames",
        "latency_ms",
        "model",
    ),
    SCHEMA_PREVIEW: ("schema", "run", "seq", "frame_id", "jpeg", "width", "height"),
    SCHEMA_THUMB: ("schema", "run", "seq", "frame_id", "cell_id", "label", "top", "jpeg"),
}
CELL_FIELDS = ("id", "bbox", "kind", "label", "probs", "uncertainty", "anomaly", "review")
CELL_KINDS = ("wbc", "rbc", "platelet")


class MessageError(ValueError):
    """A message that does not follow the contract; subscribers count and skip it."""


def cell_record(cell: Cell) -> dict[str, Any]:
    """One cell of a `cells` message; ``track``/``first_seen`` only once the tracker has set them."""
    record: dict[str, Any] = {
        "id": cell.id,
        "bbox": [int(v) for v in cell.bbox],
        "kind": cell.kind,
        "label": cell.label,
        "probs": cell.probs,
        "uncertainty": cell.uncertainty,
        "anomaly": cell.anomaly,
        "review": cell.review,
    }
    if cell.track is not None:
        record["track"] = cell.track
        record["first_seen"] = cell.first_seen
    return record


def cells_payload(
    *,
    frame_id: int,
    captured_at: float,
    source: str,
    model: str,
    frame_size: tuple[int, int],
    domain_alarm: bool,
    domain_checked: bool,
    cells: Sequence[Cell],
    latency_ms: dict[str, float],
) -> dict[str, Any]:
    """The `cells` payload of one frame (``latency_ms``: queue, detect, classify in ms)."""
    return {
        "frame_id": frame_id,
        "captured_at": captured_at,
        "source": source,
        "model": model,
        "frame_size": [int(frame_size[0]), int(frame_size[1])],
        "domain_alarm": domain_alarm,
        "domain_checked": domain_checked,
        "cells": [cell_record(cell) for cell in cells],
        "latency_ms": {name: round(value, 3) for name, value in latency_ms.items()},
    }


def thumb_payload(frame_id: int, cell: Cell, cells_seq: int, jpeg: bytes) -> dict[str, Any]:
    """The `thumb` payload of one classified cell flagged for review."""
    top = sorted((cell.probs or {}).items(), key=lambda item: -item[1])[:3]
    return {
        "frame_id": frame_id,
        "cell_id": cell.id,
        "cells_seq": cells_seq,
        "label": cell.label,
        "top": [[name, p] for name, p in top],
        "uncertainty": cell.uncertainty,
        "anomaly": cell.anomaly,
        "jpeg": jpeg,
    }


def preview_payload(frame_id: int, jpeg: bytes, width: int, height: int, scale: float) -> dict[str, Any]:
    return {"frame_id": frame_id, "jpeg": jpeg, "width": width, "height": height, "scale": round(scale, 5)}


def status_payload(
    *,
    state: str,
    source_state: str,
    source: str,
    fps: float,
    frames: dict[str, Any],
    latency_ms: dict[str, dict[str, float]],
    queue_depth: int,
    model: str,
    uptime_s: float,
    warnings: list[str],
    final: bool,
) -> dict[str, Any]:
    """The `status` payload; ``frames``: read, published, dropped, skipped, rejected, rejected_by_reason
    (a map of rejection kind to count), errors."""
    return {
        "state": state,
        "source_state": source_state,
        "source": source,
        "fps": fps,
        "frames": frames,
        "latency_ms": latency_ms,
        "queue_depth": queue_depth,
        "model": model,
        "uptime_s": round(uptime_s, 3),
        "warnings": warnings,
        "final": final,
    }


def rejected_by_reason(status: dict[str, Any]) -> dict[str, int]:
    """A status's rejected-frame counts per kind, most frequent first; {} when absent or malformed.

    Optional within schema 1 (older publishers do not send it), so a reader takes what is well formed
    rather than refusing the whole status over it.
    """
    frames = status.get("frames")
    counts = frames.get("rejected_by_reason") if isinstance(frames, dict) else None
    if not isinstance(counts, dict):
        return {}
    valid = {str(kind): count for kind, count in counts.items() if _is_int(count) and count > 0}
    return dict(sorted(valid.items(), key=lambda item: (-item[1], item[0])))


def rejections_text(status: dict[str, Any]) -> str:
    """One short line for a person: "out_of_focus 12, too_dark 3" ("" when nothing was rejected)."""
    return ", ".join(f"{kind} {count}" for kind, count in rejected_by_reason(status).items())


def encode(payload: dict[str, Any]) -> bytes:
    return msgpack.packb(payload, use_bin_type=True)


def decode(topic: bytes, data: bytes, max_bytes: int = 8 << 20) -> dict[str, Any]:
    """Decode and check one payload; raise MessageError rather than hand on something malformed."""
    if len(data) > max_bytes:
        raise MessageError(f"{topic!r} payload of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    expected = SCHEMA_BY_TOPIC.get(topic)
    if expected is None:
        raise MessageError(f"unknown topic {topic!r}")
    try:
        payload = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad bytes
        raise MessageError(f"{topic!r} payload is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(payload, dict):
        raise MessageError(f"{topic!r} payload is not a map")
    schema = payload.get("schema")
    if schema != expected:
        raise MessageError(f"{topic!r} payload has schema {schema!r}, expected {expected!r}")
    missing = [name for name in REQUIRED_FIELDS[expected] if name not in payload]
    if missing:
        raise MessageError(f"{topic!r} payload lacks {', '.join(missing)}")
    for name in ("seq", "frame_id", "cell_id", "cells_seq", "width", "height"):
        if name in payload and not _is_int(payload[name]):
            raise MessageError(f"{topic!r} field {name!r} must be an integer")
    for name in ("run", "source", "model", "state", "source_state"):
        if name in payload and not isinstance(payload[name], str):
            raise MessageError(f"{topic!r} field {name!r} must be a string")
    if expected == SCHEMA_CELLS:
        _check_cells(payload["cells"])
    elif expected == SCHEMA_STATUS:
        for name in ("frames", "latency_ms"):
            if not isinstance(payload[name], dict):
                raise MessageError(f"status field {name!r} must be a map")
        if not _is_number(payload["fps"]):
            raise MessageError("status field 'fps' must be a number")
    elif "jpeg" in payload and not isinstance(payload["jpeg"], bytes):
        raise MessageError(f"{topic!r} field 'jpeg' must be bytes")
    return payload


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_cells(cells: Any) -> None:
    if not isinstance(cells, list):
        raise MessageError("'cells' must be a list")
    for cell in cells:
        if not isinstance(cell, dict):
            raise MessageError("each cell must be a map")
        missing = [name for name in CELL_FIELDS if name not in cell]
        if missing:
            raise MessageError(f"cell lacks {', '.join(missing)}")
        if cell["kind"] not in CELL_KINDS:
            raise MessageError(f"cell kind {cell['kind']!r} is not one of {', '.join(CELL_KINDS)}")
        bbox = cell["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_int(v) for v in bbox)):
            raise MessageError("cell bbox must be four integers [x, y, width, height]")
        if not _is_int(cell["id"]):
            raise MessageError("cell id must be an integer")
        if cell["label"] is not None and not isinstance(cell["label"], str):
            raise MessageError("cell label must be a string or null")
        probs = cell["probs"]
        if probs is not None and not (
            isinstance(probs, dict) and all(isinstance(k, str) and _is_number(v) for k, v in probs.items())
        ):
            raise MessageError("cell probs must map class names to numbers, or be null")
        for name in ("uncertainty", "anomaly"):
            if cell[name] is not None and not _is_number(cell[name]):
                raise MessageError(f"cell {name} must be a number or null")
        if not isinstance(cell["review"], bool):
            raise MessageError("cell review must be true or false")
        if "first_seen" in cell and not isinstance(cell["first_seen"], bool):
            raise MessageError("cell first_seen must be true or false")
        if "track" in cell and not _is_int(cell["track"]):
            raise MessageError("cell track must be an integer")

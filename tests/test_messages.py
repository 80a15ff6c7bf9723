"""The wire contract's checking decoder: malformed payloads are refused with a reason."""

from __future__ import annotations

import msgpack
import pytest

from edge.messages import TOPIC_CELLS, TOPIC_STATUS, MessageError, decode, encode


def cells_payload(**changes: object) -> dict:
    payload = {
        "schema": "cytoedge.cells/1",
        "run": "r",
        "seq": 0,
        "frame_id": 0,
        "captured_at": 0.0,
        "published_at": 0.0,
        "source": "s",
        "model": "m",
        "cells": [
            {
                "id": 0,
                "bbox": [1, 2, 3, 4],
                "kind": "wbc",
                "label": "neutrophil",
                "probs": {"neutrophil": 1.0},
                "uncertainty": 0.0,
                "anomaly": 0.0,
                "review": False,
            }
        ],
    }
    payload.update(changes)
    return payload


def test_well_formed_cells_message_round_trips() -> None:
    assert decode(TOPIC_CELLS, encode(cells_payload())) == cells_payload()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xc1\xc1\xc1", "not valid msgpack"),
        (msgpack.packb([1, 2, 3]), "not a map"),
        (encode(cells_payload(schema="cytoedge.cells/2")), "schema 'cytoedge.cells/2'"),
        (encode({k: v for k, v in cells_payload().items() if k != "seq"}), "lacks seq"),
        (encode(cells_payload(cells=[{"id": 0}])), "cell lacks"),
        (encode(cells_payload(cells="many")), "'cells' must be a list"),
    ],
)
def test_malformed_payload_is_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(MessageError, match=None) as caught:
        decode(TOPIC_CELLS, data)
    assert reason in str(caught.value)


def test_oversized_payload_is_refused_before_decoding() -> None:
    with pytest.raises(MessageError, match="exceeds"):
        decode(TOPIC_STATUS, b"\x00" * 100, max_bytes=10)


def test_unknown_topic_is_refused() -> None:
    with pytest.raises(MessageError, match="unknown topic"):
        decode(b"other", encode({"schema": "x"}))


def test_payload_builders_lay_out_the_documented_fields_in_a_fixed_order() -> None:
    """Subscribers and the audit log see the same maps, field for field and in the same order, on every run."""
    from edge.cells import Cell
    from edge.messages import (
        SCHEMA_BY_TOPIC,
        TOPIC_CELLS,
        TOPIC_STATUS,
        TOPIC_THUMB,
        cells_payload,
        decode,
        encode,
        status_payload,
        thumb_payload,
    )

    cell = Cell(0, (1, 2, 3, 4), "wbc", "neutrophil", {"neutrophil": 0.9, "lymphocyte": 0.1}, 0.2, 0.1, True, 7, True)
    red = Cell(1, (5, 6, 7, 8), "rbc", track=8, first_seen=False)
    cells = cells_payload(frame_id=3, captured_at=1.0, source="s", model="m", frame_size=(640, 480),
                          domain_alarm=False, domain_checked=True, cells=[cell, red],
                          latency_ms={"queue": 1.23456, "detect": 2.0, "classify": 3.0})
    assert list(cells) == ["frame_id", "captured_at", "source", "model", "frame_size", "domain_alarm",
                           "domain_checked", "cells", "latency_ms"]
    assert list(cells["cells"][0]) == ["id", "bbox", "kind", "label", "probs", "uncertainty", "anomaly", "review",
                                       "track", "first_seen"]
    assert cells["cells"][1]["label"] is None and cells["latency_ms"]["queue"] == 1.235
    status = status_payload(state="running", source_state="streaming", source="s", fps=1.0, frames={},
                            latency_ms={}, queue_depth=0, model="m", uptime_s=1.0, warnings=[], final=False)
    assert list(status) == ["state", "source_state", "source", "fps", "frames", "latency_ms", "queue_depth", "model",
                            "uptime_s", "warnings", "final"]
    thumb = thumb_payload(3, cell, 5, b"jpeg")
    assert thumb["top"] == [["neutrophil", 0.9], ["lymphocyte", 0.1]]
    common = {"schema": "", "run": "r", "seq": 0, "published_at": 0.0}
    for topic, payload in ((TOPIC_CELLS, cells), (TOPIC_STATUS, status), (TOPIC_THUMB, thumb)):
        decode(topic, encode({**common, "schema": SCHEMA_BY_TOPIC[topic], **payload}))  # passes the contract check

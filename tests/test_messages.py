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

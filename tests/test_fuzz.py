"""Fuzzed inputs (hypothesis): whatever a person or a network peer hands us ends in a clear message or
a counted skip, never an unexpected exception. CI runs a bounded number of examples; set
CYTOEDGE_FUZZ_EXAMPLES for a longer run (figures in docs/hardening.md)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge import config as cfg
from edge.errors import ConfigError, ModelError, SourceError
from edge.frames import BadImage, decode_image
from edge.messages import TOPICS, MessageError, decode
from edge.modelmeta import parse_metadata
from edge.replay import ReplaySource

EXAMPLES = int(os.environ.get("CYTOEDGE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

toml_scalars = st.one_of(st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True), st.text(max_size=30))
known_keys = st.sampled_from([(section, key) for section, keys in cfg.all_rules().items() for key in keys])


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return (
            "nan"
            if value != value
            else ("inf" if value == float("inf") else "-inf" if value == float("-inf") else repr(value))
        )
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)


@FUZZ
@given(st.lists(st.tuples(known_keys, toml_scalars), max_size=6))
def test_any_typed_config_value_is_accepted_or_refused_by_name(tmp_path_factory, entries) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("cfg")
    sections: dict[str, dict[str, str]] = {}
    for (section, key), value in entries:
        sections.setdefault(section, {})[key] = toml_value(value)
    text = "".join(f"[{s}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) for s, keys in sections.items())
    file = folder / "c.toml"
    file.write_text(text)
    try:
        cfg.load(file)
    except ConfigError as exc:
        assert str(file) in str(exc)


@FUZZ
@given(st.binary(max_size=400))
def test_arbitrary_bytes_as_config_never_crash(tmp_path_factory, data: bytes) -> None:  # type: ignore[no-untyped-def]
    file = tmp_path_factory.mktemp("cfg") / "c.toml"
    file.write_bytes(data)
    try:
        loaded = cfg.load(file)
    except ConfigError as exc:
        assert str(file) in str(exc) and "\n" not in str(exc)
    else:
        assert set(loaded) == set(cfg.all_rules())


SAMPLE_JPEG = (Path(__file__).resolve().parents[1] / "samples" / "bccd" / "BloodImage_00007.jpg").read_bytes()


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=2000),
        st.integers(0, len(SAMPLE_JPEG)).map(lambda n: SAMPLE_JPEG[:n]),
        st.tuples(st.integers(200, len(SAMPLE_JPEG) - 1), st.integers(0, 255)).map(
            lambda flip: SAMPLE_JPEG[: flip[0]] + bytes([flip[1]]) + SAMPLE_JPEG[flip[0] + 1 :]
        ),
    )
)
def test_damaged_image_bytes_decode_or_are_refused(data: bytes) -> None:
    try:
        image = decode_image(data, "fuzz.jpg", max_pixels=2_000_000)
    except BadImage as exc:
        assert "fuzz.jpg" in str(exc)
    else:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


@FUZZ
@given(st.integers(1, 70000), st.integers(1, 70000))
def test_images_declaring_huge_sizes_are_refused_before_decoding(width: int, height: int) -> None:
    png = bytearray(
        b"\x89PNG\r\n\x1a\n"
        + (13).to_bytes(4, "big")
        + b"IHDR"
        + width.to_bytes(4, "big")
        + height.to_bytes(4, "big")
        + bytes([8, 2, 0, 0, 0])
        + b"\0\0\0\0"
    )
    png += b"\0\0\0\0IEND\xaeB`\x82"
    try:
        decode_image(bytes(png), "huge.png", max_pixels=1_000_000)
    except BadImage as exc:
        if width * height > 1_000_000:
            assert "exceeds" in str(exc)


index_lines = st.one_of(
    st.text(max_size=60),
    st.builds(
        lambda f, t: json.dumps({"frame": f, "t": t}),
        st.text(max_size=20),
        st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=5), st.none()),
    ),
    st.just(json.dumps({"frame": "frames/0.jpg", "t": 1.0})),
    st.just(json.dumps({"frame": "../../etc/passwd", "t": 1.0})),
)


@FUZZ
@given(st.lists(index_lines, max_size=8))
def test_recorded_session_index_lines_play_or_are_skipped(tmp_path_factory, lines: list[str]) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("session")
    (folder / "frames").mkdir()
    (folder / "frames" / "0.jpg").write_bytes(SAMPLE_JPEG)
    (folder / "index.jsonl").write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    source = ReplaySource(folder, pace="max")
    try:
        frames = list(source.frames(threading.Event()))
    except SourceError:
        return
    good = sum(1 for line in lines if line == json.dumps({"frame": "frames/0.jpg", "t": 1.0}))
    assert len(frames) == good
    assert source.stats.read == good


metadata_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10,
)
VALID_META = {
    "name": "m",
    "version": "1",
    "classes": ["a", "b"],
    "input_size": 64,
    "mean": [0.5] * 3,
    "std": [0.2] * 3,
    "um_per_px": 0.5,
    "field_um": 36.0,
}


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from([*VALID_META, "temperature", "channel_order", "format", "extra"]), metadata_values, max_size=10
    )
)
def test_model_metadata_is_parsed_or_refused_with_a_reason(changes: dict) -> None:
    text = json.dumps({**VALID_META, **changes}, default=str)
    try:
        meta = parse_metadata(text, "fuzz.onnx")
    except ModelError as exc:
        assert "fuzz.onnx" in str(exc)
    else:
        assert meta.input_size >= 8 and meta.temperature > 0 and len(meta.classes) >= 1


@FUZZ
@given(st.binary(max_size=300))
def test_model_metadata_garbage_is_refused(data: bytes) -> None:
    try:
        meta = parse_metadata(data.decode("utf-8", errors="replace"), "fuzz.onnx")
    except ModelError as exc:
        assert str(exc).startswith("fuzz.onnx:")
    else:
        assert meta.classes


message_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(),
        st.text(max_size=10),
        st.binary(max_size=10),
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20,
)


@FUZZ
@given(
    st.sampled_from([*TOPICS, b"junk"]),
    st.one_of(st.binary(max_size=200), message_values.map(lambda v: msgpack.packb(v))),
)
def test_arriving_messages_decode_or_raise_message_error(topic: bytes, data: bytes) -> None:
    try:
        payload = decode(topic, data, max_bytes=10_000)
    except MessageError:
        return
    assert isinstance(payload, dict) and "schema" in payload


VALID_CELLS = {
    "schema": "cytoedge.cells/1",
    "run": "r",
    "seq": 3,
    "frame_id": 3,
    "captured_at": 1.0,
    "published_at": 2.0,
    "source": "s",
    "model": "m",
    "cells": [
        {
            "id": 0,
            "bbox": [1, 2, 3, 4],
            "kind": "wbc",
            "label": "neutrophil",
            "probs": {"neutrophil": 0.9, "monocyte": 0.1},
            "uncertainty": 0.2,
            "anomaly": 0.1,
            "review": False,
        },
        {
            "id": 1,
            "bbox": [5, 6, 7, 8],
            "kind": "rbc",
            "label": None,
            "probs": None,
            "uncertainty": None,
            "anomaly": None,
            "review": False,
        },
    ],
}


@st.composite
def mutated_cells(draw: st.DrawFn) -> dict:
    """A valid message with a few fields removed or replaced: the realistic shape of a buggy peer."""
    message = json.loads(json.dumps(VALID_CELLS))
    cells = message["cells"]
    for _ in range(draw(st.integers(1, 4))):
        target = message if draw(st.booleans()) else cells[draw(st.integers(0, 1))]
        if not target:
            continue
        key = draw(st.sampled_from(sorted(target)))
        if draw(st.booleans()):
            del target[key]
        else:
            target[key] = draw(message_values)
    return message


@FUZZ
@given(mutated_cells())
def test_mutated_cells_messages_are_refused_or_safe_for_subscribers(message: dict) -> None:
    from edge.commands.watch import Differential

    try:
        payload = decode(b"cells", msgpack.packb(message, use_bin_type=True))
    except MessageError:
        return
    differential = Differential()
    differential.add(payload)
    differential.render(None)


@FUZZ
@given(
    st.sampled_from([*TOPICS, b"junk"]),
    st.one_of(
        st.binary(max_size=300),
        message_values.map(lambda v: msgpack.packb(v)),
        mutated_cells().map(lambda m: msgpack.packb(m, use_bin_type=True)),
    ),
)
def test_display_state_counts_or_skips_whatever_arrives(tmp_path_factory, topic: bytes, data: bytes) -> None:  # type: ignore[no-untyped-def]
    from edge.display.state import DisplayState

    state = DisplayState(tmp_path_factory.mktemp("sessions"))
    before = state.malformed
    applied = state.handle_raw(topic, data)
    assert applied or state.malformed == before + 1
    snapshot = state.snapshot()
    json.dumps(snapshot, default=str)  # what the page gets is always serialisable
    assert isinstance(snapshot, dict)

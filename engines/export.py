"""Export a torch classifier to the ONNX file the edge runtime loads, with its ``cytoedge`` metadata.

Reusable for every model: the network must take ``image`` (N, 3, S, S) float32 normalised as the
metadata says and return ``logits`` (N, C) (plus any extra heads the metadata names). The batch axis
is dynamic because the runtime sends one batch per frame with however many cells it found.

Re-stamp metadata on an existing file (e.g. a new temperature) without re-exporting::

    python -m engines.export set-metadata engines/models/baseline-cnn/model.onnx --temperature 1.2
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
from pathlib import Path

import numpy as np

from edge.modelmeta import METADATA_KEY, ModelMetadata, parse_metadata
from engines.pbc import atomic_write_bytes

OPSET = 17


def make_metadata(*, name: str, version: str, classes: list[str], input_size: int, mean: list[float],
                  std: list[float], field_um: float, kind: str, temperature: float = 1.0,
                  **extra: object) -> ModelMetadata:
    """Build and validate metadata; ``um_per_px`` follows from the field so the two never disagree."""
    meta = ModelMetadata(
        name=name, version=version, classes=list(classes), input_size=int(input_size),
        mean=[float(v) for v in mean], std=[float(v) for v in std],
        um_per_px=round(field_um / input_size, 6), field_um=float(field_um), channel_order="RGB",
        temperature=float(temperature), kind=kind, **extra,  # type: ignore[arg-type]
    )
    return parse_metadata(meta.to_json(), name)


def replace(meta: ModelMetadata, **changes: object) -> ModelMetadata:
    """A changed copy, validated again so a bad value fails here and not on the device."""
    new = dataclasses.replace(meta, **changes)  # type: ignore[arg-type]
    return parse_metadata(new.to_json(), meta.name)


def _set_props(model: object, meta: ModelMetadata) -> None:
    props = model.metadata_props  # type: ignore[attr-defined]
    for i in reversed(range(len(props))):
        if props[i].key == METADATA_KEY:
            del props[i]
    entry = props.add()
    entry.key, entry.value = METADATA_KEY, meta.to_json()


def export_onnx(model: object, path: Path, meta: ModelMetadata, opset: int = OPSET) -> Path:
    """Trace ``model`` (eval mode, CPU) to ONNX with a dynamic batch, stamp metadata, write atomically,
    and check that ONNX Runtime reproduces torch's logits before anyone can ship the file."""
    import onnx
    import torch

    model.eval()  # type: ignore[attr-defined]
    model = model.to(memory_format=torch.contiguous_format)  # type: ignore[attr-defined]
    size = meta.input_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    outputs = [n for n in (meta.logits_output, meta.uncertainty_output, meta.anomaly_output) if n]
    buffer = io.BytesIO()
    with torch.no_grad():
        # The TorchScript exporter keeps small CNNs as a single self-contained file with plain ops.
        torch.onnx.export(
            model, (example,), buffer, input_names=[meta.input_name], output_names=outputs,
            dynamic_axes={meta.input_name: {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
            opset_version=opset, do_constant_folding=True, dynamo=False,
        )
        expected = model(example)  # type: ignore[operator]
    proto = onnx.load_from_string(buffer.getvalue())
    _set_props(proto, meta)
    proto.producer_name = "cytoedge-engines"
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    _check_runtime(data, meta, example.numpy(), expected if not isinstance(expected, tuple) else expected[0])
    atomic_write_bytes(Path(path), data)
    return Path(path)


def _check_runtime(data: bytes, meta: ModelMetadata, example: np.ndarray, expected: object) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run([meta.logits_output], {meta.input_name: example.astype(np.float32)})[0]
    want = expected.detach().numpy()  # type: ignore[attr-defined]
    if got.shape != want.shape or not np.allclose(got, want, atol=1e-3, rtol=1e-3):
        raise RuntimeError(f"ONNX Runtime disagrees with torch: max |diff| {np.abs(got - want).max():.2e}")


def read_metadata(path: Path) -> ModelMetadata:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise ValueError(f"{path} has no '{METADATA_KEY}' metadata")
    return parse_metadata(props[METADATA_KEY], str(path))


def write_metadata(path: Path, meta: ModelMetadata) -> None:
    """Replace the metadata in an existing ONNX file in place (atomically); the weights are untouched."""
    import onnx

    proto = onnx.load(str(path))
    _set_props(proto, meta)
    atomic_write_bytes(Path(path), proto.SerializeToString())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.export", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print a model's metadata")
    show.add_argument("model", type=Path)
    stamp = sub.add_parser("set-metadata", help="change metadata fields of an exported model")
    stamp.add_argument("model", type=Path)
    stamp.add_argument("--temperature", type=float)
    stamp.add_argument("--version")
    stamp.add_argument("--field-um", type=float)
    args = parser.parse_args(argv)
    meta = read_metadata(args.model)
    if args.command == "set-metadata":
        changes: dict[str, object] = {}
        if args.temperature is not None:
            changes["temperature"] = args.temperature
        if args.version:
            changes["version"] = args.version
        if args.field_um is not None:
            changes["field_um"] = args.field_um
            changes["um_per_px"] = round(args.field_um / meta.input_size, 6)
        meta = replace(meta, **changes)
        write_metadata(args.model, meta)
    print(json.dumps(json.loads(meta.to_json()), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

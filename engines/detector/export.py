"""Export the trained detector to ONNX with its metadata, thresholds fitted on validation frames.

    python -m engines.detector.export --weights .cache/detector/full/weights.pt \\
        --out engines/models/detector-v1/model.onnx

The per-class heat-map thresholds are chosen on the **val** frames of the microscopes the model
trained on (F1 per class at IoU 0.5, at each source's true scale), never on test frames. Height and
width are dynamic (any frame size); the file is checked against torch with ONNX Runtime before it
is written (then renamed).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys
from pathlib import Path

import numpy as np

from edge.fileutil import atomic_write
from edge.learnedfinder import CLASSES, METADATA_KEY, DetectorMetadata, decode, network_input, to_work_scale
from engines.detector.dataset import Labelled, load
from engines.detector.model import STRIDE, CenterNetLite
from engines.finder.bccd import match

OPSET = 17
GRID = (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)


def load_model(weights: Path) -> tuple[CenterNetLite, dict]:
    import torch

    state = torch.load(weights, weights_only=False)
    model = CenterNetLite(width=state["preset"]["width"])
    model.load_state_dict(state["model"])
    model.eval()
    return model, state


def raw_outputs(model: CenterNetLite, items: list[Labelled], meta: DetectorMetadata) -> list[tuple]:
    """Per frame: the network's heat/size/offset (cropped to the frame) and its work scale."""
    import torch

    out = []
    with torch.no_grad():
        for item in items:
            small, scale = to_work_scale(item.image, item.um_per_px, meta.work_um_per_px)
            heat, size, offset = (t[0].numpy() for t in model(torch.from_numpy(network_input(small, meta))))
            oh, ow = -(-small.shape[0] // STRIDE), -(-small.shape[1] // STRIDE)
            out.append((heat[:, :oh, :ow], size[:, :oh, :ow], offset[:, :oh, :ow], scale))
    return out


def fit_thresholds(model: CenterNetLite, items: list[Labelled], meta: DetectorMetadata) -> dict[str, float]:
    """Each class's threshold maximising its F1 at IoU 0.5 over ``items`` (validation frames)."""
    outputs = raw_outputs(model, items, meta)
    chosen = {}
    for kind in CLASSES:
        best = (-1.0, 0.3)
        for threshold in GRID:
            trial = dataclasses.replace(meta, thresholds={k: threshold for k in CLASSES})
            tp = found = truth = 0
            for item, (heat, size, offset, scale) in zip(items, outputs, strict=True):
                mine = [d for d in decode(heat, size, offset, trial, scale, item.image.shape[:2]) if d.kind == kind]
                tp += match(mine, item.boxes.get(kind, []))
                found += len(mine)
                truth += len(item.boxes.get(kind, []))
            f1 = 2 * tp / max(1, found + truth)
            if f1 > best[0]:
                best = (f1, threshold)
        chosen[kind] = best[1]
        print(f"{kind}: threshold {best[1]} (val F1 {best[0]:.3f})", flush=True)
    return chosen


def export(weights: Path, out: Path, name: str, version: str) -> DetectorMetadata:
    import onnx
    import onnxruntime as ort
    import torch

    model, state = load_model(weights)
    preset = state["preset"]
    meta = DetectorMetadata(name=name, version=version, classes=list(CLASSES),
                            work_um_per_px=preset["work_um_per_px"], stride=STRIDE, thresholds={})
    val = load("val", tuple(state["sources"]), preset.get("frames_per_source"))  # all of them, but in smoke runs
    meta = dataclasses.replace(meta, thresholds=fit_thresholds(model, val, meta))
    example = torch.from_numpy(np.random.default_rng(0).normal(0, 0.5, (1, 3, 128, 160)).astype(np.float32))
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model, (example,), buffer, input_names=[meta.input_name], output_names=meta.outputs,
                          dynamic_axes={meta.input_name: {2: "height", 3: "width"},
                                        **{o: {2: "h", 3: "w"} for o in meta.outputs}},
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
        expected = model(example)[0].numpy()
    proto = onnx.load_from_string(buffer.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, meta.to_json()
    proto.producer_name = "cytoedge-engines"
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    got = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(["heat"], {"od": example.numpy()})[0]
    if not np.allclose(got, expected, atol=1e-4):
        raise RuntimeError(f"ONNX Runtime disagrees with torch: max |diff| {np.abs(got - expected).max():.2e}")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, data)
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name", default="detector")
    parser.add_argument("--version", default="1")
    args = parser.parse_args(argv)
    meta = export(args.weights, args.out, args.name, args.version)
    print(f"wrote {args.out}: thresholds {meta.thresholds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

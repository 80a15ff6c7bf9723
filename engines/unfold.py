"""Torch weights for an exported model whose training checkpoint is gone: unfold its ONNX file.

``cytoedge adapt`` starts from ``weights.pt`` beside a model. The shipped student-v1 was exported
before its checkpoint was kept, and the exporter folds every BatchNorm into the convolution before
it (``do_constant_folding``), so the ONNX file holds ``W' = γ/σ·W`` and ``b' = β − γμ/σ`` only. Any
split of those back into a convolution and a BatchNorm computes the same function; the one chosen
here keeps what adaptation relies on: each BatchNorm's running statistics are the per-channel mean
and variance of its convolution's output over PBC training crops (what the trained layer's running
statistics estimated) and its affine parameters map them back onto the folded output. Re-estimating
the statistics on a site's crops (AdaBN) then moves the site's channel moments onto PBC's, exactly as
it does for a network whose BatchNorms were never folded.

    python -m engines.unfold engines/models/student-v1/model.onnx   # writes weights.pt beside it

The result is checked against ONNX Runtime on PBC crops before it is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge.modelmeta import ModelMetadata


def _conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """Every convolution with the BatchNorm that follows it, in the order the forward pass runs them."""
    order: list[nn.Conv2d] = []
    hooks = [m.register_forward_hook(lambda mod, *_: order.append(mod)) for m in model.modules()
             if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()
        model(torch.zeros(1, 3, 64, 64))
    for hook in hooks:
        hook.remove()
    modules = list(model.modules())
    following = {id(m): modules[i + 1] for i, m in enumerate(modules[:-1])}
    pairs = []
    for conv in order:
        norm = following.get(id(conv))
        if not isinstance(norm, nn.BatchNorm2d):
            raise ValueError(f"convolution {conv} is not followed by a BatchNorm")
        pairs.append((conv, norm))
    return pairs


def _folded_convs(onnx_path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight, bias) of each Conv node, in graph order."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(onnx_path))
    init = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    convs = []
    for node in proto.graph.node:
        if node.op_type == "Conv":
            if len(node.input) < 3:
                raise ValueError(f"{onnx_path}: a Conv without bias; the file's BatchNorms were not folded")
            convs.append((init[node.input[1]], init[node.input[2]]))
    return convs


def _plain_linears(onnx_path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(onnx_path))
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer if not i.name.startswith("onnx::")}


@torch.no_grad()
def unfold(model: nn.Module, onnx_path: Path, crops_bgr: np.ndarray, meta: ModelMetadata,
           batch: int = 256) -> nn.Module:
    """Load ``onnx_path``'s folded weights into ``model`` (same architecture as exported), with BatchNorm
    statistics measured on ``crops_bgr`` (uint8 BGR crops, as the runtime is given them)."""
    from engines.baseline import normalise, to_tensor

    pairs = _conv_bn_pairs(model)
    folded = _folded_convs(onnx_path)
    if len(pairs) != len(folded):
        raise ValueError(f"{onnx_path} has {len(folded)} convolutions, the network {len(pairs)}")
    named = _plain_linears(onnx_path)
    state = model.state_dict()
    for key, value in named.items():
        if key not in state or tuple(state[key].shape) != value.shape:
            raise ValueError(f"{onnx_path}: initializer {key} {value.shape} does not fit the network")
        state[key] = torch.from_numpy(value.copy())
    model.load_state_dict(state)
    for (conv, norm), (weight, bias) in zip(pairs, folded, strict=True):
        if tuple(conv.weight.shape) != weight.shape:
            raise ValueError(f"{onnx_path}: conv {weight.shape} does not fit {tuple(conv.weight.shape)}")
        conv.weight.copy_(torch.from_numpy(weight.copy()))
        # First an exact identity BatchNorm (output = conv + folded bias) so later layers see the true inputs.
        norm.running_mean.zero_()
        norm.running_var.fill_(1.0 - norm.eps)
        norm.weight.fill_(1.0)
        norm.bias.copy_(torch.from_numpy(bias.copy()))
    sums = {id(c): [0.0, 0.0, 0] for c, _ in pairs}

    def record(conv: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        acc = sums[id(conv)]
        acc[0] = acc[0] + output.double().sum((0, 2, 3))
        acc[1] = acc[1] + (output.double() ** 2).sum((0, 2, 3))
        acc[2] += output.shape[0] * output.shape[2] * output.shape[3]

    hooks = [conv.register_forward_hook(record) for conv, _ in pairs]
    model.eval()
    for i in range(0, len(crops_bgr), batch):
        model(normalise(to_tensor(crops_bgr[i:i + batch]), meta.mean, meta.std))
    for hook in hooks:
        hook.remove()
    for conv, norm in pairs:
        total, squares, n = sums[id(conv)]
        mean = total / n
        var = (squares / n - mean ** 2).clamp_min(1e-8)
        norm.running_mean.copy_(mean.float())
        norm.running_var.copy_((var - norm.eps).clamp_min(1e-8).float())
        norm.weight.copy_(torch.sqrt(norm.running_var + norm.eps))
        norm.bias.add_(mean.float())
    return model


def network_for(meta: ModelMetadata, onnx_path: Path) -> nn.Module:
    """A fresh network of the architecture the file was exported from (the student or the baseline)."""
    from engines.baseline import BaselineCNN
    from engines.distill import Student

    names = set(_plain_linears(onnx_path))
    if "aux.weight" in names:
        return Student(len(meta.classes))
    if "head.weight" in names:
        return BaselineCNN(len(meta.classes))
    raise ValueError(f"{onnx_path}: neither a student nor a baseline network")


def max_difference(model: nn.Module, onnx_path: Path, crops_bgr: np.ndarray) -> float:
    """Largest |logit| difference between the torch network and ONNX Runtime on the same crops."""
    from edge.onnx_backend import OnnxRuntimeClassifier
    from engines.adapt import class_logits
    from engines.baseline import normalise, to_tensor
    from engines.evaluate import onnx_logits

    meta = OnnxRuntimeClassifier(onnx_path, threads=1).metadata
    with torch.no_grad():
        ours = class_logits(model, normalise(to_tensor(crops_bgr), meta.mean, meta.std)).numpy()
    return float(np.abs(ours - onnx_logits(onnx_path, crops_bgr)).max())


BEGIN = "<!-- cytoedge:weights:begin -->"
END = "<!-- cytoedge:weights:end -->"


def record_in_card(model_dir: Path, info: dict) -> None:
    """card.json ``adaptation_weights`` and a marked block of card.md saying where weights.pt came from."""
    import json
    import re

    from engines import pbc

    card_path = model_dir / "card.json"
    card = json.loads(card_path.read_text(encoding="utf-8")) if card_path.is_file() else {}
    card["adaptation_weights"] = info
    pbc.atomic_write_json(card_path, card)
    section = "\n".join([
        BEGIN, "## Weights for `cytoedge adapt`", "",
        f"- `{info['file']}` beside `model.onnx`: {info['method']}. The exporter had folded each BatchNorm into its "
        "convolution; the unfolded network keeps the folded weights and gives each BatchNorm the per-channel "
        f"statistics of its convolution's output over {info['batchnorm_statistics_from']}, so re-estimating them on "
        "a site's crops means what it means for the baselines.",
        f"- Checked against ONNX Runtime on {info['checked_on']}: max |logit difference| "
        f"{info['max_logit_difference_to_onnx']:.1e}. `replay.npz`: the same 50 PBC training crops per class as the "
        "baselines ship (engines.adapt.replay_set).", "", END])
    md_path = model_dir / "card.md"
    text = md_path.read_text(encoding="utf-8") if md_path.is_file() else f"# Model card: {model_dir.name}\n"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section + "\n"
    pbc.atomic_write_text(md_path, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.unfold", description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="model.onnx; weights.pt is written beside it")
    parser.add_argument("--data", type=Path, default=None, help="PBC folder (default ../shared/data/pbc)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from edge.onnx_backend import OnnxRuntimeClassifier
    from engines import pbc
    from engines.baseline import WEIGHTS_FILE, TrainConfig, prepare_data, save_weights

    meta = OnnxRuntimeClassifier(args.model, threads=1).metadata
    data = prepare_data(pbc.data_dir(args.data), TrainConfig())
    train, val = data.images["train"], data.images["val"]
    model = network_for(meta, args.model)
    unfold(model, args.model, train, meta)
    diff = max_difference(model, args.model, val)
    if diff > 1e-3:
        print(f"unfolded network differs from {args.model} by {diff:.2e} in the logits", file=sys.stderr)
        return 1
    save_weights(model, args.model.with_name(WEIGHTS_FILE))
    record_in_card(args.model.parent, {"file": WEIGHTS_FILE, "method": "unfolded from model.onnx (engines.unfold)",
                                       "batchnorm_statistics_from": f"{len(train)} PBC training crops",
                                       "max_logit_difference_to_onnx": float(f"{diff:.2e}"),
                                       "checked_on": f"{len(val)} PBC validation crops",
                                       "split_sha256": data.split_summary["sha256"]})
    print(f"wrote {args.model.with_name(WEIGHTS_FILE)}: BatchNorm statistics from {len(train)} PBC training crops; "
          f"max |logit difference| to ONNX Runtime on {len(val)} validation crops {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

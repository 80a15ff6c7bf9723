"""The baseline classifier: a small ResNet trained on PBC crops on the CPU, then exported and carded.

Rebuild the shipped model (about 15 minutes on two cores)::

    python -m engines.baseline train --data ../shared/data/pbc --out engines/models/baseline-cnn

``--preset smoke`` trains on a tiny subset in about a minute (CI). A run checkpoints every epoch
under ``.cache/baseline/``; ``--resume`` continues an interrupted run with the same data order.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from calibration.temperature import fit_temperature
from edge.classifier import hide_context
from engines import pbc
from engines.amplitude_mix import amplitude_mix
from engines.augment import augment_batch
from engines.style_mix import DONORS, StyleMix, set_batch

INPUT_SIZE = 64
# PBC crops are 144 px over a ~36 µm field (see docs/models.md for the red-cell measurement).
FIELD_UM = 36.0
SCALE_NOTE = (
    "36 µm field (0.5625 µm/px at 64 px; 0.25 µm/px in the 144 px crops). Checked with "
    "engines.pbc.measure_red_cell_px: isolated red cells are 29.5-31 px across (median; 60 neutrophil and "
    "60 lymphocyte crops, n=256 cells), i.e. 0.24-0.25 µm/px for a 7.5 µm red cell, a 35-37 µm field."
)


# --------------------------------------------------------------------------------------------- model
NORMS = ("batch", "group", "layer")
INPUT_NORMS = ("none", "plasma", "plasma-ratio")


def make_norm(kind: str, channels: int) -> nn.Module:
    """BatchNorm (the shipped models), GroupNorm with 8 groups, or layer norm (one group over all channels
    and positions): the latter two keep no batch statistics, so nothing learnt about PBC's channel moments
    is frozen into inference (Tsutsui et al. 2023: BatchNorm models collapse under stain shift, GroupNorm
    ones much less). A robustness lever, measured in docs/robustness.md."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(8, channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    raise ValueError(f"unknown normalisation {kind!r} (one of {NORMS})")


class LowPass(nn.Module):
    """Keeps only what a ``resolution``-pixel crop of the same field would show: box-average down, bilinear
    back up to the input size. The network (and its cost) is unchanged; what it can learn from is not: PBC's
    sharp granules and chromatin texture, which softer optics (BCCD's frames) do not resolve, are gone in
    training and at run time alike (part of the exported graph)."""

    def __init__(self, resolution: int, size: int = INPUT_SIZE) -> None:
        super().__init__()
        if resolution <= 0 or size % resolution:
            raise ValueError(f"resolution {resolution} must divide the input size {size}")
        self.factor = size // resolution
        self.down = nn.AvgPool2d(self.factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.down(x), scale_factor=self.factor, mode="bilinear", align_corners=False)


class Grey(nn.Module):
    """Keeps only the luminance (Rec. 601 weights) of a mean/std-normalised RGB crop, repeated in all three
    channels and normalised again: hue and saturation, which differ most between stains and cameras, cannot
    be learnt, in training and at run time alike (part of the exported graph). An invariance by construction,
    where colour augmentation only teaches one."""

    WEIGHTS = (0.299, 0.587, 0.114)

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([float(v) for v in mean]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([float(v) for v in std]).view(1, 3, 1, 1))
        self.register_buffer("weights", torch.tensor(self.WEIGHTS).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        luminance = ((x * self.std + self.mean) * self.weights).sum(1, keepdim=True)
        return (luminance - self.mean) / self.std


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual path; a 1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str = "batch") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = make_norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = make_norm(norm, cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), make_norm(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class BaselineCNN(nn.Module):
    """ResNet-style net for 64 px crops: a stride-2 stem (full-resolution convolutions cost 4x on a CPU
    for little gain at this size), four residual stages, global average pooling, linear logits."""

    def __init__(self, num_classes: int, stem: int = 24, widths: tuple[int, ...] = (32, 64, 128, 192),
                 norm: str = "batch", input_norm: str = "none", pixel_mean: list[float] | None = None,
                 pixel_std: list[float] | None = None, style: str = "none", resolution: int = INPUT_SIZE,
                 colour: str = "rgb") -> None:
        super().__init__()
        # What save_weights records to rebuild it (style mixing holds no weights and is for training only).
        self.options: dict = {"norm": norm, "resolution": resolution}
        # colour "grey": luminance only, in the graph (a robustness lever)
        self.grey: nn.Module | None = None
        if colour == "grey":
            self.grey = Grey(*self._pixel_stats(pixel_mean, pixel_std, "colour='grey'"))
            self.options["colour"] = colour
        elif colour != "rgb":
            raise ValueError(f"unknown colour {colour!r} (rgb or grey)")
        # resolution < INPUT_SIZE: the crop's detail is limited to that many pixels across, in the graph
        self.low_pass: nn.Module | None = LowPass(resolution) if resolution != INPUT_SIZE else None
        # input_norm "plasma": optical density against each crop's own plasma, in the graph
        # (engines.plasma_norm; needs the metadata's mean/std to undo the runtime's normalisation).
        self.plasma: nn.Module | None = None
        if input_norm in ("plasma", "plasma-ratio"):  # "plasma-ratio": pixel / plasma, no logarithm (a control)
            from engines.plasma_norm import PlasmaNorm

            mean, std = self._pixel_stats(pixel_mean, pixel_std, f"input_norm={input_norm!r}")
            self.plasma = PlasmaNorm(mean, std, mode="ratio" if input_norm == "plasma-ratio" else "od")
            self.options["input_norm"] = input_norm
        elif input_norm != "none":
            raise ValueError(f"unknown input normalisation {input_norm!r} (one of {INPUT_NORMS})")
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, 2, 1, bias=False), make_norm(norm, stem), nn.ReLU())
        blocks, cin = [], stem
        for i, width in enumerate(widths):
            blocks.append(BasicBlock(cin, width, 1 if i == 0 else 2, norm))
            cin = width
        self.blocks = nn.Sequential(*blocks)
        # style "batch"/"foreign": feature-style mixing after the stem and the first two stages, in training
        # only (engines.style_mix; no parameters, absent from the exported graph).
        self.styles = nn.ModuleList()
        if style != "none":
            if style not in DONORS:
                raise ValueError(f"unknown style mixing {style!r} (one of {DONORS})")
            self.styles = nn.ModuleList(StyleMix() for _ in range(3))
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(cin, num_classes)

    def _pixel_stats(self, pixel_mean: list[float] | None, pixel_std: list[float] | None,
                     needed_by: str) -> tuple[list[float], list[float]]:
        """The runtime's normalisation, which an in-graph input layer must undo; recorded in ``options`` so
        save_weights can rebuild that layer."""
        if pixel_mean is None or pixel_std is None:
            raise ValueError(f"{needed_by} needs pixel_mean and pixel_std")
        mean, std = [float(v) for v in pixel_mean], [float(v) for v in pixel_std]
        self.options.update(pixel_mean=mean, pixel_std=std)
        return mean, std

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """Pooled features before the head (a student's extra heads read them too)."""
        if self.grey is not None:
            image = self.grey(image)
        if self.low_pass is not None:
            image = self.low_pass(image)
        if self.plasma is not None:
            image = self.plasma(image)
        if not len(self.styles):
            x = self.blocks(self.stem(image))
        else:
            x = self.styles[0](self.stem(image))
            for i, block in enumerate(self.blocks):
                x = block(x)
                if i + 1 < len(self.styles):
                    x = self.styles[i + 1](x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(image)))


WEIGHTS_FILE = "weights.pt"  # beside model.onnx: what `cytoedge adapt` starts from


def save_weights(model: nn.Module, path: Path) -> None:
    """State dict plus the architecture and its constructor arguments, so ``engines.adapt.load_weights``
    needs nothing else. A student (``engines.distill.Student``) wraps this network as ``body``."""
    body = getattr(model, "body", model)
    buffer = io.BytesIO()
    torch.save({"architecture": type(model).__name__, "num_classes": body.head.out_features,
                "stem": body.stem[0].out_channels, "widths": [block.conv2.out_channels for block in body.blocks],
                "options": getattr(model, "options", {}), "state_dict": model.state_dict()}, buffer)
    pbc.atomic_write_bytes(Path(path), buffer.getvalue())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------- augmentation
def _hue_matrices(angles: torch.Tensor) -> torch.Tensor:
    """RGB rotation about the grey axis: a cheap, linear hue shift that keeps grey grey."""
    cos, sin = torch.cos(angles), torch.sin(angles)
    third, root = 1.0 / 3.0, math.sqrt(1.0 / 3.0)
    a = cos + (1.0 - cos) * third
    b = third * (1.0 - cos) - root * sin
    c = third * (1.0 - cos) + root * sin
    rows = [torch.stack(r, -1) for r in ((a, b, c), (c, a, b), (b, c, a))]
    return torch.stack(rows, -2)  # (N, 3, 3)


def augment(x: torch.Tensor, gen: torch.Generator, shift: int = 3) -> torch.Tensor:
    """Light, label-preserving changes for (N, 3, H, W) RGB in [0, 1]: the dihedral group (cells have no
    up or down), a few pixels of shift (the finder's crops are not perfectly centred), and small
    brightness/contrast/hue jitter (lamp and stain vary between slides)."""
    n = x.shape[0]
    rand = torch.rand(n, 3, generator=gen)
    x = torch.where((rand[:, 0] < 0.5).view(-1, 1, 1, 1), x.flip(-1), x)
    x = torch.where((rand[:, 1] < 0.5).view(-1, 1, 1, 1), x.flip(-2), x)
    x = torch.where((rand[:, 2] < 0.5).view(-1, 1, 1, 1), x.transpose(-1, -2), x)
    if shift:
        size = x.shape[-1]
        padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
        offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=gen)
        x = torch.stack([padded[i, :, oy:oy + size, ox:ox + size] for i, (oy, ox) in enumerate(offsets.tolist())])
    jitter = torch.rand(n, 3, generator=gen) * 2 - 1
    brightness = (1 + 0.10 * jitter[:, 0]).view(-1, 1, 1, 1)
    contrast = (1 + 0.10 * jitter[:, 1]).view(-1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean * brightness
    hue = _hue_matrices(jitter[:, 2] * 0.05 * math.pi)  # up to ±9 degrees
    x = torch.einsum("nij,njhw->nihw", hue, x)
    return x.clamp_(0.0, 1.0)


# ----------------------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    epochs: int = 45
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.05
    seed: int = 0
    threads: int = 2
    stem: int = 24
    widths: tuple[int, ...] = (32, 64, 128, 192)
    exclude_classes: list[str] = field(default_factory=list)
    # Smoke runs: at most this many crops per class and split (0 = all).
    per_class_limit: int = 0
    # "basic": the flips/shift/jitter below only; "robust": engines.augment's lab-to-lab set first.
    augment: str = "basic"
    # > 0: train (and, via the exported metadata, run) on crops whose surroundings outside this centred
    # disc are painted with the plasma colour (edge.classifier.hide_context).
    context_radius: float = 0.0
    norm: str = "batch"  # "group" / "layer": GroupNorm (8 groups / one) instead of BatchNorm (robustness lever)
    resolution: int = INPUT_SIZE  # < INPUT_SIZE: detail limited to this many pixels across (LowPass; a lever)
    colour: str = "rgb"  # "grey": luminance only, in the graph (Grey; a lever)
    input_norm: str = "none"  # "plasma": optical density against each crop's plasma (engines.plasma_norm);
    # "plasma-ratio": pixel / plasma without the logarithm
    style: str = "none"  # "batch" / "foreign": feature-style mixing (engines.style_mix), a robustness lever
    # > 0: weight of a consistency loss on other microscopes' unlabelled white cells (FixMatch, Sohn et al.
    # 2020): the network's confident call on a lightly changed view is the target for a ``strong`` view
    consistency: float = 0.0
    consistency_threshold: float = 0.9
    # > 0: Fourier amplitude mixing with other microscopes' white cells as donors, ratio up to this value
    # (engines.amplitude_mix; training only)
    amplitude_mix: float = 0.0
    # style "foreign" / consistency / amplitude_mix: other microscopes' unlabelled white cells (python -m
    # engines.foreign cut; only its train-frame cells are used), foreign_batch of them per batch riding behind
    # the labelled crops (style and consistency), without the sources named in foreign_exclude
    foreign_cells: str = ""
    foreign_batch: int = 64
    foreign_exclude: tuple[str, ...] = ()
    # "": from scratch; else the weights to start from (a weights.pt beside a shipped model, or a checkpoint)
    init: str = ""

    @property
    def uses_foreign_cells(self) -> bool:
        """Style mixing with foreign donors, consistency or amplitude mixing: the run needs foreign_cells."""
        return self.style == "foreign" or self.consistency > 0 or self.amplitude_mix > 0


@dataclass
class PreparedData:
    classes: list[str]
    mean: list[float]
    std: list[float]
    images: dict[str, np.ndarray]  # split -> (N, S, S, 3) uint8 BGR, the runtime's input
    labels: dict[str, np.ndarray]  # split -> (N,) int64
    paths: dict[str, list[str]]
    split_summary: dict


def prepare_data(root: Path, cfg: TrainConfig, size: int = INPUT_SIZE) -> PreparedData:
    """Decode (cached), split with the shared split, drop excluded classes, fit mean/std on train."""
    samples = pbc.read_manifest(root)
    split = pbc.split_pbc(samples, pbc.SPLIT_SEED)
    summary = pbc.split_summary(samples, split)
    classes = [c for c in pbc.CLASSES if c not in set(cfg.exclude_classes)]
    index = {c: i for i, c in enumerate(classes)}
    images_all = pbc.load_images(root, samples, size)
    images, labels, paths = {}, {}, {}
    for name in pbc.SPLITS:
        chosen: list[int] = []
        taken: dict[str, int] = {}
        for i, sample in enumerate(samples):
            if split[sample.path] != name or sample.label not in index:
                continue
            if cfg.per_class_limit and taken.get(sample.label, 0) >= cfg.per_class_limit:
                continue
            taken[sample.label] = taken.get(sample.label, 0) + 1
            chosen.append(i)
        images[name] = images_all[chosen]
        labels[name] = np.array([index[samples[i].label] for i in chosen], np.int64)
        paths[name] = [samples[i].path for i in chosen]
    rgb = images["train"][..., ::-1].reshape(-1, 3).astype(np.float64) / 255.0
    mean = [round(float(v), 4) for v in rgb.mean(0)]
    std = [round(float(v), 4) for v in rgb.std(0)]
    return PreparedData(classes, mean, std, images, labels, paths, summary)


def to_tensor(batch_bgr: np.ndarray) -> torch.Tensor:
    """uint8 BGR NHWC -> float RGB NCHW in [0, 1]; normalisation is a separate step (see ``normalise``)."""
    rgb = np.ascontiguousarray(batch_bgr[..., ::-1].transpose(0, 3, 1, 2))
    return torch.from_numpy(rgb).float().div_(255.0)


def normalise(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@torch.no_grad()
def predict_logits(model: nn.Module, images_bgr: np.ndarray, mean: list[float], std: list[float],
                   batch: int = 256) -> np.ndarray:
    """Torch-side logits, used only for progress lines; the card's figures come from the ONNX file."""
    model.eval()
    out = [model(normalise(to_tensor(images_bgr[i:i + batch]), mean, std)).numpy()
           for i in range(0, len(images_bgr), batch)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def run_key(cfg: TrainConfig, data: PreparedData) -> str:
    import hashlib

    config = asdict(cfg)
    if config["augment"] == "basic":
        del config["augment"]  # keeps the keys (and --resume) of runs made before the option existed
    if not config["context_radius"]:
        del config["context_radius"]
    if config["norm"] == "batch":
        del config["norm"]
    if config["input_norm"] == "none":
        del config["input_norm"]
    if config["resolution"] == INPUT_SIZE:
        del config["resolution"]
    if config["colour"] == "rgb":
        del config["colour"]
    if not config["amplitude_mix"]:
        del config["amplitude_mix"]
    if config["style"] == "none" and not config["consistency"]:
        del config["style"], config["foreign_batch"]
        if not config.get("amplitude_mix"):
            del config["foreign_cells"], config["foreign_exclude"]
    if not config["consistency"]:
        del config["consistency"], config["consistency_threshold"]
    if not config["init"]:
        del config["init"]
    if config.get("foreign_cells"):
        config["foreign_cells"] = Path(config["foreign_cells"]).name  # the run, not where the file lies
    text = json.dumps({"cfg": config, "split": data.split_summary["sha256"],
                       "n": {k: len(v) for k, v in data.labels.items()}}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def network_state(path: str | Path) -> dict:
    """The network's state dict from an epoch checkpoint (``model``) or a shipped ``weights.pt``
    (``state_dict``), or a bare state dict."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state.get("model", state.get("state_dict", state))


def foreign_pool(cfg: TrainConfig) -> np.ndarray | None:
    """Other microscopes' unlabelled white cells, for style mixing, consistency or amplitude mixing (train
    frames only, minus the excluded sources); None when the run uses none of them."""
    if not cfg.uses_foreign_cells:
        return None
    if not cfg.foreign_cells:
        raise ValueError("foreign style mixing, consistency or amplitude mixing needs foreign_cells "
                         "(python -m engines.foreign cut --out FILE)")
    from engines import foreign

    cells = foreign.load(Path(cfg.foreign_cells))
    keep = (cells["split"] == "train") & ~np.isin(cells["source"], list(cfg.foreign_exclude))
    if not keep.any():
        raise ValueError(f"no foreign train-frame cells left in {cfg.foreign_cells} without {cfg.foreign_exclude}")
    return cells["crops"][keep]


@torch.no_grad()
def consistency_targets(model: nn.Module, cells_bgr: np.ndarray, data: PreparedData, gen: torch.Generator,
                        threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FixMatch's pseudo-labels: the network's call on a lightly changed view (flips, shift, light jitter) in
    inference mode, kept (1.0) where its confidence reaches ``threshold``."""
    model.eval()
    weak = normalise(augment(to_tensor(cells_bgr), gen), data.mean, data.std)
    probs = F.softmax(model(weak.contiguous(memory_format=torch.channels_last)), 1)
    model.train()
    confidence, label = probs.max(1)
    return label, (confidence >= threshold).float()


def train(root: Path, cfg: TrainConfig, checkpoint_dir: Path, resume: bool = False,
          log=print) -> tuple[nn.Module, PreparedData, dict]:
    """Train with fixed seeds, one checkpoint per epoch; returns the model, its data and a history."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    data = prepare_data(root, cfg)
    model = BaselineCNN(len(data.classes), cfg.stem, cfg.widths, cfg.norm, cfg.input_norm, data.mean,
                        data.std, cfg.style, cfg.resolution, cfg.colour).to(memory_format=torch.channels_last)
    train_x, train_y = data.images["train"], torch.from_numpy(data.labels["train"])
    pool = foreign_pool(cfg)
    if cfg.init:
        model.load_state_dict(network_state(cfg.init))
        log(f"initialised from {cfg.init}")
    val_x = hide_context(data.images["val"], cfg.context_radius) if cfg.context_radius else data.images["val"]
    steps_per_epoch = max(1, math.ceil(len(train_x) / cfg.batch_size))
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimiser = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=cfg.lr, epochs=cfg.epochs,
                                                    steps_per_epoch=steps_per_epoch, pct_start=0.15)
    ckpt_path = Path(checkpoint_dir) / f"run-{run_key(cfg, data)}.pt"
    history: dict = {"epochs": [], "checkpoint": str(ckpt_path)}
    start = 0
    if resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["scheduler"])
        start, history = state["epoch"], state["history"]
        log(f"resumed from {ckpt_path} after epoch {start}")
    log(f"training {count_params(model):,} params on {len(train_x)} crops, "
        f"{len(data.labels['val'])} val, classes {data.classes}, checkpoint {ckpt_path}")
    for epoch in range(start, cfg.epochs):
        began = time.time()
        model.train()
        # Data order depends only on (seed, epoch), so a resumed run repeats what it would have done.
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(len(train_x), generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            if len(idx) < 2:
                continue
            batch = train_x[idx.numpy()]
            if cfg.amplitude_mix:  # before the colour/optics ops, so they vary around the foreign looks too
                batch = amplitude_mix(batch, pool, np.random.default_rng([cfg.seed, epoch, step, 11]),
                                      cfg.amplitude_mix)
            if cfg.augment != "basic":
                batch = augment_batch(batch, cfg.augment, np.random.default_rng([cfg.seed, epoch, step]))
            if cfg.context_radius:  # after the colour ops, as the runtime hides the context of a foreign crop
                batch = hide_context(batch, cfg.context_radius)
            y = train_y[idx]
            rng = np.random.default_rng([cfg.seed, epoch, step, 7])
            targets = None
            if pool is not None and (cfg.style == "foreign" or cfg.consistency):  # donors ride behind the batch
                extra = pool[rng.integers(0, len(pool), cfg.foreign_batch)]
                if cfg.consistency:
                    targets = consistency_targets(model, extra, data, gen, cfg.consistency_threshold)
                    extra = augment_batch(extra, "strong", rng)
                elif cfg.augment != "basic":
                    extra = augment_batch(extra, cfg.augment, rng)
                batch = np.concatenate([batch, extra])
            if cfg.style != "none":
                set_batch(model, len(y), rng)
            x = augment(to_tensor(batch), gen)
            x = normalise(x, data.mean, data.std).contiguous(memory_format=torch.channels_last)
            outputs = model(x)
            logits = outputs[:len(y)]
            loss = F.cross_entropy(logits, y)
            if targets is not None:
                label, keep = targets
                kept = F.cross_entropy(outputs[len(y):], label, reduction="none") * keep
                loss = loss + cfg.consistency * kept.mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            total += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += loss.item() * len(y)
        val_logits = predict_logits(model, val_x, data.mean, data.std)
        val_acc = float((val_logits.argmax(1) == data.labels["val"]).mean()) if len(val_logits) else float("nan")
        row = {"epoch": epoch + 1, "loss": loss_sum / max(total, 1), "train_acc": correct / max(total, 1),
               "val_acc": val_acc, "seconds": time.time() - began}
        history["epochs"].append(row)
        log(f"epoch {epoch + 1}/{cfg.epochs} loss {row['loss']:.4f} train_acc {row['train_acc']:.4f} "
            f"val_acc {val_acc:.4f} lr {scheduler.get_last_lr()[0]:.2e} {row['seconds']:.1f}s")
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_path.with_suffix(".pt.tmp")
        torch.save({"model": model.state_dict(), "optimiser": optimiser.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "history": history}, tmp)
        tmp.replace(ckpt_path)
    model.eval()
    return model, data, history


# ------------------------------------------------------------------------------------------ presets
PRESETS: dict[str, dict] = {
    "full": {"epochs": 45},
    # About a minute end to end on two cores: enough to prove the pipeline, not to learn much.
    "smoke": {"epochs": 3, "per_class_limit": 64, "batch_size": 64},
}


def build(args: argparse.Namespace) -> int:
    """Train, export to ONNX, fit the temperature on val, evaluate the ONNX file on test, write the card."""
    overrides = dict(PRESETS[args.preset])
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    cfg = TrainConfig(**overrides, seed=args.seed, threads=args.threads,
                      exclude_classes=sorted(args.exclude or []), augment=args.augment,
                      context_radius=args.context_radius)
    root = pbc.data_dir(args.data)
    if not (root / "manifest.csv").is_file():
        print(f"no PBC data at {root} (set --data or CYTOEDGE_PBC)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.time()
    model, data, history = train(root, cfg, pbc.REPO_ROOT / ".cache" / "baseline", resume=args.resume)
    from engines import evaluate, export  # after training, so a broken exporter never costs a run

    train_seconds = sum(row["seconds"] for row in history["epochs"])
    meta = export.make_metadata(
        name=args.name, version=args.version, classes=data.classes, input_size=INPUT_SIZE,
        mean=data.mean, std=data.std, field_um=FIELD_UM, kind="baseline", context_radius=cfg.context_radius,
    )
    onnx_path = out / "model.onnx"
    export.export_onnx(model, onnx_path, meta)
    temperature = fit_temperature(evaluate.onnx_logits(onnx_path, data.images["val"]), data.labels["val"])
    meta = export.replace(meta, temperature=round(temperature, 4))
    export.write_metadata(onnx_path, meta)
    print(f"exported {onnx_path} ({onnx_path.stat().st_size / 1e6:.2f} MB), temperature {meta.temperature}")
    save_weights(model, out / WEIGHTS_FILE)  # what `cytoedge adapt` starts from
    # The command that rebuilds this model; --resume only skips finished epochs, so it is left out.
    command = pbc.portable_command("engines.baseline", [a for a in sys.argv[1:] if a != "--resume"])
    training = {
        "command": command, "preset": args.preset, "config": asdict(cfg), "params": count_params(model),
        "train_seconds": round(train_seconds, 1), "wall_seconds": round(time.time() - began, 1),
        "history": history["epochs"], "threads": cfg.threads, "scale": SCALE_NOTE,
        "architecture": (f"ResNet-style: 3x3/2 stem ({cfg.stem} ch), BasicBlocks {list(cfg.widths)} "
                         "(stride 1,2,2,2), global average pool, dropout 0.1, linear"),
        "optimiser": f"AdamW lr {cfg.lr} wd {cfg.weight_decay}, one-cycle, batch {cfg.batch_size}, "
                     f"{cfg.epochs} epochs, cross-entropy",
        "augmentation": "flips, transpose (90° rotations), ±3 px shift, brightness/contrast ±10%, hue ±9°",
    }
    if cfg.augment != "basic":
        from engines.augment import PIPELINES

        training["augmentation"] = (f"engines.augment '{cfg.augment}' ({PIPELINES[cfg.augment].describe()}; "
                                    "see docs/robustness.md), then " + training["augmentation"])
    if cfg.context_radius:
        training["augmentation"] += (f"; context outside a centred disc of radius {cfg.context_radius:g} × the crop "
                                     "side painted with the plasma colour, in training and at runtime")
    report = evaluate.evaluate_onnx(onnx_path, data.images["test"], data.labels["test"],
                                    timing_repeats=args.timing_repeats)
    evaluate.write_card(out, onnx_path, report, training, data.split_summary)
    pbc.atomic_write_json(out / "split.json", data.split_summary)
    print(evaluate.summary_line(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.baseline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train, export, calibrate, evaluate and write the model card")
    p.add_argument("--data", default=None, help="PBC folder (default $CYTOEDGE_PBC or ../shared/data/pbc)")
    p.add_argument("--out", required=True, help="model folder to write (model.onnx, card.md, card.json)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--exclude", action="append", choices=pbc.CLASSES, help="hold a class out (repeatable)")
    from engines.augment import PIPELINES

    p.add_argument("--augment", choices=["basic", *PIPELINES], default="basic",
                   help="robust: add engines.augment's lab-to-lab set (stain, light, blur, noise, JPEG, scale)")
    p.add_argument("--context-radius", type=float, default=0.0,
                   help="hide everything outside this centred disc (fraction of the crop side) in training and "
                        "at runtime (docs/robustness.md); 0 = the whole crop")
    p.add_argument("--name", default="baseline-cnn")
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--timing-repeats", type=int, default=20)
    p.add_argument("--resume", action="store_true", help="continue from the last epoch checkpoint")
    args = parser.parse_args(argv)
    if args.preset == "smoke" and args.timing_repeats == 20:
        args.timing_repeats = 3
    return build(args)


if __name__ == "__main__":
    raise SystemExit(main())

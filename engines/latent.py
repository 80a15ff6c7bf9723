"""A latent diffusion teacher that converges on a two-core CPU: a small autoencoder, then diffusion in its latent.

CytoDiffusion runs its diffusion in the latent space of Stable Diffusion's autoencoder, not in pixels.
The same at our scale: a convolutional autoencoder (64 px RGB -> 16x16x4, 12x fewer numbers) trained
here on PBC crops under the wide colour and optics augmentation (``engines.augment`` set ``strong``),
so its latent describes a cell's shape and texture more than one analyser's stain; then the class-
conditional UNet of ``engines.diffusion`` (epsilon prediction, cosine schedule, null class
``null_prob`` of the time) learns the distribution of those latents, again from augmented crops. The
teacher scores cells exactly as the pixel teacher does (``engines.teacher.denoising_errors``: shared
noise per trial across classes, K timesteps, disc-masked error normalised by the unconditional error,
optional pruning) on the encoded cell, and writes the same label files, so ``engines.teacher
calibrate`` and ``engines.distill`` take them unchanged.

    python -m engines.latent autoencoder --minutes 15 --out .cache/latent/ae.pt
    python -m engines.latent diffusion --ae .cache/latent/ae.pt --minutes 45 --out .cache/latent/teacher.pt
    python -m engines.latent label --teacher .cache/latent/teacher.pt --split val --per-class 40 --no-prune \
        --out .cache/latent/teacher-val.npz
    python -m engines.latent autoencoder --preset smoke --out /tmp/ae.pt    # CI: seconds, tiny data

Every stage is resumable (checkpoints every minute, written by rename) and stops at its wall-clock
budget; a resumed run continues the same budget.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engines import pbc
from engines.augment import PIPELINES, augment_batch
from engines.baseline import TrainConfig, prepare_data
from engines.diffusion import (
    UNet,
    cosine_alpha_bar,
    count_params,
    denoising_step,
    dihedral,
    save_checkpoint,
    to_diffusion_space,
    unet_macs,
)

RESOLUTION = 64  # the crops the student sees; the latent is RESOLUTION // 4


# --------------------------------------------------------------------------------------- autoencoder
def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class AutoEncoder(nn.Module):
    """Conv encoder (two stride-2 steps) to ``latent`` channels at 1/4 the size, and its mirror decoder.
    GroupNorm, not BatchNorm: no batch statistics to tie the latent to the training stain."""

    def __init__(self, widths: tuple[int, int] = (32, 64), latent: int = 4) -> None:
        super().__init__()
        a, b = widths
        self.encoder = nn.Sequential(
            _block(3, a), nn.Conv2d(a, b, 3, stride=2, padding=1), nn.SiLU(),
            _block(b, b), nn.Conv2d(b, b, 3, stride=2, padding=1), nn.SiLU(),
            _block(b, b), nn.Conv2d(b, latent, 1))
        self.decoder = nn.Sequential(
            nn.Conv2d(latent, b, 3, padding=1), nn.SiLU(), _block(b, b),
            nn.Upsample(scale_factor=2, mode="nearest"), _block(b, b),
            nn.Upsample(scale_factor=2, mode="nearest"), _block(b, a), nn.Conv2d(a, 3, 3, padding=1))
        self.latent = latent
        # Per-channel latent mean and std over clean training crops (set after training): the diffusion
        # model sees unit-variance latents, as Stable Diffusion's scale factor arranges.
        self.register_buffer("shift", torch.zeros(1, latent, 1, 1))
        self.register_buffer("scale", torch.ones(1, latent, 1, 1))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """RGB in [-1, 1] (N, 3, 64, 64) -> normalised latent (N, latent, 16, 16)."""
        return (self.encoder(x) - self.shift) / self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z * self.scale + self.shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


@dataclass
class AEConfig:
    minutes: float = 15.0
    max_steps: int = 100_000
    batch_size: int = 64
    lr: float = 2e-3
    widths: tuple[int, int] = (32, 64)
    latent: int = 4
    augment: str = "strong"  # engines.augment set applied to every training crop ("basic" = flips only)
    seed: int = 0
    threads: int = 2
    per_class_limit: int = 0


@dataclass
class LatentDiffusionConfig:
    minutes: float = 45.0
    max_steps: int = 100_000
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    ema: float = 0.995
    null_prob: float = 0.15
    low_t_frac: float = 0.7  # share of timesteps drawn from [0, low_t_max): where classification looks
    low_t_max: int = 600
    widths: tuple[int, ...] = (48, 96, 128)  # the pixel teacher's UNet: a like-for-like comparison
    augment: str = "strong"
    augment_share: float = 0.5  # share of each batch drawn through the augmentation (the rest clean PBC)
    seed: int = 0
    threads: int = 2
    exclude_classes: list[str] = field(default_factory=list)
    per_class_limit: int = 0


AE_PRESETS: dict[str, dict] = {"full": {}, "smoke": {"minutes": 0.2, "max_steps": 8, "batch_size": 8,
                                                     "widths": (8, 16), "per_class_limit": 6}}
DIFFUSION_PRESETS: dict[str, dict] = {"full": {}, "smoke": {"minutes": 0.2, "max_steps": 8, "batch_size": 8,
                                                            "widths": (16, 16), "per_class_limit": 6,
                                                            "warmup": 2}}
BUDGET_KEYS = ("minutes", "max_steps", "threads")


def _maths(config: dict) -> dict:
    """The parts of a config that change the result (a longer budget resumes the same run)."""
    return {k: v for k, v in config.items() if k not in BUDGET_KEYS}


def _augmented(images: np.ndarray, name: str, share: float, rng: np.random.Generator) -> np.ndarray:
    """``share`` of the crops through the named augmentation set, the rest as they are."""
    if name == "basic" or share <= 0:
        return images
    out = images.copy()
    chosen = np.flatnonzero(rng.random(len(images)) < share)
    if len(chosen):
        out[chosen] = augment_batch(images[chosen], name, rng)
    return out


def _resume(out: Path, config: dict, log) -> dict | None:
    if not out.is_file():
        return None
    state = torch.load(out, map_location="cpu", weights_only=False)
    if _maths(state["config"]) != _maths(config):
        raise SystemExit(f"{out} was trained with another configuration; choose another --out")
    log(f"resumed {out} at step {state['step']} ({state['elapsed'] / 60:.1f} min trained)")
    return state


@torch.no_grad()
def fit_latent_scale(ae: AutoEncoder, images_bgr: np.ndarray, n: int = 2048, batch: int = 256) -> None:
    """Per-channel mean/std of the raw latent over (up to) n clean crops -> the AE's shift/scale buffers."""
    ae.eval()
    pick = np.linspace(0, len(images_bgr) - 1, min(n, len(images_bgr))).astype(int)
    z = torch.cat([ae.encoder(to_diffusion_space(images_bgr[pick[i:i + batch]], RESOLUTION))
                   for i in range(0, len(pick), batch)])
    ae.shift.copy_(z.mean((0, 2, 3), keepdim=True))
    ae.scale.copy_(z.std((0, 2, 3), keepdim=True).clamp_min(1e-3))


def train_autoencoder(root: Path, cfg: AEConfig, out: Path, log=print) -> Path:
    """Reconstruction (MSE) of augmented crops; validation MSE on clean validation crops in the history."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    data = prepare_data(root, TrainConfig(per_class_limit=cfg.per_class_limit))
    train, val = data.images["train"], data.images["val"]
    val_x = to_diffusion_space(val[np.linspace(0, len(val) - 1, min(256, len(val))).astype(int)], RESOLUTION)
    ae = AutoEncoder(tuple(cfg.widths), cfg.latent)
    optimiser = torch.optim.AdamW(ae.parameters(), lr=cfg.lr, weight_decay=0.0)
    config = json.loads(json.dumps(asdict(cfg)))
    step, elapsed, history = 0, 0.0, []
    state = _resume(Path(out), config, log)
    if state:
        ae.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
    log(f"autoencoder {count_params(ae):,} params, {len(train)} train crops, augment {cfg.augment}")

    def checkpoint(done: bool) -> None:
        if done:
            fit_latent_scale(ae, train)
        save_checkpoint(Path(out), {"model": ae.state_dict(), "optimiser": optimiser.state_dict(), "step": step,
                                    "elapsed": elapsed, "history": history, "config": config, "done": done,
                                    "params": count_params(ae), "split_sha256": data.split_summary["sha256"]})

    last_save, window, began = time.time(), [], time.time()
    while step < cfg.max_steps and elapsed < cfg.minutes * 60:
        t0 = time.time()
        ae.train()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, len(train), (cfg.batch_size,), generator=gen).numpy()
        batch = _augmented(train[idx], cfg.augment, 1.0, np.random.default_rng([cfg.seed, step]))
        x = dihedral(to_diffusion_space(batch, RESOLUTION), gen)
        for group in optimiser.param_groups:  # warm-up, then a cosine decay over the step cap's horizon
            group["lr"] = cfg.lr * min(1.0, (step + 1) / 50)
        loss = F.mse_loss(ae(x), x)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        step += 1
        elapsed += time.time() - t0
        window.append(loss.item())
        if step % 50 == 0 or step == cfg.max_steps:
            ae.eval()
            with torch.no_grad():
                val_mse = float(F.mse_loss(ae(val_x), val_x))
            history.append({"step": step, "loss": float(np.mean(window)), "val_mse": val_mse,
                            "minutes": elapsed / 60})
            log(f"step {step} loss {np.mean(window):.5f} val_mse {val_mse:.5f} {elapsed / 60:.1f}/{cfg.minutes} min")
            window = []
        if time.time() - last_save > 60:
            checkpoint(done=False)
            last_save = time.time()
    checkpoint(done=True)
    log(f"done: {step} steps, {elapsed / 60:.1f} min ({(time.time() - began) / 60:.1f} min this call) -> {out}")
    return Path(out)


def load_autoencoder(path: Path) -> AutoEncoder:
    state = torch.load(path, map_location="cpu", weights_only=False)
    ae = AutoEncoder(tuple(state["config"]["widths"]), int(state["config"]["latent"]))
    ae.load_state_dict(state["model"])
    ae.eval()
    for p in ae.parameters():
        p.requires_grad_(False)
    return ae


@torch.no_grad()
def encode(ae: AutoEncoder, images_bgr: np.ndarray, batch: int = 256) -> torch.Tensor:
    """uint8 BGR crops at 64 px -> normalised latents."""
    parts = [ae.encode(to_diffusion_space(images_bgr[i:i + batch], RESOLUTION))
             for i in range(0, len(images_bgr), batch)]
    return torch.cat(parts) if parts else torch.zeros(0, ae.latent, RESOLUTION // 4, RESOLUTION // 4)


# ------------------------------------------------------------------------------------ latent diffusion
def build_unet(cfg: LatentDiffusionConfig, num_classes: int, latent: int) -> UNet:
    return UNet(num_classes, tuple(cfg.widths), patch=1, channels=latent)


def train_diffusion(root: Path, cfg: LatentDiffusionConfig, ae_path: Path, out: Path, log=print) -> Path:
    """Class-conditional epsilon prediction on the latents of (partly augmented) training crops, EMA weights
    kept; constant learning rate after warm-up so a resumed run is the same run."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    ae = load_autoencoder(ae_path)
    data = prepare_data(root, TrainConfig(exclude_classes=list(cfg.exclude_classes),
                                          per_class_limit=cfg.per_class_limit))
    train, labels = data.images["train"], torch.from_numpy(data.labels["train"])
    num_classes = len(data.classes)
    model = build_unet(cfg, num_classes, ae.latent)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    alpha_bar = cosine_alpha_bar()
    config = {**json.loads(json.dumps(asdict(cfg))), "autoencoder": str(ae_path)}
    step, elapsed, history = 0, 0.0, []
    state = _resume(Path(out), config, log)
    if state:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimiser.load_state_dict(state["optimiser"])
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
    size = RESOLUTION // 4
    macs = unet_macs(ema, size)
    log(f"latent UNet {count_params(model):,} params, {macs / 1e6:.1f} M MACs/pass at {size}x{size}x{ae.latent}, "
        f"{len(train)} train crops, classes {data.classes}")
    ae_state = torch.load(ae_path, map_location="cpu", weights_only=False)

    def checkpoint(done: bool) -> None:
        save_checkpoint(Path(out), {
            "model": model.state_dict(), "ema": ema.state_dict(), "optimiser": optimiser.state_dict(),
            "step": step, "elapsed": elapsed, "history": history, "classes": data.classes, "config": config,
            "done": done, "params": count_params(model), "macs": macs, "latent": ae.latent, "resolution": size,
            "autoencoder": {"model": ae.state_dict(), "config": ae_state["config"], "step": ae_state["step"],
                            "elapsed": ae_state["elapsed"], "history": ae_state["history"],
                            "params": ae_state["params"]},
            "split_sha256": data.split_summary["sha256"]})

    last_save, window, began = time.time(), [], time.time()
    model.train()
    while step < cfg.max_steps and elapsed < cfg.minutes * 60:
        t0 = time.time()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, len(train), (cfg.batch_size,), generator=gen)
        batch = _augmented(train[idx.numpy()], cfg.augment, cfg.augment_share, np.random.default_rng([cfg.seed, step]))
        with torch.no_grad():
            z0 = ae.encode(dihedral(to_diffusion_space(batch, RESOLUTION), gen))
        loss = denoising_step(model, ema, optimiser, z0, labels[idx], num_classes, cfg, step, alpha_bar, gen)
        step += 1
        elapsed += time.time() - t0
        window.append(loss.item())
        if step % 50 == 0 or step == cfg.max_steps:
            history.append({"step": step, "loss": float(np.mean(window)), "minutes": elapsed / 60})
            log(f"step {step} loss {np.mean(window):.4f} {elapsed / 60:.1f}/{cfg.minutes} min "
                f"({elapsed / step:.2f} s/step)")
            window = []
        if time.time() - last_save > 60:
            checkpoint(done=False)
            last_save = time.time()
    checkpoint(done=True)
    log(f"done: {step} steps, {elapsed / 60:.1f} min ({(time.time() - began) / 60:.1f} min this call) -> {out}")
    return Path(out)


class LatentTeacher(nn.Module):
    """The EMA UNet behind the encoder, with the attributes ``engines.teacher.denoising_errors`` reads."""

    def __init__(self, unet: UNet, ae: AutoEncoder) -> None:
        super().__init__()
        self.unet, self.ae = unet, ae
        self.num_classes = unet.num_classes

    def forward(self, zt: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.unet(zt, t, y)


def load_latent_teacher(path: Path) -> tuple[LatentTeacher, dict]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    cfg = state["config"]
    unet = UNet(len(state["classes"]), tuple(cfg["widths"]), patch=1, channels=int(state["latent"]))
    unet.load_state_dict(state["ema"])
    ae = AutoEncoder(tuple(state["autoencoder"]["config"]["widths"]), int(state["latent"]))
    ae.load_state_dict(state["autoencoder"]["model"])
    teacher = LatentTeacher(unet, ae).eval()
    return teacher, state


def is_latent_teacher(path: Path) -> bool:
    state = torch.load(path, map_location="cpu", weights_only=False)
    return "autoencoder" in state


# ------------------------------------------------------------------------------------------- labelling
def label_array(teacher: LatentTeacher, images: np.ndarray, out: Path, cfg, extra: dict, chunk: int = 64,
                log=print) -> Path:
    """Score uint8 BGR 64 px crops with the latent teacher into ``out`` (engines.teacher's label-file format
    plus ``extra`` arrays); resumable chunk by chunk from ``out``'s ``.partial.npz``."""
    from engines.teacher import label_crops

    log(f"labelling {len(images)} cells with the latent teacher: K={len(cfg.timesteps)}, "
        f"prune after {cfg.prune_after} keep {cfg.keep}")
    return label_crops(teacher, images, lambda crops: encode(teacher.ae, crops), out, cfg, extra, chunk, log)


def label_split(teacher_path: Path, root: Path, split: str, out: Path, cfg, per_class: int = 0, chunk: int = 64,
                threads: int = 2, all_of: tuple[str, ...] = (), log=print) -> Path:
    """``engines.teacher.label_split`` for the latent teacher: same selection, same file, resumable."""
    from engines.teacher import select

    torch.set_num_threads(threads)
    teacher, state = load_latent_teacher(teacher_path)
    data = prepare_data(root, TrainConfig())
    labels_all = data.labels[split]
    skip = tuple(i for i, c in enumerate(data.classes) if c not in state["classes"]) if split == "train" else ()
    idx = select(labels_all, per_class, tuple(data.classes.index(c) for c in all_of), skip)
    extra = {"labels": labels_all[idx], "index": idx, "paths": np.array([data.paths[split][i] for i in idx]),
             "classes": np.array(state["classes"]), "data_classes": np.array(data.classes),
             "config": json.dumps({"split": split, "per_class": per_class, "all_of": list(all_of),
                                   "teacher": str(teacher_path), "kind": "latent", "prune_after": cfg.prune_after,
                                   "keep": cfg.keep, "seed": cfg.seed, "disc_radius": cfg.disc_radius,
                                   "threads": threads, "chunk": chunk})}
    return label_array(teacher, data.images[split][idx], out, cfg, extra, chunk, log)


def label_foreign(teacher_path: Path, cells_path: Path, out: Path, cfg, threads: int = 2, log=print) -> Path:
    """The teacher on txl-pbc's unlabelled white cells (engines.foreign cut): its posterior there is what a
    student can be distilled towards on microscopes it has no labels for."""
    from engines import foreign

    torch.set_num_threads(threads)
    teacher, state = load_latent_teacher(teacher_path)
    cells = foreign.load(cells_path)
    from engines.teacher import foreign_extra

    extra = foreign_extra(cells, state["classes"], {"cells": str(cells_path), "teacher": str(teacher_path),
                                                    "kind": "latent", "prune_after": cfg.prune_after,
                                                    "keep": cfg.keep, "seed": cfg.seed})
    return label_array(teacher, cells["crops"], out, cfg, extra, log=log)


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.latent", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("autoencoder", help="train (or resume) the autoencoder")
    d = sub.add_parser("diffusion", help="train (or resume) the class-conditional diffusion model in the latent")
    d.add_argument("--ae", type=Path, required=True, help="autoencoder checkpoint")
    d.add_argument("--exclude", action="append", choices=pbc.CLASSES, help="hold a class out (repeatable)")
    for p, presets in ((a, AE_PRESETS), (d, DIFFUSION_PRESETS)):
        p.add_argument("--data", default=None, help="PBC folder (default $CYTOEDGE_PBC or ../shared/data/pbc)")
        p.add_argument("--out", type=Path, required=True, help="checkpoint (resumed if it exists)")
        p.add_argument("--preset", choices=sorted(presets), default="full")
        p.add_argument("--minutes", type=float, default=None, help="training wall-clock budget")
        p.add_argument("--max-steps", type=int, default=None)
        p.add_argument("--augment", choices=["basic", *PIPELINES], default="strong")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=2)
    lab = sub.add_parser("label", help="score one split with the latent teacher (engines.teacher's file format)")
    lab.add_argument("--teacher", type=Path, required=True)
    lab.add_argument("--data", default=None)
    lab.add_argument("--split", choices=pbc.SPLITS, default=None, help="a split of the fixed PBC split, or:")
    lab.add_argument("--foreign", type=Path, default=None, help="txl-pbc white cells (python -m engines.foreign cut)")
    lab.add_argument("--out", type=Path, required=True)
    lab.add_argument("--per-class", type=int, default=0, help="first N cells per class (0 = all)")
    lab.add_argument("--all-of", action="append", default=[], choices=pbc.CLASSES)
    lab.add_argument("--k", type=int, default=8, help="timesteps per cell, evenly spaced in [50, 500]")
    lab.add_argument("--prune-after", type=int, default=3)
    lab.add_argument("--keep", type=int, default=3)
    lab.add_argument("--no-prune", action="store_true")
    lab.add_argument("--seed", type=int, default=0)
    lab.add_argument("--threads", type=int, default=2)
    lab.add_argument("--preset", choices=("full", "smoke"), default="full", help="smoke: K=2, 4 cells per class")
    args = parser.parse_args(argv)
    root = pbc.data_dir(args.data)
    if not (root / "manifest.csv").is_file():
        print(f"no PBC data at {root} (set --data or CYTOEDGE_PBC)", file=sys.stderr)
        return 2
    if args.command == "label":
        from engines.teacher import ScoreConfig, default_timesteps

        k, per_class = (2, args.per_class or 4) if args.preset == "smoke" else (args.k, args.per_class)
        cfg = ScoreConfig(timesteps=tuple(default_timesteps(k)), seed=args.seed,
                          prune_after=0 if args.no_prune else args.prune_after, keep=args.keep)
        if (args.split is None) == (args.foreign is None):
            parser.error("label: give exactly one of --split and --foreign")
        if args.foreign is not None:
            label_foreign(args.teacher, args.foreign, args.out, cfg, threads=args.threads)
            return 0
        label_split(args.teacher, root, args.split, args.out, cfg, per_class, threads=args.threads,
                    all_of=tuple(args.all_of))
        return 0
    presets = AE_PRESETS if args.command == "autoencoder" else DIFFUSION_PRESETS
    overrides = dict(presets[args.preset])
    for key in ("minutes", "max_steps"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    common = {**overrides, "seed": args.seed, "threads": args.threads, "augment": args.augment}
    if args.command == "autoencoder":
        train_autoencoder(root, AEConfig(**common), args.out)
    else:
        train_diffusion(root, LatentDiffusionConfig(**common, exclude_classes=sorted(args.exclude or [])),
                        args.ae, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The diffusion teacher's network: a small class-conditional UNet, the cosine schedule, and its training.

Epsilon prediction, cosine schedule with T=1000 (Nichol & Dhariwal 2021), pixel space at 32x32 (the
64 px cache halved by 2x2 averaging) so that training makes progress on a two-core CPU. One extra
"null" class is fed ``null_prob`` of the time, so the same network also predicts the noise with no
class: the gap between the best class and no class is a likelihood-ratio-style anomaly signal.

Train (resumable; checkpoints under ``.cache/diffusion/``)::

    python -m engines.diffusion train --minutes 25 --out .cache/diffusion/teacher.pt
    python -m engines.diffusion train --exclude erythroblast --minutes 10 --out .cache/diffusion/teacher-noery.pt
    python -m engines.diffusion train --preset smoke --out /tmp/t.pt            # CI, well under a minute
"""

from __future__ import annotations

import argparse
import copy
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

from engines import pbc
from engines.augment import PIPELINES, augment_batch
from engines.baseline import TrainConfig, prepare_data

T_STEPS = 1000
RESOLUTION = 32


# ------------------------------------------------------------------------------------------ schedule
def cosine_alpha_bar(steps: int = T_STEPS, s: float = 0.008) -> torch.Tensor:
    """ᾱ_t for t = 0..steps-1 (index t means timestep t+1), clipped like Nichol & Dhariwal so β ≤ 0.999."""
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0).float()


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Forward process: x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε, for integer timesteps t in [0, T)."""
    ab = alpha_bar[t].view(-1, 1, 1, 1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


# ---------------------------------------------------------------------------------------------- data
def to_diffusion_space(images_bgr: np.ndarray, resolution: int = RESOLUTION) -> torch.Tensor:
    """uint8 BGR NHWC (any size divisible by ``resolution``) -> RGB NCHW in [-1, 1] at ``resolution``.

    Downsampling by exact averaging matches cv2.INTER_AREA for integer factors and is cheap on the fly.
    """
    x = torch.from_numpy(np.ascontiguousarray(images_bgr[..., ::-1].transpose(0, 3, 1, 2))).float() / 127.5 - 1
    factor = x.shape[-1] // resolution
    return F.avg_pool2d(x, factor) if factor > 1 else x


def disc_mask(size: int = RESOLUTION, radius_frac: float = 0.34) -> torch.Tensor:
    """(size, size) float mask of the central disc where the analyser centres the cell; errors are
    measured only there so red cells and background at the corners do not vote."""
    centre = (size - 1) / 2
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (((yy - centre) ** 2 + (xx - centre) ** 2) <= (radius_frac * size) ** 2).float()


def dihedral(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips and transposes: cells have no up or down, so this is free extra data."""
    n = x.shape[0]
    r = torch.rand(n, 3, generator=gen)
    x = torch.where((r[:, 0] < 0.5).view(-1, 1, 1, 1), x.flip(-1), x)
    x = torch.where((r[:, 1] < 0.5).view(-1, 1, 1, 1), x.flip(-2), x)
    return torch.where((r[:, 2] < 0.5).view(-1, 1, 1, 1), x.transpose(-1, -2), x)


# --------------------------------------------------------------------------------------------- model
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float().view(-1, 1) * freqs.view(1, -1)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the (time + class) embedding as a per-channel scale and shift."""

    def __init__(self, cin: int, cout: int, emb: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, 2 * cout)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip: nn.Module = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb).unsqueeze(-1).unsqueeze(-1).chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class UNet(nn.Module):
    """A small UNet for 32 px: pixel-unshuffle to 16 px, then levels at 16/8/4 px with ``widths``
    channels, one ResBlock per level on each path, two in the middle; no attention (too costly on a
    CPU for the gain at this size).
    Class index ``num_classes`` is the null class (unconditional prediction)."""

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (48, 96, 128), emb: int = 128,
                 patch: int = 2, channels: int = 3) -> None:
        super().__init__()
        self.patch = patch
        self.channels = channels
        self.num_classes = num_classes
        self.emb_dim = emb
        self.time_mlp = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.class_emb = nn.Embedding(num_classes + 1, emb)
        # Pixel-unshuffle by ``patch``: a 32 px image becomes 16x16x12, which cuts the cost ~4x while
        # the network still sees (and predicts) every pixel.
        self.stem = nn.Conv2d(channels * patch * patch, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.pool = nn.ModuleList()
        cin = widths[0]
        for i, w in enumerate(widths):
            self.down.append(ResBlock(cin, w, emb))
            self.pool.append(nn.Conv2d(w, w, 3, stride=2, padding=1) if i < len(widths) - 1 else nn.Identity())
            cin = w
        self.mid1 = ResBlock(cin, cin, emb)
        self.mid2 = ResBlock(cin, cin, emb)
        self.up = nn.ModuleList()
        for i in reversed(range(len(widths))):
            self.up.append(ResBlock(cin + widths[i], widths[i], emb))
            cin = widths[i]
        self.out_norm = nn.GroupNorm(8, cin)
        self.out = nn.Conv2d(cin, channels * patch * patch, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.emb_dim)) + self.class_emb(y)
        emb = F.silu(emb)
        h = self.stem(F.pixel_unshuffle(x, self.patch) if self.patch > 1 else x)
        skips = []
        for block, pool in zip(self.down, self.pool, strict=True):
            h = block(h, emb)
            skips.append(h)
            h = pool(h)
        h = self.mid2(self.mid1(h, emb), emb)
        for block in self.up:
            skip = skips.pop()
            if h.shape[-1] != skip.shape[-1]:
                h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], dim=1), emb)
        out = self.out(F.silu(self.out_norm(h)))
        return F.pixel_shuffle(out, self.patch) if self.patch > 1 else out


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def unet_macs(model: UNet, resolution: int = RESOLUTION) -> int:
    """Multiply-accumulates of one forward pass for one image (conv + linear), by hooks on a real pass."""
    total = [0]

    def hook(module: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            total[0] += out[0].numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.Linear):
            total[0] += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, model.channels, resolution, resolution), torch.zeros(1, dtype=torch.long),
              torch.zeros(1, dtype=torch.long))
    for h in handles:
        h.remove()
    return total[0]


# ------------------------------------------------------------------------------------------ training
@dataclass
class DiffusionConfig:
    minutes: float = 25.0  # wall-clock budget: the step count follows from the measured speed
    max_steps: int = 100_000
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.0
    ema: float = 0.995
    null_prob: float = 0.15
    # Fraction of training timesteps drawn from [1, low_t_max] (where classification looks); the rest
    # uniform over [1, T] so the network stays a proper diffusion model.
    low_t_frac: float = 0.7
    low_t_max: int = 600
    widths: tuple[int, ...] = (48, 96, 128)
    resolution: int = RESOLUTION
    seed: int = 0
    threads: int = 2
    exclude_classes: list[str] = field(default_factory=list)
    per_class_limit: int = 0
    # Lab-to-lab augmentation (an engines.augment set) applied to each batch's crops before the
    # diffusion-space conversion; "basic" = none beyond the dihedral flips.
    augment: str = "basic"
    # Start from this checkpoint's weights (e.g. the plain teacher) instead of from scratch.
    init: str = ""


def _comparable(config: dict) -> dict:
    """The parts of a config that change the maths; new options at their defaults are left out, so
    checkpoints made before they existed still resume."""
    budget_keys = ("minutes", "max_steps", "threads")
    defaults = {"augment": "basic", "init": ""}
    return {k: v for k, v in config.items() if k not in budget_keys and defaults.get(k, object()) != v}


PRESETS: dict[str, dict] = {
    "full": {},
    "smoke": {"minutes": 0.25, "max_steps": 30, "batch_size": 16, "widths": (16, 32), "per_class_limit": 24,
              "warmup": 5},
}


def sample_timesteps(n: int, cfg: DiffusionConfig, gen: torch.Generator) -> torch.Tensor:
    low = torch.randint(0, cfg.low_t_max, (n,), generator=gen)
    full = torch.randint(0, T_STEPS, (n,), generator=gen)
    return torch.where(torch.rand(n, generator=gen) < cfg.low_t_frac, low, full)


def denoising_step(model: nn.Module, ema: nn.Module, optimiser: torch.optim.Optimizer, x0: torch.Tensor,
                   labels: torch.Tensor, num_classes: int, cfg, step: int, alpha_bar: torch.Tensor,
                   gen: torch.Generator) -> torch.Tensor:
    """One training step of a class-conditional denoiser and its EMA copy, for the pixel teacher and the
    latent one (engines/latent.py) alike: the class is dropped with ``cfg.null_prob`` (so one network also
    predicts with no class), timesteps as :func:`sample_timesteps`, epsilon loss, warm-up, clipped step.
    ``cfg`` needs null_prob, low_t_max, low_t_frac, lr, warmup and ema. Returns the loss."""
    y = labels.clone()
    y[torch.rand(len(y), generator=gen) < cfg.null_prob] = num_classes
    t = sample_timesteps(len(y), cfg, gen)
    noise = torch.randn(x0.shape, generator=gen)
    loss = F.mse_loss(model(q_sample(x0, t, noise, alpha_bar), t, y), noise)
    for group in optimiser.param_groups:
        group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimiser.step()
    with torch.no_grad():
        decay = min(cfg.ema, (1 + step) / (10 + step))
        for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
            pe.lerp_(pm, 1 - decay)
        for be, bm in zip(ema.buffers(), model.buffers(), strict=True):
            be.copy_(bm)
    return loss


def build_model(cfg: DiffusionConfig, num_classes: int) -> UNet:
    return UNet(num_classes, tuple(cfg.widths))


def save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_teacher(path: Path) -> tuple[UNet, dict]:
    """The EMA network (eval mode) and its checkpoint's info (classes, config, history)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    cfg = DiffusionConfig(**{**state["config"], "widths": tuple(state["config"]["widths"])})
    model = build_model(cfg, len(state["classes"]))
    model.load_state_dict(state["ema"])
    model.eval()
    return model, state


def train(root: Path, cfg: DiffusionConfig, out: Path, resume: bool = True, log=print) -> Path:
    """Train until the step cap or the wall-clock budget; checkpoint (atomically) every ~60 s.

    The step count is not fixed in advance: on a shared two-core CPU the speed varies, so the run
    stops when ``minutes`` of training have passed, and a resumed run continues the same budget.
    The learning rate is constant after warm-up (no schedule to break on resume); the EMA smooths.
    """
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    data = prepare_data(root, TrainConfig(exclude_classes=list(cfg.exclude_classes),
                                          per_class_limit=cfg.per_class_limit))
    x_all = to_diffusion_space(data.images["train"], cfg.resolution)
    y_all = torch.from_numpy(data.labels["train"])
    num_classes = len(data.classes)
    model = build_model(cfg, num_classes)
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    alpha_bar = cosine_alpha_bar()
    step, elapsed, history = 0, 0.0, []
    out = Path(out)
    if resume and out.is_file():
        state = torch.load(out, map_location="cpu", weights_only=False)
        same = _comparable(state["config"]) == _comparable(json.loads(json.dumps(asdict(cfg))))
        if not same:
            raise SystemExit(f"{out} was trained with another configuration; use --no-resume or another --out")
        if True:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            optimiser.load_state_dict(state["optimiser"])
            step, elapsed, history = state["step"], state["elapsed"], state["history"]
            log(f"resumed {out} at step {step} ({elapsed / 60:.1f} min trained)")
    elif cfg.init:
        start = torch.load(cfg.init, map_location="cpu", weights_only=False)
        if start["classes"] != data.classes:
            raise SystemExit(f"{cfg.init} was trained on classes {start['classes']}, not {data.classes}")
        model.load_state_dict(start["ema"])  # the smoothed weights are the ones that were good
        ema.load_state_dict(start["ema"])
        log(f"initialised from {cfg.init} ({start['step']} steps, {start['elapsed'] / 60:.1f} min trained)")
    log(f"UNet {count_params(model):,} params, {unet_macs(model, cfg.resolution) / 1e6:.1f} M MACs/pass, "
        f"{len(x_all)} train crops at {cfg.resolution}px, classes {data.classes}")

    def state_dict(done: bool) -> dict:
        return {"model": model.state_dict(), "ema": ema.state_dict(), "optimiser": optimiser.state_dict(),
                "step": step, "elapsed": elapsed, "history": history, "classes": data.classes,
                "config": json.loads(json.dumps(asdict(cfg))), "done": done, "params": count_params(model),
                "macs": unet_macs(ema, cfg.resolution), "split_sha256": data.split_summary["sha256"]}

    budget = cfg.minutes * 60
    last_save, window_loss, window_n, began = time.time(), 0.0, 0, time.time()
    model.train()
    while step < cfg.max_steps and elapsed < budget:
        t0 = time.time()
        # Every step's randomness depends only on (seed, step): a resumed run repeats what it would have done.
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=gen)
        if cfg.augment != "basic":  # lab-to-lab variation on the uint8 crops, then to diffusion space
            batch = augment_batch(data.images["train"][idx.numpy()], cfg.augment,
                                  np.random.default_rng([cfg.seed, step]))
            x0 = dihedral(to_diffusion_space(batch, cfg.resolution), gen)
        else:
            x0 = dihedral(x_all[idx], gen)
        loss = denoising_step(model, ema, optimiser, x0, y_all[idx], num_classes, cfg, step, alpha_bar, gen)
        step += 1
        elapsed += time.time() - t0
        window_loss += loss.item()
        window_n += 1
        if step % 50 == 0 or step == cfg.max_steps:
            history.append({"step": step, "loss": window_loss / window_n, "minutes": elapsed / 60})
            log(f"step {step} loss {window_loss / window_n:.4f} {elapsed / 60:.1f}/{cfg.minutes:.1f} min "
                f"({elapsed / step:.2f} s/step)")
            window_loss, window_n = 0.0, 0
        if time.time() - last_save > 60:
            save_checkpoint(out, state_dict(done=False))
            last_save = time.time()
    save_checkpoint(out, state_dict(done=True))
    log(f"done: {step} steps, {elapsed / 60:.1f} min of training ({(time.time() - began) / 60:.1f} min this call)"
        f" -> {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.diffusion", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train (or resume) the class-conditional diffusion teacher")
    p.add_argument("--data", default=None, help="PBC folder (default $CYTOEDGE_PBC or ../shared/data/pbc)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint file (resumed if it exists)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--minutes", type=float, default=None, help="training wall-clock budget")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--exclude", action="append", choices=pbc.CLASSES, help="hold a class out (repeatable)")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--augment", choices=["basic", *PIPELINES], default="basic",
                   help="engines.augment set applied to training crops")
    p.add_argument("--init", default="", help="start from this teacher checkpoint's (EMA) weights")
    args = parser.parse_args(argv)
    overrides = dict(PRESETS[args.preset])
    if args.minutes is not None:
        overrides["minutes"] = args.minutes
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    cfg = DiffusionConfig(**overrides, seed=args.seed, threads=args.threads,
                          exclude_classes=sorted(args.exclude or []), augment=args.augment, init=args.init)
    root = pbc.data_dir(args.data)
    if not (root / "manifest.csv").is_file():
        print(f"no PBC data at {root} (set --data or CYTOEDGE_PBC)", file=sys.stderr)
        return 2
    train(root, cfg, args.out, resume=not args.no_resume)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

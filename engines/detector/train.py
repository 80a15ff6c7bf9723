"""Train the learned cell finder (resumable; one preset per purpose).

    python -m engines.detector.train --preset full --out engines/models/detector-v1
    python -m engines.detector.train --preset full --leave-out Raabin --out .cache/detector/without-Raabin

Checkpoints (``checkpoint.pt``) are written every ``save_every`` steps (written then renamed), so a
killed run resumes where it stopped. ``--leave-out`` drops one microscope (BCCD, BCD, Raabin) from
training, for the leave-one-microscope-out figures. The loop logs the loss curve to ``loss.csv``.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from edge.fileutil import atomic_write
from engines.detector.dataset import MICROSCOPE_OF, TXL_SOURCES, Labelled, load, sample
from engines.detector.model import CenterNetLite


@dataclass(frozen=True)
class Preset:
    steps: int
    batch: int
    crop: int
    width: int
    lr: float
    work_um_per_px: float = 0.3
    frames_per_source: int | None = None
    save_every: int = 100


PRESETS = {
    "smoke": Preset(steps=6, batch=4, crop=96, width=8, lr=2e-3, frames_per_source=4, save_every=3),
    "full": Preset(steps=3000, batch=16, crop=192, width=16, lr=3e-3),
}


def focal_loss(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss over the heat maps, per positive centre."""
    pred = pred.clamp(1e-4, 1 - 1e-4)
    pos = gt.eq(1).float()
    pos_loss = torch.log(pred) * (1 - pred) ** 2 * pos
    neg_loss = torch.log(1 - pred) * pred**2 * (1 - gt) ** 4 * (1 - pos)
    return -(pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1.0)


def loss_of(model: CenterNetLite, batch: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    od, heat, size, offset, mask = batch
    p_heat, p_size, p_offset = model(od)
    m = mask.unsqueeze(1)
    count = m.sum().clamp(min=1.0)
    l_heat = focal_loss(p_heat, heat)
    l_size = (torch.abs(p_size - size) * m).sum() / count
    l_offset = (torch.abs(p_offset - offset) * m).sum() / count
    total = l_heat + 0.5 * l_size + l_offset
    return total, {"heat": l_heat.item(), "size": l_size.item(), "offset": l_offset.item()}


def batch_of(items: list[Labelled], rng: np.random.Generator, preset: Preset) -> list[torch.Tensor]:
    picks = [items[int(i)] for i in rng.integers(0, len(items), preset.batch)]
    parts = [sample(item, rng, preset.work_um_per_px, preset.crop) for item in picks]
    return [torch.from_numpy(np.stack([p[i] for p in parts])) for i in range(5)]


def save_atomic(state: dict, path: Path) -> None:
    """Checkpoints go through the project's one atomic writer: a killed run leaves the old file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getvalue())


def train(preset_name: str, out: Path, leave_out: str | None = None, seed: int = 0) -> Path:
    """Train (or resume) and return the final weights' path (``weights.pt``)."""
    preset = PRESETS[preset_name]
    out.mkdir(parents=True, exist_ok=True)
    sources = tuple(s for s in TXL_SOURCES if MICROSCOPE_OF[s] != leave_out)
    items = load("train", sources, preset.frames_per_source)
    if not items:
        raise SystemExit("no training frames found (is ../shared/data present?)")
    torch.manual_seed(seed)
    model = CenterNetLite(width=preset.width)
    optimiser = torch.optim.AdamW(model.parameters(), lr=preset.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, preset.lr, total_steps=preset.steps, pct_start=0.05)
    step = 0
    checkpoint = out / "checkpoint.pt"
    if checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        step = state["step"]
        print(f"resuming at step {step}", flush=True)
    rng = np.random.default_rng([seed, step])
    log_path = out / "loss.csv"
    started = time.monotonic()
    model.train()
    with open(log_path, "a", newline="") as handle:
        log = csv.writer(handle)
        if step == 0:
            log.writerow(["step", "loss", "heat", "size", "offset", "seconds"])
        while step < preset.steps:
            total, parts = loss_of(model, batch_of(items, rng, preset))
            optimiser.zero_grad()
            total.backward()
            optimiser.step()
            schedule.step()
            step += 1
            if step % 10 == 0 or step == preset.steps:
                log.writerow([step, f"{total.item():.4f}", *(f"{v:.4f}" for v in parts.values()),
                              f"{time.monotonic() - started:.0f}"])
                handle.flush()
            if step % 50 == 0:
                print(f"step {step}/{preset.steps} loss {total.item():.3f} {parts} "
                      f"{time.monotonic() - started:.0f}s", flush=True)
            if step % preset.save_every == 0 or step == preset.steps:
                save_atomic({"model": model.state_dict(), "optimiser": optimiser.state_dict(),
                             "schedule": schedule.state_dict(), "step": step}, checkpoint)
    weights = out / "weights.pt"
    save_atomic({"model": model.state_dict(), "preset": asdict(preset), "preset_name": preset_name,
                 "sources": list(sources), "leave_out": leave_out, "seed": seed, "steps": step}, weights)
    return weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--leave-out", choices=sorted(set(MICROSCOPE_OF.values())))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(train(args.preset, args.out, args.leave_out, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())

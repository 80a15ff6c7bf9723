"""The diffusion classifier (teacher): class scores from denoising errors, its calibration, and labelling.

For each cell and each of K fixed timesteps (spread over [50, 500]; §4 of docs/background: t ≤ 500
suffices, t≈130–180 is most informative), one noise draw is added and the network predicts it under
every class *and* under the null class, all in one batched forward pass. The SAME noise is used for
every class of a trial (paired comparison), and the squared error is measured only in a central disc.

Per-trial normalisation: each class's error is divided by the unconditional (null-class) error of the
same trial, r = err_c / err_null. That removes the per-timestep scale (every timestep counts about
equally), is defined even after classes have been pruned, and makes the class score a likelihood-ratio
proxy: r < 1 means the class explains the cell better than "no class".

Scores per cell (``summarise``):
- ``logits`` = -mean_k r_ck; posterior = softmax(logits / τ), τ fitted on validation (NLL);
- anomaly candidates, all *relative* (raw error measures how simple an image is, not how well it fits):
  ``lr_gap`` = mean_k r_best,k (the best class relative to no class; ≈1 or more = nothing fits),
  ``margin`` = -(mean of the others' scores - best) / their spread,
  ``paired_t`` = -paired t of the runner-up vs the winner over trials, ``maxprob`` = 1 - max posterior.

Label the fixed split (resumable; one .npz per split)::

    python -m engines.teacher label --teacher .cache/diffusion/teacher.pt --split val --per-class 100 \
        --no-prune --out .cache/teacher/teacher-val.npz
    python -m engines.teacher calibrate --val .cache/teacher/teacher-val.npz --out .cache/teacher/teacher-calib.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engines import pbc
from engines.baseline import TrainConfig, prepare_data
from engines.diffusion import T_STEPS, UNet, cosine_alpha_bar, disc_mask, load_teacher, q_sample, to_diffusion_space

ANOMALY_SCORES = ("lr_gap", "margin", "paired_t", "maxprob")
PRIMARY_ANOMALY = "lr_gap"


def default_timesteps(k: int = 8, low: int = 50, high: int = 500) -> list[int]:
    """K fixed, evenly spaced timesteps in [low, high] (deterministic: no sampling at test time)."""
    return [round(float(v)) for v in np.linspace(low, high, k)] if k > 1 else [(low + high) // 2]


def trial_noise(trial: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """The noise of trial ``trial``: one draw from a generator seeded by (seed, trial), shared by every
    class (paired comparison) and every cell, so results do not depend on batching."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + trial + 1)
    return torch.randn((1, *shape), generator=gen)


@dataclass
class ScoreConfig:
    timesteps: tuple[int, ...] = tuple(default_timesteps(8))
    seed: int = 0
    disc_radius: float = 0.34
    prune_after: int = 3  # trials with every class before pruning (0 or >= K = never prune)
    keep: int = 3  # classes kept after pruning (plus the null class, always)


@torch.inference_mode()
def denoising_errors(model: UNet, x0: torch.Tensor, cfg: ScoreConfig) -> tuple[np.ndarray, int]:
    """Disc-masked squared error of the predicted noise, (B, C+1, K) with NaN where pruned (column C =
    null class), and the number of network passes (image evaluations) spent."""
    num_classes = model.num_classes
    b, _, size, _ = x0.shape
    alpha_bar = cosine_alpha_bar()
    mask = disc_mask(size, cfg.disc_radius)
    mask_sum = float(mask.sum()) * x0.shape[1]
    k_total = len(cfg.timesteps)
    errors = np.full((b, num_classes + 1, k_total), np.nan, np.float32)
    active = np.ones((b, num_classes + 1), bool)
    passes = 0
    for k, t_value in enumerate(cfg.timesteps):
        if 0 < cfg.prune_after == k and cfg.keep < num_classes:
            mean_r = np.nanmean(errors[:, :num_classes, :k] / errors[:, num_classes:, :k], axis=2)
            order = np.argsort(mean_r, axis=1)
            active[:, :num_classes] = False
            np.put_along_axis(active[:, :num_classes], order[:, : cfg.keep], True, axis=1)
        noise = trial_noise(k, tuple(x0.shape[1:]), cfg.seed)
        t = torch.full((b,), int(t_value), dtype=torch.long)
        xt = q_sample(x0, t, noise.expand(b, -1, -1, -1), alpha_bar)
        cells, conds = np.nonzero(active)
        cells_t = torch.from_numpy(cells)
        pred = model(xt[cells_t], t[cells_t], torch.from_numpy(conds).long())
        err = ((pred - noise) ** 2 * mask).sum(dim=(1, 2, 3)) / mask_sum
        errors[cells, conds, k] = err.numpy()
        passes += len(cells)
    return errors, passes


def summarise(errors: np.ndarray, tau: float = 1.0) -> dict[str, np.ndarray]:
    """Per-cell outputs from the (N, C+1, K) error tensor: logits, posterior, uncertainty, anomaly scores."""
    with warnings.catch_warnings():  # pruned (NaN) entries and K=2 smoke runs make nan* functions chatty
        warnings.simplefilter("ignore", RuntimeWarning)
        return _summarise(errors, tau)


def _summarise(errors: np.ndarray, tau: float) -> dict[str, np.ndarray]:
    num_classes = errors.shape[1] - 1
    r = errors[:, :num_classes, :] / errors[:, num_classes:, :]  # per-trial normalisation by the null class
    score = np.nanmean(r, axis=2)  # lower = better explanation
    logits = -score
    z = logits / tau
    z = z - z.max(axis=1, keepdims=True)
    post = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    entropy = np.clip(-(post * np.log(np.clip(post, 1e-12, 1))).sum(axis=1) / math.log(num_classes), 0, 1)
    order = np.argsort(score, axis=1)
    best, second = order[:, 0], order[:, 1]
    rows = np.arange(len(score))
    best_score = score[rows, best]
    others = score.copy()
    others[rows, best] = np.nan
    margin = (np.nanmean(others, axis=1) - best_score) / (np.nanstd(others, axis=1) + 1e-6)
    diff = r[rows, second, :] - r[rows, best, :]  # both kept after pruning, so every trial is there
    n = np.sum(~np.isnan(diff), axis=1)
    paired_t = np.nanmean(diff, axis=1) / (np.nanstd(diff, axis=1, ddof=1) / np.sqrt(n) + 1e-6)
    return {
        "logits": logits.astype(np.float32), "posterior": post.astype(np.float32),
        "uncertainty": entropy.astype(np.float32), "score": score.astype(np.float32),
        "lr_gap": best_score.astype(np.float32), "margin": (-margin).astype(np.float32),
        "paired_t": (-paired_t).astype(np.float32), "maxprob": (1 - post.max(axis=1)).astype(np.float32),
    }


def squash(values: np.ndarray, q50: float, q95: float) -> np.ndarray:
    """Map an anomaly score to 0..1 with a logistic fitted to in-domain quantiles: the in-domain median
    lands at 0.05 and the in-domain 95th percentile at 0.5, so typical cells read near 0."""
    scale = max((q95 - q50) / math.log(19), 1e-6)
    return (1 / (1 + np.exp(-(values - q95) / scale))).astype(np.float32)


# ------------------------------------------------------------------------------------------ labelling
def select(labels: np.ndarray, per_class: int, keep_all: tuple[int, ...] = (),
           skip: tuple[int, ...] = ()) -> np.ndarray:
    """Indices of the first ``per_class`` cells of each class in split order (0 = all), every cell of the
    classes in ``keep_all`` and none of those in ``skip``: deterministic and cheap to describe."""
    chosen = []
    for c in np.unique(labels):
        if int(c) in skip:
            continue
        rows = np.nonzero(labels == c)[0]
        chosen.append(rows if per_class <= 0 or int(c) in keep_all else rows[:per_class])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def label_crops(model: torch.nn.Module, images: np.ndarray, to_input, out: Path, cfg: ScoreConfig, extra: dict,
                chunk: int = 32, log=print) -> Path:
    """Score uint8 BGR crops with a diffusion teacher into ``out``: per cell its errors and passes, plus the
    ``extra`` arrays (labels, paths, config, ...). ``to_input`` turns a chunk of crops into what ``model``
    denoises (pixel space for the pixel teacher, the encoder's latent for the latent one). Resumable chunk
    by chunk from ``out``'s ``.partial.npz``; both files are written then renamed."""
    errors = np.full((len(images), model.num_classes + 1, len(cfg.timesteps)), np.nan, np.float32)
    passes = np.zeros(len(images), np.int64)
    done, seconds = 0, 0.0
    out = Path(out)
    partial = out.with_suffix(".partial.npz")
    if partial.is_file():
        saved = np.load(partial)
        if saved["errors"].shape == errors.shape and list(saved["timesteps"]) == list(cfg.timesteps):
            done, seconds = int(saved["done"]), float(saved["seconds"])
            errors[:done], passes[:done] = saved["errors"][:done], saved["passes"][:done]
            log(f"resuming {out} at {done}/{len(images)}")
    began = time.time()
    while done < len(images):
        t0 = time.perf_counter()
        x0 = to_input(images[done:done + chunk])
        err, n_pass = denoising_errors(model, x0, cfg)
        errors[done:done + len(x0)] = err
        passes[done:done + len(x0)] = n_pass // len(x0)
        seconds += time.perf_counter() - t0
        done += len(x0)
        tmp = partial.with_name(partial.name + ".tmp.npz")
        np.savez(tmp, errors=errors, passes=passes, done=done, seconds=seconds, timesteps=np.array(cfg.timesteps))
        tmp.replace(partial)
        if done % (chunk * 8) == 0 or done == len(images):
            log(f"  {done}/{len(images)} cells, {seconds / done * 1e3:.1f} ms/cell, {passes[:done].mean():.1f} "
                f"passes/cell ({(time.time() - began) / 60:.1f} min)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(tmp, errors=errors, passes=passes, timesteps=np.array(cfg.timesteps),
             ms_per_cell=seconds / max(len(images), 1) * 1e3, **extra)
    tmp.replace(out)
    partial.unlink(missing_ok=True)
    log(f"wrote {out}")
    return out


def label_split(teacher_path: Path, root: Path, split: str, out: Path, cfg: ScoreConfig, per_class: int = 0,
                chunk: int = 32, threads: int = 2, all_of: tuple[str, ...] = (), log=print) -> Path:
    """Run the teacher over one split of the fixed split (all 8 classes' cells, also those a held-out
    teacher never saw) and save errors + bookkeeping; resumes from a partial file chunk by chunk."""
    torch.set_num_threads(threads)
    model, state = load_teacher(teacher_path)
    resolution = state["config"]["resolution"]
    data = prepare_data(root, TrainConfig())  # all 8 classes: a held-out teacher must see its unknowns too
    labels_all = data.labels[split]
    # Training cells of a class the teacher never saw are useless to its student: skip them.
    skip = tuple(i for i, c in enumerate(data.classes) if c not in state["classes"]) if split == "train" else ()
    idx = select(labels_all, per_class, tuple(data.classes.index(c) for c in all_of), skip)
    log(f"labelling {split}: {len(idx)} cells, K={len(cfg.timesteps)} {list(cfg.timesteps)}, "
        f"prune after {cfg.prune_after} keep {cfg.keep}, teacher classes {state['classes']}")
    extra = {"labels": labels_all[idx], "index": idx, "paths": np.array([data.paths[split][i] for i in idx]),
             "classes": np.array(state["classes"]), "data_classes": np.array(data.classes),
             "config": json.dumps({"split": split, "per_class": per_class, "all_of": list(all_of),
                                   "teacher": str(teacher_path),
                                   "prune_after": cfg.prune_after, "keep": cfg.keep, "seed": cfg.seed,
                                   "disc_radius": cfg.disc_radius, "threads": threads, "chunk": chunk})}
    return label_crops(model, data.images[split][idx], lambda crops: to_diffusion_space(crops, resolution), out,
                       cfg, extra, chunk, log)


def foreign_extra(cells: dict, classes: list[str], config: dict) -> dict:
    """What a foreign-cell label file keeps beside the errors: each cell's microscope, split and frame
    (engines.distill learns only from train-frame cells), the teacher's classes and how the file was made."""
    return {"source": cells["source"], "split": cells["split"], "frame": cells["frame"],
            "classes": np.array(classes), "config": json.dumps(config)}


def label_foreign(teacher_path: Path, cells_path: Path, out: Path, cfg: ScoreConfig, chunk: int = 32,
                  threads: int = 2, log=print) -> Path:
    """The teacher on txl-pbc's unlabelled white cells (engines.foreign cut): its posterior there is what a
    student can be distilled towards on microscopes nobody labelled (``engines.distill train --foreign``)."""
    from engines import foreign

    torch.set_num_threads(threads)
    model, state = load_teacher(teacher_path)
    resolution = state["config"]["resolution"]
    cells = foreign.load(cells_path)
    log(f"labelling {len(cells['crops'])} foreign white cells, K={len(cfg.timesteps)}, "
        f"prune after {cfg.prune_after} keep {cfg.keep}")
    extra = foreign_extra(cells, state["classes"], {
        "cells": str(cells_path), "teacher": str(teacher_path), "kind": "pixel", "prune_after": cfg.prune_after,
        "keep": cfg.keep, "seed": cfg.seed, "disc_radius": cfg.disc_radius, "threads": threads, "chunk": chunk})
    return label_crops(model, cells["crops"], lambda crops: to_diffusion_space(crops, resolution), out, cfg,
                       extra, chunk, log)


def load_labels(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def simulate_pruning(errors: np.ndarray, prune_after: int, keep: int) -> tuple[np.ndarray, float]:
    """What pruning would have computed, from an unpruned error tensor: (masked errors, passes per cell).
    Lets the validation run measure whether pruning costs accuracy without labelling twice."""
    num_classes = errors.shape[1] - 1
    out = errors.copy()
    r = errors[:, :num_classes, :prune_after] / errors[:, num_classes:, :prune_after]
    order = np.argsort(r.mean(axis=2), axis=1)
    drop = np.ones((len(errors), num_classes), bool)
    np.put_along_axis(drop, order[:, :keep], False, axis=1)
    later = out[:, :num_classes, prune_after:]
    later[drop] = np.nan
    k = errors.shape[2]
    passes = prune_after * (num_classes + 1) + (k - prune_after) * (keep + 1)
    return out, float(passes)


def calibrate(val_path: Path, out: Path, primary: str = PRIMARY_ANOMALY, log=print) -> dict:
    """Fit τ on validation (NLL of softmax(-score/τ)), the anomaly squash on in-domain validation cells,
    and measure what pruning would cost; write a small JSON used by distillation and the card."""
    from calibration.temperature import fit_temperature

    lab = load_labels(val_path)
    teacher_classes = [str(c) for c in lab["classes"]]
    data_classes = [str(c) for c in lab["data_classes"]]
    in_domain = np.array([data_classes[y] in teacher_classes for y in lab["labels"]])
    y = np.array([teacher_classes.index(data_classes[v]) if ok else -1 for v, ok in zip(lab["labels"], in_domain,
                                                                                       strict=True)])
    base = summarise(lab["errors"])
    # Normalised errors differ between classes by ~1e-2, so τ is far below the CNNs' T: widen the search.
    tau = fit_temperature(base["logits"][in_domain], y[in_domain], low=1e-4, high=10.0)
    summ = summarise(lab["errors"], tau)
    squash_params = {name: {"q50": float(np.quantile(summ[name][in_domain], 0.5)),
                            "q95": float(np.quantile(summ[name][in_domain], 0.95))} for name in ANOMALY_SCORES}
    acc = float((summ["logits"][in_domain].argmax(1) == y[in_domain]).mean())
    pruning = []
    k = lab["errors"].shape[2]
    if not np.isnan(lab["errors"]).any():
        for after in (1, 2, 3, 4):
            for keep in (2, 3, 4):
                if after >= k:
                    continue
                masked, passes = simulate_pruning(lab["errors"], after, keep)
                pacc = float((summarise(masked)["logits"][in_domain].argmax(1) == y[in_domain]).mean())
                pruning.append({"prune_after": after, "keep": keep, "passes": passes, "accuracy": pacc})
    result = {"tau": tau, "val_accuracy": acc, "val_n": int(in_domain.sum()), "squash": squash_params,
              "primary_anomaly": primary, "full_passes": k * (len(teacher_classes) + 1),
              "pruning": pruning, "timesteps": [int(t) for t in lab["timesteps"]], "classes": teacher_classes}
    if (~in_domain).any():
        from engines.compare import auroc

        result["val_anomaly_auroc"] = {name: auroc(summ[name], ~in_domain) for name in ANOMALY_SCORES}
    pbc.atomic_write_json(Path(out), result)
    log(json.dumps({k: v for k, v in result.items() if k != "squash"}, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.teacher", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("label", help="score one split of the fixed split (or foreign cells) with the diffusion "
                                     "classifier")
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--data", default=None)
    p.add_argument("--split", choices=pbc.SPLITS, default=None, help="a split of the fixed PBC split, or:")
    p.add_argument("--foreign", type=Path, default=None, help="txl-pbc white cells (python -m engines.foreign cut)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--per-class", type=int, default=0, help="first N cells per class of the split (0 = all)")
    p.add_argument("--all-of", action="append", default=[], choices=pbc.CLASSES,
                   help="label every cell of this class regardless of --per-class (repeatable)")
    p.add_argument("--k", type=int, default=8, help="timesteps per cell, evenly spaced in [50, 500]")
    p.add_argument("--prune-after", type=int, default=3)
    p.add_argument("--keep", type=int, default=3)
    p.add_argument("--no-prune", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--preset", choices=("full", "smoke"), default="full", help="smoke: K=2, 4 cells per class")
    c = sub.add_parser("calibrate", help="fit τ and the anomaly squash on a labelled validation file")
    c.add_argument("--val", type=Path, required=True)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--primary", choices=ANOMALY_SCORES, default=PRIMARY_ANOMALY,
                   help="the anomaly score the student's head learns (fixed before test figures are seen)")
    args = parser.parse_args(argv)
    if args.command == "calibrate":
        calibrate(args.val, args.out, args.primary)
        return 0
    if (args.split is None) == (args.foreign is None):
        parser.error("label: give exactly one of --split and --foreign")
    root = pbc.data_dir(args.data)
    if not (root / "manifest.csv").is_file():
        print(f"no PBC data at {root} (set --data or CYTOEDGE_PBC)", file=sys.stderr)
        return 2
    k, per_class = args.k, args.per_class
    if args.preset == "smoke":
        k, per_class = 2, per_class or 4
    cfg = ScoreConfig(timesteps=tuple(default_timesteps(k)), seed=args.seed,
                      prune_after=0 if args.no_prune else args.prune_after, keep=args.keep)
    assert max(cfg.timesteps) <= T_STEPS
    if args.foreign is not None:
        if not args.foreign.is_file():
            print(f"no foreign cells file at {args.foreign} (python -m engines.foreign cut --out FILE)",
                  file=sys.stderr)
            return 2
        label_foreign(args.teacher, args.foreign, args.out, cfg, threads=args.threads)
        return 0
    label_split(args.teacher, root, args.split, args.out, cfg, per_class=per_class, threads=args.threads,
                all_of=tuple(args.all_of))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

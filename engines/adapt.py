"""Adapting a PBC-trained classifier to one lab's microscope from that microscope's own cells.

A model that has only seen one analyser's stain and optics puts foreign cells into one class
(docs/robustness.md). Two cheap, well-understood fixes are measured here, alone and together, and a
third for sites that have no labels yet:

* **batch-norm re-estimation** (AdaBN, Li et al. 2016): the running means/variances of every
  BatchNorm layer are recomputed on the site's *unlabelled* crops, so features are normalised with
  the site's own statistics. Needs no labels: every found cell counts.
* **fine-tuning** on the cells reviewers confirmed or corrected at the display: either the last
  linear layer only (``head``) or the whole network (``all``), with the baseline's flips/shift
  jitter, class-balanced sampling (a slide is mostly neutrophils), and a pull back towards the
  starting weights (L2-SP) so a handful of labels cannot wreck what PBC taught.
* **class-balance calibration on normal control smears** (frames only, ``--normal-controls``): per-class
  offsets in the head so the controls' white cells read as a normal differential
  (``engines/differential_prior.py``).

The network's weights come from ``weights.pt`` beside the model's ``model.onnx``. The runtime
command is ``cytoedge adapt`` (edge/commands/adapt.py); what it buys on wbc-shift with 0/20/50/100
labelled cells is ``python -m engines.adapt curve MODEL`` (the card's adaptation block, docs/robustness.md).
Methods that were measured but are not part of the product (self-training, colour matching, ...) live in
``engines/experiments/adapt_methods.py`` and reuse :func:`adaptation_curve` with their own adapt step.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge.modelmeta import ModelMetadata
from edge.onnx_backend import OnnxRuntimeClassifier
from engines import differential_prior
from engines.baseline import WEIGHTS_FILE, BaselineCNN, augment, normalise, to_tensor

REPLAY_FILE = "replay.npz"  # PBC training crops mixed into fine-tuning (see replay_set)
REPLAY_PER_CLASS = 50  # what the shipped replay.npz holds per class


@dataclass(frozen=True)
class AdaptConfig:
    """What ``adapt`` does; recorded in the site model's card."""

    batchnorm: bool = True  # re-estimate BatchNorm statistics on the site's crops
    layers: str = "all"  # "none" | "head" | "all": which weights the labelled cells fine-tune
    epochs: int = 30
    lr: float = 1e-3
    l2sp: float = 0.01  # pull towards the starting weights (per parameter, summed squares)
    batch_size: int = 32
    replay: bool = False  # mix PBC training crops into every fine-tuning batch (keeps PBC accuracy)
    mixed_batchnorm: bool = False  # batch-norm statistics over site and PBC replay crops together
    # Learning without forgetting on the replay crops: KL from the starting model's posterior (taken with
    # its own, PBC, batch-norm statistics) to the site model's, weighted by this; 0 = plain replay labels.
    replay_distill: float = 0.0
    # The site's unlabelled white cells come from normal control smears: after everything else, per-class
    # logit offsets make them average to a normal differential (engines/differential_prior.py).
    normal_differential: bool = False
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        if self.replay_distill and not self.replay:
            raise ValueError("replay_distill needs replay=True: the posterior is kept on the PBC replay crops")

    @property
    def uses_unlabelled_training(self) -> bool:
        """Trains on unlabelled site crops beyond batch norm (only experiment methods do)."""
        return False

    @property
    def trains_without_labels(self) -> bool:
        """Has something to train with no site labels at all (the adaptation curve measures it at 0 labels)."""
        return self.uses_unlabelled_training


# ------------------------------------------------------------------------------------------ weights
def class_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The class logits of a baseline (one output) or a student (logits, uncertainty, anomaly)."""
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


def load_weights(model_onnx: Path) -> tuple[nn.Module, ModelMetadata]:
    """The torch network behind ``model_onnx`` (from ``weights.pt`` beside it) and the ONNX file's metadata.
    A student keeps its uncertainty and anomaly heads, so a site model adapted from it exports them too."""
    from engines.distill import Student

    path = Path(model_onnx).with_name(WEIGHTS_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: this model ships no training weights, so it cannot be adapted")
    state = torch.load(path, map_location="cpu", weights_only=True)
    architectures = {"BaselineCNN": BaselineCNN, "Student": Student}
    if state.get("architecture") not in architectures:
        raise ValueError(f"{path}: cannot adapt architecture {state.get('architecture')!r}")
    model = architectures[state["architecture"]](int(state["num_classes"]), int(state["stem"]),
                                                 tuple(state["widths"]), **state.get("options", {}))
    model.load_state_dict(state["state_dict"])
    model.eval()
    metadata = OnnxRuntimeClassifier(model_onnx, threads=1).metadata
    if len(metadata.classes) != model.head.out_features:
        raise ValueError(f"{path} has {model.head.out_features} classes, {model_onnx} has {len(metadata.classes)}")
    return model, metadata


# ------------------------------------------------------------------------------------- adaptation
def _inputs(crops_bgr: np.ndarray, meta: ModelMetadata) -> torch.Tensor:
    return normalise(to_tensor(crops_bgr), meta.mean, meta.std)


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, crops_bgr: np.ndarray, meta: ModelMetadata, batch: int = 64) -> None:
    """AdaBN: replace every BatchNorm layer's running statistics by the cumulative average over the
    site's crops (momentum None), each crop seen once plus its mirror images (cells have no up)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    x = _inputs(crops_bgr, meta)
    views = [x, x.flip(-1), x.transpose(-1, -2)]
    for view in views:
        for i in range(0, len(view), batch):
            part = view[i:i + batch]
            if len(part) > 1:
                model(part)
    for norm in norms:
        norm.momentum = 0.1
    model.eval()


def balanced_order(labels: np.ndarray, steps: int, batch: int, rng: np.random.Generator) -> np.ndarray:
    """Indices drawn so each class present appears about equally often (a site's labels are mostly neutrophils)."""
    classes = np.unique(labels)
    weights = np.zeros(len(labels))
    for c in classes:
        weights[labels == c] = 1.0 / (labels == c).sum()
    weights /= weights.sum()
    return rng.choice(len(labels), size=(steps, batch), p=weights)


def fine_tune(model: BaselineCNN, crops_bgr: np.ndarray, labels: np.ndarray, meta: ModelMetadata,
              cfg: AdaptConfig, replay: tuple[np.ndarray, np.ndarray] | None = None, log=print,
              anchor: nn.Module | None = None) -> None:
    """Fine-tune on labelled site cells; BatchNorm statistics stay frozen (they came from many more
    unlabelled cells than there are labels). L2-SP keeps the weights near where they started; with
    ``anchor`` (the starting model before batch-norm re-estimation) and ``cfg.replay_distill``, the replay
    crops must also keep the posterior the starting model gave them, not only its labels. Without site
    labels that is all it trains: the network learns to read PBC through the site's batch-norm statistics."""
    replay_only = (len(labels) == 0 and cfg.trains_without_labels and anchor is not None and cfg.replay_distill > 0
                   and replay is not None and len(replay[1]) > 0)
    if cfg.layers == "none" or (len(labels) == 0 and not replay_only):
        return
    torch.manual_seed(cfg.seed)
    params = list(model.head.parameters()) if cfg.layers == "head" else list(model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    start = [p.detach().clone() for p in params]
    optimiser = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    steps_per_epoch = max(1, math.ceil(len(labels) / cfg.batch_size))
    rng = np.random.default_rng(cfg.seed)
    batch = min(cfg.batch_size, max(2, len(labels))) if len(labels) else cfg.batch_size
    order = (balanced_order(labels, cfg.epochs * steps_per_epoch, batch, rng) if len(labels)
             else np.zeros((cfg.epochs * steps_per_epoch, 0), np.int64))
    replay_order = None
    if replay is not None and len(replay[1]):
        replay_order = balanced_order(replay[1], len(order), batch, rng)
        crops_bgr = np.concatenate([crops_bgr, replay[0]])
        labels = np.concatenate([labels, replay[1]])
        replay_order = replay_order + (len(labels) - len(replay[1]))
        order = np.concatenate([order, replay_order], axis=1)
    gen = torch.Generator().manual_seed(cfg.seed)
    y_all = torch.from_numpy(labels.astype(np.int64))
    model.eval()  # frozen BN statistics and no dropout: the few labels only move the weights
    # the replay half of each batch, when its starting posterior is to be kept
    kept = (slice(order.shape[1] - replay_order.shape[1], None)
            if anchor is not None and cfg.replay_distill and replay_order is not None else None)
    for step, idx in enumerate(order):
        x = augment(to_tensor(crops_bgr[idx]), gen)
        x = normalise(x, meta.mean, meta.std)
        logits = class_logits(model, x)
        loss = F.cross_entropy(logits, y_all[idx])
        if kept is not None:
            with torch.no_grad():
                target = class_logits(anchor, x[kept]).log_softmax(1)
            loss = loss + cfg.replay_distill * F.kl_div(logits[kept].log_softmax(1), target, log_target=True,
                                                        reduction="batchmean")
        if cfg.l2sp:
            loss = loss + cfg.l2sp * sum(((p - s) ** 2).sum() for p, s in zip(params, start, strict=True))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if (step + 1) % steps_per_epoch == 0 and (step + 1) // steps_per_epoch % 10 == 0:
            log(f"  fine-tune epoch {(step + 1) // steps_per_epoch}/{cfg.epochs} loss {loss.item():.4f}")
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()


def replay_anchor(model: nn.Module, cfg: AdaptConfig, replay: tuple[np.ndarray, np.ndarray] | None
                  ) -> nn.Module | None:
    """A frozen copy of the starting model, whose posterior the replay crops must keep (``cfg.replay_distill``);
    taken before batch-norm re-estimation or any fine-tuning moves it. None when nothing needs it."""
    return copy.deepcopy(model).eval() if cfg.replay_distill and replay is not None else None


def adapt_model(model: BaselineCNN, meta: ModelMetadata, unlabelled_bgr: np.ndarray, labelled_bgr: np.ndarray,
                labels: np.ndarray, cfg: AdaptConfig, replay: tuple[np.ndarray, np.ndarray] | None = None,
                log=print, white_bgr: np.ndarray | None = None) -> BaselineCNN:
    """BatchNorm re-estimation on every site crop (labelled ones too), then fine-tuning on the labels, then
    (``cfg.normal_differential``) the class-balance offsets fitted on the site's unlabelled white cells
    (``white_bgr``; default ``unlabelled_bgr``, which then must hold white cells only)."""
    torch.set_num_threads(cfg.threads)
    anchor = replay_anchor(model, cfg, replay)
    if cfg.batchnorm:
        parts = [unlabelled_bgr, labelled_bgr]
        if cfg.mixed_batchnorm and replay is not None:
            parts.append(replay[0])
        pool = np.concatenate([c for c in parts if len(c)])
        if len(pool) < 16:
            raise ValueError(f"batch-norm re-estimation needs at least 16 site crops, got {len(pool)}")
        reestimate_batchnorm(model, pool, meta)
        log(f"re-estimated batch-norm statistics on {len(pool)} site crops")
    fine_tune(model, labelled_bgr, labels, meta, cfg, replay if cfg.replay else None, log, anchor)
    if cfg.normal_differential:
        cells = unlabelled_bgr if white_bgr is None else white_bgr
        offsets = calibrate_to_normal(model, meta, cells)
        shown = ", ".join(f"{c} {o:+.1f}" for c, o in zip(meta.classes, offsets, strict=True))
        log(f"class-balance offsets for a normal differential, fitted on {len(cells)} white cells: {shown}")
    return model


def calibrate_to_normal(model: nn.Module, meta: ModelMetadata, white_bgr: np.ndarray) -> np.ndarray:
    """Fit the class-balance offsets that make ``white_bgr`` read as a normal differential and add them to the
    head's bias (on top of any offsets already there); returns them."""
    offsets = differential_prior.fit_offsets(predict_probs(model, white_bgr, meta),
                                             differential_prior.target_shares(meta.classes))
    differential_prior.fold_into_head(model.head, offsets, meta.temperature)
    return offsets


@torch.no_grad()
def predict_probs(model: nn.Module, crops_bgr: np.ndarray, meta: ModelMetadata, batch: int = 256) -> np.ndarray:
    model.eval()
    parts = [class_logits(model, _inputs(crops_bgr[i:i + batch], meta)) / meta.temperature
             for i in range(0, len(crops_bgr), batch)]
    return torch.cat(parts).softmax(1).numpy() if parts else np.zeros((0, len(meta.classes)), np.float32)


def save_replay(path: Path, crops_bgr: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    """JPEG (quality 95) bytes end to end plus offsets: a tenth of the raw size, and no pickles to load."""
    import io

    import cv2

    from engines.pbc import atomic_write_bytes

    encoded = [cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes() for crop in crops_bgr]
    offsets = np.cumsum([0] + [len(e) for e in encoded]).astype(np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, jpeg=np.frombuffer(b"".join(encoded), np.uint8), offsets=offsets,
             labels=np.asarray(labels, np.int64), classes=np.array(classes))
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_replay(model_onnx: Path, classes: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """The replay set beside the model, if it ships one (classes must match the model's)."""
    import cv2

    path = Path(model_onnx).with_name(REPLAY_FILE)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        if [str(c) for c in data["classes"]] != list(classes):
            raise ValueError(f"{path}: classes differ from the model's")
        jpeg, offsets, labels = data["jpeg"], data["offsets"], data["labels"]
    crops = np.stack([cv2.imdecode(jpeg[a:b], cv2.IMREAD_COLOR) for a, b in itertools.pairwise(offsets)])
    return crops, labels


# ---------------------------------------------------------------------------- adaptation curve
def draw_labelled(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n cells from pool, as a reviewer would meet them: at random, so the mix follows the slide."""
    return rng.choice(pool, size=min(n, len(pool)), replace=False) if n else np.zeros(0, np.int64)


# What the card's adaptation block measures: no adaptation, batch norm only (no labels), the earlier
# default, and what `cytoedge adapt` does now (DEFAULT_METHOD with reviewed cells, LABEL_FREE_METHOD without).
METHODS: dict[str, AdaptConfig] = {
    "none": AdaptConfig(batchnorm=False, layers="none"),
    "bn": AdaptConfig(batchnorm=True, layers="none"),
    "bn+all+replay": AdaptConfig(batchnorm=True, layers="all", replay=True),
    # As bn+all+replay, at a third of the rate for 100 epochs, and the replay crops also keep the posterior
    # the starting model gave them under PBC's own batch-norm statistics (learning without forgetting):
    # PBC stays near its own accuracy (docs/robustness.md, "Keeping PBC while adapting").
    "bn+all+lwf": AdaptConfig(batchnorm=True, layers="all", replay=True, replay_distill=3.0, lr=3e-4, epochs=100),
    # Frames only, from normal control smears: the class balance is calibrated too (docs/robustness.md,
    # "Calibrating on normal control smears"). Measured on a simulated control run.
    "bn+normal": AdaptConfig(batchnorm=True, layers="none", normal_differential=True),
}
DEFAULT_METHOD = "bn+all+lwf"  # with reviewed cells
LABEL_FREE_METHOD = "bn"  # only unlabelled crops: batch-norm re-estimation is all there is to do
NORMAL_CONTROLS_METHOD = "bn+normal"  # only unlabelled crops, declared to be normal control smears


def method_for(n_labels: int, normal_controls: bool = False) -> AdaptConfig:
    """What ``cytoedge adapt`` does with this many reviewed cells: the default fine-tuning when there are
    any, batch-norm re-estimation on the frames' cells when there are none. ``normal_controls`` (the frames
    are of healthy donors' smears) adds the class-balance calibration, but only without reviewed cells: after
    fine-tuning on 50 labels it lowered tecom from 0.88 to 0.79 and PBC to 0.80 (the labels already set the
    balance, and the calibration pulls the fine-tuned head off it)."""
    if n_labels:
        return METHODS[DEFAULT_METHOD]
    return METHODS[NORMAL_CONTROLS_METHOD if normal_controls else LABEL_FREE_METHOD]


CURVE_SHOTS = (0, 20, 50, 100)

AdaptStep = Callable[..., BaselineCNN]
SiteView = Callable[[AdaptConfig, np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]], np.ndarray]


def _mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    known = [v for v in values if v is not None]
    return (float(np.mean(known)), float(np.std(known))) if known else (None, None)


def _shares(pred: np.ndarray, k: int) -> list[float]:
    """How the test cells were spread over the classes (a collapse into one class shows here)."""
    return [round(float(v), 3) for v in np.bincount(pred, minlength=k) / max(1, len(pred))]


def runs_at(cfg: AdaptConfig, n_labels: int) -> bool:
    """Whether the curve measures ``cfg`` with ``n_labels`` labelled cells: methods that fine-tune on
    labels need some, methods that do not cannot use them; training on unlabelled crops works at 0."""
    if n_labels == 0:
        return cfg.layers == "none" or cfg.trains_without_labels
    return cfg.layers != "none"


def replay_set(pbc_root: Path, classes: list[str], per_class: int, size: int, seed: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
    """PBC training-split crops, ``per_class`` of each class: what fine-tuning mixes in so the site model
    does not forget the classes and stain it was trained on."""
    from engines import pbc

    samples = pbc.read_manifest(pbc_root)
    split = pbc.split_pbc(samples, pbc.SPLIT_SEED)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in classes:
        rows = [s for s in samples if s.label == c and split[s.path] == "train"]
        chosen += [rows[i] for i in rng.choice(len(rows), size=min(per_class, len(rows)), replace=False)]
    crops = np.stack([pbc.load_crop_bgr(pbc_root / s.path, size) for s in chosen])
    return crops, np.array([classes.index(s.label) for s in chosen], np.int64)


def curve_split(n_cells: int, seed: int = 12345) -> tuple[np.ndarray, np.ndarray]:
    """The adaptation curve's fixed split of a domain's cells: (test half, the site's pool)."""
    order = np.random.default_rng(seed).permutation(n_cells)
    return order[: n_cells // 2], order[n_cells // 2:]


def adaptation_curve(model_onnx: Path, shots: tuple[int, ...], seeds: int, methods: dict[str, AdaptConfig],
                     out: Path | None, epochs: int | None = None, log=print, domains: tuple[str, ...] | None = None,
                     adapt_step: AdaptStep = adapt_model, site_view: SiteView | None = None,
                     replay_per_class: int = REPLAY_PER_CLASS) -> dict:
    """For each wbc-shift domain: half the cells are a fixed test set, the other half the site's pool
    (all of it unlabelled for batch norm; n of it labelled). Balanced accuracy over the classes present,
    mean ± sd over seeds; PBC test balanced accuracy of the adapted model next to it. ``pool_balanced_accuracy``
    is measured on the pool's unlabelled cells (those the method adapted on, transductively): the figure
    to choose between methods by, so that the test half is never used to choose.

    ``epochs`` overrides every method's own fine-tuning epochs (None: each keeps its own).
    ``adapt_step`` and ``site_view`` (crops as a method sees them, e.g. colour-matched) let experiments
    measure other methods with exactly this protocol."""
    from engines import evaluate, ood, pbc

    base, meta = load_weights(model_onnx)
    site_cells, scales = ood.domain_crops(meta.classes, meta.field_um, meta.input_size, domains or ood.DOMAINS)
    pbc_root = pbc.data_dir(None)
    _, pbc_images, pbc_labels = evaluate.test_split(Path(model_onnx).parent, pbc_root)
    _, val_images, val_labels = evaluate.pbc_split(Path(model_onnx).parent, pbc_root, "val")
    replay = replay_set(pbc_root, meta.classes, replay_per_class, meta.input_size)
    report: dict = {"model": Path(model_onnx).parent.name + "/" + Path(model_onnx).name,
                    "default_method": DEFAULT_METHOD, "replay_per_class": replay_per_class,
                    "scales": {d: s["um_per_px"] for d, s in scales.items()},
                    "epochs": epochs, "seeds": seeds, "methods": {m: asdict(c) for m, c in methods.items()},
                    "threads": torch.get_num_threads(), "domains": {}}
    for domain, (crops, labels) in site_cells.items():
        test, pool = curve_split(len(labels))
        rows = report["domains"].setdefault(domain, {"n_test": len(test), "n_pool": len(pool), "results": []})
        for n in shots:
            if n > len(pool):
                log(f"{domain}: skip n={n} (only {len(pool)} cells in the pool)")
                continue
            for method, method_cfg in methods.items():
                if not runs_at(method_cfg, n):
                    continue
                site_crops = site_view(method_cfg, crops, pool, replay) if site_view else crops
                runs = []
                # Without labels a method is deterministic, unless it trains or draws a control run.
                repeats = seeds if n or method_cfg.trains_without_labels or method_cfg.normal_differential else 1
                for seed in range(repeats):
                    began = time.time()
                    rng = np.random.default_rng([seed, n])
                    chosen_idx = draw_labelled(pool, n, rng)
                    model = copy.deepcopy(base)
                    cfg = dataclasses.replace(method_cfg, seed=seed, epochs=epochs or method_cfg.epochs)
                    # A method that assumes normal control smears gets a simulated control run as its frames.
                    seen = (differential_prior.control_sample(pool, labels, meta.classes, rng)
                            if cfg.normal_differential else pool)
                    adapt_step(model, meta, site_crops[seen], site_crops[chosen_idx], labels[chosen_idx], cfg,
                               replay, log=lambda *_: None)
                    seconds = time.time() - began
                    probs = predict_probs(model, site_crops[test], meta)
                    site = evaluate.classification_metrics(probs.argmax(1), labels[test], meta.classes)
                    unlabelled = np.setdiff1d(pool, chosen_idx)
                    pool_accuracy = None  # every pool cell labelled: nothing left to measure on
                    if len(unlabelled):
                        pool_probs = predict_probs(model, site_crops[unlabelled], meta)
                        pool_accuracy = evaluate.classification_metrics(pool_probs.argmax(1), labels[unlabelled],
                                                                        meta.classes)["balanced_accuracy"]
                    pbc_probs = predict_probs(model, pbc_images, meta)
                    pbc_metrics = evaluate.classification_metrics(pbc_probs.argmax(1), pbc_labels, meta.classes)
                    val_probs = predict_probs(model, val_images, meta)
                    val_metrics = evaluate.classification_metrics(val_probs.argmax(1), val_labels, meta.classes)
                    runs.append({"seed": seed, "balanced_accuracy": site["balanced_accuracy"],
                                 "ece": evaluate.expected_calibration_error(probs, labels[test]),
                                 "pool_balanced_accuracy": pool_accuracy,
                                 "pbc_balanced_accuracy": pbc_metrics["balanced_accuracy"],
                                 "pbc_val_balanced_accuracy": val_metrics["balanced_accuracy"],
                                 "predicted_share": _shares(probs.argmax(1), len(meta.classes)),
                                 "confusion": site["confusion"],
                                 "seconds": seconds})
                summary = {k: _mean_sd([r[k] for r in runs]) for k in ("balanced_accuracy", "ece",
                           "pool_balanced_accuracy", "pbc_balanced_accuracy", "pbc_val_balanced_accuracy",
                           "seconds")}
                rows["results"].append({"n_labels": n, "method": method, "runs": runs, "mean_sd": summary})
                log(f"{domain} n={n:3d} {method:8s} bal_acc {summary['balanced_accuracy'][0]:.3f}"
                    f"±{summary['balanced_accuracy'][1]:.3f} ece {summary['ece'][0]:.3f} "
                    f"pool {summary['pool_balanced_accuracy'][0] or float('nan'):.3f} "
                    f"pbc val {summary['pbc_val_balanced_accuracy'][0]:.3f} "
                    f"test {summary['pbc_balanced_accuracy'][0]:.3f}"
                    f" ({summary['seconds'][0]:.0f}s/run)")
                if out:
                    pbc.atomic_write_json(out, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.adapt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("curve", help="what adapting buys on wbc-shift with 0/20/50/100 labelled cells")
    p.add_argument("model", type=Path, help="model.onnx with weights.pt beside it")
    p.add_argument("--shots", type=int, nargs="+", default=list(CURVE_SHOTS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=None,
                   help="fine-tuning epochs for every method (default: each method's own)")
    p.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1)
    from engines.ood import DOMAINS

    p.add_argument("--domains", nargs="+", choices=DOMAINS, default=None,
                   help="wbc-shift domains to measure (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = adaptation_curve(args.model, tuple(args.shots), args.seeds, {m: METHODS[m] for m in args.methods},
                              args.out, args.epochs, domains=tuple(args.domains) if args.domains else None)
    if not args.out:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

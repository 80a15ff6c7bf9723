"""Site-adaptation methods beyond the product's (batch norm + labelled fine-tuning), measured on wbc-shift.

    python -m engines.experiments.adapt_methods MODEL.onnx [--methods ...] [--out results/adapt-X.json]

Same protocol as the card's adaptation curve (``engines.adapt.adaptation_curve``: fixed test half, the
other half as the site's pool, 0/20/50/100 labels, seeds), with more kinds of method: training on the
site's unlabelled crops (TENT / SHOT-IM / self-training, ``selftrain.py``), Reinhard colour matching of the
site's crops to PBC's (``colourmatch.py``), variants of the product's fine-tuning (learning without
forgetting: weight, rate, epochs, batch norm) and of its normal-control calibration (before the fine-tuning,
with self-training). Results: ``results/adapt-*.json``, discussed in docs/robustness.md ("Adaptation"). The
product (`cytoedge adapt`, ``engines.adapt.METHODS``) keeps only what beat its predecessor on the pool and
PBC-validation figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from edge.modelmeta import ModelMetadata
from engines.adapt import (
    CURVE_SHOTS,
    REPLAY_PER_CLASS,
    AdaptConfig,
    adapt_model,
    adaptation_curve,
    calibrate_to_normal,
    fine_tune,
    replay_anchor,
)
from engines.adapt import METHODS as PRODUCT_METHODS
from engines.baseline import BaselineCNN
from engines.experiments import colourmatch


@dataclass(frozen=True)
class MethodConfig(AdaptConfig):
    """The product's settings plus what the experiment methods need."""

    # Training on the site's unlabelled crops after batch-norm re-estimation (selftrain.py):
    # "none" | "im" (information maximisation, SHOT-IM / TENT) | "selftrain" (class-balanced pseudo-labels)
    # | "selftrain-after" (the labelled fine-tuning first, then pseudo-labels from the adapted model).
    unsupervised: str = "none"
    im_params: str = "bn"  # "bn": BatchNorm affine weights only (TENT) | "features": all but the head (SHOT)
    im_epochs: int = 15  # epochs over the site's crops (SHOT's default)
    im_lr: float = 1e-3  # Adam for "bn" (TENT), SGD with momentum 0.9 for "features" (SHOT's backbone lr)
    im_diversity: float = 1.0  # weight of the entropy of the batch-mean prediction (0 = TENT's objective)
    st_portions: tuple[float, ...] = (0.2, 0.35, 0.5)  # self-training: share of each predicted class kept, per round
    # Reinhard colour matching of the site's crops to PBC's CIELAB statistics before everything else
    # (the runtime cannot apply a per-site colour transform).
    colour_match: bool = False

    # With normal_differential: calibrate right after batch-norm re-estimation, before the labelled fine-tuning
    # (the product calibrates after, and only without labels).
    calibrate_first: bool = False

    # With no site labels, train on the PBC replay crops' starting posterior alone (needs replay_distill):
    # after batch-norm re-estimation, the network learns to read PBC through the site's statistics.
    zero_label_replay: bool = False

    @property
    def uses_unlabelled_training(self) -> bool:
        """Trains on unlabelled site crops, so it has something to do with no labels at all."""
        return self.unsupervised != "none"

    @property
    def trains_without_labels(self) -> bool:
        return self.uses_unlabelled_training or self.zero_label_replay


METHODS: dict[str, MethodConfig] = {
    "none": MethodConfig(batchnorm=False, layers="none"),
    "bn": MethodConfig(batchnorm=True, layers="none"),
    "head": MethodConfig(batchnorm=False, layers="head", lr=3e-3),
    "bn+head": MethodConfig(batchnorm=True, layers="head", lr=3e-3),
    "bn+all": MethodConfig(batchnorm=True, layers="all"),
    "all+replay": MethodConfig(batchnorm=False, layers="all", replay=True),
    "bn+all+replay": MethodConfig(batchnorm=True, layers="all", replay=True),
    "mixbn+all+replay": MethodConfig(batchnorm=True, layers="all", replay=True, mixed_batchnorm=True),
    # Unsupervised (selftrain.py, results/adapt-unsupervised.json); literature defaults, fixed up front.
    "bn+tent": MethodConfig(batchnorm=True, layers="none", unsupervised="im", im_diversity=0.0),
    "bn+im": MethodConfig(batchnorm=True, layers="none", unsupervised="im"),
    "bn+im+replay": MethodConfig(batchnorm=True, layers="none", unsupervised="im", replay=True),
    "bn+shot": MethodConfig(batchnorm=True, layers="none", unsupervised="im", im_params="features"),
    "bn+shot+replay": MethodConfig(batchnorm=True, layers="none", unsupervised="im", im_params="features",
                                   replay=True),
    "bn+st+replay": MethodConfig(batchnorm=True, layers="all", unsupervised="selftrain", replay=True),
    "colour+bn": MethodConfig(batchnorm=True, layers="none", colour_match=True),
    # ... followed by the labelled fine-tuning of "bn+all+replay" (self-training takes labels itself).
    "bn+im+all+replay": MethodConfig(batchnorm=True, layers="all", unsupervised="im", replay=True),
    "bn+shot+all+replay": MethodConfig(batchnorm=True, layers="all", unsupervised="im", im_params="features",
                                       replay=True),
    "colour+bn+all+replay": MethodConfig(batchnorm=True, layers="all", replay=True, colour_match=True),
    # Learning without forgetting: the replay crops also keep the starting model's posterior (issue 15's
    # "PBC still >= 0.97 after adapting"). The product's is "bn+all+lwf" (weight 3, lr 3e-4, 100 epochs);
    # these vary the weight (lwf1, lwf10), batch norm (all+: PBC's statistics kept), rate and epochs.
    "bn+all+lwf": MethodConfig(**asdict(PRODUCT_METHODS["bn+all+lwf"])),
    "bn+all+lwf1": MethodConfig(batchnorm=True, layers="all", replay=True, replay_distill=1.0, lr=3e-4, epochs=100),
    "bn+all+lwf+e200": MethodConfig(**{**asdict(PRODUCT_METHODS["bn+all+lwf"]), "epochs": 200}),
    "bn+all+lwf+lr1e-4+e300": MethodConfig(**{**asdict(PRODUCT_METHODS["bn+all+lwf"]), "lr": 1e-4, "epochs": 300}),
    "bn+all+lwf+l2sp0.1": MethodConfig(**{**asdict(PRODUCT_METHODS["bn+all+lwf"]), "l2sp": 0.1}),
    "bn+all+lwf10": MethodConfig(batchnorm=True, layers="all", replay=True, replay_distill=10.0, lr=3e-4,
                                 epochs=100),
    "all+lwf3": MethodConfig(batchnorm=False, layers="all", replay=True, replay_distill=3.0, lr=3e-4, epochs=100),
    "all+lwf1": MethodConfig(batchnorm=False, layers="all", replay=True, replay_distill=1.0, lr=3e-4, epochs=100),
    "all+lwf1+e30": MethodConfig(batchnorm=False, layers="all", replay=True, replay_distill=1.0, lr=3e-4),
    "all+lwf1+lr1e-3": MethodConfig(batchnorm=False, layers="all", replay=True, replay_distill=1.0),
    "all+lwf1+lr1e-3+e100": MethodConfig(batchnorm=False, layers="all", replay=True, replay_distill=1.0,
                                         epochs=100),
    "bn+all+lwf1+lr1e-3": MethodConfig(batchnorm=True, layers="all", replay=True, replay_distill=1.0),
    "mixbn+all+lwf1+lr1e-3": MethodConfig(batchnorm=True, layers="all", replay=True, mixed_batchnorm=True,
                                          replay_distill=1.0),
    "all+replay+slow": MethodConfig(batchnorm=False, layers="all", replay=True, lr=3e-4, epochs=100),
    "bn+all+replay+slow": MethodConfig(batchnorm=True, layers="all", replay=True, lr=3e-4, epochs=100),
    # With no labels: the replay posterior alone, after batch-norm re-estimation (and without it, a control).
    "bn+lwf-only": MethodConfig(**{**asdict(PRODUCT_METHODS["bn+all+lwf"]), "zero_label_replay": True}),
    "lwf3-only": MethodConfig(batchnorm=False, layers="all", replay=True, replay_distill=3.0, lr=3e-4, epochs=100,
                              zero_label_replay=True),
    # ... then one round of self-training on the site's unlabelled crops, pseudo-labelled by the adapted model
    # (its most confident half of each predicted class; reviewer labels win).
    # The frames are a normal control run: class-balance offsets for a normal differential after the rest
    # (engines/differential_prior.py), measured on a control run simulated from the pool.
    "bn+normal": MethodConfig(**asdict(PRODUCT_METHODS["bn+normal"])),
    "bn+all+lwf+normal": MethodConfig(**{**asdict(PRODUCT_METHODS["bn+all+lwf"]), "normal_differential": True}),
    # Frames only: the calibrated model's most confident half of each class as pseudo-labels, fine-tuned as the
    # product fine-tunes on reviewed cells (replay posterior kept), then calibrated again.
    "bn+normal+st": MethodConfig(**{**asdict(PRODUCT_METHODS["bn+all+lwf"]), "layers": "none",
                                    "normal_differential": True, "unsupervised": "selftrain-after",
                                    "st_portions": (0.5,)}),
    "bn+normal+all+lwf": MethodConfig(**{**asdict(PRODUCT_METHODS["bn+all+lwf"]), "normal_differential": True,
                                         "calibrate_first": True}),
    "bn+all+lwf+st": MethodConfig(**{**asdict(PRODUCT_METHODS["bn+all+lwf"]), "unsupervised": "selftrain-after",
                                     "st_portions": (0.5,)}),
}


def adapt_with_method(model: BaselineCNN, meta: ModelMetadata, unlabelled_bgr: np.ndarray, labelled_bgr: np.ndarray,
                      labels: np.ndarray, cfg: AdaptConfig, replay: tuple[np.ndarray, np.ndarray] | None = None,
                      log=print) -> BaselineCNN:
    """Batch-norm re-estimation (the product's step), then, if ``cfg.unsupervised``, training on the
    unlabelled crops, then fine-tuning on the labels (self-training fine-tunes on labels and pseudo-labels
    together). Colour matching is the caller's job (``site_view``)."""
    from engines.experiments.selftrain import information_maximisation, self_train, without_labelled

    unsupervised = getattr(cfg, "unsupervised", "none")
    if unsupervised not in ("none", "im", "selftrain", "selftrain-after"):
        raise ValueError(f"unknown unsupervised method {unsupervised!r} (none, im, selftrain or selftrain-after)")
    if getattr(cfg, "calibrate_first", False):
        anchor = replay_anchor(model, cfg, replay)  # the starting model, before anything moved it
        pool = np.concatenate([c for c in (unlabelled_bgr, labelled_bgr) if len(c)])
        adapt_model(model, meta, pool, labelled_bgr[:0], labels[:0], dataclasses.replace(cfg, layers="none"), replay,
                    log, white_bgr=unlabelled_bgr)
        fine_tune(model, labelled_bgr, labels, meta, cfg, replay if cfg.replay else None, log, anchor)
        return model
    if unsupervised == "none":
        return adapt_model(model, meta, unlabelled_bgr, labelled_bgr, labels, cfg, replay, log)
    if unsupervised == "selftrain-after":
        # The anchor for the replay posterior is the starting model, before anything moved it.
        anchor = replay_anchor(model, cfg, replay)
        adapt_model(model, meta, unlabelled_bgr, labelled_bgr, labels, cfg, replay, log)
        self_train(model, unlabelled_bgr, labelled_bgr, labels, meta, cfg, replay if cfg.replay else None, log,
                   anchor=anchor)
        if cfg.normal_differential:  # self-training's class-balanced batches move the balance again
            calibrate_to_normal(model, meta, unlabelled_bgr)
        return model
    adapt_model(model, meta, unlabelled_bgr, labelled_bgr, labels, dataclasses.replace(cfg, layers="none"),
                replay, log)
    replay = replay if cfg.replay else None
    if unsupervised == "selftrain":
        self_train(model, unlabelled_bgr, labelled_bgr, labels, meta, cfg, replay, log)
        return model
    site = [c for c in (without_labelled(unlabelled_bgr, labelled_bgr), labelled_bgr) if len(c)]
    if site:
        information_maximisation(model, np.concatenate(site), meta, cfg, replay, log)
    return adapt_model(model, meta, unlabelled_bgr[:0], labelled_bgr, labels,
                       dataclasses.replace(cfg, batchnorm=False), replay, log)


def colour_matched_view(cfg: AdaptConfig, crops: np.ndarray, pool: np.ndarray,
                        replay: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """A fixed per-site colour transform, fitted on the pool's crops only, applied to every crop of the site."""
    if not getattr(cfg, "colour_match", False):
        return crops
    return colourmatch.match(crops, colourmatch.lab_stats(crops[pool]), colourmatch.lab_stats(replay[0]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.experiments.adapt_methods",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="model.onnx with weights.pt beside it")
    parser.add_argument("--shots", type=int, nargs="+", default=list(CURVE_SHOTS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None,
                        help="fine-tuning epochs for every method (default: each method's own)")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--domains", nargs="+", default=None, help="wbc-shift domains to measure (default: all)")
    parser.add_argument("--replay-per-class", type=int, default=REPLAY_PER_CLASS,
                        help="PBC training crops per class replayed (the shipped replay.npz holds 50)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = adaptation_curve(args.model, tuple(args.shots), args.seeds, {m: METHODS[m] for m in args.methods},
                              args.out, args.epochs, domains=tuple(args.domains) if args.domains else None,
                              adapt_step=adapt_with_method, site_view=colour_matched_view,
                              replay_per_class=args.replay_per_class)
    if not args.out:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

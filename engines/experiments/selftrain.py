"""Training a site model on the site's *unlabelled* crops, after batch-norm re-estimation.

Two source-free methods from the domain-adaptation literature, measured by
``python -m engines.experiments.adapt_methods`` (results: results/adapt-unsupervised.json):

* **information maximisation** (SHOT-IM, Liang et al. 2020): make each crop's prediction confident
  (low per-crop entropy) while keeping the batch's mean prediction spread over the classes (high entropy
  of the mean; without this "diversity" term the objective is TENT's, Wang et al. 2021, which can put
  every cell into one class). Either only the BatchNorm scales/shifts move (TENT's choice) or the whole
  feature extractor with the classifier head frozen (SHOT's choice). PBC replay cross-entropy can be
  mixed into every step so the model keeps what PBC taught.
* **self-training** with class-balanced, confidence-filtered pseudo-labels (CBST, Zou et al. 2018):
  predict the pool, keep the most confident share of each predicted class, fine-tune on those (and on
  any reviewer labels, which win over pseudo-labels), repeat with a growing share.

Hyper-parameters are the papers' defaults, fixed before measuring (see ``AdaptConfig``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge.modelmeta import ModelMetadata
from engines.adapt import AdaptConfig, balanced_order, class_logits, fine_tune, predict_probs
from engines.baseline import BaselineCNN, augment, normalise, to_tensor


# ------------------------------------------------------------------------- information maximisation
def im_parameters(model: BaselineCNN, scope: str) -> list[nn.Parameter]:
    """``bn``: the affine weights of every BatchNorm layer; ``features``: everything but the head."""
    if scope == "bn":
        return [p for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()]
    if scope == "features":
        head = {id(p) for p in model.head.parameters()}
        return [p for p in model.parameters() if id(p) not in head]
    raise ValueError(f"unknown information-maximisation scope {scope!r} (bn or features)")


def im_loss(logits: torch.Tensor, diversity: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean per-sample entropy minus ``diversity`` times the entropy of the batch-mean prediction.
    Returns (loss, mean entropy, entropy of the mean)."""
    probs = logits.softmax(1)
    log_probs = logits.log_softmax(1)
    entropy = -(probs * log_probs).sum(1).mean()
    mean = probs.mean(0)
    marginal_entropy = -(mean * torch.log(mean + 1e-8)).sum()
    return entropy - diversity * marginal_entropy, entropy, marginal_entropy


def information_maximisation(model: BaselineCNN, crops_bgr: np.ndarray, meta: ModelMetadata, cfg: AdaptConfig,
                             replay: tuple[np.ndarray, np.ndarray] | None = None, log=print) -> None:
    """SHOT-IM / TENT on the site's crops. BatchNorm statistics stay as re-estimated (eval mode), so
    only the chosen weights move; with ``replay`` a class-balanced batch of PBC crops adds cross-entropy."""
    if len(crops_bgr) < 2 or cfg.im_epochs <= 0:
        return
    torch.manual_seed(cfg.seed)
    params = im_parameters(model, cfg.im_params)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    if cfg.im_params == "bn":  # TENT: Adam, lr 1e-3
        optimiser = torch.optim.Adam(params, lr=cfg.im_lr)
    else:  # SHOT: SGD with momentum, backbone lr 1e-3, weight decay 1e-3
        optimiser = torch.optim.SGD(params, lr=cfg.im_lr, momentum=0.9, weight_decay=1e-3, nesterov=True)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    batch = min(cfg.batch_size, len(crops_bgr))
    steps_per_epoch = math.ceil(len(crops_bgr) / batch)
    replay_order = None
    if replay is not None and len(replay[1]):
        replay_order = balanced_order(replay[1], cfg.im_epochs * steps_per_epoch, batch, rng)
        replay_y = torch.from_numpy(replay[1].astype(np.int64))
    model.eval()
    step = 0
    for epoch in range(cfg.im_epochs):
        order = rng.permutation(len(crops_bgr))
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            if len(idx) < 2:  # the diversity term needs a batch
                continue
            x = normalise(augment(to_tensor(crops_bgr[idx]), gen), meta.mean, meta.std)
            loss, entropy, marginal = im_loss(class_logits(model, x) / meta.temperature, cfg.im_diversity)
            if replay_order is not None:
                r = replay_order[step % len(replay_order)]
                xr = normalise(augment(to_tensor(replay[0][r]), gen), meta.mean, meta.std)
                loss = loss + F.cross_entropy(class_logits(model, xr), replay_y[r])
            if not torch.isfinite(loss):
                raise ValueError(f"information maximisation diverged (loss {loss.item()}) at epoch {epoch + 1}")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            step += 1
        if (epoch + 1) % 5 == 0:
            log(f"  information maximisation epoch {epoch + 1}/{cfg.im_epochs}: entropy {entropy.item():.3f}, "
                f"entropy of the mean {marginal.item():.3f}")
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()


# ------------------------------------------------------------------------------------ self-training
def select_confident(probs: np.ndarray, portion: float) -> np.ndarray:
    """Indices of the most confident ``portion`` of each predicted class (at least one per class that is
    predicted at all): a class-balanced filter, so the majority class cannot crowd out the rest."""
    pred, confidence = probs.argmax(1), probs.max(1)
    keep = []
    for c in np.unique(pred):
        members = np.flatnonzero(pred == c)
        k = max(1, round(portion * len(members)))
        keep.append(members[np.argsort(-confidence[members], kind="stable")[:k]])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def without_labelled(unlabelled_bgr: np.ndarray, labelled_bgr: np.ndarray) -> np.ndarray:
    """The unlabelled crops that are not byte-for-byte one of the labelled crops (labels win over
    pseudo-labels: a reviewed cell must not come back with the model's own guess)."""
    if not len(labelled_bgr) or not len(unlabelled_bgr):
        return unlabelled_bgr
    seen = {hashlib.blake2b(c.tobytes(), digest_size=16).digest() for c in labelled_bgr}
    keep = [hashlib.blake2b(c.tobytes(), digest_size=16).digest() not in seen for c in unlabelled_bgr]
    return unlabelled_bgr[np.array(keep, bool)]


def pseudo_labelled_set(model: nn.Module, unlabelled_bgr: np.ndarray, labelled_bgr: np.ndarray,
                        labels: np.ndarray, meta: ModelMetadata, portion: float) -> tuple[np.ndarray, np.ndarray]:
    """This round's training set: confident pseudo-labelled site crops plus every labelled crop."""
    probs = predict_probs(model, unlabelled_bgr, meta)
    keep = select_confident(probs, portion) if len(probs) else np.zeros(0, np.int64)
    crops = np.concatenate([unlabelled_bgr[keep], labelled_bgr]) if len(labelled_bgr) else unlabelled_bgr[keep]
    targets = np.concatenate([probs.argmax(1)[keep], labels]).astype(np.int64)
    return crops, targets


def self_train(model: BaselineCNN, unlabelled_bgr: np.ndarray, labelled_bgr: np.ndarray, labels: np.ndarray,
               meta: ModelMetadata, cfg: AdaptConfig, replay: tuple[np.ndarray, np.ndarray] | None = None,
               log=print, anchor: torch.nn.Module | None = None) -> None:
    """``len(cfg.st_portions)`` rounds of pseudo-labelling and fine-tuning (``fine_tune``: L2-SP,
    class-balanced batches, PBC replay if given, the replay posterior of ``anchor`` if given), ``cfg.epochs``
    split evenly over the rounds."""
    pool = without_labelled(unlabelled_bgr, labelled_bgr)
    rounds = len(cfg.st_portions)
    layers = cfg.layers if cfg.layers != "none" else "all"
    for r, portion in enumerate(cfg.st_portions):
        crops, targets = pseudo_labelled_set(model, pool, labelled_bgr, labels, meta, portion)
        counts = np.bincount(targets, minlength=len(meta.classes))
        log(f"  self-training round {r + 1}/{rounds}: {len(targets)} cells ({len(labels)} labelled), "
            f"per class {counts.tolist()}")
        sub = replace(cfg, layers=layers, epochs=max(1, cfg.epochs // rounds), seed=cfg.seed * 1000 + r)
        fine_tune(model, crops, targets, meta, sub, replay, log, anchor)

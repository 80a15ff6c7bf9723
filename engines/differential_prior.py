"""Calibrating a site's class balance on normal control smears, without a single label.

At a new microscope the network's errors are mostly one-sided: tecom's and BCCD's neutrophils are read
as eosinophils (docs/robustness.md), so whole classes are over- or under-called while the ranking of
cells within a pair of classes is still partly right. A lab that records *normal control* smears (healthy
donors) knows what their differential should look like: about 60% neutrophils, 30% lymphocytes and a
few monocytes, eosinophils and basophils. Per-class logit offsets that make the site's white cells average
to that differential (the EM prior correction of Saerens et al., Neural Computation 2002, with the target
prior fixed instead of estimated) undo the one-sided part of the shift.

The offsets are fitted once, on the control run, and then frozen in the site model's head bias: later
patients are read with them, so an eosinophilia still shows as more eosinophils than the control had. Never
fit them on a patient's own smear: that would force every patient's differential towards normal.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

# Typical adult peripheral blood differential (midpoints of the usual reference intervals: neutrophils
# 40-75%, lymphocytes 20-45%, monocytes 2-10%, eosinophils 1-6%, basophils 0-2%); fixed before measuring.
NORMAL_DIFFERENTIAL = {"neutrophil": 0.60, "lymphocyte": 0.30, "monocyte": 0.06, "eosinophil": 0.03,
                       "basophil": 0.01}
RARE_SHARE = 0.003  # classes a normal white-cell differential lacks (immature granulocytes, erythroblasts, platelets)
MIN_CELLS = 50  # fewer control cells than this cannot say what 3% eosinophils look like


def target_shares(classes: list[str]) -> np.ndarray:
    """The normal differential over ``classes`` (in their order), summing to 1."""
    shares = np.array([NORMAL_DIFFERENTIAL.get(c, RARE_SHARE) for c in classes], np.float64)
    return shares / shares.sum()


def fit_offsets(probs: np.ndarray, target: np.ndarray, iterations: int = 1000, tolerance: float = 1e-5
                ) -> np.ndarray:
    """Log-probability offsets ``b`` such that softmax(log p + b), averaged over the cells, equals ``target``.

    Fixed-point iteration b += log(target / mean posterior); converges because each step moves every class's
    average share towards its target (Saerens et al.'s EM with the prior held fixed)."""
    if len(probs) < MIN_CELLS:
        raise ValueError(f"calibrating to a normal differential needs at least {MIN_CELLS} white cells from "
                         f"normal control smears, got {len(probs)}")
    log_p = np.log(np.clip(probs.astype(np.float64), 1e-12, None))
    offsets = np.zeros(probs.shape[1])
    for _ in range(iterations):
        shares = _adjusted(log_p, offsets).mean(0)
        step = np.log(target / np.clip(shares, 1e-300, None))
        offsets += step
        if np.abs(step).max() < tolerance:
            break
    return offsets - offsets.max()  # only differences matter; the largest offset is 0


def apply_offsets(probs: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The posteriors with the offsets added in log space (what the site model's head computes)."""
    return _adjusted(np.log(np.clip(probs.astype(np.float64), 1e-12, None)), offsets)


def _adjusted(log_p: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    z = log_p + offsets
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


@torch.no_grad()
def fold_into_head(head: nn.Linear, offsets: np.ndarray, temperature: float) -> None:
    """Add the offsets to the classifier's last bias, so the exported ONNX file carries them: the runtime
    divides logits by ``temperature`` before the softmax, so the bias moves by temperature × offset."""
    head.bias += torch.as_tensor(offsets * temperature, dtype=head.bias.dtype)


def control_sample(candidates: np.ndarray, labels: np.ndarray, classes: list[str], rng: np.random.Generator,
                   shares: np.ndarray | None = None) -> np.ndarray:
    """A simulated normal control run for experiments: ``len(candidates)`` cells drawn (with replacement) from
    ``candidates`` so their classes follow the normal differential (or ``shares``, the donor's own) over the
    classes present. The labels only choose which cells the donor's smear would have shown; the calibration
    itself never sees them."""
    target = target_shares(classes) if shares is None else np.asarray(shares, np.float64)
    present = labels[candidates]
    counts = np.bincount(present, minlength=len(classes)).astype(np.float64)
    weights = target[present] / counts[present]
    return rng.choice(candidates, size=len(candidates), p=weights / weights.sum())

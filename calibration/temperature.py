"""Temperature scaling (Guo et al. 2017) for any model that produces logits or logit-like scores.

One implementation (golden-section search of the validation NLL over log T, no scipy, identical on
every machine) calibrates every model (baseline CNN, diffusion teacher, distilled student), so their
figures stay comparable. It lives here, not in ``engines/``: calibration is shared by the offline
tools and never depends on the training code.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["apply_temperature", "calibrated_probs", "fit_temperature", "nll"]


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true class after dividing logits by ``temperature``."""
    z = logits.astype(np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, low: float = 0.05, high: float = 20.0,
                    iterations: int = 100) -> float:
    """Temperature scaling (Guo et al. 2017): the T minimising validation NLL.

    NLL is convex in 1/T, hence unimodal in log T, so a golden-section search on log T finds the
    optimum without torch or scipy and gives the same answer on every machine.
    """
    if len(labels) == 0:
        return 1.0
    a, b = math.log(low), math.log(high)
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(logits, labels, math.exp(c)), nll(logits, labels, math.exp(d))
    for _ in range(iterations):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(logits, labels, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(logits, labels, math.exp(d))
    return float(math.exp((a + b) / 2))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Logits divided by T (T > 1 softens over-confident models, T < 1 sharpens timid ones)."""
    if not temperature > 0:
        raise ValueError("temperature must be positive")
    return np.asarray(logits, np.float64) / float(temperature)


def calibrated_probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T), computed stably; the same formula as the runtime's edge.classifier."""
    z = apply_temperature(logits, temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

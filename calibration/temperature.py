"""Temperature scaling (Guo et al. 2017) for any model that produces logits or logit-like scores.

The fit itself already lives in :mod:`engines.evaluate` (golden-section search of the validation NLL
over log T, no scipy, identical on every machine), where the baseline uses it. It is imported here,
not moved or copied, so every model (baseline CNN, diffusion teacher, distilled student) is calibrated
by one implementation and its figures stay comparable.
"""

from __future__ import annotations

import numpy as np

from engines.evaluate import fit_temperature, nll

__all__ = ["apply_temperature", "calibrated_probs", "fit_temperature", "nll"]


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

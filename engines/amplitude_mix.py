"""Fourier amplitude mixing with other microscopes' cells as donors (FACT, Xu et al., CVPR 2021; FDA, Yang &
Soatto, CVPR 2020), a robustness lever for issue 15.

A crop's Fourier *phase* carries where edges are (the nucleus outline, the lobes, the granules); its
*amplitude* spectrum carries how strong each spatial frequency is: the mean colour (the zero frequency), the
contrast, and how soft or sharp the optics are (the fall-off at high frequencies). A lab's microscope, lamp,
stain and camera change mostly the amplitude. During training some labelled PBC crops keep their phase and
take an amplitude that is a random mix of their own and that of a white cell from *another microscope*
(txl-pbc's BCCD, BCD and Raabin frames, unlabelled):

    A' = (1 - lam) * |F(x)| + lam * |F(donor)|,   x' = F^-1(A' * exp(i * angle(F(x)))),   lam ~ U(0, eta)

so the network must name the same cell under the contrast, colour and blur those microscopes really have,
which no hand-made augmentation has to guess. Unlike feature-style mixing (engines.style_mix), this acts on
the image, so the donors' blur is carried too. Training only: the exported graph does not change.
"""

from __future__ import annotations

import numpy as np


def amplitude_mix(batch: np.ndarray, donors: np.ndarray, rng: np.random.Generator, eta: float = 1.0,
                  p: float = 0.5) -> np.ndarray:
    """Each crop of ``batch`` (N, S, S, 3 uint8) takes, with probability ``p``, a random donor's amplitude
    spectrum mixed in at a ratio drawn from U(0, eta), per channel; the rest are returned unchanged."""
    if eta <= 0 or p <= 0 or not len(batch):
        return batch
    if donors.shape[1:] != batch.shape[1:]:
        raise ValueError(f"donor crops are {donors.shape[1:]}, training crops {batch.shape[1:]}: cut the foreign "
                         "cells at the training input size (python -m engines.foreign cut)")
    chosen = np.flatnonzero(rng.random(len(batch)) < p)
    if not len(chosen):
        return batch
    source = np.fft.fft2(batch[chosen].astype(np.float32), axes=(1, 2))
    donor = np.fft.fft2(donors[rng.integers(0, len(donors), len(chosen))].astype(np.float32), axes=(1, 2))
    lam = rng.uniform(0.0, eta, len(chosen)).astype(np.float32)[:, None, None, None]
    amplitude = (1.0 - lam) * np.abs(source) + lam * np.abs(donor)
    mixed = np.fft.ifft2(amplitude * np.exp(1j * np.angle(source)), axes=(1, 2)).real
    out = batch.copy()
    out[chosen] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return out

"""Feature-style mixing (MixStyle, Zhou et al., ICLR 2021), optionally with other microscopes' cells as donors.

In a CNN's early layers, a crop's *style* (stain hue, lamp colour, contrast, blur) lives largely in each
channel's mean and standard deviation over the image, and its *content* (nucleus shape, granules) in the
normalised pattern. During training, ``StyleMix`` re-styles some crops: their per-channel feature statistics
are replaced by a random mix of their own and another crop's,

    x' = (x - mu_x) / sigma_x * (lam * sigma_x + (1 - lam) * sigma_d) + (lam * mu_x + (1 - lam) * mu_d),

with ``lam ~ Beta(alpha, alpha)`` (alpha = 0.1: mostly near 0 or 1, i.e. often a full swap), so the network
must classify the same content under other styles. Two donor pools:

* ``"batch"``: the other PBC crops of the batch (the paper's version: styles PBC already has);
* ``"foreign"``: white cells of *other microscopes* (txl-pbc's BCCD, BCD and Raabin frames, unlabelled),
  carried in the same batch after the labelled crops. Their styles are the real ones a new lab brings,
  which no hand-made colour augmentation has to guess; they need no labels, because only their statistics
  are used and only the labelled crops carry a loss.

At inference (``model.eval()``) the layer is the identity, adds no parameters, and is absent from the
exported ONNX graph: the shipped runtime does not change. Measured as a lever in docs/robustness.md.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

DONORS = ("none", "batch", "foreign")


class StyleMix(nn.Module):
    """Mixes per-channel feature statistics of the first ``labelled`` rows with donors', in training only.

    ``labelled`` is set by the training loop for each batch: rows ``[:labelled]`` are the labelled crops
    (re-styled with probability ``p``), rows ``[labelled:]`` the foreign donors (left as they are). With
    ``labelled`` unset (or equal to the batch size) donors are the batch itself, shuffled.
    """

    def __init__(self, p: float = 0.5, alpha: float = 0.1, eps: float = 1e-6) -> None:
        super().__init__()
        self.p, self.alpha, self.eps = p, alpha, eps
        self.labelled: int | None = None
        # Seeded by the training loop per step, so a resumed run repeats itself; a fresh one otherwise.
        self.rng: np.random.Generator = np.random.default_rng()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p <= 0:
            return x
        n = x.shape[0]
        labelled = n if self.labelled is None else min(self.labelled, n)
        donors = n - labelled
        if labelled < 1 or (donors == 0 and n < 2):
            return x
        mu = x.mean(dim=(2, 3), keepdim=True)
        sigma = (x.var(dim=(2, 3), keepdim=True) + self.eps).sqrt()
        mu, sigma = mu.detach(), sigma.detach()  # a style to borrow, not something to learn through
        # foreign donors ride behind the labelled rows; otherwise the batch lends its own styles
        pick = labelled + self.rng.integers(0, donors, labelled) if donors else self.rng.permutation(n)[:labelled]
        pick_t = torch.from_numpy(pick)
        lam = torch.from_numpy(self.rng.beta(self.alpha, self.alpha, labelled)).to(x.dtype).view(-1, 1, 1, 1)
        apply = torch.from_numpy(self.rng.random(labelled) < self.p).view(-1, 1, 1, 1)
        mu_mix = lam * mu[:labelled] + (1 - lam) * mu[pick_t]
        sigma_mix = lam * sigma[:labelled] + (1 - lam) * sigma[pick_t]
        styled = (x[:labelled] - mu[:labelled]) / sigma[:labelled] * sigma_mix + mu_mix
        head = torch.where(apply, styled, x[:labelled])
        return torch.cat([head, x[labelled:]]) if donors else head


def style_layers(model: nn.Module) -> list[StyleMix]:
    """Every ``StyleMix`` in a model (the training loop sets their ``labelled`` and ``rng``)."""
    return [m for m in model.modules() if isinstance(m, StyleMix)]


def set_batch(model: nn.Module, labelled: int | None, rng: np.random.Generator) -> None:
    """Tell every layer how many rows of the coming batch are labelled, and give each its own draws."""
    for i, layer in enumerate(style_layers(model)):
        layer.labelled = labelled
        layer.rng = np.random.default_rng([int(rng.integers(2**31)), i])

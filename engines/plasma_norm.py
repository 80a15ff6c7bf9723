"""Plasma-relative input normalisation: optical density against each crop's own background, in the graph.

A lab's lamp colour, white balance and camera gain multiply each colour channel by a constant. Dividing
every channel by the crop's own plasma (background) level removes that constant before the network sees
anything: the network is fed optical density per channel,

    OD_c = ln(plasma_c) - ln(pixel_c),

0 on plasma, about 1-2 on a Giemsa-stained nucleus. Beer-Lambert makes OD additive in stain amount, so a
lighter or darker stain becomes a scale on OD (which the training augmentation can then span).

Everything is in the network (``PlasmaNorm`` in front of ``engines.baseline.BaselineCNN`` with
``input_norm="plasma"``), so the exported ONNX carries it and the runtime's preprocessing
(``edge.classifier.preprocess``: RGB / 255, then mean/std from the metadata) stays as it is:

1. undo the mean/std normalisation to get pixel values in [0, 1];
2. estimate the plasma per channel robustly: average-pool the crop in ``pool`` x ``pool`` blocks (64 px ->
   16 x 16 blocks of about 2.3 µm) and take the mean of the brightest ``top_fraction`` of blocks, per
   channel (TopK; a mean of a top quantile scales exactly with a per-channel gain, so the OD below is
   exactly invariant to one up to uint8 rounding and clipping);
3. OD per channel, pixels and plasma floored at ``eps`` (a black pixel is about OD 5.5, not infinity);
   (mode ``"ratio"``, a control: transmittance pixel / plasma, the same division without the logarithm);
4. a fixed affine scale to a sensible range for the first convolution (``OD_MEAN``/``OD_STD``: PBC
   training crops' per-channel OD mean and sd, measured once, rounded; the stem's BatchNorm absorbs any
   residual scale, so they are not refitted per run).

Exports with the TorchScript exporter at opset 17 (AveragePool, TopK, ReduceMean, Log), which is what
``engines.export`` uses; ``tests/test_plasma_norm.py`` checks ONNX Runtime against torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Per-channel (R, G, B) OD mean and sd over PBC's 10,159 training crops at 64 px (measured: 0.153/0.229/0.108
# and 0.237/0.369/0.118; the plasma there is RGB 0.99/0.90/0.80).
OD_MEAN = (0.15, 0.23, 0.11)
OD_STD = (0.24, 0.37, 0.12)
# The control without the logarithm (mode "ratio": transmittance pixel / plasma), same crops.
RATIO_MEAN = (0.88, 0.84, 0.90)
RATIO_STD = (0.16, 0.20, 0.10)
MODES = ("od", "ratio")


class PlasmaNorm(nn.Module):
    """(N, 3, S, S) mean/std-normalised RGB -> (N, 3, S, S) standardised optical density against the plasma."""

    def __init__(self, mean: list[float] | tuple[float, ...], std: list[float] | tuple[float, ...],
                 input_size: int = 64, pool: int = 4, top_fraction: float = 0.1, eps: float = 1.0 / 255.0,
                 mode: str = "od", od_mean: tuple[float, ...] | None = None,
                 od_std: tuple[float, ...] | None = None) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown plasma mode {mode!r} (one of {MODES})")
        self.mode = mode
        od_mean = od_mean if od_mean is not None else (OD_MEAN if mode == "od" else RATIO_MEAN)
        od_std = od_std if od_std is not None else (OD_STD if mode == "od" else RATIO_STD)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("od_mean", torch.tensor(list(od_mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("od_std", torch.tensor(list(od_std), dtype=torch.float32).view(1, 3, 1, 1))
        self.pool = int(pool)
        # k is a constant of the graph (the batch is the only dynamic axis): 26 of 256 blocks at 64 px.
        self.k = max(1, round(float(top_fraction) * (int(input_size) // self.pool) ** 2))
        self.eps = float(eps)

    def plasma(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) pixels in [0, 1] -> (N, 3, 1, 1) plasma level per channel."""
        blocks = F.avg_pool2d(pixels, self.pool, self.pool)
        top = torch.topk(torch.flatten(blocks, 2), self.k, dim=2).values  # (N, 3, k)
        return top.mean(dim=2, keepdim=True).unsqueeze(-1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        pixels = image * self.std + self.mean
        plasma = self.plasma(pixels).clamp(min=self.eps)
        ratio = self.mode == "ratio"
        value = pixels / plasma if ratio else torch.log(plasma) - torch.log(pixels.clamp(min=self.eps))
        return (value - self.od_mean) / self.od_std

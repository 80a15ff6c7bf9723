"""The detector network: a small encoder-decoder with CenterNet heads at 1/4 resolution.

Sized for a 2-core CPU at inference (a 640x480 BCCD frame is ~160x120 at 0.3 µm/px, a 1080p frame
~480x270: about 0.7 GMAC, a third of the first, wider draft's, which took 24 ms there) and for
training here in minutes: four stride-2 stages (receptive field > a 16 µm white cell at 0.3 µm/px),
two upsampling steps with skips back to 1/4, one shared 3x3 layer, then three 1x1 heads - per-class
centre heat map (sigmoid), log box size in µm, sub-cell centre offset.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

STRIDE = 4


def conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class CenterNetLite(nn.Module):
    """Input (N, 3, H, W) optical density, H and W multiples of 16; outputs at (H/4, W/4)."""

    def __init__(self, classes: int = 3, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(conv(3, w, 2), conv(w, w))                 # 1/2
        self.down4 = nn.Sequential(conv(w, 2 * w, 2), conv(2 * w, 2 * w))     # 1/4
        self.down8 = nn.Sequential(conv(2 * w, 3 * w, 2), conv(3 * w, 3 * w))  # 1/8
        self.down16 = nn.Sequential(conv(3 * w, 4 * w, 2), conv(4 * w, 4 * w), conv(4 * w, 4 * w))  # 1/16
        self.up8 = conv(4 * w + 3 * w, 3 * w)
        self.up4 = conv(3 * w + 2 * w, 2 * w)
        self.head = conv(2 * w, 2 * w)  # one shared 3x3 layer: at 1/4 resolution it is most of the cost
        self.heat = nn.Conv2d(2 * w, classes, 1)
        self.size = nn.Conv2d(2 * w, 2, 1)
        self.offset = nn.Conv2d(2 * w, 2, 1)
        nn.init.constant_(self.heat.bias, -2.19)  # start at p = 0.1, as CenterNet does

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x4 = self.down4(self.stem(x))
        x8 = self.down8(x4)
        x16 = self.down16(x8)
        y8 = self.up8(torch.cat([F.interpolate(x16, scale_factor=2.0, mode="nearest"), x8], 1))
        y4 = self.head(self.up4(torch.cat([F.interpolate(y8, scale_factor=2.0, mode="nearest"), x4], 1)))
        return torch.sigmoid(self.heat(y4)), self.size(y4), self.offset(y4)

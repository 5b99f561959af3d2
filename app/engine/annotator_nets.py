"""The networks of the ControlNet preprocessors that need weights, written from the published
architectures so that the released weight files load into them unchanged (strictly: every
module's attribute name and position below is what makes a state-dict key, so they follow
the names the files use).

- `ControlNetHED`: lllyasviel's Apache-2.0 HED ("ControlNetHED_Apache2", the weights
  `ControlNetHED.pth`). A VGG-like stack of five blocks (2, 2, 3, 3, 3 convolutions of 3x3
  with ReLU; 64, 128, 256, 512, 512 channels), each block but the first starting with a 2x2
  max-pool; every block ends in a 1x1 projection to one channel. The input is RGB in 0..255
  minus a learnt per-channel offset (`norm`). Keys: `norm`, `block<i>.convs.<j>.weight|bias`,
  `block<i>.projection.weight|bias`.
- `LineartGenerator`: the generator of "Learning to generate line drawings that convey
  geometry and semantics" (Chan, Durand, Isola 2022; `sk_model.pth` realistic, `sk_model2.pth`
  coarse): reflection-padded 7x7 conv to 64 channels, two stride-2 3x3 convs (128, 256), three
  residual blocks of two reflection-padded 3x3 convs, two stride-2 transposed convs (128, 64),
  a reflection-padded 7x7 conv to one channel and a sigmoid; instance norm without affine
  parameters and ReLU after every conv but the last. Input RGB in 0..1. Keys: `model0.1`,
  `model1.0`, `model1.3`, `model2.<k>.conv_block.1|5`, `model3.0`, `model3.3`, `model4.1`
  (`.weight` and `.bias` each).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _HEDBlock(nn.Module):
    """`layers` 3x3 convolutions with ReLU, and a 1x1 projection of the result to one channel."""

    def __init__(self, channels_in: int, channels: int, layers: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[
            nn.Conv2d(channels_in if i == 0 else channels, channels, kernel_size=3, padding=1)
            for i in range(layers)
        ])
        self.projection = nn.Conv2d(channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor, pool: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if pool:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class ControlNetHED(nn.Module):
    """HED's five side outputs (logits, at 1, 1/2, 1/4, 1/8 and 1/16 of the input's size)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        self.block1 = _HEDBlock(3, 64, 2)
        self.block2 = _HEDBlock(64, 128, 2)
        self.block3 = _HEDBlock(128, 256, 3)
        self.block4 = _HEDBlock(256, 512, 3)
        self.block5 = _HEDBlock(512, 512, 3)

    def forward(self, rgb255: torch.Tensor) -> list[torch.Tensor]:
        x = rgb255 - self.norm
        sides = []
        for index, block in enumerate((self.block1, self.block2, self.block3, self.block4, self.block5)):
            x, side = block(x, pool=index > 0)
            sides.append(side)
        return sides


def _padded_conv(channels_in: int, channels: int, kernel: int) -> list[nn.Module]:
    return [nn.ReflectionPad2d(kernel // 2), nn.Conv2d(channels_in, channels, kernel)]


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        # positions 1 and 5 hold the convolutions (conv_block.1, conv_block.5)
        self.conv_block = nn.Sequential(
            *_padded_conv(channels, channels, 3), nn.InstanceNorm2d(channels), nn.ReLU(),
            *_padded_conv(channels, channels, 3), nn.InstanceNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class LineartGenerator(nn.Module):
    """Line drawing (one channel, 0..1, 1 = paper) of an RGB picture in 0..1 whose sides are
    multiples of 4."""

    def __init__(self, residual_blocks: int = 3) -> None:
        super().__init__()
        self.model0 = nn.Sequential(*_padded_conv(3, 64, 7), nn.InstanceNorm2d(64), nn.ReLU())
        down: list[nn.Module] = []
        up: list[nn.Module] = []
        for channels in (64, 128):
            down += [nn.Conv2d(channels, channels * 2, 3, stride=2, padding=1),
                     nn.InstanceNorm2d(channels * 2), nn.ReLU()]
        for channels in (256, 128):
            up += [nn.ConvTranspose2d(channels, channels // 2, 3, stride=2, padding=1, output_padding=1),
                   nn.InstanceNorm2d(channels // 2), nn.ReLU()]
        self.model1 = nn.Sequential(*down)
        self.model2 = nn.Sequential(*[_Residual(256) for _ in range(residual_blocks)])
        self.model3 = nn.Sequential(*up)
        self.model4 = nn.Sequential(*_padded_conv(64, 1, 7), nn.Sigmoid())

    def forward(self, rgb01: torch.Tensor) -> torch.Tensor:
        return self.model4(self.model3(self.model2(self.model1(self.model0(rgb01)))))

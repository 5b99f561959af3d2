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
- `PiDiNet`: Su et al.'s pixel difference network (ICCV 2021), the `carv4` variant the
  `table5_pidinet.pth` weights are (60 channels, dilation module of 24, spatial attention). Its
  16 depthwise 3x3 convolutions take, in turn, central (`cd`), angular (`ad`), radial (`rd`)
  differences of pixels and plain values (`cv`), each a plain convolution with a kernel made
  from the learnt one: `cd` subtracts the kernel's sum at the centre, `ad` subtracts each tap's
  clockwise neighbour's weight, `rd` spreads taps 1..8 onto a 5x5 ring (+ outer, - inner).
  Four stages (60, 120, 240, 240 channels; stages 2-4 start with a 2x2 max-pool and a 1x1
  shortcut), each reduced to one map through a dilated-convolution module (`dilations`),
  an attention module (`attentions`) and a 1x1 conv (`conv_reduces`), upsampled bilinearly and
  fused by a 1x1 `classifier`; every map through a sigmoid. Input BGR in 0..1. The file keeps
  its tensors under `state_dict` with DataParallel's `module.` prefix.
- `AnimeLineartUnet`: the pix2pix U-Net generator (Isola et al. 2017) of the anime line
  drawings (`netG.pth`, 54M parameters): 8 levels of 4x4 stride-2 convolutions down (64, 128,
  256, 512, 512, 512, 512, 512 channels; LeakyReLU 0.2 and instance norm without parameters)
  and transposed ones up (ReLU, instance norm), each level's input concatenated to its output,
  tanh at the top. Input RGB in -1..1, sides multiples of 256. Keys nest as the levels do:
  `model.model.0|3`, `model.model.1.model.1|5`, `model.model.1.model.3.model.1|5`, ...
- `MangaLineNet`: the manga line extraction residual U-Net (`erika.pth`, 43M parameters, with
  batch norms): grey in 0..255, sides multiples of 16; its blocks' keys are
  `block<i>.model.<j>.conv1|residual.model.0|2` and `.shortcut.model.0`, `conv15.model.0|2`.
- `BodyPoseNet`: OpenPose's body network (`body_pose_model.pth`): a VGG-style feature stack,
  then six stages of a PAF branch and a heatmap branch; its keys are the file's flat Caffe
  layer names (`conv1_1.weight`, `Mconv7_stage6_L2.bias`, ...). See the class.
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


# ---- PiDiNet ----------------------------------------------------------------------------

# the carv4 variant: each block's pixel-difference operator, init_block first
CARV4 = ("cd", "ad", "rd", "cv") * 4
# `ad`: tap i of a 3x3 kernel less the weight of this tap (its clockwise neighbour's source)
_ANGULAR_SOURCE = [3, 0, 1, 6, 4, 2, 7, 8, 5]
# `rd`: taps 1..8 of the 3x3 kernel onto these places of a 5x5 one (outer ring +, inner ring -)
_RADIAL_OUTER = [0, 2, 4, 10, 14, 20, 22, 24]
_RADIAL_INNER = [6, 7, 8, 11, 13, 16, 17, 18]


def pixel_difference_conv(op: str, x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A 3x3 convolution (padding 1, stride 1) of pixel differences `op` as a plain one."""
    if op == "cv":
        return F.conv2d(x, weight, padding=1, groups=groups)
    if op == "cd":
        return (F.conv2d(x, weight, padding=1, groups=groups)
                - F.conv2d(x, weight.sum(dim=(2, 3), keepdim=True), groups=groups))
    out_c, in_c = weight.shape[:2]
    flat = weight.reshape(out_c, in_c, 9)
    if op == "ad":
        kernel = (flat - flat[:, :, _ANGULAR_SOURCE]).reshape(weight.shape)
        return F.conv2d(x, kernel, padding=1, groups=groups)
    if op == "rd":
        kernel = weight.new_zeros(out_c, in_c, 25)
        kernel[:, :, _RADIAL_OUTER] = flat[:, :, 1:]
        kernel[:, :, _RADIAL_INNER] = -flat[:, :, 1:]
        return F.conv2d(x, kernel.reshape(out_c, in_c, 5, 5), padding=2, groups=groups)
    raise ValueError(f"unknown pixel difference {op!r}")


class _PixelDifference(nn.Module):
    def __init__(self, op: str, channels_in: int, channels: int, groups: int = 1) -> None:
        super().__init__()
        self.op, self.groups = op, groups
        self.weight = nn.Parameter(torch.zeros(channels, channels_in // groups, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_difference_conv(self.op, x, self.weight, self.groups)


class _PDCBlock(nn.Module):
    def __init__(self, op: str, channels_in: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        if stride > 1:
            self.shortcut = nn.Conv2d(channels_in, channels, kernel_size=1)
        self.conv1 = _PixelDifference(op, channels_in, channels_in, groups=channels_in)
        self.conv2 = nn.Conv2d(channels_in, channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        y = self.conv2(F.relu(self.conv1(x)))
        return y + (self.shortcut(x) if self.stride > 1 else x)


class _Dilations(nn.Module):
    """CDCM: a 1x1 conv, then four 3x3 convs dilated 5, 7, 9 and 11, summed."""

    def __init__(self, channels_in: int, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels, kernel_size=1)
        for index, dilation in enumerate((5, 7, 9, 11), start=1):
            setattr(self, f"conv2_{index}", nn.Conv2d(channels, channels, kernel_size=3, dilation=dilation,
                                                       padding=dilation, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(F.relu(x))
        return sum(getattr(self, f"conv2_{i}")(x) for i in range(1, 5))  # type: ignore[return-value]


class _Attention(nn.Module):
    """CSAM: the input times a sigmoid mask made by a 1x1 conv to 4 channels and a 3x3 to 1."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4, kernel_size=1)
        self.conv2 = nn.Conv2d(4, 1, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv2(self.conv1(F.relu(x))))


class _MapReduce(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PiDiNet(nn.Module):
    """The four stage edge maps and their fusion (last), each in 0..1, at the input's size."""

    def __init__(self, ops: tuple[str, ...] = CARV4, width: int = 60, dilation: int = 24) -> None:
        super().__init__()
        self.init_block = _PixelDifference(ops[0], 3, width)
        # (channels in, channels, blocks) of each stage
        stages = ((width, width, 3), (width, 2 * width, 4), (2 * width, 4 * width, 4),
                  (4 * width, 4 * width, 4))
        op = iter(ops[1:])
        for stage, (channels_in, channels, blocks) in enumerate(stages, start=1):
            for block in range(1, blocks + 1):
                first = block == 1 and stage > 1
                setattr(self, f"block{stage}_{block}", _PDCBlock(
                    next(op), channels_in if first else channels, channels, stride=2 if first else 1))
        self.dilations = nn.ModuleList([_Dilations(c, dilation) for _, c, _ in stages])
        self.attentions = nn.ModuleList([_Attention(dilation) for _ in stages])
        self.conv_reduces = nn.ModuleList([_MapReduce(dilation) for _ in stages])
        self.classifier = nn.Conv2d(4, 1, kernel_size=1)
        self._blocks = [[f"block{stage}_{b}" for b in range(1, blocks + 1)]
                        for stage, (_, _, blocks) in enumerate(stages, start=1)]

    def forward(self, bgr01: torch.Tensor) -> list[torch.Tensor]:
        size = bgr01.shape[2:]
        x = self.init_block(bgr01)
        maps = []
        for stage, names in enumerate(self._blocks):
            for name in names:
                x = getattr(self, name)(x)
            reduced = self.conv_reduces[stage](self.attentions[stage](self.dilations[stage](x)))
            maps.append(F.interpolate(reduced, size, mode="bilinear", align_corners=False))
        maps.append(self.classifier(torch.cat(maps, dim=1)))
        return [torch.sigmoid(m) for m in maps]


# ---- lineart_anime: the pix2pix U-Net generator (netG.pth) -------------------------------


class _UnetLevel(nn.Module):
    """One level of the anime line U-Net, holding the level inside it (`sub`; the innermost
    holds none).

    `model` is laid out as the published generator's Sequentials, whose positions make the
    keys: the outermost level [down, inner, ReLU, up, Tanh] (keys .0, .3), an inner level
    [LeakyReLU, down, norm, inner, ReLU, up, norm] (.1, .5; the inner level at .3) and the
    innermost [LeakyReLU, down, ReLU, up, norm] (.1, .3). Every conv is 4x4, stride 2,
    padding 1, with a bias; the norms are instance norms without parameters.
    """

    def __init__(self, outer: int, inner: int, sub: _UnetLevel | None = None, *,
                 channels_in: int | None = None, outermost: bool = False) -> None:
        super().__init__()
        self.outermost = outermost
        down = nn.Conv2d(channels_in or outer, inner, kernel_size=4, stride=2, padding=1)
        up = nn.ConvTranspose2d(inner if sub is None else 2 * inner, outer, kernel_size=4, stride=2,
                                padding=1)
        if outermost:
            assert sub is not None
            layers: list[nn.Module] = [down, sub, nn.ReLU(), up, nn.Tanh()]
        elif sub is None:
            layers = [nn.LeakyReLU(0.2), down, nn.ReLU(), up, nn.InstanceNorm2d(outer)]
        else:
            layers = [nn.LeakyReLU(0.2), down, nn.InstanceNorm2d(inner), sub, nn.ReLU(), up,
                      nn.InstanceNorm2d(outer)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        # The published block starts with an in-place LeakyReLU on its input and concatenates
        # that same (now activated) tensor as the skip; done so here too (the ReLU the outer
        # level applies next would make the plain input the same)
        x = self.model[0](x)
        return torch.cat([x, self.model[1:](x)], dim=1)


class AnimeLineartUnet(nn.Module):
    """The anime line drawing of an RGB picture in -1..1 (one channel, -1..1, 1 = paper) whose
    sides are multiples of 256: a U-Net of 8 levels (`width`, 2, 4 and then 8 times `width`
    channels; 64 in the released netG.pth) with skip connections. Keys: `model.model.0`,
    `model.model.3` (outermost), then `.model.1` for each level further in, its `.model.1` /
    `.model.5` (or `.model.1` / `.model.3` for the innermost) convolutions."""

    def __init__(self, width: int = 64, levels: int = 8) -> None:
        super().__init__()
        level = _UnetLevel(8 * width, 8 * width)
        for _ in range(levels - 5):
            level = _UnetLevel(8 * width, 8 * width, level)
        for outer in (4 * width, 2 * width, width):
            level = _UnetLevel(outer, 2 * outer, level)
        self.model = _UnetLevel(1, width, level, channels_in=3, outermost=True)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.model(rgb)


# ---- lineart_anime_denoise: the manga line extraction res-U-Net (erika.pth) --------------


def _norm_act_conv(channels_in: int, channels: int, kernel: int, stride: int = 1,
                   upsample: bool = False) -> nn.Sequential:
    """Batch norm (eps 1e-3), LeakyReLU 0.2, a conv (`kernel` square, zero padding kernel // 2),
    and for the first block of an upsampling stage a 2x nearest upsampling; keys `.model.0`
    (the norm) and `.model.2` (the conv)."""
    layers = [nn.BatchNorm2d(channels_in, eps=1e-3), nn.LeakyReLU(0.2),
              nn.Conv2d(channels_in, channels, kernel, stride=stride, padding=kernel // 2)]
    if upsample:
        layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
    return nn.Sequential(*layers)


class _Wrapped(nn.Module):
    """A Sequential under the attribute `model` (what the published file's keys go through)."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class _MangaResidual(nn.Module):
    """Two norm-act-conv steps (`conv1`, `residual`) added to the input, which goes through a
    1x1 conv (`shortcut.model.0`) where the channels or the size change. `upsample` doubles the
    size (the first block of a decoder stage: conv1 and the shortcut upsample)."""

    def __init__(self, channels_in: int, channels: int, stride: int = 1, upsample: bool = False) -> None:
        super().__init__()
        self.conv1 = _Wrapped(*_norm_act_conv(channels_in, channels, 3, stride, upsample))
        self.residual = _Wrapped(*_norm_act_conv(channels, channels, 3))
        self.shortcut: nn.Module = nn.Identity()  # (no keys)
        if channels_in != channels or stride != 1:
            shortcut: list[nn.Module] = [nn.Conv2d(channels_in, channels, 1, stride=stride)]
            if upsample:
                shortcut.append(nn.Upsample(scale_factor=2, mode="nearest"))
            self.shortcut = _Wrapped(*shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.residual(self.conv1(x))


def _encoder_stage(channels_in: int, channels: int, blocks: int, downsample: bool) -> _Wrapped:
    """`blocks` residual blocks, the last of stride 2 where `downsample`."""
    return _Wrapped(*[_MangaResidual(channels_in if i == 0 else channels, channels,
                                     stride=2 if downsample and i == blocks - 1 else 1)
                      for i in range(blocks)])


def _decoder_stage(channels_in: int, channels: int, blocks: int) -> _Wrapped:
    """`blocks` residual blocks, the first doubling the size."""
    return _Wrapped(*[_MangaResidual(channels_in if i == 0 else channels, channels, upsample=i == 0)
                      for i in range(blocks)])


class MangaLineNet(nn.Module):
    """The manga line extraction net (MangaLineExtraction, Li et al. 2017; the weights
    erika.pth): a residual U-Net on a grey picture in 0..255 whose sides are multiples of 16,
    answering its line drawing (one channel, about 0..255, 255 = paper).

    Encoder `block0`..`block4` (`width` = 24 in erika.pth, doubling: 24, 48, 96, 192, 384
    channels from 1; 2, 3, 5, 7, 12 residual
    blocks, each stage but the first halving the size in its last block), decoder
    `block5`..`block8` (192, 96, 48, 24; 7, 5, 3, 2 blocks, each stage doubling the size in its
    first), each decoder stage's output plus the encoder's of the same size, `block9` (16
    channels, 2 blocks) and `conv15` (norm, LeakyReLU, 1x1 conv to one channel). Every block's
    keys: `<stage>.model.<i>.conv1|residual.model.0` (batch norm: weight, bias, running_mean,
    running_var, num_batches_tracked), `.model.2` (conv), and `shortcut.model.0` where projected.
    """

    ENCODER_BLOCKS = (2, 3, 5, 7, 12)
    DECODER_BLOCKS = (7, 5, 3, 2)

    def __init__(self, width: int = 24) -> None:
        super().__init__()
        channels_in = 1
        for index, blocks in enumerate(self.ENCODER_BLOCKS):
            channels = width << index
            stage = _encoder_stage(channels_in, channels, blocks, downsample=index > 0)
            setattr(self, f"block{index}", stage)
            channels_in = channels
        for index, blocks in enumerate(self.DECODER_BLOCKS, start=len(self.ENCODER_BLOCKS)):
            channels = channels_in // 2
            setattr(self, f"block{index}", _decoder_stage(channels_in, channels, blocks))
            channels_in = channels
        self.block9 = _encoder_stage(width, 16, 2, downsample=False)
        self.conv15 = _Wrapped(*_norm_act_conv(16, 1, 1))

    def forward(self, grey255: torch.Tensor) -> torch.Tensor:
        skips = []
        x = grey255
        stages = len(self.ENCODER_BLOCKS)
        for index in range(stages):
            x = getattr(self, f"block{index}")(x)
            skips.append(x)
        skips.pop()  # the bottom stage's output is the decoder's input, not a skip
        for index in range(stages, stages + len(self.DECODER_BLOCKS)):
            x = getattr(self, f"block{index}")(x) + skips.pop()
        return self.conv15(self.block9(x))


# (name, channels in, channels out, kernel) of the body pose net's feature stack; None: a 2x2 max-pool
_BODY_FEATURES: list[tuple[str, int, int, int] | None] = [
    ("conv1_1", 3, 64, 3), ("conv1_2", 64, 64, 3), None,
    ("conv2_1", 64, 128, 3), ("conv2_2", 128, 128, 3), None,
    ("conv3_1", 128, 256, 3), ("conv3_2", 256, 256, 3), ("conv3_3", 256, 256, 3), ("conv3_4", 256, 256, 3),
    None,
    ("conv4_1", 256, 512, 3), ("conv4_2", 512, 512, 3), ("conv4_3_CPM", 512, 256, 3),
    ("conv4_4_CPM", 256, 128, 3),
]
# channels: the shared features, the PAFs (19 limbs x (x, y)), the heatmaps (18 parts + background)
BODY_FEATURES, BODY_PAFS, BODY_HEATMAPS = 128, 38, 19


def _body_branch(stage: int, branch: int) -> list[tuple[str, int, int, int]]:
    """The convolutions of one branch (1: PAFs, 2: heatmaps) of one stage, as the file names them."""
    out = BODY_PAFS if branch == 1 else BODY_HEATMAPS
    if stage == 1:
        return [(f"conv5_1_CPM_L{branch}", BODY_FEATURES, 128, 3), (f"conv5_2_CPM_L{branch}", 128, 128, 3),
                (f"conv5_3_CPM_L{branch}", 128, 128, 3), (f"conv5_4_CPM_L{branch}", 128, 512, 1),
                (f"conv5_5_CPM_L{branch}", 512, out, 1)]
    width_in = BODY_PAFS + BODY_HEATMAPS + BODY_FEATURES
    convs = [(f"Mconv{k}_stage{stage}_L{branch}", width_in if k == 1 else 128, 128, 7) for k in range(1, 6)]
    return convs + [(f"Mconv6_stage{stage}_L{branch}", 128, 128, 1),
                    (f"Mconv7_stage{stage}_L{branch}", 128, out, 1)]


class BodyPoseNet(nn.Module):
    """OpenPose's body network (Cao et al., CVPR 2017; the `body_pose_model.pth` of
    lllyasviel/Annotators, converted from CMU's Caffe model by pytorch-openpose).

    A VGG-19-style feature stack (3x3 convolutions with ReLU, three 2x2 max-pools: stride 8)
    down to 128 channels, then six stages of two branches: L1 predicts 38 part affinity
    fields (x and y for 19 limbs), L2 19 heatmaps (18 keypoints and the background). Stage 1
    reads the features (three 3x3, a 1x1 to 512 and a 1x1 out); stages 2-6 read the previous
    stage's two outputs and the features, concatenated in that order (five 7x7, a 1x1 and a
    1x1 out). Every convolution is followed by a ReLU except each branch's last, but for the
    last stage's heatmaps: the published network (a duplicated name in its list of layers
    without ReLU) rectifies those, and so does this one, to give the same maps.

    The file keeps the Caffe layer names flat (`conv1_1.weight`, `conv5_5_CPM_L2.bias`,
    `Mconv7_stage6_L1.weight`, ...); the published code moves them into nested blocks when it
    loads them. Here every convolution is an attribute under its own name, so the file's keys
    are this module's state-dict keys as they are. Forward returns (PAFs, heatmaps) of the
    last stage, at an eighth of the input's size."""

    def __init__(self) -> None:
        super().__init__()
        self._features = [spec if spec is None else spec[0] for spec in _BODY_FEATURES]
        self._branches = [[[name for name, *_ in _body_branch(stage, branch)] for branch in (1, 2)]
                          for stage in range(1, 7)]
        specs = [s for s in _BODY_FEATURES if s is not None]
        specs += [s for stage in range(1, 7) for branch in (1, 2) for s in _body_branch(stage, branch)]
        for name, channels_in, channels, kernel in specs:
            # left uninitialised (52M parameters take seconds to draw at random): it is only
            # ever used with every tensor loaded from the file
            self.add_module(name, torch.nn.utils.skip_init(nn.Conv2d, channels_in, channels, kernel,
                                                           padding=kernel // 2))

    def _run(self, names: list[str | None], x: torch.Tensor, *, last_relu: bool) -> torch.Tensor:
        for i, name in enumerate(names):
            if name is None:
                x = F.max_pool2d(x, 2, 2)
                continue
            x = getattr(self, name)(x)
            if i < len(names) - 1 or last_relu:
                x = F.relu(x)
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self._run(self._features, x, last_relu=True)
        h = features
        pafs = heatmaps = features
        for stage, (paf_names, heat_names) in enumerate(self._branches, start=1):
            pafs = self._run(paf_names, h, last_relu=False)
            heatmaps = self._run(heat_names, h, last_relu=stage == 6)
            h = torch.cat([pafs, heatmaps, features], dim=1)
        return pafs, heatmaps

"""Small reference networks, written here and randomly initialised, to convert and verify end to end.

Each family of convolution that real CNNs use appears at least once: MobileNet-style
depthwise-separable blocks and inverted residuals with stride-2 stages, ResNet basic and bottleneck
blocks with 1x1 projection shortcuts, a ResNeXt grouped block, an Inception block (1x1 reductions,
1x7 and 7x1 kernels), a dilated (atrous) segmentation head, EfficientNet-style squeeze-and-excitation
(1x1 convolutions on a 1x1 grid), a U-Net (pooling, transposed convolutions, upsampling, skip concatenations),
and a "zoo" of the remaining ``nn.Conv2d`` corners (every padding
mode, even kernels with ``'same'``, ``'valid'``, uneven strides and dilations, depth multipliers, no
bias, odd image sizes). They are tiny (8-64 channels, 16-32 pixels) so that all of them verify in
seconds on a laptop CPU.

:data:`REFERENCE_MODELS` maps a name to a :class:`ReferenceModel` (factory, example input shape,
description); :func:`reference_model` builds one with a fixed seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["ReferenceModel", "REFERENCE_MODELS", "reference_model",
           "MobileNetish", "ResNetish", "ResNeXtish", "Inceptionish", "DilatedSegmenter", "SqueezeExciteNet",
           "ConvZoo", "UNet"]


# -------------------------------------------------------------------------------- building blocks
def _conv_bn(c_in: int, c_out: int, kernel_size: Any = 3, stride: Any = 1, padding: Any = None, groups: int = 1,
             dilation: Any = 1, act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    """Conv2d (no bias) -> BatchNorm2d -> activation; ``padding`` defaults to "keep the size" for odd kernels."""
    if padding is None:
        padding = (kernel_size - 1) // 2 * dilation if isinstance(kernel_size, int) else 0
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size, stride, padding, dilation, groups, bias=False),
                               nn.BatchNorm2d(c_out)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class DepthwiseSeparable(nn.Module):
    """MobileNet-v1 block: 3x3 depthwise (per channel) then 1x1 pointwise (channel mixing)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.depthwise = _conv_bn(c_in, c_in, 3, stride, groups=c_in, act=nn.ReLU6)
        self.pointwise = _conv_bn(c_in, c_out, 1, act=nn.ReLU6)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


class InvertedResidual(nn.Module):
    """MobileNet-v2 block: 1x1 expansion, 3x3 depthwise (maybe strided), linear 1x1 projection,
    identity shortcut when the shape is kept."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, expand: int = 2) -> None:
        super().__init__()
        hidden = c_in * expand
        self.use_shortcut = stride == 1 and c_in == c_out
        self.block = nn.Sequential(
            _conv_bn(c_in, hidden, 1, act=nn.ReLU6),
            _conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            _conv_bn(hidden, c_out, 1, act=None),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return x + out if self.use_shortcut else out


class MobileNetish(nn.Module):
    """MobileNet-style classifier: strided stem, a depthwise-separable block, inverted residuals in
    stride-2 stages, 1x1 head, global pooling, linear classifier."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, 16, 3, stride=2, act=nn.ReLU6)       # 32 -> 16
        self.features = nn.Sequential(
            DepthwiseSeparable(16, 16),
            InvertedResidual(16, 24, stride=2),                                  # 16 -> 8
            InvertedResidual(24, 24),
            InvertedResidual(24, 32, stride=2),                                  # 8 -> 4
            InvertedResidual(32, 32),
        )
        self.head = _conv_bn(32, 64, 1, act=nn.ReLU6)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.features(self.stem(x)))
        return self.classifier(x.mean((2, 3)))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convolutions, identity or 1x1 projection shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv_bn(c_in, c_out, 3, stride)
        self.conv2 = _conv_bn(c_out, c_out, 3, act=None)
        self.shortcut = (_conv_bn(c_in, c_out, 1, stride, act=None) if stride != 1 or c_in != c_out
                         else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 reduction, 3x3 (maybe strided, maybe grouped), 1x1 expansion, projection
    shortcut. With ``groups > 1`` it is the ResNeXt block."""

    def __init__(self, c_in: int, mid: int, c_out: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.reduce = _conv_bn(c_in, mid, 1)
        self.conv = _conv_bn(mid, mid, 3, stride, groups=groups)
        self.expand = _conv_bn(mid, c_out, 1, act=None)
        self.shortcut = (_conv_bn(c_in, c_out, 1, stride, act=None) if stride != 1 or c_in != c_out
                         else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.expand(self.conv(self.reduce(x))) + self.shortcut(x))


class ResNetish(nn.Module):
    """ResNet-style classifier: stem, basic blocks (identity and strided projection shortcuts), a
    strided bottleneck block, global pooling, linear classifier."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, 16, 3)
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(16, 32, stride=2)                # 24 -> 12, projection
        self.layer3 = Bottleneck(32, 16, 64, stride=2)            # 12 -> 6, projection
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class ResNeXtish(nn.Module):
    """ResNeXt-style classifier: grouped-convolution bottlenecks (cardinality 8, 4 channels per group)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, 32, 3)
        self.block1 = Bottleneck(32, 32, 32, groups=8)            # identity shortcut
        self.block2 = Bottleneck(32, 32, 64, stride=2, groups=8)  # projection shortcut
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.block2(self.block1(self.stem(x))).mean((2, 3)))


class InceptionBlock(nn.Module):
    """Inception block: 1x1; 1x1 -> 1x7 -> 7x1; 1x1 -> 3x3; 3x3 average pool -> 1x1; concatenated."""

    def __init__(self, c_in: int, width: int = 8, same: bool = False) -> None:
        super().__init__()
        pad17, pad71 = ("same", "same") if same else ((0, 3), (3, 0))
        self.branch1 = _conv_bn(c_in, width, 1)
        self.branch7 = nn.Sequential(_conv_bn(c_in, width, 1),
                                     _conv_bn(width, width, (1, 7), padding=pad17),
                                     _conv_bn(width, width, (7, 1), padding=pad71))
        self.branch3 = nn.Sequential(_conv_bn(c_in, width, 1), _conv_bn(width, width + width // 2, 3))
        self.branch_pool = nn.Sequential(nn.AvgPool2d(3, 1, 1), _conv_bn(c_in, width // 2, 1))
        self.out_channels = width * 3 + width // 2 + width // 2

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1(x), self.branch7(x), self.branch3(x), self.branch_pool(x)], dim=1)


class Inceptionish(nn.Module):
    """Inception-style classifier: stem, two Inception blocks (explicit and ``'same'`` padding of the
    factorised 7x7), global pooling, linear classifier."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, 16, 3, stride=2)        # 24 -> 12
        self.mixed1 = InceptionBlock(16, 8)
        self.mixed2 = InceptionBlock(self.mixed1.out_channels, 8, same=True)
        self.fc = nn.Linear(self.mixed2.out_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.mixed2(self.mixed1(self.stem(x))).mean((2, 3)))


class DilatedSegmenter(nn.Module):
    """Dilated (atrous) segmentation net: strided stem, dilated residual blocks (rates 2 and 4), an
    ASPP head (1x1, 3x3 at rates 2 and 3, and image pooling: a 1x1 convolution on a 1x1 grid), per-pixel
    logits upsampled to the input size."""

    def __init__(self, in_channels: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, 16, 3, stride=2)                  # 24 -> 12
        self.atrous = nn.ModuleList([_conv_bn(16, 16, 3, dilation=2), _conv_bn(16, 16, 3, dilation=4)])
        self.aspp = nn.ModuleList([_conv_bn(16, 8, 1), _conv_bn(16, 8, 3, dilation=2),
                                   _conv_bn(16, 8, 3, padding="same", dilation=(3, 2))])
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 8, 1), nn.ReLU())
        self.project = _conv_bn(32, 16, 1)
        self.classifier = nn.Conv2d(16, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        x = self.stem(x)
        for block in self.atrous:
            x = x + block(x)
        pooled = self.image_pool(x).expand(-1, -1, *x.shape[-2:])
        x = self.project(torch.cat([branch(x) for branch in self.aspp] + [pooled], dim=1))
        return nn.functional.interpolate(self.classifier(x), size=size, mode="bilinear", align_corners=False)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: global pooling to a 1x1 grid, 1x1 reduce, SiLU, 1x1 expand, sigmoid gate."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.expand(nn.functional.silu(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class MBConv(nn.Module):
    """EfficientNet block: 1x1 expansion, kxk depthwise, squeeze-and-excitation, linear 1x1 projection."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, expand: int = 4) -> None:
        super().__init__()
        hidden = c_in * expand
        self.use_shortcut = stride == 1 and c_in == c_out
        self.expand = _conv_bn(c_in, hidden, 1, act=nn.SiLU)
        self.depthwise = _conv_bn(hidden, hidden, kernel_size, stride, groups=hidden, act=nn.SiLU)
        self.se = SqueezeExcite(hidden, max(1, c_in // 4))
        self.project = _conv_bn(hidden, c_out, 1, act=None)

    def forward(self, x: Tensor) -> Tensor:
        out = self.project(self.se(self.depthwise(self.expand(x))))
        return x + out if self.use_shortcut else out


class SqueezeExciteNet(nn.Module):
    """EfficientNet-style classifier: MBConv blocks (5x5 and strided 3x3 depthwise) with
    squeeze-and-excitation."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, 16, 3, stride=2, act=nn.SiLU)   # 24 -> 12
        self.blocks = nn.Sequential(MBConv(16, 16, 5), MBConv(16, 24, 3, stride=2))
        self.head = _conv_bn(24, 32, 1, act=nn.SiLU)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


class ConvZoo(nn.Module):
    """The ``nn.Conv2d`` corners the other networks miss, in one chain on an odd, non-square image:
    reflect / replicate / circular padding, an even kernel with ``'same'`` padding, ``'valid'``, a
    4x4 stride-2 kernel, uneven stride and dilation, a depthwise layer with depth multiplier 2,
    ``bias=False``, stride 3, and a convolution applied twice (shared weights)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 4) -> None:
        super().__init__()
        self.reflect = nn.Conv2d(in_channels, 8, 3, padding=1, padding_mode="reflect")
        self.replicate = nn.Conv2d(8, 8, (3, 5), padding=(1, 2), padding_mode="replicate", bias=False)
        self.circular = nn.Conv2d(8, 8, 3, padding=2, dilation=2, padding_mode="circular")
        self.even_same = nn.Conv2d(8, 8, (2, 4), padding="same", dilation=(1, 2))
        self.shared = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.down = nn.Conv2d(8, 16, 4, stride=2, padding=1)
        self.uneven = nn.Conv2d(16, 16, (3, 2), stride=(1, 2), dilation=(2, 1), padding=(2, 0))
        self.depthwise = nn.Conv2d(16, 32, 3, padding="valid", groups=16)   # depth multiplier 2
        self.stride3 = nn.Conv2d(32, 16, 2, stride=3, padding=1, padding_mode="reflect")
        self.classifier = nn.Conv2d(16, num_classes, 1, bias=False)

        # BatchNorm after each convolution keeps the signal O(1) through the chain (PyTorch's default
        # initialisation shrinks it by about sqrt(3) per layer), so errors are measured on O(1) data.
        self.norms = nn.ModuleDict({name: nn.BatchNorm2d(conv.out_channels) for name, conv in self.named_children()
                                    if name != "classifier"})

    def forward(self, x: Tensor) -> Tensor:
        def step(name: str, x: Tensor, conv: nn.Module | None = None) -> Tensor:
            return nn.functional.gelu(self.norms[name]((conv or getattr(self, name))(x)))

        for name in ("reflect", "replicate", "circular", "even_same"):
            x = step(name, x)
        x = step("shared", self.shared(x))
        for name in ("down", "uneven", "depthwise", "stride3"):
            x = step(name, x)
        return self.classifier(x).mean((2, 3))


class UNet(nn.Module):
    """A U-Net: double 3x3 conv blocks (BatchNorm, ReLU), max pooling down, transposed convolutions and
    bilinear upsampling up (alternating), skip connections by channel concatenation, per-pixel 1x1 logits.

    Args:
        in_channels (int): image channels (default: 3).
        num_classes (int): output channels (default: 2).
        width (int): channels of the first level, doubled at each level down (default: 8).
        depth (int): pooling steps (default: 2).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 2, width: int = 8, depth: int = 2) -> None:
        super().__init__()
        widths = [width * 2 ** i for i in range(depth + 1)]

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(_conv_bn(c_in, c_out), _conv_bn(c_out, c_out))

        self.down = nn.ModuleList([block(in_channels, widths[0])] +
                                  [block(widths[i], widths[i + 1]) for i in range(depth)])
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for i in reversed(range(depth)):
            if (depth - 1 - i) % 2 == 0:  # a learned upsampling
                self.up.append(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2))
            else:  # a fixed one, then a 1x1 convolution to the level's width
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                             nn.Conv2d(widths[i + 1], widths[i], 1)))
            self.merge.append(block(2 * widths[i], widths[i]))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        skips.pop()
        for up, merge in zip(self.up, self.merge):
            x = merge(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


# ------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class ReferenceModel:
    """A registered reference network: how to build it and the input it expects.

    Args:
        name (str): registry key.
        factory (callable): builds the ``nn.Module`` (no arguments).
        input_shape (tuple[int, ...]): an example input shape ``(B, C, H, W)``.
        description (str): one line for tables.
    """

    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    description: str

    def build(self, *, seed: int = 0, dtype: torch.dtype | None = None, device: Any = None) -> nn.Module:
        """The network with seeded random weights (BatchNorm scales, shifts and running statistics
        randomised too, so inference-mode normalisation is not the identity). The global RNG is left alone."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.factory()
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        m.weight.uniform_(0.5, 1.5)
                        m.bias.normal_(0.0, 0.1)
                        m.running_mean.normal_(0.0, 0.1)
                        m.running_var.uniform_(0.5, 1.5)
        return model.to(device=device, dtype=dtype)

    def example_input(self, *, seed: int = 0, dtype: torch.dtype | None = None, device: Any = None,
                      batch_size: int | None = None) -> Tensor:
        """A seeded standard-normal input of :attr:`input_shape` (``batch_size`` replaces ``B``)."""
        shape = self.input_shape if batch_size is None else (batch_size, *self.input_shape[1:])
        generator = torch.Generator().manual_seed(seed + 1)
        return torch.randn(shape, generator=generator, dtype=dtype or torch.get_default_dtype()).to(device)


REFERENCE_MODELS: dict[str, ReferenceModel] = {m.name: m for m in [
    ReferenceModel("mobilenet", MobileNetish, (2, 3, 32, 32),
                   "depthwise-separable block, inverted residuals, stride-2 stages"),
    ReferenceModel("resnet", ResNetish, (2, 3, 24, 24),
                   "basic and bottleneck blocks, 1x1 projection shortcuts"),
    ReferenceModel("resnext", ResNeXtish, (2, 3, 16, 16), "grouped bottlenecks (cardinality 8)"),
    ReferenceModel("inception", Inceptionish, (2, 3, 24, 24),
                   "1x1 reductions, 1x7 and 7x1 kernels, explicit and 'same' padding"),
    ReferenceModel("dilated", DilatedSegmenter, (2, 3, 24, 24),
                   "atrous blocks (rates 2, 4), ASPP with image pooling, per-pixel logits"),
    ReferenceModel("squeeze_excite", SqueezeExciteNet, (2, 3, 24, 24),
                   "MBConv with squeeze-and-excitation (1x1 convolutions on a 1x1 grid)"),
    ReferenceModel("conv_zoo", ConvZoo, (2, 3, 19, 23),
                   "all padding modes, even 'same', 'valid', uneven stride/dilation, shared conv"),
    ReferenceModel("unet", UNet, (2, 3, 16, 16),
                   "U-Net: max pooling, transposed convolution and bilinear upsampling, skip concatenations"),
]}


def reference_model(name: str, *, seed: int = 0, dtype: torch.dtype | None = None, device: Any = None) -> nn.Module:
    """Build the reference network ``name`` (a key of :data:`REFERENCE_MODELS`) with seeded weights.

    Example:
        >>> sorted(REFERENCE_MODELS)
        ['conv_zoo', 'dilated', 'inception', 'mobilenet', 'resnet', 'resnext', 'squeeze_excite', 'unet']
        >>> net = reference_model('resnet')
        >>> net(torch.randn(REFERENCE_MODELS['resnet'].input_shape)).shape
        torch.Size([2, 10])
    """
    if name not in REFERENCE_MODELS:
        raise ValueError(f"unknown reference model {name!r}; expected one of {sorted(REFERENCE_MODELS)}")
    return REFERENCE_MODELS[name].build(seed=seed, dtype=dtype, device=device)

"""CIFAR ResNets (He et al., 2015) and pre-activation ResNets (He et al., 2016).

Both families have depth ``6n + 2``: a 3x3 stem convolution, three stages of ``n``
basic blocks with 16, 32 and 64 channels (the first block of stages 2 and 3
halves the resolution), global average pooling and a final ``nn.Linear`` named
``fc``. The shortcuts are the parameter-free "option A" of the ResNet paper, so
the parameter counts match the published ones (ResNet-20: 0.27M, ResNet-56:
0.85M, ResNet-110: 1.7M, ResNet-1202: 19.4M).

Initialisation follows ``fb.resnet.torch``: every convolution weight is drawn from
``Normal(0, sqrt(2 / (k * k * C_out)))`` (convolutions have no bias), every
BatchNorm has ``gamma = 1`` and ``beta = 0``, and the final ``nn.Linear`` keeps
PyTorch's default weight initialisation with a zero bias.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BasicBlock",
    "CifarPreResNet",
    "CifarResNet",
    "PreActBasicBlock",
    "ShortcutA",
    "cifar_preresnet",
    "cifar_resnet",
]

_STAGE_WIDTHS: tuple[int, int, int] = (16, 32, 64)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def _blocks_per_stage(depth: int) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(
            f"CIFAR ResNet depth must be an integer of the form 6n + 2 with n >= 1 "
            f"(e.g. 20, 32, 44, 56, 110, 230, 1202), got {depth!r}"
        )
    return (depth - 2) // 6


def _init_weights(model: nn.Module) -> None:
    """``fb.resnet.torch`` initialisation (see the module docstring)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            k_h, k_w = module.kernel_size
            std = math.sqrt(2.0 / (k_h * k_w * module.out_channels))
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


class ShortcutA(nn.Module):
    """Parameter-free "option A" shortcut: stride-2 subsampling plus zero channels.

    The new channels are appended after the input channels, as in ``fb.resnet.torch``.

    Example:
        >>> shortcut = ShortcutA(16, 32)
        >>> shortcut(torch.randn(2, 16, 32, 32)).shape
        torch.Size([2, 32, 16, 16])
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"ShortcutA cannot reduce channels ({in_channels} -> {out_channels})")
        self.in_channels = in_channels
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}"


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    if stride != 2:
        raise ValueError(f"option-A shortcut supports stride 1 or 2, got {stride}")
    return ShortcutA(in_channels, out_channels)


class BasicBlock(nn.Module):
    """Post-activation block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    Example:
        >>> block = BasicBlock(16, 32, stride=2)
        >>> block(torch.randn(2, 16, 32, 32)).shape
        torch.Size([2, 32, 16, 16])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return self.relu(out)


class PreActBasicBlock(nn.Module):
    """Pre-activation block: ``conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut(x)``.

    The shortcut takes the raw block input, so the shortcut path is a clean
    identity (up to option-A subsampling / zero channels).

    Example:
        >>> block = PreActBasicBlock(16, 16)
        >>> block(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 16, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.shortcut = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return out + self.shortcut(x)


def _make_stages(block: type[nn.Module], blocks_per_stage: int) -> list[nn.Sequential]:
    stages = []
    in_channels = _STAGE_WIDTHS[0]
    for index, width in enumerate(_STAGE_WIDTHS):
        first_stride = 1 if index == 0 else 2
        blocks = [block(in_channels, width, first_stride)]
        blocks += [block(width, width, 1) for _ in range(blocks_per_stage - 1)]
        stages.append(nn.Sequential(*blocks))
        in_channels = width
    return stages


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs (He et al., 2015, Sec. 4.2) with option-A shortcuts.

    Modules: ``conv1``, ``bn1``, ``relu``, ``layer1``-``layer3``, ``avgpool``, ``fc``.

    Example:
        >>> model = CifarResNet(depth=20, num_classes=10)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        blocks_per_stage = _blocks_per_stage(depth)
        self.depth = depth
        self.conv1 = _conv3x3(3, _STAGE_WIDTHS[0])
        self.bn1 = nn.BatchNorm2d(_STAGE_WIDTHS[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1, self.layer2, self.layer3 = _make_stages(BasicBlock, blocks_per_stage)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(_STAGE_WIDTHS[-1], num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class CifarPreResNet(nn.Module):
    """Pre-activation ResNet for 32x32 inputs (He et al., 2016) with option-A shortcuts.

    Modules: ``conv1``, ``layer1``-``layer3``, ``bn_final``, ``relu_final``,
    ``avgpool``, ``fc``. The stem is a bare convolution (the first block
    pre-activates it). With ``final_bn=False`` (the "PreResNetv1" of Huang et al.)
    ``bn_final`` and ``relu_final`` are ``nn.Identity``.

    Example:
        >>> model = CifarPreResNet(depth=20, final_bn=False)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, depth: int, num_classes: int = 10, final_bn: bool = True) -> None:
        super().__init__()
        blocks_per_stage = _blocks_per_stage(depth)
        self.depth = depth
        self.final_bn = final_bn
        self.conv1 = _conv3x3(3, _STAGE_WIDTHS[0])
        self.layer1, self.layer2, self.layer3 = _make_stages(PreActBasicBlock, blocks_per_stage)
        width = _STAGE_WIDTHS[-1]
        self.bn_final: nn.Module = nn.BatchNorm2d(width) if final_bn else nn.Identity()
        self.relu_final: nn.Module = nn.ReLU(inplace=True) if final_bn else nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.relu_final(self.bn_final(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """Build the CIFAR ResNet of the given depth (``6n + 2``, e.g. 20, 56, 110, 1202).

    Raises:
        ValueError: if ``depth`` is not of the form ``6n + 2`` with ``n >= 1``.

    Example:
        >>> model = cifar_resnet(20)
        >>> sum(p.numel() for p in model.parameters())
        269722
    """
    return CifarResNet(depth, num_classes)


def cifar_preresnet(depth: int, num_classes: int = 10, final_bn: bool = True) -> CifarPreResNet:
    """Build the CIFAR pre-activation ResNet of the given depth (``6n + 2``).

    ``final_bn=False`` drops the final BN-ReLU before pooling ("PreResNetv1").

    Raises:
        ValueError: if ``depth`` is not of the form ``6n + 2`` with ``n >= 1``.

    Example:
        >>> model = cifar_preresnet(56, final_bn=False)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return CifarPreResNet(depth, num_classes, final_bn)

"""Reference models for conditioning experiments and the "last BN" model surgery.

Example:
    >>> from lightning_conditioning.models import add_last_bn, cifar_resnet
    >>> model = add_last_bn(cifar_resnet(56))
    >>> type(model.fc).__name__
    'LastBN'
"""

from lightning_conditioning.models.cifar_resnet import (
    BasicBlock,
    CifarPreResNet,
    CifarResNet,
    PreActBasicBlock,
    ShortcutA,
    cifar_preresnet,
    cifar_resnet,
)
from lightning_conditioning.models.last_bn import (
    LastBN,
    Position,
    PreBNPool,
    add_last_bn,
    find_last_linear,
    remap_state_dict_for_last_bn,
)

__all__ = [
    "BasicBlock",
    "CifarPreResNet",
    "CifarResNet",
    "LastBN",
    "Position",
    "PreActBasicBlock",
    "PreBNPool",
    "ShortcutA",
    "add_last_bn",
    "cifar_preresnet",
    "cifar_resnet",
    "find_last_linear",
    "remap_state_dict_for_last_bn",
]

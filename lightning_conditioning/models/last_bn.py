"""Insert one BatchNorm right before a model's last linear layer ("ResNetLastBN").

Huang et al. (ECCV 2020) show that the input of the final classifier of a deep
network is ill-conditioned and that a single BatchNorm on that input (the pooled
features) fixes it. :func:`add_last_bn` adds that BatchNorm to any model in place:

* ``position="before_linear"`` (default): the final classifier ``linear`` is
  replaced in its parent by ``LastBN(nn.BatchNorm1d(linear.in_features), linear)``.
* ``position="before_pool"``: the model's global ``avgpool`` is replaced by
  ``PreBNPool(nn.BatchNorm2d(linear.in_features), avgpool)`` (ResNet-like models).

The *final classifier* is the last ``nn.Linear`` (subclasses included) in
``model.named_modules()`` order, i.e. in the order the submodules were registered.
For almost every architecture this is the output layer (``fc`` of ResNets,
``classifier[6]`` of VGG, ``classifier[3]`` of MobileNetV3, ``classifier`` of
DenseNet, ...), but if a model registers its head *before* its body, pass a model
whose registration order matches the data flow.

Checkpoints of the original model load after renaming ``<name>.weight`` to
``<name>.linear.weight`` (and the bias); see :func:`remap_state_dict_for_last_bn`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter

from lightning_conditioning.capture.selection import last_linear_name

__all__ = [
    "LastBN",
    "Position",
    "PreBNPool",
    "add_last_bn",
    "find_last_linear",
    "last_linear_name",
    "remap_state_dict_for_last_bn",
]

Position = Literal["before_linear", "before_pool"]
_POSITIONS: tuple[str, ...] = ("before_linear", "before_pool")


class LastBN(nn.Module):
    """A final classifier preceded by a BatchNorm on its ``(N, features)`` input.

    ``forward(x) = self.linear(self.bn(x))``. The input must be 2-D (pooled
    features); any other shape raises a ``ValueError`` at call time, because a
    ``BatchNorm1d`` would otherwise silently normalise the wrong axis.

    Example:
        >>> import torch
        >>> head = LastBN(nn.BatchNorm1d(64), nn.Linear(64, 10))
        >>> head(torch.randn(8, 64)).shape
        torch.Size([8, 10])
    """

    def __init__(self, bn: nn.BatchNorm1d, linear: nn.Linear) -> None:
        super().__init__()
        if bn.num_features != linear.in_features:
            raise ValueError(f"LastBN: bn has {bn.num_features} features but linear expects {linear.in_features}")
        self.bn = bn
        self.linear = linear

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2:
            raise ValueError(
                f"LastBN expects pooled (N, features) input, got shape {tuple(x.shape)}: "
                "add_last_bn(position='before_linear') only applies to a final nn.Linear fed with "
                "(N, features) tensors; for feature maps use position='before_pool'. A sequence "
                "model's (batch, tokens, features) head is not the paper's setting: pool the tokens "
                "before the BatchNorm, or keep the model's LayerNorm."
            )
        return self.linear(self.bn(x))


class PreBNPool(nn.Module):
    """A BatchNorm2d followed by the model's global pooling: ``pool(bn(x))``.

    Example:
        >>> import torch
        >>> pool = PreBNPool(nn.BatchNorm2d(64), nn.AdaptiveAvgPool2d(1))
        >>> pool(torch.randn(8, 64, 8, 8)).shape
        torch.Size([8, 64, 1, 1])
    """

    def __init__(self, bn: nn.BatchNorm2d, pool: nn.Module) -> None:
        super().__init__()
        self.bn = bn
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.bn.num_features:
            raise ValueError(
                f"PreBNPool expects (N, {self.bn.num_features}, H, W) feature maps, got shape {tuple(x.shape)}: "
                "position='before_pool' requires the pooled channels to feed the final nn.Linear directly."
            )
        return self.pool(self.bn(x))


def find_last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """Return ``(qualified_name, module)`` of the last ``nn.Linear`` in ``named_modules()`` order.

    Raises:
        ValueError: if the model contains no ``nn.Linear``.

    Example:
        >>> find_last_linear(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))[0]
        '2'
    """
    name = last_linear_name(model)
    if name is None:
        raise ValueError(
            f"add_last_bn: {type(model).__name__} contains no nn.Linear, so there is no final classifier "
            "to put a BatchNorm before."
        )
    linear = model.get_submodule(name)
    assert isinstance(linear, nn.Linear)
    return name, linear


def _existing_position(model: nn.Module) -> str | None:
    for module in model.modules():
        if isinstance(module, LastBN):
            return "before_linear"
        if isinstance(module, PreBNPool):
            return "before_pool"
    return None


def _set_child(parent: nn.Module, name: str, child: nn.Module) -> None:
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and name.isdigit():
        parent[int(name)] = child
    else:
        setattr(parent, name, child)


def _is_global_avg_pool(module: object) -> bool:
    return isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1))


def add_last_bn(
    model: nn.Module, *, position: Position = "before_linear", eps: float = 1e-5, momentum: float | None = 0.1
) -> nn.Module:
    """Put one BatchNorm right before the model's final classifier, in place.

    The final classifier is the last ``nn.Linear`` of ``model.named_modules()``
    (see the module docstring). The new BatchNorm is created on the Linear's
    device and dtype and in the Linear's train/eval mode. Calling the function
    again with the same ``position`` detects the existing :class:`LastBN` /
    :class:`PreBNPool` and changes nothing.

    Args:
        model: the network; modified in place and returned.
        position: ``"before_linear"`` wraps the Linear as ``LastBN(BatchNorm1d, linear)``
            (its input must be ``(N, features)``; a module cannot know the shape its forward
            will receive without running it, so this is checked at the first call, with a
            message that says what applies to sequence models);
            ``"before_pool"`` wraps the global ``avgpool`` that sits next to the
            Linear (CIFAR and torchvision ResNets) as ``PreBNPool(BatchNorm2d, avgpool)``.
        eps: BatchNorm epsilon.
        momentum: BatchNorm momentum (``None`` for a cumulative average).

    Returns:
        The same ``model`` object.

    Raises:
        ValueError: unknown ``position``; no ``nn.Linear``; the model *is* the
            Linear (it cannot be modified in place); a lazy, uninitialised Linear;
            ``"before_pool"`` on a model without a global ``avgpool`` next to its
            final Linear; or the model already has a last BN at the other position.

    Example:
        >>> from lightning_conditioning.models import cifar_resnet
        >>> model = add_last_bn(cifar_resnet(20))
        >>> type(model.fc).__name__, model.fc.bn.num_features
        ('LastBN', 64)
    """
    if position not in _POSITIONS:
        raise ValueError(f"add_last_bn: position must be one of {_POSITIONS}, got {position!r}")
    existing = _existing_position(model)
    if existing == position:
        return model
    if existing is not None:
        raise ValueError(f"add_last_bn: model already has a last BN at position={existing!r}; refusing to add another")

    name, linear = find_last_linear(model)
    if not name:
        raise ValueError("add_last_bn: the model is itself an nn.Linear; wrap it (e.g. nn.Sequential(linear)) first")
    if isinstance(linear.weight, UninitializedParameter):
        raise ValueError(f"add_last_bn: the final Linear {name!r} is lazy (uninitialised); run one forward pass first")
    device, dtype = linear.weight.device, linear.weight.dtype
    parent_name, _, child_name = name.rpartition(".")
    parent = model.get_submodule(parent_name)

    wrapper: nn.Module
    if position == "before_linear":
        bn1d = nn.BatchNorm1d(linear.in_features, eps=eps, momentum=momentum, device=device, dtype=dtype)
        wrapper = LastBN(bn1d, linear)
        _set_child(parent, child_name, wrapper)
    else:
        pool = getattr(parent, "avgpool", None)
        if not _is_global_avg_pool(pool):
            raise ValueError(
                f"add_last_bn: position='before_pool' needs a global average pool attribute `avgpool` "
                f"(nn.AdaptiveAvgPool2d(1)) on the module holding the final Linear {name!r}, as in CIFAR and "
                f"torchvision ResNets; {type(parent).__name__} has avgpool={pool!r}. "
                "Use position='before_linear' instead."
            )
        bn2d = nn.BatchNorm2d(linear.in_features, eps=eps, momentum=momentum, device=device, dtype=dtype)
        assert isinstance(pool, nn.Module)
        wrapper = PreBNPool(bn2d, pool)
        parent.avgpool = wrapper
    wrapper.train(linear.training)
    return model


def remap_state_dict_for_last_bn(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Adapt a checkpoint of the original model to ``model`` (after :func:`add_last_bn`).

    For every :class:`LastBN` at ``name`` the keys ``name.weight`` / ``name.bias``
    become ``name.linear.weight`` / ``name.linear.bias`` (every key under a
    :class:`PreBNPool` at ``name`` moves to ``name.pool.*``). The new BatchNorm's
    entries (``name.bn.*``) do not exist in an old checkpoint: they are filled with
    the current values of ``model`` (fresh: identity-like in eval mode), so the
    result loads with ``strict=True``. Alternatively, load the renamed keys with
    ``strict=False`` and ignore the BN's missing keys. Already-remapped keys are
    left alone, and the input mapping is not modified.

    Example:
        >>> from lightning_conditioning.models import cifar_resnet
        >>> old = cifar_resnet(20).state_dict()
        >>> model = add_last_bn(cifar_resnet(20))
        >>> model.load_state_dict(remap_state_dict_for_last_bn(old, model))
        <All keys matched successfully>
    """
    remapped = dict(state_dict)
    bn_prefixes: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, (LastBN, PreBNPool)):
            continue
        inner = "linear" if isinstance(module, LastBN) else "pool"
        prefix = f"{name}." if name else ""
        own = (f"{prefix}bn.", f"{prefix}{inner}.")
        for key in [k for k in remapped if k.startswith(prefix) and not k.startswith(own)]:
            remapped[f"{prefix}{inner}.{key[len(prefix) :]}"] = remapped.pop(key)
        bn_prefixes.append(f"{prefix}bn.")
    for key, value in model.state_dict().items():
        if key not in remapped and key.startswith(tuple(bn_prefixes)):
            remapped[key] = value.detach().clone()
    return remapped

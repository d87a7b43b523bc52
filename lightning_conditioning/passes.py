"""Extra forward/backward passes that leave no trace on training.

The true Fisher (labels sampled from the model) and probe batches need a forward and backward
pass of their own. :func:`isolated_pass` guarantees that such a pass changes nothing that
training can see: the global RNG streams (CPU and CUDA) are forked, every buffer (BatchNorm
running statistics, ``num_batches_tracked``) and every module's train/eval flag is restored,
and :func:`backward_without_grad` computes gradients with ``torch.autograd.grad`` so no
``.grad`` is touched (the optimizer state never is). The capture hooks still see the layer
inputs and output gradients of the pass.

What a pass calls and which loss it takes (batches, outputs, labels) is read by
:mod:`lightning_conditioning.batches`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lightning_conditioning.batches import (  # re-exported: the passes' public names
    ForwardFn,
    LossFn,
    SampleLossFn,
    defines_forward,
    forward_module_name,
    default_forward,
    forward_kwargs,
    logits_of,
    batch_labels,
    default_loss,
    class_dim_of,
    sampled_cross_entropy,
    position_mask,
    shifts_labels,
    sampled_loss,
    sampled_positions,
    label_generator,
)

__all__ = [
    "isolated_pass",
    "backward_without_grad",
    "cuda_devices",
    "ForwardFn",
    "LossFn",
    "SampleLossFn",
    "defines_forward",
    "forward_module_name",
    "default_forward",
    "forward_kwargs",
    "logits_of",
    "batch_labels",
    "default_loss",
    "class_dim_of",
    "sampled_cross_entropy",
    "position_mask",
    "shifts_labels",
    "sampled_loss",
    "sampled_positions",
    "label_generator",
]


def cuda_devices(module: nn.Module) -> list[torch.device]:
    """The CUDA devices holding ``module``'s parameters (for ``torch.random.fork_rng``).

    Example:
        >>> cuda_devices(nn.Linear(2, 2))
        []
    """
    return sorted({t.device for t in module.parameters() if t.device.type == "cuda"}, key=str)


@contextmanager
def isolated_pass(module: nn.Module) -> Iterator[None]:
    """Run extra passes inside; afterwards RNG, buffers and train/eval flags are as before.

    Example:
        >>> bn = nn.BatchNorm1d(2)
        >>> with isolated_pass(bn):
        ...     _ = bn(torch.randn(4, 2) + 5)
        >>> bn.running_mean.tolist()
        [0.0, 0.0]
    """
    buffers = [(buffer, buffer.detach().clone()) for buffer in module.buffers()]
    modes = [(child, child.training) for child in module.modules()]
    try:
        with torch.random.fork_rng(devices=cuda_devices(module)):
            yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for child, training in modes:
            child.training = training


def backward_without_grad(module: nn.Module, loss: Tensor) -> bool:
    """Backpropagate ``loss`` to every trainable parameter without touching ``.grad``.

    Returns False (and does nothing) when no parameter requires a gradient.

    Example:
        >>> layer = nn.Linear(2, 1)
        >>> backward_without_grad(layer, layer(torch.ones(1, 2)).sum()), layer.weight.grad
        (True, None)
    """
    parameters = [p for p in module.parameters() if p.requires_grad]
    if not parameters or not loss.requires_grad:
        return False
    torch.autograd.grad(loss, parameters, allow_unused=True)
    return True

"""Extra forward/backward passes that leave no trace on training.

The true Fisher (labels sampled from the model) and probe batches need a forward and backward
pass of their own. :func:`isolated_pass` guarantees that such a pass changes nothing that
training can see: the global RNG streams (CPU and CUDA) are forked, every buffer (BatchNorm
running statistics, ``num_batches_tracked``) and every module's train/eval flag is restored,
and :func:`backward_without_grad` computes gradients with ``torch.autograd.grad`` so no
``.grad`` is touched (the optimizer state never is). The capture hooks still see the layer
inputs and output gradients of the pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ForwardFn",
    "LossFn",
    "SampleLossFn",
    "isolated_pass",
    "backward_without_grad",
    "cuda_devices",
    "default_forward",
    "default_loss",
    "sampled_cross_entropy",
]

#: ``forward_fn(pl_module, batch) -> outputs``
ForwardFn = Callable[[nn.Module, Any], Tensor]
#: ``loss_fn(outputs, batch) -> loss`` with the batch's own labels (empirical Fisher)
LossFn = Callable[[Tensor, Any], Tensor]
#: ``sample_fn(outputs, generator) -> loss`` with labels drawn from the model (true Fisher)
SampleLossFn = Callable[[Tensor, torch.Generator], Tensor]


def default_forward(module: nn.Module, batch: Any) -> Tensor:
    """``module(batch[0])`` for ``(inputs, targets, ...)`` batches.

    Example:
        >>> default_forward(nn.Identity(), (torch.ones(2), torch.zeros(2)))
        tensor([1., 1.])
    """
    if isinstance(batch, (tuple, list)) and batch:
        return module(batch[0])
    raise TypeError(
        f"cannot find the inputs in a batch of type {type(batch).__name__}: pass "
        "forward_fn=lambda module, batch: module(...) to the callback"
    )


def default_loss(outputs: Tensor, batch: Any) -> Tensor:
    """Mean cross-entropy against ``batch[1]`` (classification).

    Example:
        >>> float(default_loss(torch.zeros(2, 4), (None, torch.tensor([0, 3])))) == float(torch.log(torch.tensor(4.0)))
        True
    """
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        return F.cross_entropy(outputs, batch[1])
    raise TypeError("cannot find the targets in the batch: pass loss_fn to the callback")


def sampled_cross_entropy(outputs: Tensor, generator: torch.Generator) -> Tensor:
    """Mean cross-entropy against labels drawn from ``softmax(outputs)`` (the true Fisher).

    ``outputs`` are ``(N, classes)`` logits (or ``(N, classes, *)``, sampled per position).
    The draw uses ``generator`` only, never the global RNG.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> float(sampled_cross_entropy(torch.zeros(3, 2), g)) == float(torch.log(torch.tensor(2.0)))
        True
    """
    logits = outputs.detach().float().movedim(1, -1).reshape(-1, outputs.shape[1])
    probabilities = torch.softmax(logits, dim=-1).cpu()
    labels = torch.multinomial(probabilities, 1, generator=generator).reshape(
        outputs.shape[:1] + outputs.shape[2:]
    )
    return F.cross_entropy(outputs, labels.to(outputs.device))


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

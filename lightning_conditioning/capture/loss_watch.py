"""The model's own loss, and the gradient that reaches it: what a trainer scaled the loss by.

A trainer that calls ``model(**batch)`` and reads ``outputs.loss`` (the Hugging Face
``Trainer``, an Accelerate loop) multiplies that loss before ``backward``: ``1/K`` for ``K``
accumulated micro-batches of an unnormalised loss, the number of processes when tokens are
averaged across devices, the float16 loss scale. :class:`LossWatch` reads it, with no help
from the trainer: a pre-hook on the model sees each forward's keyword arguments (``labels``,
``num_items_in_batch``), and a tensor hook on the returned loss sees the gradient reaching it,
which runs before any layer's output-gradient hook (the loss is the root of the model's part
of the graph). :class:`LossFactor` turns both into the capture's per-row factor, and
:class:`WatchedPasses` decides which of the trainer's forwards a monitor captures. Framework-free.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["LossWatch", "LossFactor", "WatchedPasses", "StepLoss", "item_count"]


def item_count(value: Any) -> int | None:
    """``num_items_in_batch`` (an int or a one-element tensor) as an int; None otherwise.

    Example:
        >>> import torch
        >>> item_count(torch.tensor(12.0)), item_count(7), item_count(True), item_count(None)
        (12, 7, None, None)
    """
    if isinstance(value, Tensor):
        return int(round(float(value))) if value.numel() == 1 else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return int(round(value))
    return None


class LossWatch:
    """Two hooks on a model, acting only while ``active()``: before each forward,
    ``before(kwargs)`` gets its keyword arguments; on the backward, ``loss_grad(loss, grad)``
    gets the model's (scalar) ``loss`` and the gradient that reaches it.

    Example:
        >>> import torch
        >>> class Model(nn.Module):
        ...     def forward(self, x, labels=None):
        ...         return {"loss": (x * self.w).sum()} if hasattr(self, "w") else None
        >>> model = Model(); model.w = nn.Parameter(torch.ones(2))
        >>> seen = []
        >>> watch = LossWatch(lambda: True, lambda kw: seen.append(sorted(kw)),
        ...                   lambda loss, grad: seen.append(float(grad)))
        >>> watch.attach(model)
        >>> (0.25 * model(x=torch.ones(2), labels=1)["loss"]).backward()
        >>> watch.detach(); seen
        [['labels', 'x'], 0.25]
    """

    def __init__(
        self,
        active: Callable[[], bool],
        before: Callable[[Mapping[str, Any]], None],
        loss_grad: Callable[[Tensor, Tensor], None],
    ) -> None:
        self._active, self._before, self._loss_grad = active, before, loss_grad
        self._handles: list[RemovableHandle] = []

    def attach(self, model: nn.Module) -> None:
        self.detach()
        self._handles = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            model.register_forward_hook(self._post),
        ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._active():
            self._before(kwargs)

    def _post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not self._active():
            return
        if isinstance(output, Mapping):  # ModelOutput, dict
            loss = output.get("loss")
        elif isinstance(output, (tuple, list)) and output:  # return_dict=False: the loss first
            loss = output[0]
        else:
            loss = getattr(output, "loss", None)
        if isinstance(loss, Tensor) and loss.requires_grad and loss.ndim == 0:
            loss.register_hook(functools.partial(self._on_grad, loss.detach()))

    def _on_grad(self, loss: Tensor, grad: Tensor) -> None:
        self._loss_grad(loss, grad)


class _Capture(Protocol):  # what LossFactor and WatchedPasses need of a ConditioningMonitor
    loss_reduction: str

    @property
    def current_step(self) -> int | None: ...
    @property
    def capturing(self) -> bool: ...

    def loss_tokens_for(self, batch: Any) -> int | None: ...
    def set_loss_tokens(self, tokens: int | None) -> None: ...
    def set_grad_multiplier(self, grad_multiplier: float) -> None: ...


class LossFactor:
    """The per-row factor of each captured micro-batch, for a monitor whose passes a trainer
    runs: the tokens its loss divides by (``num_items_in_batch`` when the trainer passes it and
    the loss is a token mean, else the micro-batch's own labels), and the inverse of what the
    trainer multiplied the loss by, read off the gradient that reaches it (README "Hugging
    Face Trainer", the per-token factor). :attr:`forwards` and :attr:`graded` count the
    micro-batches seen and those whose loss gradient arrived.

    Example:
        >>> import torch
        >>> class Monitor:
        ...     loss_reduction = "token_mean"
        ...     def loss_tokens_for(self, batch): return None
        ...     def set_loss_tokens(self, tokens): print("tokens", tokens)
        ...     def set_grad_multiplier(self, m): print("multiplier", m)
        >>> factor = LossFactor(Monitor())
        >>> factor.before_forward({"num_items_in_batch": torch.tensor(40)})
        tokens 40
        multiplier 1.0
        >>> factor.loss_gradient(torch.tensor(2.0), torch.tensor(0.5))
        multiplier 2.0
        >>> factor.forwards, factor.graded
        (1, 1)
    """

    def __init__(self, monitor: _Capture) -> None:
        self.monitor = monitor
        self.forwards = self.graded = 0

    def reset(self) -> None:
        """A new captured step."""
        self.forwards = self.graded = 0

    def before_forward(self, kwargs: Mapping[str, Any]) -> None:
        """A captured micro-batch's forward is about to run with ``kwargs``."""
        self.forwards += 1
        tokens = item_count(kwargs.get("num_items_in_batch"))
        if tokens is None or self.monitor.loss_reduction != "token_mean":
            tokens = self.monitor.loss_tokens_for(kwargs)  # its own labels (None: rows / batch)
        self.monitor.set_loss_tokens(tokens)
        self.monitor.set_grad_multiplier(1.0)  # until the loss gradient says otherwise

    def loss_gradient(self, loss: Tensor, grad: Tensor) -> None:
        """The gradient reaching the model's loss: what the trainer multiplied it by, undone."""
        factor = float(grad)
        if factor != 0.0 and math.isfinite(factor):
            self.graded += 1
            self.monitor.set_grad_multiplier(1.0 / factor)

    def missing_note(self, who: str, step: int) -> str | None:
        """A sentence when the backward of some captured micro-batches did not pass through
        the model's own loss (what the trainer scaled it by is then unknown)."""
        missing = self.forwards - self.graded
        if not missing:
            return None
        return (
            f"{who}: step {step}: the backward of {missing} captured micro-batch(es) did not "
            "pass through the model's own `loss` (labels popped by `compute_loss_func` or label "
            "smoothing, a custom `compute_loss`), so what the trainer scaled the loss by is "
            "unknown: λmax(Σ∇h) may be off by a constant factor (κ_p is not affected)."
        )


class WatchedPasses:
    """The passes a trainer runs through the model, seen from the model's own hooks (a trainer
    whose callbacks get no hook around each micro-batch: the Hugging Face ``Trainer``): which
    forwards the monitor captures, each captured micro-batch's per-row factor
    (:class:`LossFactor`) and, for the true Fisher without probe batches, the sampled pass run
    through ``extra_pass(batch, step)`` before each micro-batch's own forward. The callback's own
    passes run inside :meth:`own_pass`, and are not seen as the trainer's.

    Example:
        >>> class Passes:  # the callback's ExtraPasses (capture.passes)
        ...     fisher, probe_batches, active = "empirical", 0, False
        >>> watched = WatchedPasses(Passes(), lambda batch, step: None)
        >>> watched.monitor is None, watched.watch._active()
        (True, False)
    """

    def __init__(self, extra_passes: Any, extra_pass: Callable[[Any, int], None]) -> None:
        self.extra_passes, self._extra_pass = extra_passes, extra_pass
        self.monitor: _Capture | None = None
        self.factor: LossFactor | None = None  # the per-row factor of the trainer's passes
        self._own = False  # one of the callback's own passes is running
        #: the model's hooks (attach to the model the trainer trains)
        self.watch = LossWatch(self._capturing, self._before_forward, self._loss_gradient)

    def bind(self, monitor: _Capture) -> None:
        """The monitor the trainer's passes feed."""
        self.monitor, self.factor = monitor, LossFactor(monitor)

    @contextmanager
    def own_pass(self) -> Iterator[None]:
        """The callback's own forward and backward run inside: not one of the trainer's."""
        self._own = True
        try:
            yield
        finally:
            self._own = False

    def missing_note(self, who: str, step: int) -> str | None:
        """:meth:`LossFactor.missing_note` for an analysed ``step`` (None for any other)."""
        if self.monitor is None or self.factor is None or self.monitor.current_step != step:
            return None
        return self.factor.missing_note(who, step)

    def _capturing(self) -> bool:
        monitor = self.monitor
        if monitor is None or self._own:
            return False
        if self.extra_passes.fisher == "true" and not self.extra_passes.probe_batches:
            return monitor.current_step is not None  # each micro-batch gets its sampled pass
        return monitor.capturing

    def _before_forward(self, kwargs: Mapping[str, Any]) -> None:
        """A micro-batch of a captured step (the true Fisher: its pass with sampled labels, here,
        before the trainer's own forward, inside the trainer's autocast)."""
        assert self.monitor is not None and self.factor is not None
        if self.extra_passes.active:
            assert self.monitor.current_step is not None
            self._extra_pass(dict(kwargs), self.monitor.current_step)
        else:
            self.factor.before_forward(kwargs)

    def _loss_gradient(self, loss: Tensor, grad: Tensor) -> None:
        if self.factor is not None and not self.extra_passes.active:  # (extra passes: their own)
            self.factor.loss_gradient(loss, grad)


class StepLoss:
    """A step's training loss as the trainer applied it: the model's own loss of every
    micro-batch times what the trainer scaled it by (read off the gradient reaching it, the
    float16 scale taken out), summed, then the mean over processes.

    Example:
        >>> import torch
        >>> step = StepLoss()
        >>> step.start(scale=4.0)
        >>> step.add(torch.tensor(3.0), torch.tensor(2.0)); step.add(torch.tensor(1.0), torch.tensor(2.0))
        >>> step.value()
        2.0
    """

    def __init__(self) -> None:
        self.total, self.count, self.scale = 0.0, 0, 1.0

    def start(self, scale: float = 1.0) -> None:
        """A new step; ``scale``: the float16 loss scale the gradients carry."""
        self.total, self.count, self.scale = 0.0, 0, scale

    def add(self, loss: Tensor, grad: Tensor) -> None:
        """A micro-batch's loss and the gradient reaching it."""
        self.total += float(loss) * float(grad) / self.scale
        self.count += 1

    def value(self, mean: Callable[[float], float] = float) -> float | None:
        """The step's loss (``mean``: over processes, e.g. ``Collectives.mean``); None when no
        micro-batch's loss was seen or it is not finite."""
        loss = mean(self.total if self.count else math.nan)
        return loss if math.isfinite(loss) else None

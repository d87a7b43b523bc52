"""``WeightDominationTrainerCallback``: the weight-domination check in a Hugging Face ``Trainer``."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from lightning_conditioning.capture.loss_watch import LossWatch
from lightning_conditioning.distributed.collectives import Collectives, auto_collectives
from lightning_conditioning.integrations.huggingface.shell import _TrainerShell
from lightning_conditioning.monitors.domination import DominationOptions, WeightDominationMonitor
from lightning_conditioning.monitors.readouts import DominationReadout
from lightning_conditioning.monitors.shell import check_options, grad_scale, unscale_gradients

__all__ = ["WeightDominationTrainerCallback"]


class WeightDominationTrainerCallback(DominationReadout, _TrainerShell):
    r"""σmax(∇W)/σmax(W) per layer and warnings about layers in weight domination, in a Hugging
    Face ``Trainer``: a thin shell over :class:`~lightning_conditioning.WeightDominationMonitor`.

    Every ``every_n_steps``-th optimizer step is checked in ``on_pre_optimizer_step`` (the
    gradient as the optimizer applies it: fp16 unscaled, DDP-averaged, clipped when the Trainer
    clips) and its update in ``on_optimizer_step``; the scalars go to every reporting
    integration under ``{prefix}/{layer}/{quantity}`` and ``{prefix}/dominated_layers``. The
    step's loss (each layer's fall is judged net of it) is the model's loss of every
    micro-batch times what the Trainer scaled it by, summed and averaged over processes.
    README "Hugging Face Trainer".

    Args:
        every_n_steps: check optimizer steps 0, n, 2n, …
        prefix: first part of every logged key.
        **options: the check's other options by name (``threshold``, ``patience``, ``include``,
            …: :class:`~lightning_conditioning.monitors.domination.DominationOptions`).

    Example::

        domination = WeightDominationTrainerCallback(every_n_steps=50)
        Trainer(model, args, train_dataset=data, callbacks=[domination]).train()
        domination.dominated, domination.results["lm_head"].grad_weight_ratio
    """

    def __init__(self, every_n_steps: int = 100, *, prefix: str = "weight_domination", **options: Any) -> None:
        super().__init__()
        check_options(options, DominationOptions.names())
        #: the check's options, validated
        self.options = DominationOptions(every_n_steps=every_n_steps, **options)
        for name, value in self.options.as_kwargs().items():
            setattr(self, name, value)
        self.prefix = prefix
        self.monitor: WeightDominationMonitor | None = None
        self._watch = LossWatch(lambda: self._checking, lambda kwargs: None, self._add_loss)
        self._checking = False  # the step under way is checked: its loss is summed
        self._loss_sum, self._losses = 0.0, 0
        self._scale = 1.0
        self._collectives = Collectives.local()

    # ------------------------------------------------------------------ the Trainer's hooks
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._bind(state)
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            raise RuntimeError(f"{type(self).__name__}: the Trainer passed no model to on_train_begin")
        if self.monitor is not None:
            self._restored = self.monitor.state_dict()
        self._restore(state)  # a resumed run: what its checkpoint holds
        self._collectives = auto_collectives()  # torch.distributed's group under DDP / FSDP
        self.monitor = WeightDominationMonitor(
            model, prefix=self.prefix, warn=self._warn, info=self._info, collectives=self._collectives,
            **self.options.as_kwargs())
        self.monitor.load_state_dict(self._restored)
        self._watch.attach(model)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._checking = self.monitor is not None and self.monitor.is_due(state.global_step)
        if self._checking:
            self._loss_sum, self._losses = 0.0, 0
            self._scale = grad_scale(kwargs.get("optimizer"))

    def _add_loss(self, loss: Tensor, grad: Tensor) -> None:
        """The model's loss times what the Trainer scaled it by (the fp16 scale taken out)."""
        self._loss_sum += float(loss) * float(grad) / self._scale
        self._losses += 1

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._checking = False
        step = state.global_step
        if self.monitor is None or not self.monitor.is_due(step):
            return
        unscale_gradients(kwargs.get("optimizer"))
        self.monitor.before_optimizer_step(step, loss=self._step_loss())

    def _step_loss(self) -> float | None:
        """The checked step's training loss, the mean over processes (every process checks the
        same steps: one scalar all-reduce per check)."""
        loss = self._loss_sum if self._losses else math.nan
        group = self._collectives
        if group.distributed:
            import torch

            total = group.all_reduce(torch.tensor([loss], dtype=torch.float64), "sum")
            loss = float(total[0]) / group.world_size
        return loss if math.isfinite(loss) else None

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        monitor, step = self.monitor, state.global_step
        if monitor is None or monitor.pending_step != step:
            return
        if getattr(kwargs.get("optimizer"), "step_was_skipped", False):
            monitor.cancel()  # fp16 overflow: no update was applied
            return
        self._report(args, state, control, step, monitor.after_optimizer_step(), kwargs)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._checking = False
        self._watch.detach()
        if self.monitor is not None:
            self.monitor.cancel()

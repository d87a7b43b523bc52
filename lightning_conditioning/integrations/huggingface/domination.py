"""``WeightDominationTrainerCallback``: the weight-domination check in a Hugging Face ``Trainer``."""

from __future__ import annotations

from typing import Any

from lightning_conditioning.capture.loss_watch import LossWatch, StepLoss
from lightning_conditioning.distributed.collectives import Collectives, auto_collectives
from lightning_conditioning.integrations.huggingface.shell import _TrainerShell
from lightning_conditioning.monitors.domination import DominationOptions, WeightDominationMonitor
from lightning_conditioning.monitors.readouts import DominationReadout
from lightning_conditioning.monitors.shell import check_options, grad_scale, unscale_gradients

__all__ = ["WeightDominationTrainerCallback"]


class WeightDominationTrainerCallback(DominationReadout, _TrainerShell):
    r"""σmax(∇W)/σmax(W) per layer and warnings about layers in weight domination, in a Hugging
    Face ``Trainer``: a thin shell over :class:`~lightning_conditioning.WeightDominationMonitor`.

    A step is checked in ``on_pre_optimizer_step`` (the gradient as the optimizer applies it:
    fp16 unscaled, DDP-averaged, clipped) and its update in ``on_optimizer_step``; each layer's
    fall is judged net of the step's loss (:class:`~lightning_conditioning.capture.loss_watch.StepLoss`).

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
        self._loss = StepLoss()  # the checked step's loss
        self._watch = LossWatch(lambda: self._checking, lambda kwargs: None, self._loss.add)
        self._checking = False  # the step under way is checked: its loss is summed
        self._collectives = Collectives.local()

    # ------------------------------------------------------------------ the Trainer's hooks
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = self._bind(state, kwargs)
        self._collectives = auto_collectives()  # torch.distributed's group under DDP / FSDP
        self.monitor = self._new_monitor(
            WeightDominationMonitor, model, prefix=self.prefix, collectives=self._collectives
        )
        self.monitor.load_state_dict(self._restored)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._checking = self.monitor is not None and self.monitor.is_due(state.global_step)
        if self._checking:
            self._loss.start(grad_scale(kwargs.get("optimizer")))

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._checking = False
        step = state.global_step
        if self.monitor is None or not self.monitor.is_due(step):
            return
        unscale_gradients(kwargs.get("optimizer"))
        # (every process checks the same steps: one scalar all-reduce per check)
        self.monitor.before_optimizer_step(step, loss=self._loss.value(self._collectives.mean))

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        monitor, step = self.monitor, state.global_step
        if monitor is None or monitor.pending_step != step:
            return
        if getattr(kwargs.get("optimizer"), "step_was_skipped", False):
            monitor.cancel()  # fp16 overflow: no update was applied
            return
        self._report((args, state, control, kwargs), step, monitor.after_optimizer_step())

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._checking = False
        self._watch.detach()
        if self.monitor is not None:
            self.monitor.cancel()

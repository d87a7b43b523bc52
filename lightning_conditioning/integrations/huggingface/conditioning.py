"""``ConditioningTrainerCallback``: the conditioning analysis in a Hugging Face ``Trainer``."""

from __future__ import annotations

import functools
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

from torch import nn

from lightning_conditioning.analysis.options import ConditioningOptions
from lightning_conditioning.capture import passes
from lightning_conditioning.capture.loss_watch import WatchedPasses
from lightning_conditioning.capture.passes import ForwardFn, LossFn, SampleLossFn
from lightning_conditioning.integrations.huggingface.shell import Hook, _TrainerShell, resumed_checkpoint
from lightning_conditioning.monitors.conditioning import ConditioningMonitor
from lightning_conditioning.monitors.readouts import ConditioningReadout
from lightning_conditioning.monitors.shell import check_options, domination_source, grad_scale, unwrap_optimizer
from lightning_conditioning.sinks.reporters import write_to_tensorboard
from lightning_conditioning.views.publication import Publication

__all__ = ["ConditioningTrainerCallback"]


class ConditioningTrainerCallback(ConditioningReadout, _TrainerShell):
    r"""λmax, κ_p and rank of Σx, Σ∇h and the sub-FIM of every weight layer, in a Hugging Face
    ``Trainer``: a thin shell over :class:`~lightning_conditioning.ConditioningMonitor`.

    A step opens in ``on_step_begin``; hooks on the model read each micro-batch's ``labels`` /
    ``num_items_in_batch`` and the gradient reaching its loss (the per-token factor,
    :class:`~lightning_conditioning.capture.loss_watch.LossFactor`); the window finishes in
    ``on_optimizer_step`` and its results go to every reporting integration at the step it
    began, with TensorBoard also the histograms and the spectra file. The extra passes and the
    state in checkpoints are the Lightning callback's (README "Hugging Face Trainer").

    Args:
        every_n_steps: analyse optimizer steps 0, n, 2n, … (None: the default schedule).
        prefix: first part of every logged key.
        log_histograms: with a TensorBoard integration, the histograms and the spectra file.
        print_diagnosis: print the diagnosis of the latest analysis when training ends.
        **options: the monitor's analysis options by name (``kappa_percents``, ``include``,
            ``loss_reduction``, ``window_steps``, ``solver``, …), checked here.

    Example::

        conditioning = ConditioningTrainerCallback(every_n_steps=100, include=["model.layers.*"])
        Trainer(model, args, train_dataset=data, callbacks=[conditioning]).train()
        conditioning.results["model.layers.0.mlp.down_proj"].grad.kappa[50]
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        *,
        prefix: str = "conditioning",
        log_histograms: bool = True,
        print_diagnosis: bool = False,
        fisher: Literal["empirical", "true"] = "empirical",
        probe_batches: int = 0,
        forward_fn: ForwardFn | None = None,
        loss_fn: LossFn | None = None,
        sample_fn: SampleLossFn | None = None,
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__()
        #: the callback's own passes (true Fisher, probe batches)
        self.extra_passes = passes.ExtraPasses(fisher, probe_batches, seed, loss_fn, sample_fn, forward_fn)
        check_options(options, ConditioningOptions.names())
        #: the analysis options, checked (the monitor's :class:`ConditioningOptions`)
        self.options = ConditioningOptions(every_n_steps=every_n_steps, **options)
        self.prefix, self.log_histograms, self.print_diagnosis = prefix, log_histograms, print_diagnosis
        self.monitor: ConditioningMonitor | None = None
        self._model: nn.Module | None = None
        self._passes = WatchedPasses(self.extra_passes, self._extra_pass)  # the Trainer's, seen from the model
        self._watch = self._passes.watch
        self._rank, self._optimizer, self._probe_file = 0, None, ""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # beside the new checkpoint
        self.extra_passes.save_held(Path(args.output_dir) / f"checkpoint-{state.global_step}", self._probe_file)

    # ------------------------------------------------------------------ the Trainer's hooks
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = self._bind(state, kwargs)
        self._rank, self._optimizer = int(getattr(args, "process_index", 0)), kwargs.get("optimizer")
        self._probe_file = f"lightning_conditioning_{self.prefix}_probe_batches_rank{self._rank}.pt"  # on_save
        if self.monitor is None or self.monitor.closed:
            self.monitor = self._new_monitor(ConditioningMonitor, model, collectives="auto")
            self.monitor.load_state_dict(self._restored)
            self._passes.bind(self.monitor)
        self.monitor.optimizer = unwrap_optimizer(kwargs.get("optimizer"))  # the stability margin
        self.monitor.domination_source = domination_source(self._callbacks())
        self._model = model
        # those of a resumed run's checkpoint, else drawn beside the training loader
        if note := self.extra_passes.hold_for_run(
            kwargs.get("train_dataloader"), resumed_checkpoint(self._trainer), self._probe_file, type(self).__name__
        ):
            self._warn(f"{type(self).__name__}: {note}")

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        monitor = self.monitor
        if monitor is None or monitor.capture is None or not monitor.begin(state.global_step):
            return
        assert self._passes.factor is not None
        self._passes.factor.reset()
        if not self.extra_passes.active:
            monitor.capture.active = True  # the Trainer's own passes of every micro-batch
        elif self.extra_passes.probe_batches:  # each held batch, once per analysed step
            assert self._model is not None
            autocast = getattr(self._trainer, "autocast_smart_context_manager", None) or nullcontext
            self.extra_passes.run_held(
                lambda held: self._extra_pass(held, state.global_step, autocast),
                next((p.device for p in self._model.parameters()), None),
            )

    def _extra_pass(self, batch: Any, step: int, context: Any = nullcontext) -> None:
        model, monitor, extra = self._model, self.monitor, self.extra_passes
        assert monitor is not None and model is not None
        with self._passes.own_pass():
            run = functools.partial(extra.run, step=step, rank=self._rank, forward_context=context)
            run(monitor, model, lambda: extra.forward(model, batch), batch, loss_scale=grad_scale(self._optimizer))

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        monitor, step = self.monitor, state.global_step
        if monitor is None:
            return
        skipped = getattr(kwargs.get("optimizer"), "step_was_skipped", False)
        if not skipped and (note := self._passes.missing_note(type(self).__name__, step)):
            self._warn_once("no-loss-gradient", note)
        if monitor.step_done(
            step, skipped="the optimizer step was skipped" if skipped else None, who=type(self).__name__
        ):
            self._publish((args, state, control, kwargs))

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        super().on_epoch_end(args, state, control, **kwargs)
        # the last background analysis, while the reporters are still open (they close in
        # on_train_end, which reaches them before this callback)
        if self.monitor is not None and self.monitor.wait():
            self._publish((args, state, control, kwargs))

    def _publish(self, hook: Hook) -> None:
        """The monitor's new results, at the step they belong to."""
        monitor = self.monitor
        assert monitor is not None and monitor.results_step is not None
        step = monitor.results_step
        publication = Publication(
            monitor.window_results,
            step,
            prefix=self.prefix,
            figures=False,
            histograms=self.log_histograms,
            attention=monitor.attention.results,
        )
        self._report(hook, step, publication.metrics)
        if self.log_histograms and self._zero:
            write_to_tensorboard(self._reporters(), publication)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        monitor = self.monitor
        self._watch.detach()
        if monitor is None:
            return
        if monitor.wait():  # an analysis still in flight (after on_epoch_end: rare)
            self._publish((args, state, control, kwargs))
        monitor.discard()
        monitor.close()  # hooks go; the latest results stay readable
        if self._zero and (note := self.closing_words(self.print_diagnosis)):
            self._info(note)

"""``ConditioningTrainerCallback``: the conditioning analysis in a Hugging Face ``Trainer``."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_conditioning.analysis.options import ConditioningOptions
from lightning_conditioning.capture import passes
from lightning_conditioning.capture.loss_watch import LossFactor, LossWatch
from lightning_conditioning.capture.passes import ForwardFn, LossFn, SampleLossFn
from lightning_conditioning.integrations.huggingface.shell import _TrainerShell, resumed_checkpoint
from lightning_conditioning.monitors.conditioning import ConditioningMonitor
from lightning_conditioning.monitors.readouts import ConditioningReadout
from lightning_conditioning.monitors.shell import check_options, grad_scale, unwrap_optimizer
from lightning_conditioning.views.publication import Publication

__all__ = ["ConditioningTrainerCallback"]


class ConditioningTrainerCallback(ConditioningReadout, _TrainerShell):
    r"""λmax, κ_p and rank of Σx, Σ∇h and the sub-FIM of every weight layer, in a Hugging Face
    ``Trainer``: a thin shell over :class:`~lightning_conditioning.ConditioningMonitor`.

    At the scheduled optimizer steps (0, 1, 2, 4, …, 64, then every 100; with
    ``every_n_steps=n``: 0, n, 2n, …) the Trainer's own passes of all the step's micro-batches
    are captured and the results go to every reporting integration (``report_to``) under
    ``{prefix}/{layer}/{quantity}``, at ``state.global_step`` when the step began; with
    TensorBoard also the histograms and the spectra file. README "Hugging Face Trainer" says how:
    the per-token factor (read off ``num_items_in_batch`` and the gradient reaching the model's
    loss, :class:`~lightning_conditioning.capture.loss_watch.LossFactor`), the extra passes
    (``fisher="true"``, ``probe_batches``, ``forward_fn``, ``loss_fn``, ``sample_fn``,
    ``seed``: as in the Lightning callback, training bit-identical), the state in checkpoints.

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
        self._watch = LossWatch(self._capturing, self._before_forward, self._loss_gradient)
        self._factor: LossFactor | None = None  # the per-row factor of the Trainer's passes
        self._in_pass = False  # an extra pass is running (its forward is not a training one)
        self._rank, self._optimizer = 0, None
        self._model: nn.Module | None = None

    # ------------------------------------------------------------------ checkpoints
    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.extra_passes.held_batches and folder.is_dir():  # the Trainer has just written it
            torch.save(self.extra_passes.held_batches, folder / self._probe_file())

    def _probe_file(self) -> str:
        return f"lightning_conditioning_{self.prefix}_probe_batches_rank{self._rank}.pt"

    # ------------------------------------------------------------------ the Trainer's hooks
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._bind(state)
        self._rank, self._optimizer = int(getattr(args, "process_index", 0)), kwargs.get("optimizer")
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            raise RuntimeError(f"{type(self).__name__}: the Trainer passed no model to on_train_begin")
        if self.monitor is None or self.monitor.closed:
            if self.monitor is not None:  # a second train(): keep what the first one said
                self._restored = self.monitor.state_dict()
            self._restore(state)  # a resumed run: what its checkpoint holds
            self.monitor = ConditioningMonitor(
                model, collectives="auto", info=self._info, warn=self._warn,
                **{name: getattr(self.options, name) for name in ConditioningOptions.names()})
            self.monitor.load_state_dict(self._restored)
            self._factor = LossFactor(self.monitor)
        optimizer = unwrap_optimizer(kwargs.get("optimizer"))
        self.monitor.optimizer = optimizer  # SGD-family: the stability margin
        for callback in self._callbacks():
            domination = getattr(callback, "domination_table", None)  # a WeightDominationTrainerCallback
            if callable(domination):
                self.monitor.domination_source = domination
        self._watch.attach(model)
        self._model = model
        if self.extra_passes.probe_batches and not self.extra_passes.held_batches:
            self._hold_probe_batches(kwargs.get("train_dataloader"))

    def _hold_probe_batches(self, loader: Any) -> None:
        """The probe batches of a resumed run's checkpoint, else drawn beside ``loader``."""
        extra, folder = self.extra_passes, resumed_checkpoint(self._trainer)
        if folder is not None and (Path(folder) / self._probe_file()).is_file():
            extra.held_batches = torch.load(Path(folder) / self._probe_file(), weights_only=False)
        elif not isinstance(loader, DataLoader):
            raise RuntimeError(f"{type(self).__name__}(probe_batches={extra.probe_batches}): the Trainer "
                               "passed no training DataLoader to on_train_begin to draw them from")
        elif note := extra.hold(passes.draw_probe_batches(loader, extra.probe_batches)):
            self._warn(f"{type(self).__name__}: {note}")

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        monitor = self.monitor
        if monitor is None or monitor.capture is None or not monitor.begin(state.global_step):
            return
        assert self._factor is not None
        self._factor.reset()
        if not self.extra_passes.active:
            monitor.capture.active = True  # the Trainer's own passes of every micro-batch
        elif self.extra_passes.probe_batches:  # each held batch, once per analysed step
            assert self._model is not None
            device = next((p.device for p in self._model.parameters()), torch.device("cpu"))
            autocast = getattr(self._trainer, "autocast_smart_context_manager", None)
            for held in self.extra_passes.held_batches:
                self._extra_pass(passes.map_tensors(held, lambda t: t.to(device)),
                                 state.global_step, autocast or nullcontext)

    def _extra_pass(self, batch: Any, step: int, context: Any = nullcontext) -> None:
        model = self._model
        assert self.monitor is not None and model is not None
        self._in_pass = True
        try:
            self.extra_passes.run(self.monitor, model, lambda: self.extra_passes.forward(model, batch), batch,
                                  step=step, rank=self._rank, loss_scale=grad_scale(self._optimizer),
                                  forward_context=context)
        finally:
            self._in_pass = False

    def _capturing(self) -> bool:
        monitor = self.monitor
        if monitor is None or self._in_pass:
            return False
        if self.extra_passes.fisher == "true" and not self.extra_passes.probe_batches:
            return monitor.current_step is not None  # each micro-batch gets its sampled pass
        return monitor.capturing

    def _before_forward(self, kwargs: Mapping[str, Any]) -> None:
        """A micro-batch of a captured step (the true Fisher: its pass with sampled labels, here,
        before the Trainer's own forward, inside the Trainer's autocast)."""
        assert self.monitor is not None and self._factor is not None
        if self.extra_passes.active:
            assert self.monitor.current_step is not None
            self._extra_pass(dict(kwargs), self.monitor.current_step)
        else:
            self._factor.before_forward(kwargs)

    def _loss_gradient(self, loss: Tensor, grad: Tensor) -> None:
        if self._factor is not None and not self.extra_passes.active:  # (extra passes: their own)
            self._factor.loss_gradient(loss, grad)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        monitor, step = self.monitor, state.global_step
        if monitor is None:
            return
        if monitor.current_step != step:
            if monitor.poll():  # an earlier window's background analysis finished
                self._publish(args, state, control, kwargs)
            return
        if getattr(kwargs.get("optimizer"), "step_was_skipped", False):
            self._info(f"{type(self).__name__}: step {step} skipped: its gradients overflowed in "
                       "float16 (the optimizer step was skipped); nothing is logged for its window.")
            monitor.discard()
            return
        if self._factor is not None and (note := self._factor.missing_note(type(self).__name__, step)):
            self._warn_once("no-loss-gradient", note)
        if monitor.end(step):
            self._publish(args, state, control, kwargs)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        super().on_epoch_end(args, state, control, **kwargs)
        # the last background analysis, while the reporters are still open (they close in
        # on_train_end, which reaches them before this callback)
        if self.monitor is not None and self.monitor.wait():
            self._publish(args, state, control, kwargs)

    def _publish(self, args: Any, state: Any, control: Any, hook_kwargs: Mapping[str, Any]) -> None:
        """The monitor's new results, at the step they belong to."""
        monitor = self.monitor
        assert monitor is not None and monitor.results_step is not None
        step = monitor.results_step
        publication = Publication(monitor.window_results, step, prefix=self.prefix, figures=False,
                                  histograms=self.log_histograms, attention=monitor.attention.results)
        self._report(args, state, control, step, publication.metrics, hook_kwargs)
        if not (self.log_histograms and self._zero):
            return
        from transformers.integrations.integration_utils import rewrite_logs

        for writer in self._tensorboard_writers():  # histograms named as the scalars beside them
            publication.write_to(writer, getattr(writer, "log_dir", None) or getattr(writer, "logdir", None),
                                 tag=lambda key: next(iter(rewrite_logs({key: 0.0}))))
            writer.flush()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        monitor = self.monitor
        self._watch.detach()
        if monitor is None:
            return
        if monitor.wait():  # an analysis still in flight (after on_epoch_end: rare)
            self._publish(args, state, control, kwargs)
        monitor.discard()
        monitor.close()  # hooks go; the latest results stay readable
        if self._zero and (note := self.closing_words(self.print_diagnosis)):
            self._info(note)

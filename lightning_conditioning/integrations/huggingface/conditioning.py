"""``ConditioningTrainerCallback``: the conditioning analysis in a Hugging Face ``Trainer``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_conditioning.analysis.options import ConditioningOptions
from lightning_conditioning.capture import passes
from lightning_conditioning.capture.passes import ForwardFn, LossFn, SampleLossFn
from lightning_conditioning.integrations.huggingface.shell import (
    _count,
    _loss_scale,
    _LossWatch,
    _TrainerShell,
    _unwrapped,
    resumed_checkpoint,
)
from lightning_conditioning.monitors.conditioning import ConditioningMonitor
from lightning_conditioning.monitors.readouts import ConditioningReadout
from lightning_conditioning.views.diagnosis import format_findings
from lightning_conditioning.views.publication import Publication
from lightning_conditioning.views.spectra_file import SPECTRA_FILENAME, append_records

__all__ = ["ConditioningTrainerCallback"]


class ConditioningTrainerCallback(ConditioningReadout, _TrainerShell):
    r"""λmax, κ_p and rank of Σx, Σ∇h and the sub-FIM of every weight layer, in a Hugging Face
    ``Trainer``: a thin shell over :class:`~lightning_conditioning.ConditioningMonitor`.

    At the scheduled optimizer steps (by default 0, 1, 2, 4, …, 64, then every 100; with
    ``every_n_steps=n``: 0, n, 2n, …) the Trainer's own forward and backward passes of all the
    step's micro-batches are captured (the empirical Fisher) and the results go to every
    reporting integration of the Trainer (``report_to``) under ``{prefix}/{layer}/{quantity}``
    (README "Logged keys"; the integrations prefix them as they prefix ``loss``: TensorBoard
    shows ``train/conditioning/…``), at ``step = state.global_step`` when the step began (step 0
    is the initialisation, as with the Lightning callback). With a TensorBoard integration
    the log10-eigenvalue histograms go to its writer and the spectra file
    ``conditioning_spectra.jsonl`` next to its event files, so ``python -m
    lightning_conditioning report OUTPUT_DIR`` reads the run. :attr:`results` holds the latest
    analysis with full spectra.

    **The per-token factor.** For a token-level head (``loss_reduction="auto"`` picks
    ``"token_mean"`` for ``…ForCausalLM`` and the like) each output-gradient row is
    multiplied back to the gradient of the *summed* per-token losses. The Trainer passes the
    model ``num_items_in_batch``, the label tokens of *all* the step's micro-batches (on all
    processes when ``average_tokens_across_devices``), and the model's loss is its micro-batch's
    summed token losses divided by that: the factor is ``num_items_in_batch`` itself (not the
    micro-batch's own tokens, not times the accumulation), divided by what the Trainer
    multiplied the loss by (``num_processes`` with tokens averaged across devices; the loss
    scale with fp16), which is read off the gradient that reaches the model's loss. Without
    ``num_items_in_batch`` (a model whose ``forward`` takes no ``**kwargs``), the loss is the
    micro-batch's token mean and the Trainer divides it by the accumulation steps: the factor
    is the micro-batch's label tokens times those steps, again read off that gradient. A head
    that is passed ``num_items_in_batch`` but ignores it (in transformers 5, ``BertForMaskedLM``
    and ``T5ForConditionalGeneration`` build a ``CrossEntropyLoss()`` of their own) makes the
    Trainer sum its accumulated micro-batch means, and the factor here off by the ratio of the
    step's tokens to the micro-batch's (both exact without accumulation, on one process); set
    ``model.accepts_loss_kwargs = False`` before making the Trainer to put both right.

    Args:
        every_n_steps: analyse optimizer steps 0, n, 2n, … (None: the default schedule).
        prefix: first part of every logged key.
        log_histograms: with a TensorBoard integration, the log10-eigenvalue histograms and the
            spectra file.
        print_diagnosis: print the diagnosis of the latest analysis when training ends.
        **options: the monitor's analysis options by name (``kappa_percents``, ``conv_mode``,
            ``layer_types``, ``include``, ``exclude``, ``loss_reduction``, ``include_bias``,
            ``rank_rtol``, ``statistics_dtype``, ``kappa_definition``, ``window_steps``,
            ``solver``, ``warn_diagnosis``, …), checked here; the meaning is the Lightning
            callback's.

    **Extra passes.** ``fisher="true"`` (labels sampled from the model, the true Fisher) and
    ``probe_batches=k`` (the same ``k`` training batches every analysed step) work as in the
    Lightning callback (README "Fisher, probe batches"): the true Fisher's pass runs on each
    micro-batch of an analysed step, just before the Trainer's own forward of it; probe
    batches are drawn at train begin beside the training loader (its sampler and generators
    stay as they were) and each gets its pass at the start of an analysed step. Both are
    isolated: training is bit-identical. ``forward_fn(model, batch)``, ``loss_fn(outputs,
    batch)``, ``sample_fn(outputs, generator)`` and ``seed`` replace the defaults.

    **Checkpoints.** The callback's state (the notes already given, the turn of the layers)
    rides in the Trainer's checkpoints (``trainer_state.json``, entry
    :attr:`checkpoint_key`) and comes back when a run resumes from one; probe batches are saved
    beside it (``lightning_conditioning_<prefix>_probe_batches_rank<r>.pt``) and resumed.

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
        self.forward_fn = forward_fn
        unknown = set(options) - set(ConditioningOptions.names())
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)}; options: "
                            f"{[n for n in ConditioningOptions.names() if n != 'every_n_steps']}")
        #: the analysis options, checked (the monitor's :class:`ConditioningOptions`)
        self.options = ConditioningOptions(every_n_steps=every_n_steps, **options)
        self.prefix, self.log_histograms, self.print_diagnosis = prefix, log_histograms, print_diagnosis
        self.monitor: ConditioningMonitor | None = None
        self._restored: dict[str, Any] = {}
        self._watch = _LossWatch(self._capturing, self._before_forward, self._loss_gradient)
        self._forwards = self._graded = 0  # micro-batches captured / whose loss gradient was seen
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
        optimizer = _unwrapped(kwargs.get("optimizer"))
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
        extra = self.extra_passes
        folder = resumed_checkpoint(self._trainer)
        if folder is not None and (Path(folder) / self._probe_file()).is_file():
            extra.held_batches = torch.load(Path(folder) / self._probe_file(), weights_only=False)
            return
        if not isinstance(loader, DataLoader):
            raise RuntimeError(f"{type(self).__name__}(probe_batches={extra.probe_batches}): the Trainer "
                               "passed no training DataLoader to on_train_begin to draw them from")
        extra.held_batches = passes.draw_probe_batches(loader, extra.probe_batches)
        if len(extra.held_batches) < extra.probe_batches:
            self._warn(f"{type(self).__name__}: asked for {extra.probe_batches} probe batches, the "
                       f"training data has {len(extra.held_batches)}; the analysis uses those "
                       f"{len(extra.held_batches)}.")

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        monitor = self.monitor
        if monitor is None or monitor.capture is None or not monitor.begin(state.global_step):
            return
        self._forwards = self._graded = 0
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
        assert self.monitor is not None
        model, fisher = self._model, self.extra_passes.fisher
        assert model is not None
        self._in_pass = True
        try:
            self.extra_passes.run(
                self.monitor, model, lambda: (self.forward_fn(model, batch) if self.forward_fn is not None
                                              else passes.default_forward(model, batch, keep_labels=fisher != "true")),
                batch, step=step, rank=self._rank, loss_scale=_loss_scale(self._optimizer),
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
        """A micro-batch of a captured step: the tokens its loss is divided by (the true
        Fisher: the pass with sampled labels, before the Trainer's own forward)."""
        assert self.monitor is not None
        if self.extra_passes.active:
            assert self.monitor.current_step is not None
            self._extra_pass(dict(kwargs), self.monitor.current_step)  # inside the Trainer's autocast
            return
        self._forwards += 1
        tokens = _count(kwargs.get("num_items_in_batch"))
        if tokens is None or self.monitor.loss_reduction != "token_mean":
            tokens = self.monitor.loss_tokens_for(kwargs)  # its own labels (None: rows / batch)
        self.monitor.set_loss_tokens(tokens)
        self.monitor.set_grad_multiplier(1.0)  # until the loss gradient says otherwise

    def _loss_gradient(self, loss: Tensor, grad: Tensor) -> None:
        """What the Trainer multiplied the model's loss by: undone in every row."""
        assert self.monitor is not None
        if self.extra_passes.active:  # the analysis comes from the extra passes
            return
        factor = float(grad)
        if factor != 0.0 and math.isfinite(factor):
            self._graded += 1
            self.monitor.set_grad_multiplier(1.0 / factor)

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
        if self._graded < self._forwards:
            self._warn_once("no-loss-gradient", (
                f"{type(self).__name__}: step {step}: the backward of {self._forwards - self._graded} "
                "captured micro-batch(es) did not pass through the model's own `loss` (labels "
                "popped by `compute_loss_func` or label smoothing, a custom `compute_loss`), so what "
                "the Trainer scaled the loss by is unknown: λmax(Σ∇h) may be off by a constant "
                "factor (κ_p is not affected)."))
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
        publication = Publication(monitor.window_results, step, prefix=self.prefix,
                                  attention=monitor.attention.results)
        self._report(args, state, control, step, publication.metrics, hook_kwargs)
        if not (self.log_histograms and self._zero):
            return
        from transformers.integrations.integration_utils import rewrite_logs

        for writer in self._tensorboard_writers():
            for key, values in publication.histogram_values.items():
                tag = next(iter(rewrite_logs({key: 0.0})))  # named as the scalars beside it
                writer.add_histogram(tag, values, global_step=step)
            folder = getattr(writer, "log_dir", None) or getattr(writer, "logdir", None)
            if folder is not None:
                append_records(Path(folder) / SPECTRA_FILENAME, publication.records)
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
        note = monitor.schedule_note()
        if note:
            self._info(note)
        if self.print_diagnosis and self.results and self._zero:
            findings = self.findings()
            print(f"Conditioning diagnosis at step {monitor.results_step}:")
            print(format_findings(findings) if findings else "  no findings: nothing looks wrong.")

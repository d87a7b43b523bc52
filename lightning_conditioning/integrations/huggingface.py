"""Hugging Face ``Trainer`` callbacks: the conditioning analysis and the weight-domination check.

Two thin shells over the Lightning-free core, the counterparts of the Lightning callbacks:
:class:`ConditioningTrainerCallback` drives a :class:`~lightning_conditioning.ConditioningMonitor`
and :class:`WeightDominationTrainerCallback` a
:class:`~lightning_conditioning.WeightDominationMonitor` from the Trainer's hooks. They log the
same keys as the Lightning callbacks (``conditioning/{layer}/{quantity}``,
``weight_domination/{layer}/{quantity}``), at the same steps (``state.global_step`` when the
optimizer step began: step 0 is the initialisation), through the Trainer's own reporting
integrations (``report_to``: TensorBoard, W&B, MLflow, …). Needs ``transformers`` (with
``accelerate``): ``pip install "lightning-conditioning[hf]"``.

How the hooks map (one optimizer step of ``gradient_accumulation_steps`` micro-batches):

=========================  ===================================================================
``on_train_begin``         build the monitor on ``model`` (hooks); find the Trainer that calls
                           us, for its reporting callbacks
``on_step_begin``          open the step (``monitor.begin(state.global_step)``); capture on
model forward (pre-hook)   each micro-batch's ``labels`` / ``num_items_in_batch``: the tokens
                           its loss divides by
model ``loss`` (grad hook) what the Trainer multiplied the model's loss by before ``backward``
                           (``1/gradient_accumulation_steps``, ``num_processes``, the fp16 loss
                           scale): read off the gradient reaching it
``on_pre_optimizer_step``  weight domination: gradients after unscaling, DDP averaging and the
                           Trainer's clipping (``max_grad_norm``)
``on_optimizer_step``      finish the window / the check (the update applied) and report
``on_train_end``           drop an open window, remove every hook (results stay readable)
=========================  ===================================================================

Example::

    from transformers import Trainer, TrainingArguments
    from lightning_conditioning.integrations import (
        ConditioningTrainerCallback, WeightDominationTrainerCallback)

    conditioning = ConditioningTrainerCallback(every_n_steps=50)
    args = TrainingArguments("out", report_to=["tensorboard"], max_steps=1000)
    trainer = Trainer(model, args, train_dataset=data,
                      callbacks=[conditioning, WeightDominationTrainerCallback(every_n_steps=50)])
    trainer.train()                # TensorBoard: train/conditioning/lm_head/grad_lambda_max, …
    conditioning.results["lm_head"].grad.lambda_max
"""

from __future__ import annotations

import copy
import functools
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_conditioning import schema
from lightning_conditioning.capture import checked_layer_types
from lightning_conditioning.collectives import Collectives, auto_collectives
from lightning_conditioning.domination import DominationReason, RatioHistory, WeightStatistics
from lightning_conditioning.domination_monitor import WeightDominationMonitor, check_options
from lightning_conditioning.monitor import ConditioningMonitor
from lightning_conditioning.notify import announce, warn as warn_at_user
from lightning_conditioning.options import ConditioningOptions
from lightning_conditioning.results import LayerConditioning
from lightning_conditioning.views.diagnosis import Finding, format_findings
from lightning_conditioning.views.spectra_file import SPECTRA_FILENAME, append_records, spectrum_records

try:
    from transformers.trainer_callback import TrainerCallback

    _MISSING: str | None = None
except ImportError as _error:  # the module stays importable (docs, doctest collection)
    TrainerCallback = object  # type: ignore[misc,assignment]
    _MISSING = str(_error)

__all__ = ["ConditioningTrainerCallback", "WeightDominationTrainerCallback"]

def _require_transformers(who: str) -> None:
    if _MISSING is not None:
        raise ImportError(f"{who} needs the Hugging Face `transformers` package (and `accelerate` for "
                          f'its Trainer): pip install "lightning-conditioning[hf]" ({_MISSING})')


def _unwrapped(optimizer: Any) -> Any:
    """The torch optimizer inside ``accelerate``'s ``AcceleratedOptimizer`` (or ``optimizer``)."""
    while optimizer is not None and getattr(optimizer, "optimizer", None) not in (None, optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _loss_scale(optimizer: Any) -> float:
    """The fp16 ``GradScaler``'s scale of ``accelerate``'s optimizer (1 without one)."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return 1.0
    return float(scaler.get_scale())


def _unscale(optimizer: Any) -> None:
    """Unscale fp16 gradients before they are read, as the Trainer's own clipping does (the
    optimizer step then skips its unscaling: training is unchanged). A no-op without a scaler
    or when they are unscaled already."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return
    try:
        scaler.unscale_(_unwrapped(optimizer))
    except RuntimeError as error:  # the Trainer's clipping unscaled them already
        if "already been called" not in str(error):
            raise


def _count(value: Any) -> int | None:
    """``num_items_in_batch`` (an int or a one-element tensor) as an int; None otherwise."""
    if isinstance(value, Tensor):
        return int(round(float(value))) if value.numel() == 1 else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return int(round(value))
    return None


def _calling_trainer(callback: object, depth: int = 32) -> Any:
    """The Trainer whose callback handler is calling ``callback`` now, found on the call stack
    (``Trainer`` → ``CallbackHandler.call_event`` → the hook); None when there is none.

    Example:
        >>> _calling_trainer(object()) is None
        True
    """
    frame: FrameType | None = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            break
        candidate = frame.f_locals.get("self")
        handler = getattr(candidate, "callback_handler", None)
        if handler is not None and any(cb is callback for cb in getattr(handler, "callbacks", ())):
            return candidate
        frame = frame.f_back
    return None


def _is_tensorboard(reporter: object) -> bool:
    return type(reporter).__name__ == "TensorBoardCallback"


class _LossWatch:
    """Two hooks on the Trainer's model, for the micro-batches of a captured step only.

    Before each forward, ``before(kwargs)`` sees the keyword arguments the Trainer calls the
    model with (``labels``, ``num_items_in_batch``). After it, a tensor hook on the model's own
    ``loss`` hands ``loss_grad(loss, grad)`` the loss and the gradient that reaches it in the
    backward: what the Trainer multiplied the model's loss by before ``backward`` (``1/K`` for
    an unnormalised loss with ``K`` accumulated micro-batches, ``num_processes`` when tokens
    are averaged across devices, the fp16 loss scale). That hook runs before any layer's
    output-gradient hook (the loss is the root of the model's part of the graph).
    """

    def __init__(self, active: Callable[[], bool], before: Callable[[Mapping[str, Any]], None],
                 loss_grad: Callable[[Tensor, Tensor], None]) -> None:
        self._active, self._before, self._loss_grad = active, before, loss_grad
        self._handles: list[RemovableHandle] = []

    def attach(self, model: nn.Module) -> None:
        self.detach()
        self._handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                         model.register_forward_hook(self._post)]

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


class _TrainerShell(TrainerCallback):
    """What both callbacks share: the Trainer driving them, its reporting integrations, the
    rank-zero notes."""

    def __init__(self) -> None:
        _require_transformers(type(self).__name__)
        self._trainer: Any = None
        self._zero = True  # this process is the world's process zero (it speaks)
        self._said: set[str] = set()

    def set_trainer(self, trainer: Any) -> None:
        """The ``transformers.Trainer`` whose reporting integrations get the scalars. Needed
        only when the hooks are called by something else than a Trainer's callback handler:
        at every ``on_train_begin`` the Trainer calling the callback is found on the call
        stack (and replaces the one set)."""
        self._trainer = trainer

    def _bind(self, state: Any) -> None:
        """At train begin: who speaks, and the Trainer (the caller's, else the one set)."""
        self._zero = bool(getattr(state, "is_world_process_zero", True))
        self._trainer = _calling_trainer(self) or self._trainer
        if self._trainer is None:
            self._warn_once("no-trainer", f"{type(self).__name__}: no Hugging Face Trainer calls this "
                            "callback, so its scalars reach no reporting integration (they are in "
                            "`results`); call `callback.set_trainer(trainer)` before training.")
        elif not self._reporters():
            self._warn_once("no-reporter", f"{type(self).__name__}: the Trainer has no reporting "
                            "integration (`report_to`), so nothing is logged; the latest numbers "
                            "are in `results`.")

    def _callbacks(self) -> list[Any]:
        handler = getattr(self._trainer, "callback_handler", None)
        return list(getattr(handler, "callbacks", []))

    def _reporters(self) -> list[Any]:
        """The Trainer's reporting integrations (``report_to``), in its order."""
        from transformers.integrations import INTEGRATION_TO_CALLBACK

        kinds = tuple(INTEGRATION_TO_CALLBACK.values())
        return [cb for cb in self._callbacks() if isinstance(cb, kinds)]

    def _report(self, args: Any, state: Any, control: Any, step: int, scalars: Mapping[str, float],
                hook_kwargs: Mapping[str, Any]) -> None:
        """``scalars`` to every reporting integration's ``on_log``, at ``step`` (a copy of the
        state carries it; the Trainer's own state and ``log_history`` are left alone)."""
        if not scalars or not self._zero:  # the integrations report from process zero only
            return
        at = copy.copy(state)
        at.global_step = int(step)
        passed = {k: v for k, v in hook_kwargs.items() if k != "logs"}
        for reporter in self._reporters():
            reporter.on_log(args, at, control, logs=dict(scalars), **passed)

    def _tensorboard_writers(self) -> Iterator[Any]:
        """The ``SummaryWriter`` of every TensorBoard integration (process zero only)."""
        for reporter in self._reporters():
            writer = getattr(reporter, "tb_writer", None)
            if _is_tensorboard(reporter) and writer is not None:
                yield writer

    def _info(self, message: str) -> None:
        if self._zero:
            announce(message)

    def _warn(self, message: str) -> None:
        if self._zero:
            warn_at_user(message)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self._warn(message)


class ConditioningTrainerCallback(_TrainerShell):
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

    The extra passes of the Lightning callback (``fisher="true"``, ``probe_batches``) are not
    offered here. The callback's state (one-time notes) is not saved in the Trainer's
    checkpoints.

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
        **options: Any,
    ) -> None:
        super().__init__()
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

    # ------------------------------------------------------------------ public state
    @property
    def results(self) -> dict[str, LayerConditioning]:
        """Latest analysed window: ``{layer name: LayerConditioning}`` (empty before one)."""
        return self.monitor.results if self.monitor is not None else {}

    @property
    def layer_names(self) -> list[str]:
        """Qualified names of the analysed layers (once training has started)."""
        return self.monitor.layer_names if self.monitor is not None else []

    def should_analyse(self, step: int) -> bool:
        """Whether optimizer step ``step``'s micro-batches are captured (it is in a window)."""
        return self.options.should_analyse(step)

    def findings(self) -> list[Finding]:
        """The diagnosis of the latest analysis (with the latest check of a
        :class:`WeightDominationTrainerCallback` in the same Trainer, if any)."""
        return self.monitor.findings() if self.monitor is not None else []

    # ------------------------------------------------------------------ the Trainer's hooks
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._bind(state)
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            raise RuntimeError(f"{type(self).__name__}: the Trainer passed no model to on_train_begin")
        if self.monitor is None or self.monitor.closed:
            if self.monitor is not None:  # a second train(): keep what the first one said
                self._restored = self.monitor.state_dict()
            self.monitor = ConditioningMonitor(
                model, collectives="auto", info=self._info, warn=self._warn,
                **{name: getattr(self.options, name) for name in ConditioningOptions.names()})
            self.monitor.load_state_dict(self._restored)
        optimizer = _unwrapped(kwargs.get("optimizer"))
        self.monitor.optimizer = optimizer  # SGD-family: the stability margin
        for callback in self._callbacks():
            if isinstance(callback, WeightDominationTrainerCallback):
                self.monitor.domination_source = callback.domination_table
        self._watch.attach(model)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        monitor = self.monitor
        if monitor is None or monitor.capture is None or not monitor.begin(state.global_step):
            return
        self._forwards = self._graded = 0
        monitor.capture.active = True  # the Trainer's own passes of every micro-batch

    def _capturing(self) -> bool:
        return self.monitor is not None and self.monitor.capturing

    def _before_forward(self, kwargs: Mapping[str, Any]) -> None:
        """A micro-batch of a captured step: the tokens its loss is divided by."""
        assert self.monitor is not None
        self._forwards += 1
        tokens = _count(kwargs.get("num_items_in_batch"))
        if tokens is None or self.monitor.loss_reduction != "token_mean":
            tokens = self.monitor.loss_tokens_for(kwargs)  # its own labels (None: rows / batch)
        self.monitor.set_loss_tokens(tokens)
        self.monitor.set_grad_multiplier(1.0)  # until the loss gradient says otherwise

    def _loss_gradient(self, loss: Tensor, grad: Tensor) -> None:
        """What the Trainer multiplied the model's loss by: undone in every row."""
        assert self.monitor is not None
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
        # the last background analysis, while the reporters are still open (they close in
        # on_train_end, which reaches them before this callback)
        if self.monitor is not None and self.monitor.wait():
            self._publish(args, state, control, kwargs)

    def _publish(self, args: Any, state: Any, control: Any, hook_kwargs: Mapping[str, Any]) -> None:
        """The monitor's new results, at the step they belong to."""
        monitor = self.monitor
        assert monitor is not None and monitor.results_step is not None
        step, results = monitor.results_step, monitor.window_results
        scalars = {k: v for result in results.values() for k, v in result.metrics(self.prefix).items()}
        self._report(args, state, control, step, scalars, hook_kwargs)
        if not (self.log_histograms and self._zero):
            return
        from transformers.integrations.integration_utils import rewrite_logs

        for writer in self._tensorboard_writers():
            for key, values in _histogram_values(results, self.prefix).items():
                tag = next(iter(rewrite_logs({key: 0.0})))  # named as the scalars beside it
                writer.add_histogram(tag, values, global_step=step)
            folder = getattr(writer, "log_dir", None) or getattr(writer, "logdir", None)
            if folder is not None:
                append_records(Path(folder) / SPECTRA_FILENAME, spectrum_records(results, self.prefix))
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


def _histogram_values(results: Mapping[str, LayerConditioning], prefix: str) -> dict[str, Any]:
    """``{key: log10 of the resolved eigenvalues}`` of Σx and Σ∇h per layer (numpy arrays)."""
    out: dict[str, Any] = {}
    for name, result in results.items():
        for moment, summary in (("input", result.input), ("grad", result.grad)):
            if summary is None or summary.rank == 0:
                continue
            values = summary.nonzero_eigenvalues
            out[schema.key(prefix, name, schema.histogram_quantity(moment))] = (
                values[values > 0].log10().numpy())
    return out


class WeightDominationTrainerCallback(_TrainerShell):
    r"""σmax(∇W)/σmax(W) per layer and warnings about layers in weight domination, in a Hugging
    Face ``Trainer``: a thin shell over :class:`~lightning_conditioning.WeightDominationMonitor`.

    At every ``every_n_steps``-th optimizer step (``state.global_step`` when it began), in
    ``on_pre_optimizer_step``, it checks every weight's gradient as the optimizer will apply it
    (fp16 gradients unscaled first, averaged over DDP ranks, and clipped when the Trainer clips:
    ``max_grad_norm > 0``, by default 1.0, scales every layer's gradient by the same factor on a
    clipped step; ``max_grad_norm=0`` checks the raw gradient, as the Lightning callback does),
    and after the optimizer step (``on_optimizer_step``) the update it applied. The scalars go to
    every reporting integration of the Trainer under ``{prefix}/{layer}/{quantity}`` and
    ``{prefix}/dominated_layers`` (README "Weight domination"), at the checked step. The step's
    training loss (each layer's fall is judged net of it) is the Trainer's: the model's loss of
    every micro-batch times what the Trainer scaled it by, summed, averaged over processes.

    Args: those of :class:`~lightning_conditioning.WeightDominationCallback`, with the same
    meaning and defaults (``every_n_steps=100``, ``threshold=1e-4``, ``update_threshold=0``,
    ``patience=3``, ``layer_types``, ``include``, ``exclude``, ``log_imbalance``, ``prefix``,
    ``fall_factor=1000``). The ratio histories are not saved in the Trainer's checkpoints.

    Example::

        domination = WeightDominationTrainerCallback(every_n_steps=50)
        Trainer(model, args, train_dataset=data, callbacks=[domination]).train()
        domination.dominated, domination.results["lm_head"].grad_weight_ratio
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        threshold: float = 1e-4,
        update_threshold: float = 0.0,
        patience: int = 3,
        layer_types: Sequence[type[nn.Module]] | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        log_imbalance: bool = True,
        prefix: str = "weight_domination",
        fall_factor: float | None = 1000.0,
    ) -> None:
        super().__init__()
        check_options(every_n_steps, threshold, update_threshold, patience, fall_factor)
        self.every_n_steps, self.threshold = every_n_steps, float(threshold)
        self.update_threshold, self.patience = float(update_threshold), patience
        self.fall_factor = float(fall_factor) if fall_factor is not None else None
        self.layer_types = checked_layer_types(layer_types)
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude) if exclude is not None else None
        self.log_imbalance, self.prefix = log_imbalance, prefix
        self.monitor: WeightDominationMonitor | None = None
        self._restored: dict[str, Any] = {}
        self._watch = _LossWatch(lambda: self._checking, lambda kwargs: None, self._add_loss)
        self._checking = False  # the step under way is checked: its loss is summed
        self._loss_sum, self._losses = 0.0, 0
        self._scale = 1.0
        self._collectives = Collectives.local()

    # ------------------------------------------------------------------ public state
    @property
    def results(self) -> dict[str, WeightStatistics]:
        """Latest check: ``{layer name: WeightStatistics}`` (layers with a gradient only)."""
        return self.monitor.results if self.monitor is not None else {}

    @property
    def warned_layers(self) -> list[str]:
        """Layers warned about (dominated for ``patience`` checks), sorted."""
        return self.monitor.warned_layers if self.monitor is not None else []

    @property
    def dominated(self) -> list[str]:
        """Layers the latest check finds in weight domination."""
        return self.monitor.dominated if self.monitor is not None else []

    @property
    def reasons(self) -> dict[str, tuple[DominationReason, ...]]:
        """Latest check: ``{layer: the rules that find it dominated}`` (``()``: none)."""
        return self.monitor.reasons if self.monitor is not None else {}

    @property
    def history(self) -> dict[str, RatioHistory]:
        """``{layer: RatioHistory}``: each layer's running peak ratio."""
        return self.monitor.history if self.monitor is not None else {}

    @property
    def zero_layers(self) -> dict[str, str]:
        """Latest check: layers whose weight gradient or weight is exactly zero, with the status."""
        return self.monitor.zero_layers if self.monitor is not None else {}

    def domination_table(self) -> dict[str, dict[str, float]]:
        """The latest check as ``{layer: {quantity: value}}`` (read by the conditioning diagnosis)."""
        return self.monitor.domination_table() if self.monitor is not None else {}

    # ------------------------------------------------------------------ the Trainer's hooks
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._bind(state)
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            raise RuntimeError(f"{type(self).__name__}: the Trainer passed no model to on_train_begin")
        if self.monitor is not None:
            self._restored = self.monitor.state_dict()
        self._collectives = auto_collectives()  # torch.distributed's group under DDP / FSDP
        self.monitor = WeightDominationMonitor(
            model, every_n_steps=self.every_n_steps, threshold=self.threshold,
            update_threshold=self.update_threshold, patience=self.patience,
            layer_types=self.layer_types, include=self.include, exclude=self.exclude,
            log_imbalance=self.log_imbalance, prefix=self.prefix, warn=self._warn,
            fall_factor=self.fall_factor, info=self._info, collectives=self._collectives)
        self.monitor.load_state_dict(self._restored)
        self._watch.attach(model)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._checking = self.monitor is not None and self.monitor.is_due(state.global_step)
        if self._checking:
            self._loss_sum, self._losses = 0.0, 0
            self._scale = _loss_scale(kwargs.get("optimizer"))

    def _add_loss(self, loss: Tensor, grad: Tensor) -> None:
        """The model's loss times what the Trainer scaled it by (the fp16 scale taken out)."""
        self._loss_sum += float(loss) * float(grad) / self._scale
        self._losses += 1

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._checking = False
        step = state.global_step
        if self.monitor is None or not self.monitor.is_due(step):
            return
        _unscale(kwargs.get("optimizer"))
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


_EXAMPLE = """
A tiny GPT-2, two optimizer steps, every step analysed and checked, read back from the
Trainer's TensorBoard run with the package's report reader:

>>> import contextlib, io, tempfile, torch
>>> from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
>>> from transformers.utils import logging as hf_logging
>>> from lightning_conditioning.report.reader import load_run
>>> hf_logging.set_verbosity_error()
>>> _ = torch.manual_seed(0)
>>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64,
...                                    n_positions=16, bos_token_id=0, eos_token_id=0))
>>> data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 64, (8, 12))]
>>> conditioning = ConditioningTrainerCallback(every_n_steps=1, warn_diagnosis=False)
>>> domination = WeightDominationTrainerCallback(every_n_steps=1)
>>> with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()):
...     args = TrainingArguments(folder, max_steps=2, per_device_train_batch_size=4,
...                              report_to=["tensorboard"], use_cpu=True, save_strategy="no",
...                              disable_tqdm=True)
...     trainer = Trainer(model, args, train_dataset=data,
...                       callbacks=[conditioning, domination])
...     _ = trainer.train()  # (stdout: the Trainer prints its own logs)
...     run = load_run(folder)
>>> key = "train/conditioning/lm_head/grad_lambda_max"  # TensorBoard prefixes train/
>>> logged = run.scalars[1][key]  # float32 in the event file
>>> run.conditioning_steps(), round(logged / conditioning.results["lm_head"].grad.lambda_max, 6)
([0, 1], 1.0)
>>> "train/weight_domination/lm_head/grad_weight_ratio" in run.scalars[1]
True
"""


def _doctests() -> dict[str, str]:
    """The executed example, only where ``transformers`` and ``accelerate`` are installed."""
    if _MISSING is not None:
        return {}
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return {}
    return {"trainer_callbacks": _EXAMPLE}


__test__ = _doctests()

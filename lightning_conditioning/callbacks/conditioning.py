"""``ConditioningCallback``: layer-wise conditioning analysis during ``Trainer.fit``."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_conditioning.capture import LayerCapture, checked_layer_types, find_layers
from lightning_conditioning.precision import STATISTICS_DTYPES, gram_dtype_for
from lightning_conditioning.distributed import analyse_layers, estimated_seconds
from lightning_conditioning.passes import (
    ForwardFn,
    LossFn,
    SampleLossFn,
    backward_without_grad,
    cuda_devices,
    default_forward,
    default_loss,
    isolated_pass,
    sampled_cross_entropy,
)
from lightning_conditioning.results import LayerConditioning, analyse_layer
from lightning_conditioning.callbacks.weight_domination import WeightDominationCallback
from lightning_conditioning.diagnosis import Finding, diagnose, format_findings
from lightning_conditioning.models.last_bn import last_linear_name
from lightning_conditioning.report.metrics import conditioning_table
from lightning_conditioning.sinks import (
    publish_conditioning,
    publish_tensorboard_layout,
)
from lightning_conditioning.sinks import tensorboard_layout as make_tensorboard_layout
from lightning_conditioning.spectra import KAPPA_DEFINITIONS, KappaDefinition

__all__ = ["ConditioningCallback"]


class ConditioningCallback(Callback):
    r"""Log λmax and κ_p of Σx, Σ∇h and the sub-FIM Σx ⊗ Σ∇h of every Linear/Conv layer.

    Every ``every_n_steps`` optimizer steps (0, n, 2n, …) the callback analyses that step's own
    training batch, from the forward and backward pass that training does anyway (the
    empirical Fisher: no extra pass). With gradient accumulation all micro-batches of the
    step are summed. Results are logged at ``step = trainer.global_step`` of the analysed
    batch (step 0 is the initialisation) through every logger of the Trainer:

    * ``{prefix}/{layer}/input_lambda_max`` and ``input_kappa_{p}``: Σx, the uncentred second
      moment of the layer input (bias not included unless ``include_bias``).
    * ``{prefix}/{layer}/grad_lambda_max`` and ``grad_kappa_{p}``: Σ∇h, the second moment of
      the per-example output gradient (``B`` × autograd's gradient for a batch-mean loss).
    * ``{prefix}/{layer}/fim_lambda_max`` and ``fim_kappa_{p}``: the sub-FIM Σx ⊗ Σ∇h.
    * ``{prefix}/{layer}/dead_input_units`` / ``full_input_units``: input units never / always
      > 0 over the analysed rows (the dead / full neurons of the layer before).

    With a ``TensorBoardLogger``, histograms of log10 eigenvalues are written as well.
    The latest results, with full spectra, are in :attr:`results`.

    Args:
        every_n_steps: analyse optimizer steps ``0, n, 2n, …``.
        kappa_percents: the ``p`` of ``κ_p`` in percent, each in ``(0, 100]``.
        conv_mode: ``"channel"`` (the paper: spatial positions are rows, C×C moments) or
            ``"patch"`` (im2col rows, C_in·k·k, as K-FAC).
        layer_types: module types to analyse (subclasses included); default Linear and ConvNd.
        include: glob patterns of qualified layer names to analyse (default all).
        exclude: glob patterns of qualified layer names to skip.
        loss_reduction: ``"mean"`` if the training loss averages over the batch (gradients are
            multiplied by the batch size to get per-example gradients), ``"sum"`` otherwise.
        include_bias: append the homogeneous coordinate 1 to the inputs of layers with a bias.
        rank_rtol: raise every moment's resolution floor to at least ``rank_rtol · λmax``
            (default ``None``: the floor derived from how the moment was computed, see README
            "Numbers you can trust"; a smaller value cannot lower it).
        statistics_dtype: dtype of the Gram GEMMs (sums are always float64). ``"auto"``
            (default): float64 on CPUs and on accelerators whose float64 GEMMs run at least
            1/8 of float32 speed (measured once per device), float32 elsewhere. float32 Grams
            resolve eigenvalues only down to ~1e-3·λmax (their floor is reported).
        kappa_definition: ``"paper"`` (default): ``λ_p`` is the ``⌈p·d/100⌉``-th largest of
            all ``d`` eigenvalues, zeros included, and κ_100 uses the smallest nonzero one
            (the paper's footnote 2). ``"nonzero"``: ``λ_p`` is taken among the resolved
            nonzero eigenvalues only.
        log_histograms: write eigenvalue histograms to loggers that store them.
        log_figures: write a depth-profile figure per analysis to loggers that store figures
            (needs matplotlib). Off by default: rendering costs 0.4-0.8 s of CPU per analysis
            (measured), more than the analysis itself; the report command draws the same
            figures afterwards.
        prefix: first part of every logged key.
        fisher: ``"empirical"`` (default): the training labels, from the training step's own
            pass (the paper's M). ``"true"``: labels sampled from the model's predictive
            distribution (the paper's F), with a forward/backward pass of its own.
        probe_batches: ``k > 0`` analyses the same ``k`` training batches (drawn from a fresh
            iterator of the training dataloader at the start of fit, kept in checkpoints)
            at every analysed step, with a pass of their own, instead of the current batch:
            curves over training then compare like with like.
        forward_fn: ``forward_fn(pl_module, batch) -> outputs`` for the extra passes
            (default ``pl_module(batch[0])``).
        loss_fn: ``loss_fn(outputs, batch) -> loss`` for empirical probe passes (default mean
            cross-entropy against ``batch[1]``); it must average over the batch when
            ``loss_reduction="mean"``.
        sample_fn: ``sample_fn(outputs, generator) -> loss`` for the true Fisher (default:
            labels drawn from ``softmax(outputs)``, mean cross-entropy).
        seed: seed of the private generator that draws true-Fisher labels (the global RNG
            streams are never touched).
        warn_diagnosis: run the paper's diagnosis rules (:mod:`lightning_conditioning.diagnosis`:
            vanishing/exploding λmax across depth, dead units, ill-conditioned outliers, a
            large last-layer input) after every analysis and warn once per rule when it first
            fires.
        print_diagnosis: print the full diagnosis of the latest analysis when fit ends.
        tensorboard_layout: write TensorBoard's custom-scalars layout (one chart per quantity
            with every layer as a line). Opt-in: a run holds only one layout.
        window_steps: sum the statistics of ``w`` consecutive optimizer steps
            (``s … s + w − 1`` for every scheduled ``s``) and take the eigenvalues once, at the
            window's end, logged at step ``s + w − 1``. Pays the cheap Gram GEMMs often and
            the eigen-solves rarely; the parameters drift within a window, so the moments
            average over ``w`` nearby points (as K-FAC's running factors do, but exact sums).

    Extra passes (``fisher="true"`` or ``probe_batches``) leave training bit-identical: the
    RNG streams are forked, buffers (BatchNorm statistics) and train/eval flags restored, and
    gradients are taken with ``torch.autograd.grad`` so no ``.grad`` or optimizer state moves.

    Example::

        trainer = Trainer(callbacks=[ConditioningCallback(every_n_steps=50)])
        trainer.fit(model)
        callback.results["fc"].input.lambda_max
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        kappa_percents: Sequence[float] = (50, 80, 100),
        conv_mode: Literal["channel", "patch"] = "channel",
        layer_types: Sequence[type[nn.Module]] | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        loss_reduction: Literal["mean", "sum"] = "mean",
        include_bias: bool = False,
        rank_rtol: float | None = None,
        statistics_dtype: Literal["auto", "float32", "float64"] = "auto",
        kappa_definition: KappaDefinition = "paper",
        log_histograms: bool = True,
        log_figures: bool = False,
        prefix: str = "conditioning",
        fisher: Literal["empirical", "true"] = "empirical",
        probe_batches: int = 0,
        forward_fn: ForwardFn | None = None,
        loss_fn: LossFn | None = None,
        sample_fn: SampleLossFn | None = None,
        seed: int = 0,
        window_steps: int = 1,
        warn_diagnosis: bool = True,
        print_diagnosis: bool = False,
        tensorboard_layout: bool = False,
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int):
            raise TypeError(f"every_n_steps must be an int, got {every_n_steps!r}")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        percents = tuple(float(p) for p in kappa_percents)
        if not percents or not all(0 < p <= 100 and math.isfinite(p) for p in percents):
            raise ValueError(
                f"kappa_percents must be a non-empty list of percents in (0, 100], "
                f"got {list(kappa_percents)}"
            )
        if conv_mode not in ("channel", "patch"):
            raise ValueError(f"conv_mode must be 'channel' or 'patch', got {conv_mode!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if statistics_dtype not in STATISTICS_DTYPES:
            raise ValueError(
                f"statistics_dtype must be one of {STATISTICS_DTYPES}, got {statistics_dtype!r}"
            )
        if rank_rtol is not None and (
            isinstance(rank_rtol, bool)
            or not isinstance(rank_rtol, (int, float))
            or not 0 <= rank_rtol < 1
        ):
            raise ValueError(f"rank_rtol must be None or a number in [0, 1), got {rank_rtol!r}")
        if kappa_definition not in KAPPA_DEFINITIONS:
            raise ValueError(
                f"kappa_definition must be one of {KAPPA_DEFINITIONS}, got {kappa_definition!r}"
            )
        selected_types = checked_layer_types(layer_types)
        if isinstance(window_steps, bool) or not isinstance(window_steps, int) or not (
            1 <= window_steps <= every_n_steps
        ):
            raise ValueError(
                f"window_steps must be an int in [1, every_n_steps={every_n_steps}], "
                f"got {window_steps!r}"
            )
        if fisher not in ("empirical", "true"):
            raise ValueError(f"fisher must be 'empirical' or 'true', got {fisher!r}")
        if isinstance(probe_batches, bool) or not isinstance(probe_batches, int) or probe_batches < 0:
            raise ValueError(f"probe_batches must be an int >= 0, got {probe_batches!r}")
        for name, fn in (("forward_fn", forward_fn), ("loss_fn", loss_fn), ("sample_fn", sample_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {fn!r}")
        self.fisher: Literal["empirical", "true"] = fisher
        self.probe_batches = probe_batches
        self.forward_fn: ForwardFn = forward_fn or default_forward
        self.loss_fn: LossFn = loss_fn or default_loss
        self.sample_fn: SampleLossFn = sample_fn or sampled_cross_entropy
        self.seed = seed
        self.window_steps = window_steps
        self.warn_diagnosis = warn_diagnosis
        self.print_diagnosis = print_diagnosis
        self.tensorboard_layout = tensorboard_layout
        self.every_n_steps = every_n_steps
        self.kappa_percents = tuple(int(p) if p.is_integer() else p for p in percents)
        self.conv_mode: Literal["channel", "patch"] = conv_mode
        self.layer_types = selected_types
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude) if exclude is not None else None
        self.loss_reduction: Literal["mean", "sum"] = loss_reduction
        self.include_bias = include_bias
        self.rank_rtol = None if rank_rtol is None else float(rank_rtol)
        self.statistics_dtype = statistics_dtype
        self.kappa_definition: KappaDefinition = kappa_definition
        self.log_histograms = log_histograms
        self.log_figures = log_figures
        self.prefix = prefix
        self._capture: LayerCapture | None = None
        self._window_start: int | None = None  # first step of the open window
        self._current_step: int | None = None  # the step whose batches are being captured
        self._results: dict[str, LayerConditioning] = {}
        self._warned_silent = False
        self._fired_rules: set[str] = set()
        self._last_linear: str | None = None
        self._held_batches: list[Any] = []
        self._scale_at_backward: float | None = None
        self._passes = 0

    # ------------------------------------------------------------------ public state
    @property
    def results(self) -> dict[str, LayerConditioning]:
        """Latest analysed window: ``{layer name: LayerConditioning}`` (empty before one)."""
        return dict(self._results)

    @property
    def layer_names(self) -> list[str]:
        """Qualified names of the analysed layers (after ``setup``)."""
        return list(self._capture.layers) if self._capture is not None else []

    def should_analyse(self, step: int) -> bool:
        """Whether optimizer step ``step``'s batches are captured (it is in a window)."""
        return step % self.every_n_steps < self.window_steps

    def _window_end(self) -> int:
        assert self._window_start is not None
        return self._window_start + self.window_steps - 1

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        layers = find_layers(
            pl_module, self.layer_types, self.include, self.exclude, self.conv_mode
        )
        if not layers:
            rank_zero_warn(
                f"{type(self).__name__}: no layer of types "
                f"{[t.__name__ for t in self.layer_types]} matched in "
                f"{type(pl_module).__name__}; nothing will be analysed."
            )
            self._capture = None
            return
        self._last_linear = last_linear_name(pl_module)
        self._capture = LayerCapture(
            layers,
            statistics_dtype=gram_dtype_for(
                self.statistics_dtype, [p.device for p in pl_module.parameters()]
            ),
            loss_reduction=self.loss_reduction,
            include_bias=self.include_bias,
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._capture is not None:
            self._capture.attach()
        if self.tensorboard_layout and trainer.is_global_zero:
            publish_tensorboard_layout(
                trainer.loggers,
                make_tensorboard_layout(
                    conditioning_prefix=self.prefix, kappa_percents=self.kappa_percents
                ),
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.print_diagnosis and self._results and trainer.is_global_zero:
            findings = self.findings(trainer)
            step = next(iter(self._results.values())).step
            print(f"Conditioning diagnosis at step {step}:")
            print(format_findings(findings) if findings else "  no findings: nothing looks wrong.")

    def findings(self, trainer: pl.Trainer | None = None) -> list[Finding]:
        """The diagnosis of the latest analysis (with the latest weight-domination check of a
        WeightDominationCallback in ``trainer``, if any).

        Example::

            for finding in callback.findings(trainer):
                print(finding.message)
        """
        table = conditioning_table(self._results)
        domination: dict[str, dict[str, float]] = {}
        for callback in getattr(trainer, "callbacks", []) if trainer is not None else []:
            if isinstance(callback, WeightDominationCallback):
                domination = {
                    name: {k: v for k, v in dataclasses.asdict(stats).items() if v is not None}
                    for name, stats in callback.results.items()
                }
        return diagnose(table, domination or None, last_layer=self._last_linear)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._capture is None or not self.probe_batches or self._held_batches:
            return
        # a fresh iterator of the training data, without consuming the global RNG streams
        with torch.random.fork_rng(devices=cuda_devices(pl_module)):
            iterator = iter(trainer.train_dataloader)  # type: ignore[arg-type]
            for _ in range(self.probe_batches):
                try:
                    self._held_batches.append(_to_cpu(next(iterator)))
                except StopIteration:
                    break
            del iterator
        if len(self._held_batches) < self.probe_batches:
            rank_zero_warn(
                f"{type(self).__name__}: asked for {self.probe_batches} probe batches, the "
                f"training data has {len(self._held_batches)}."
            )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        capture = self._capture
        if capture is None:
            return
        step = trainer.global_step
        if self._window_start is not None and not self._window_start <= step <= self._window_end():
            self._discard_window()  # an unfinished window (its optimizer steps did not all run)
        if not self.should_analyse(step):
            return
        if self._window_start is None:
            self._window_start = step - step % self.every_n_steps
        first_micro_batch = self._current_step != step
        self._current_step = step
        if self.probe_batches:
            if first_micro_batch:
                for held in self._held_batches:
                    self._extra_pass(trainer, pl_module, trainer.strategy.batch_to_device(held), step)
        elif self.fisher == "true":
            self._extra_pass(trainer, pl_module, batch, step)
        else:
            capture.active = True  # piggyback on the training step's own forward/backward

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        capture = self._capture
        if capture is None or not capture.active:
            return
        # Lightning divides the loss by the accumulated micro-batches; a GradScaler
        # multiplies it by its scale (one host read per analysed backward)
        scale = _loss_scale(trainer)
        self._scale_at_backward = scale
        accumulation = float(trainer.accumulate_grad_batches) if pl_module.automatic_optimization else 1.0
        capture.grad_multiplier = accumulation / scale

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        capture = self._capture
        if capture is None or self._current_step is None:
            return
        capture.active = False
        if trainer.global_step == self._current_step:
            return  # this step's optimizer step has not run yet (accumulation)
        step, self._current_step = self._current_step, None
        if self._scale_at_backward is not None and _loss_scale(trainer) < self._scale_at_backward:
            rank_zero_info(
                f"{type(self).__name__}: step {step} skipped: its gradients overflowed in "
                "float16 (the GradScaler lowered its scale); nothing is logged for its window."
            )
            self._discard_window()
            return
        if step < self._window_end():
            return  # more steps to sum into this window
        self._window_start = None
        self._finish_window(trainer, step)

    def _extra_pass(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, step: int
    ) -> None:
        """One isolated forward/backward with capture on (true Fisher or a probe batch)."""
        capture = self._capture
        assert capture is not None
        self._passes += 1
        rank = trainer.global_rank
        generator = torch.Generator().manual_seed(
            hash((self.seed, rank, step, self._passes)) & 0x7FFF_FFFF_FFFF_FFFF
        )
        with isolated_pass(pl_module):
            capture.active = True
            try:
                with trainer.precision_plugin.forward_context():
                    outputs = self.forward_fn(pl_module, batch)
                    if self.fisher == "true":
                        loss = self.sample_fn(outputs, generator)
                    else:
                        loss = self.loss_fn(outputs, batch)
                scale = _loss_scale(trainer)  # keep float16 gradients in range, as training does
                capture.grad_multiplier = 1.0 / scale
                backward_without_grad(pl_module, loss * scale if scale != 1.0 else loss)
            finally:
                capture.active = False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._discard_window()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_hooks()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    # ------------------------------------------------------------------ internals
    def _remove_hooks(self) -> None:
        if self._capture is not None:
            self._capture.detach()
        self._window_start = self._current_step = None

    def _discard_window(self) -> None:
        if self._capture is not None:
            self._capture.active = False
            self._capture.reset()
        self._window_start = self._current_step = None
        self._scale_at_backward = None

    def _finish_window(self, trainer: pl.Trainer, step: int) -> None:
        capture = self._capture
        assert capture is not None
        if trainer.world_size > 1:
            capture.all_reduce(lambda flat, op: trainer.strategy.reduce(flat, reduce_op=op))
        moments = capture.moments()
        capture.reset()
        self._scale_at_backward = None
        # never block without telling: announce analyses expected to take over a second
        estimate = estimated_seconds(moments, trainer.world_size)
        if estimate > 1.0:
            largest = max((m.input_second_moment.shape[0] for m in moments.values()
                           if m.input_second_moment is not None), default=0)
            rank_zero_info(
                f"{type(self).__name__}: step {step}: eigen-analysis of {len(moments)} layers "
                f"(largest Σx {largest}×{largest}), about {estimate:.0f} s per process..."
            )
        started = time.perf_counter()
        results = analyse_layers(
            moments,
            lambda name, window: analyse_layer(
                name, step, window, percents=self.kappa_percents, rank_rtol=self.rank_rtol,
                kappa_definition=self.kappa_definition,
            ),
        )
        if estimate > 1.0:
            rank_zero_info(
                f"{type(self).__name__}: step {step}: analysis done in "
                f"{time.perf_counter() - started:.1f} s."
            )
        self._results = results
        self._report_problems(results, step)
        if self.warn_diagnosis:
            for finding in self.findings(trainer):
                if finding.rule not in self._fired_rules:
                    self._fired_rules.add(finding.rule)
                    rank_zero_warn(
                        f"{type(self).__name__}: step {step}: {finding.message}"
                        + (f" Remedy: {finding.remedy}" if finding.remedy else "")
                    )
        if trainer.is_global_zero:
            publish_conditioning(
                trainer.loggers,
                results,
                step,
                prefix=self.prefix,
                histograms=self.log_histograms,
                figures=self.log_figures,
            )

    def _report_problems(self, results: dict[str, LayerConditioning], step: int) -> None:
        nonfinite = [name for name, r in results.items() if r.status == "nonfinite"]
        if nonfinite:
            rank_zero_warn(
                f"{type(self).__name__}: step {step}: the statistics of {nonfinite} contain "
                "NaN/Inf; no numbers are logged for these layers at this step."
            )
        silent = [name for name, r in results.items() if r.status == "no_data"]
        if silent and not self._warned_silent:
            self._warned_silent = True
            rank_zero_warn(
                f"{type(self).__name__}: layers {silent} are registered but their forward "
                "hooks never fired in an analysed step (not called, or called functionally, "
                "e.g. nn.MultiheadAttention.out_proj); they are not analysed."
            )

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {"held_batches": self._held_batches, "warned_silent": self._warned_silent}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._held_batches = list(state_dict.get("held_batches", []))
        self._warned_silent = bool(state_dict.get("warned_silent", False))


def _to_cpu(batch: Any) -> Any:
    return apply_to_collection(batch, Tensor, lambda t: t.detach().to("cpu", copy=True))


def _loss_scale(trainer: pl.Trainer) -> float:
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None else 1.0

"""``ConditioningCallback``: a thin Lightning shell over :class:`ConditioningMonitor`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_conditioning.analysis.options import ConditioningOptions, check_one_per_prefix
from lightning_conditioning.callbacks.support import loss_scale, prefix_state_key, rank_zero_warn, unsupported
from lightning_conditioning.capture.passes import (
    ExtraPasses,
    ForwardFn,
    LossFn,
    SampleLossFn,
    default_forward,
    draw_probe_batches,
    forward_module_name,
)
from lightning_conditioning.distributed.collectives import Collectives
from lightning_conditioning.maths.sampling import DEFAULT_ROW_LIMIT
from lightning_conditioning.maths.solvers import SolverPlan
from lightning_conditioning.maths.spectra import KappaDefinition
from lightning_conditioning.monitors.conditioning import ConditioningMonitor
from lightning_conditioning.monitors.readouts import ConditioningReadout
from lightning_conditioning.monitors.shell import domination_source
from lightning_conditioning.sinks import publish_conditioning, publish_tensorboard_layout
from lightning_conditioning.sinks import tensorboard_layout as make_tensorboard_layout

__all__ = ["ConditioningCallback"]


class ConditioningCallback(ConditioningReadout, Callback):
    r"""Log λmax, κ_p and the rank of Σx, Σ∇h and the sub-FIM Σx ⊗ Σ∇h of every weight layer.

    At the scheduled optimizer steps (by default 0, 1, 2, 4, …, 64, then every 100; with
    ``every_n_steps=n``: 0, n, 2n, …) the training step's own forward and
    backward are captured (the empirical Fisher; with accumulation all micro-batches are summed)
    and the results are logged at ``step = trainer.global_step`` under
    ``{prefix}/{layer}/{quantity}`` (README "Logged keys"), through every logger; the latest
    results, with full spectra, are in :attr:`results`. The analysis itself is
    :class:`~lightning_conditioning.ConditioningMonitor` (documented there option by option).

    Args (beyond the monitor's ``every_n_steps``, ``kappa_percents``, ``conv_mode``,
    ``layer_types``, ``include``, ``exclude``, ``loss_reduction``, ``include_bias``,
    ``rank_rtol``, ``statistics_dtype``, ``kappa_definition``, ``window_steps``, ``solver``,
    ``warn_diagnosis``):
        log_histograms: write eigenvalue histograms to loggers that store them.
        log_figures: a depth-profile figure per analysis (0.4-0.8 s each; off by default).
        prefix: first part of every logged key.
        fisher: ``"empirical"`` (the training labels) or ``"true"`` (labels sampled from the
            model, in an isolated pass of its own).
        probe_batches: ``k > 0`` analyses the same ``k`` training batches (kept in
            checkpoints) at every analysed step, in isolated passes.
        forward_fn / loss_fn / sample_fn / seed: the extra passes' forward
            ``forward_fn(pl_module, batch) -> outputs``, empirical loss
            ``loss_fn(outputs, batch)``, sampled loss ``sample_fn(outputs, generator)`` and
            label generator seed. ``None`` (default): :mod:`lightning_conditioning.capture.passes`'s
            defaults, for tensor, tuple and dict (Hugging Face) batches and tensor, tuple or
            ``.logits`` outputs; a LightningModule without ``forward`` is called through its
            only sub-module holding parameters, or setup fails naming ``forward_fn=``.
        print_diagnosis: print the diagnosis of the latest analysis when fit ends.
        tensorboard_layout: write TensorBoard's custom-scalars layout (one chart per quantity,
            every layer a line), unless the run already has a layout of its own.

    Example::

        callback = ConditioningCallback(every_n_steps=50)
        Trainer(callbacks=[callback]).fit(model)
        callback.results["fc"].input.lambda_max
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        kappa_percents: Sequence[float] = (50, 80, 100),
        conv_mode: Literal["channel", "patch"] = "channel",
        layer_types: Sequence[type[nn.Module]] | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        loss_reduction: Literal["auto", "mean", "token_mean", "sum"] = "auto",
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
        tensorboard_layout: bool = True,
        solver: SolverPlan | None = None,
        memory_budget: int | Literal["auto"] = "auto",
        analysis: Literal["auto", "sync", "background"] = "auto",
        step_overhead: float | None = 0.35,
        max_rows: int | None = DEFAULT_ROW_LIMIT,
    ) -> None:
        given = locals()  # the analysis options by name (never by their order in the dataclass)
        self.options = ConditioningOptions(**{name: given[name] for name in ConditioningOptions.names()})
        for name in ConditioningOptions.names():
            setattr(self, name, getattr(self.options, name))
        #: the callback's own passes (true Fisher, probe batches); None functions: the defaults
        #: of lightning_conditioning.capture.passes (they read the batch too)
        self.extra_passes = ExtraPasses(fisher, probe_batches, seed, loss_fn, sample_fn, forward_fn)
        self.fisher, self.probe_batches, self.seed = fisher, probe_batches, seed
        self.forward_fn: ForwardFn | None = forward_fn
        self.loss_fn, self.sample_fn = loss_fn, sample_fn
        self._forward_module: str | None = None  # what the default forward calls ("": pl_module)
        self.log_histograms, self.log_figures, self.prefix = log_histograms, log_figures, prefix
        self.print_diagnosis, self.tensorboard_layout = print_diagnosis, tensorboard_layout
        self.monitor: ConditioningMonitor | None = None
        self._restored: dict[str, Any] = {}
        self._scale_at_backward: float | None = None
        self._set_up = False

    @property
    def state_key(self) -> str:
        # one state per prefix, whatever the options (see prefix_state_key)
        return prefix_state_key(self, self._set_up)

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_one_per_prefix(self, getattr(trainer, "callbacks", ()), ConditioningCallback)
        self._set_up = True
        # an extra pass that cannot call the model fails now, not at the first analysed step
        if stage == "fit" and self._extra_pass_option and self.forward_fn is None:
            self._forward_module = self._default_forward_module(pl_module)

    @property
    def _extra_pass_option(self) -> str | None:
        """The option that makes passes of the callback's own (None: it only listens)."""
        return self.extra_passes.option

    def _default_forward_module(self, pl_module: pl.LightningModule) -> str:
        option = f"{type(self).__name__}({self._extra_pass_option})"
        name = forward_module_name(pl_module, needed_by=f"{option}'s passes")
        if name:
            rank_zero_info(
                f"{type(self).__name__}: {type(pl_module).__name__} has no forward; the "
                f"extra passes call its only sub-module with parameters, `{name}` "
                "(pass forward_fn= to call something else)."
            )
        return name

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        problem = unsupported("conditioning", trainer.strategy)
        if problem:  # never silently empty, never a wrong number: step aside, and say why
            rank_zero_warn(f"{type(self).__name__} does nothing in this run: {problem}")
            return
        # the model is on its device now (setup runs before the strategy moves it)
        if self.monitor is None or self.monitor.closed:
            if self.monitor is not None:  # a second fit: keep what the first one warned about
                self._restored = self.monitor.state_dict()
            self.monitor = ConditioningMonitor(
                pl_module,
                collectives=Collectives.strategy(trainer.strategy),
                info=rank_zero_info,
                warn=rank_zero_warn,
                **self.options.as_kwargs(),
            )
            self.monitor.load_state_dict(self._restored)
            self.monitor.optimizer = list(trainer.optimizers) or None  # for the stability margin
            self.monitor.domination_source = domination_source(trainer.callbacks)  # type: ignore[attr-defined]
        if self.tensorboard_layout and trainer.is_global_zero:
            publish_tensorboard_layout(
                trainer.loggers,
                make_tensorboard_layout(conditioning_prefix=self.prefix, kappa_percents=self.options.kappa_percents),
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and (note := self.closing_words(self.print_diagnosis, trainer)):
            rank_zero_info(note)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        passes = self.extra_passes
        if self.monitor is None or not self.monitor.capture or not self.probe_batches or passes.held_batches:
            return
        # drawn beside the training loader: its sampler, generators and workers stay as they
        # are, so training sees the batches it would have seen without the callback
        if note := passes.hold(_probe_batches(trainer, self.probe_batches)):
            rank_zero_warn(f"{type(self).__name__}: {note}")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        monitor, step = self.monitor, trainer.global_step
        if monitor is None:
            return
        first_micro_batch = monitor.current_step != step
        if first_micro_batch and not monitor.begin(step):
            return
        if self.probe_batches:
            if first_micro_batch:
                for held in self.extra_passes.held_batches:
                    self._extra_pass(trainer, pl_module, trainer.strategy.batch_to_device(held), step)
        elif self.fisher == "true":
            self._extra_pass(trainer, pl_module, batch, step)
        elif monitor.capture is not None:
            monitor.set_loss_tokens(monitor.loss_tokens_for(batch))  # token-mean losses
            monitor.capture.active = True  # piggyback on the training step's own passes

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self.monitor is None or not self.monitor.capturing:
            return
        # Lightning divides the loss by the accumulated micro-batches; a GradScaler multiplies
        # it by its scale (one host read per analysed backward)
        self._scale_at_backward = scale = loss_scale(trainer)
        accumulation = float(trainer.accumulate_grad_batches) if pl_module.automatic_optimization else 1.0
        self.monitor.set_grad_multiplier(accumulation / scale)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        monitor = self.monitor
        if monitor is None:
            return
        if monitor.current_step is None:
            if monitor.poll():  # a background analysis finished
                self._publish(trainer)
            return
        monitor.pause()
        step = monitor.current_step
        if trainer.global_step == step:
            return  # this step's optimizer step has not run yet (accumulation)
        skipped = self._scale_at_backward is not None and loss_scale(trainer) < self._scale_at_backward
        if monitor.step_done(
            step, skipped="the GradScaler lowered its scale" if skipped else None, who=type(self).__name__
        ):
            self._publish(trainer)
        self._scale_at_backward = None

    def _publish(self, trainer: pl.Trainer) -> None:
        """Log the monitor's new results at the step they belong to."""
        monitor = self.monitor
        assert monitor is not None and monitor.results_step is not None
        if trainer.is_global_zero:
            publish_conditioning(
                trainer.loggers,
                monitor.window_results,
                monitor.results_step,
                prefix=self.prefix,
                histograms=self.log_histograms,
                figures=self.log_figures,
                attention=monitor.attention.results,
            )

    def _extra_pass(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, step: int) -> None:
        """One isolated forward/backward with capture on (true Fisher or a probe batch)."""
        assert self.monitor is not None
        self.extra_passes.run(
            self.monitor,
            pl_module,
            lambda: self._forward(pl_module, batch),
            batch,
            step=step,
            rank=trainer.global_rank,
            loss_scale=loss_scale(trainer),
            forward_context=trainer.precision_plugin.forward_context,
        )

    def _forward(self, pl_module: pl.LightningModule, batch: Any) -> Any:
        if self.forward_fn is not None:
            return self.forward_fn(pl_module, batch)
        if self._forward_module is None:  # hooks called without setup
            self._forward_module = self._default_forward_module(pl_module)
        # the true Fisher computes its loss from the logits: the data's labels stay out (but
        # for encoder-decoder models, which make their decoder inputs from them)
        return default_forward(pl_module.get_submodule(self._forward_module), batch, keep_labels=self.fisher != "true")

    def _discard(self) -> None:
        if self.monitor is not None:
            self.monitor.discard()
        self._scale_at_backward = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None and self.monitor.wait():  # the last background analysis
            self._publish(trainer)
        self._discard()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    def _close(self) -> None:
        if self.monitor is not None:  # hooks go; the latest results stay readable
            self.monitor.close()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        monitor_state = self.monitor.state_dict() if self.monitor is not None else self._restored
        return {"held_batches": self.extra_passes.held_batches, **monitor_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.extra_passes.held_batches = list(state_dict.get("held_batches", []))
        self._restored = {k: v for k, v in state_dict.items() if k != "held_batches"}
        if self.monitor is not None:
            self.monitor.load_state_dict(self._restored)


def _probe_batches(trainer: pl.Trainer, count: int) -> list[Any]:
    """The first ``count`` training batches, in the form ``training_step`` receives them."""
    loaders = trainer.train_dataloader
    if isinstance(loaders, DataLoader):
        return draw_probe_batches(loaders, count)
    # several loaders (a dict or list): the i-th batch of each, combined as the fit loop does
    drawn = apply_to_collection(loaders, DataLoader, lambda loader: _Drawn(draw_probe_batches(loader, count)))
    parts: list[_Drawn] = []
    apply_to_collection(drawn, _Drawn, parts.append)
    if not parts:
        return []
    mode = getattr(getattr(trainer.fit_loop, "_combined_loader", None), "_mode", "max_size_cycle")
    if mode == "sequential":
        return [batch for part in parts for batch in part][:count]
    size = min(map(len, parts)) if mode == "min_size" else max(map(len, parts))
    if not all(parts):
        return []
    return [apply_to_collection(drawn, _Drawn, lambda part, i=i: part[i % len(part)]) for i in range(min(size, count))]


class _Drawn(list):
    """The batches drawn from one of several training loaders."""

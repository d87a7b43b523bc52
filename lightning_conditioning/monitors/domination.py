"""``WeightDominationMonitor``: σmax(∇W)/σmax(W) per layer for any training loop.

The core of :class:`~lightning_conditioning.WeightDominationCallback` (a thin Lightning shell
over it); imports neither Lightning nor TensorBoard. The maths (statuses, the layer's ratio
history, the rules) is :mod:`lightning_conditioning.maths.domination`; the words are
:mod:`lightning_conditioning.views.wording`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor, nn

from lightning_conditioning import schema
from lightning_conditioning.capture.plan import memory_budget as _memory_budget
from lightning_conditioning.capture.selection import checked_layer_types, find_layers, last_linear_name
from lightning_conditioning.distributed.collectives import Collectives
from lightning_conditioning.distributed.shards import block_norms, is_sharded, local_rows
from lightning_conditioning.maths.domination import (
    DominationReason,
    DominationRules,
    RatioHistory,
    WeightStatistics,
    domination_reasons,
    frobenius_norm,
    imbalance,
    is_dominated,
    ratio_fall,
    record_ratio,
    spectral_norm,
    statistics_from_norms,
    weight_statistics,
)
from lightning_conditioning.notify import announce
from lightning_conditioning.notify import warn as warn_at_user
from lightning_conditioning.views.wording import domination_reason_text, domination_warning, zero_layers_text

__all__ = ["WeightDominationMonitor", "DominationOptions", "check_options"]


def _span(rows: slice | int) -> tuple[int, int | None]:
    """A weight's rows as a key: a row slice's ends, or an expert's index (and None)."""
    return (rows, None) if isinstance(rows, int) else (rows.start, rows.stop)


def _adaptive(optimizer: Any) -> bool:
    """Whether any of the optimizer(s) is not of the SGD family (no ``momentum`` and
    ``dampening`` in its defaults).

    Example:
        >>> import torch
        >>> layer = nn.Linear(2, 2)
        >>> _adaptive(torch.optim.SGD(layer.parameters(), lr=0.1)), _adaptive(torch.optim.AdamW(layer.parameters()))
        (False, True)
    """
    optimizers = optimizer if isinstance(optimizer, (list, tuple)) else [optimizer] if optimizer else []
    return any(not {"momentum", "dampening"} <= set(getattr(o, "defaults", {})) for o in optimizers)


def _usable_loss(loss: float | None) -> float | None:
    return float(loss) if loss is not None and math.isfinite(loss) and loss > 0 else None


class WeightDominationMonitor:
    r"""Definition 1 of the paper, checked every ``every_n_steps`` optimizer steps.

    Call :meth:`before_optimizer_step` after the backward (and after AMP unscaling and the DDP
    gradient average), with the step's training loss when you have it, then
    :meth:`after_optimizer_step` once the optimizer has stepped: it returns the scalars
    (``{prefix}/{layer}/grad_weight_ratio`` …, names from :mod:`~lightning_conditioning.schema`),
    warns once per layer dominated for ``patience`` checks, and names once, through ``info``,
    the layers whose weight or gradient is exactly zero (never dominated). See
    :class:`~lightning_conditioning.WeightDominationCallback` for the options and the rules.

    σmax of weights, gradients and updates are within a relative 1e-4 of the float64 value
    (:func:`~lightning_conditioning.maths.solvers.largest_singular_value`: exact for small layers,
    Lanczos in the tensors' own dtype for large ones, one intra-op thread). The update ΔW is
    measured against copies of the weights taken before the step, a tied weight once, within
    ``memory_budget`` bytes (``"auto"``: half the conditioning's); when they do not all fit,
    layers take turns from check to check and the others have no ``update_weight_ratio`` then.

    Each layer's ratio history (its running peak, :attr:`history`) is kept in
    :meth:`state_dict`. Under DDP the ratios are the same on every rank (the gradients are
    averaged before the check); pass the same ``loss`` on every rank (e.g. all-reduced) and
    every rank holds the same history and verdicts.

    Example:
        >>> import torch
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> monitor = WeightDominationMonitor(model, every_n_steps=1)
        >>> model(torch.randn(16, 4)).square().mean().backward()
        >>> monitor.before_optimizer_step(0)
        True
        >>> optimizer.step()
        >>> metrics = monitor.after_optimizer_step()
        >>> sorted(monitor.results), "weight_domination/dominated_layers" in metrics
        (['0', '2'], True)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        prefix: str = "weight_domination",
        warn: Callable[[str], None] | None = None,
        info: Callable[[str], None] | None = None,
        collectives: Collectives | None = None,
        optimizer: Any = None,
        memory_budget: int | str = "auto",
        **options: Any,
    ) -> None:
        #: the check's options, validated (:class:`DominationOptions`: ``every_n_steps``,
        #: ``threshold``, ``update_threshold``, ``patience``, ``layer_types``, ``include``,
        #: ``exclude``, ``log_imbalance``, ``fall_factor``)
        self.options = o = DominationOptions(**options)
        self.every_n_steps, self.threshold, self.update_threshold = o.every_n_steps, o.threshold, o.update_threshold
        self.patience, self.fall_factor, self.log_imbalance = o.patience, o.fall_factor, o.log_imbalance
        self.rules = DominationRules(self.threshold, self.update_threshold, self.fall_factor)
        self.prefix = prefix
        self._warn = warn or warn_at_user
        self._info = info or announce
        layers = find_layers(model, o.layer_types, o.include, o.exclude)
        #: ``{layer: (parameter, rows)}``: an attention projection's weight is a row slice, an
        #: expert's the index of its matrix in a fused 3-D weight
        self._weights: dict[str, tuple[nn.Parameter, slice | int]] = {}
        for name, (module, adapter) in layers.items():
            found = adapter.weight_of(module)
            if found is not None and isinstance(found[0], nn.Parameter):
                if isinstance(found[1], int) and is_sharded(found[0]):
                    continue  # an expert of a sharded fused weight: its matrix spans shards
                self._weights[name] = (found[0], found[1])
        if not self._weights:
            self._warn(f"{type(self).__name__}: no layer with a weight matched; nothing to check.")
        #: whether the training optimizer rescales gradients per coordinate (Adam, RMSprop,
        #: …: one without SGD's ``momentum`` / ``dampening``): a check is judged on the
        #: gradient ratio only once the applied update is known
        self.adaptive = _adaptive(optimizer)
        #: weights sharded over processes (FSDP2 ``DTensor``): norms reduced over the shards
        self.sharded = any(is_sharded(parameter) for parameter, _ in self._weights.values())
        self._collectives = collectives or Collectives.local()
        if self.sharded and not self._collectives.distributed:
            self._warn(
                f"{type(self).__name__}: the weights are sharded DTensors but no collectives "
                "were given: pass collectives=Collectives.torch_distributed() (the "
                "callback does this itself)."
            )
        self.last_linear = last_linear_name(model)
        self._results: dict[str, WeightStatistics] = {}
        self._snapshot: dict[str, Tensor] = {}
        self._snapshot_keys: dict[str, tuple[int, int, int | None]] = {}
        self._snapshot_turn = 0
        #: bytes the copies of the weights (for ΔW) may hold: ``memory_budget`` (``"auto"``: half
        #: of :func:`~lightning_conditioning.capture.plan.memory_budget`, so that both monitors
        #: together hold at most 3/10 of the training state); beyond it, layers take turns
        self.snapshot_budget = _memory_budget(model, memory_budget) // (2 if memory_budget == "auto" else 1)
        self._pending_step: int | None = None
        self._last_checked_step: int | None = None
        self._below: dict[str, int] = {}
        self._warned: set[str] = set()
        self._loss: float | None = None
        self._history: dict[str, RatioHistory] = {}
        self._reasons: dict[str, tuple[DominationReason, ...]] = {}
        self._zero_named: set[str] = set()

    @property
    def results(self) -> dict[str, WeightStatistics]:
        """Latest check: ``{layer name: WeightStatistics}`` (layers with a gradient only)."""
        return dict(self._results)

    @property
    def pending_step(self) -> int | None:
        """The step checked before its optimizer step, waiting for :meth:`after_optimizer_step`."""
        return self._pending_step

    @property
    def warned_layers(self) -> list[str]:
        """Layers warned about (dominated for ``patience`` checks), sorted."""
        return sorted(self._warned)

    @property
    def dominated(self) -> list[str]:
        """Layers the latest check finds in weight domination (:attr:`reasons` not empty)."""
        return [name for name, reasons in self._reasons.items() if reasons]

    @property
    def reasons(self) -> dict[str, tuple[DominationReason, ...]]:
        """Latest check: ``{layer: the rules that find it dominated}`` (``()``: none), from
        :func:`~lightning_conditioning.maths.domination.domination_reasons` with the layer's history.
        While a check waits for :meth:`after_optimizer_step`, the update rule is not applied yet."""
        return dict(self._reasons)

    @property
    def history(self) -> dict[str, RatioHistory]:
        """``{layer: RatioHistory}``: each layer's running peak ratio (checkpointed)."""
        return dict(self._history)

    @property
    def zero_layers(self) -> dict[str, str]:
        """Latest check: ``{layer: "zero_gradient" | "zero_weight"}`` (exactly zero, never dominated)."""
        return {
            name: stats.status
            for name, stats in self._results.items()
            if stats.status in ("zero_gradient", "zero_weight")
        }

    def is_dominated(self, stats: WeightStatistics) -> bool:
        """Whether ``stats`` alone count as weight domination: the history-free rules
        (:func:`~lightning_conditioning.maths.domination.is_dominated`). :attr:`dominated` also
        judges each layer against its own history."""
        return is_dominated(stats, self.threshold, self.update_threshold)

    def is_due(self, step: int) -> bool:
        """Whether :meth:`before_optimizer_step` would check ``step``."""
        return step % self.every_n_steps == 0 and step != self._last_checked_step

    def domination_table(self) -> dict[str, dict[str, float]]:
        """The latest check as ``{layer: {quantity: value}}`` (for the diagnosis): the finite
        numbers of :class:`~lightning_conditioning.maths.domination.WeightStatistics` (a pending
        check has no ``update_weight_ratio`` yet), the layer's history
        (``grad_weight_ratio_peak``, ``grad_weight_ratio_peak_step``, ``grad_weight_ratio_fall``
        net of the loss, ``loss_fall`` when a loss is known) and the verdict ``dominated``
        (1.0 or 0.0).

        Example:
            >>> import torch
            >>> model = nn.Sequential(nn.Linear(3, 3))
            >>> monitor = WeightDominationMonitor(model, every_n_steps=1)
            >>> model(torch.randn(4, 3)).sum().backward()
            >>> monitor.before_optimizer_step(0)
            True
            >>> sorted(monitor.domination_table()["0"])[:4]
            ['dominated', 'grad_fro', 'grad_spectral_norm', 'grad_weight_ratio']
        """
        table: dict[str, dict[str, float]] = {}
        for name, stats in self._results.items():
            row = {
                key: float(value)
                for key, value in dataclasses.asdict(stats).items()
                if isinstance(value, (int, float)) and math.isfinite(value)
            }
            history = self._history.get(name)
            if history is not None and stats.status == "ok":
                row["grad_weight_ratio_peak"] = history.peak_ratio
                row["grad_weight_ratio_peak_step"] = float(history.peak_step)
                row["grad_weight_ratio_fall"] = ratio_fall(history, stats.grad_weight_ratio, self._loss)
                if history.peak_loss is not None and self._loss is not None:
                    row["loss_fall"] = history.peak_loss / self._loss
            row["dominated"] = 1.0 if self._reasons.get(name) else 0.0
            table[name] = row
        return table

    def before_optimizer_step(self, step: int, loss: float | None = None) -> bool:
        """Check step ``step`` if it is scheduled (once, however many optimizers): the norms
        of every weight and gradient, each layer's history, and a snapshot of the weight.
        ``loss``: the step's training loss (optional; with it, a ratio that falls because the
        loss falls is not taken for a fall into domination). Returns whether it checked."""
        if not self.is_due(step):
            return False
        self._last_checked_step = self._pending_step = step
        self._loss = _usable_loss(loss)
        self._results, self._snapshot, self._reasons = {}, {}, {}
        checked = [
            (name, parameter, rows)
            for name, (parameter, rows) in self._weights.items()
            if parameter.requires_grad and parameter.grad is not None
        ]  # not frozen
        for (name, _, _), stats in zip(checked, self._statistics(checked)):
            self._results[name] = stats
            if stats.status == "ok":
                self._history[name] = record_ratio(self._history.get(name), stats.grad_weight_ratio, step, self._loss)
            self._reasons[name] = self._judge(name, stats)
        self._take_snapshots(checked)
        return True

    def _take_snapshots(self, checked: list[tuple[str, nn.Parameter, slice | int]]) -> None:
        """Copies of the checked weights, for ΔW after the step: one per distinct block of
        rows (a tied weight once), within :attr:`snapshot_budget` bytes. When not all fit,
        each check copies the next ones in turn (the others' update is not measured then)."""
        order = checked[self._snapshot_turn :] + checked[: self._snapshot_turn]
        copies: dict[tuple[int, int, int | None], Tensor] = {}
        held = taken = 0
        for name, parameter, rows in order:
            key = (id(parameter), *_span(rows))
            if key not in copies:
                block = self._block(parameter.detach(), rows)
                size = block.numel() * block.element_size()
                if held + size > self.snapshot_budget:
                    break
                copies[key] = block.clone()
                held += size
            self._snapshot[name] = copies[key]
            self._snapshot_keys[name] = key
            taken += 1
        self._snapshot_turn = (self._snapshot_turn + taken) % max(len(checked), 1)

    def _block(self, tensor: Tensor, rows: slice | int) -> Tensor:
        """This process's part of a layer's rows: all of them, or (sharded weights) the rows of
        its shard; a replicated weight counts on rank 0 only, so that sums over ranks hold it once."""
        block, sharded = local_rows(tensor, rows)
        if self.sharded and not sharded and self._collectives.rank != 0:
            return block[:0]
        return block

    def _statistics(self, checked: list[tuple[str, nn.Parameter, slice | int]]) -> list[WeightStatistics]:
        """Norms of every checked layer: each weight on its own, or (sharded) reduced over ranks."""
        if not self.sharded:
            return [
                weight_statistics(parameter.detach()[rows], parameter.grad[rows])  # type: ignore[index]
                for _, parameter, rows in checked
            ]
        weights = [self._block(parameter.detach(), rows) for _, parameter, rows in checked]
        grads = [self._block(parameter.grad, rows) for _, parameter, rows in checked]  # type: ignore[arg-type]
        norms = block_norms(weights + grads, self._collectives.all_reduce)
        return [
            statistics_from_norms(w[0], g[0], w[1], g[1]) for w, g in zip(norms[: len(checked)], norms[len(checked) :])
        ]

    def _judge(self, name: str, stats: WeightStatistics) -> tuple[DominationReason, ...]:
        reasons = domination_reasons(stats, self._history.get(name), self.rules, self._loss)
        if stats.update_weight_ratio is None and self.adaptive:
            # an adaptive optimizer rescales the gradient: its ratio alone says nothing about
            # the step until the step is known (after_optimizer_step judges again)
            return tuple(r for r in reasons if r == "not_updated")
        return reasons

    def after_optimizer_step(self) -> dict[str, float]:
        """Complete the pending check with the update actually applied; returns the finite
        scalars to log (empty when no check is pending)."""
        step, self._pending_step = self._pending_step, None
        if step is None:
            return {}
        distinct = {self._snapshot_keys[name]: name for name in self._snapshot}  # a tied weight once
        changes = [
            self._block(self._weights[name][0].detach(), self._weights[name][1]) - self._snapshot[name]
            for name in distinct.values()
        ]
        norms = (
            block_norms(changes, self._collectives.all_reduce)
            if self.sharded
            else [(spectral_norm(change), 0.0) for change in changes]
        )
        del changes
        by_key = dict(zip(distinct, norms))
        for name in list(self._snapshot):
            norm, _ = by_key[self._snapshot_keys[name]]
            stats = self._results[name].with_update_norm(norm)
            self._results[name] = stats
            self._reasons[name] = self._judge(name, stats)
        self._snapshot, self._snapshot_keys = {}, {}
        self._name_zero_layers(step)
        self._update_warnings(step)
        return {k: v for k, v in self.metrics().items() if math.isfinite(v)}

    def cancel(self) -> None:
        """Drop a pending check (e.g. training ended before its optimizer step)."""
        self._pending_step, self._snapshot, self._snapshot_keys = None, {}, {}

    def metrics(self) -> dict[str, float]:
        """The scalars of the latest check, ``{prefix}/{layer}/{quantity}``."""
        metrics: dict[str, float] = {}
        previous_fro: float | None = None
        for name, (parameter, rows) in self._weights.items():
            stats = self._results.get(name)
            if self.log_imbalance and (stats is not None or not self.sharded):
                current_fro = stats.weight_fro if stats is not None else frobenius_norm(parameter.detach()[rows])
                if previous_fro is not None:
                    absolute, relative = imbalance(previous_fro, current_fro)
                    metrics[schema.key(self.prefix, name, "imbalance")] = absolute
                    metrics[schema.key(self.prefix, name, "relative_imbalance")] = relative
                previous_fro = current_fro
            stats = self._results.get(name)
            if stats is None:
                continue
            for quantity in (
                "grad_weight_ratio",
                "weight_spectral_norm",
                "grad_spectral_norm",
                "grad_weight_ratio_fro",
                "update_weight_ratio",
            ):
                value = getattr(stats, quantity)
                if value is not None:
                    metrics[schema.key(self.prefix, name, quantity)] = value
            history = self._history.get(name)
            if history is not None and stats.status == "ok":  # the layer against its own past
                metrics[schema.key(self.prefix, name, "grad_weight_ratio_peak")] = history.peak_ratio
                metrics[schema.key(self.prefix, name, "grad_weight_ratio_fall")] = ratio_fall(
                    history, stats.grad_weight_ratio, self._loss
                )
            metrics[schema.key(self.prefix, name, "dominated")] = 1.0 if self._reasons.get(name) else 0.0
        metrics[f"{self.prefix}/{schema.DOMINATED_LAYERS}"] = float(len(self.dominated))
        return metrics

    def _name_zero_layers(self, step: int) -> None:
        """One note for the layers newly found exactly zero (each layer named once per run)."""
        new = {name: status for name, status in self.zero_layers.items() if name not in self._zero_named}
        if not new:
            return
        self._zero_named.update(new)
        text = zero_layers_text(
            [n for n, s in new.items() if s == "zero_gradient"], [n for n, s in new.items() if s == "zero_weight"]
        )
        self._info(f"{type(self).__name__}: step {step}: {text}")

    def _update_warnings(self, step: int) -> None:
        table: dict[str, dict[str, float]] | None = None
        for name in self._results:
            reasons = self._reasons.get(name, ())
            self._below[name] = self._below.get(name, 0) + 1 if reasons else 0
            if self._below[name] < self.patience or name in self._warned:
                continue
            self._warned.add(name)
            table = table if table is not None else self.domination_table()
            reason = domination_reason_text(
                reasons, table[name], self.threshold, self.update_threshold, self.fall_factor
            )
            self._warn(
                domination_warning(type(self).__name__, name, step, self._below[name], reason, name == self.last_linear)
            )

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the warning state, each layer's ratio history and the
        layers already named as exactly zero (plain Python values)."""
        return {
            "below": dict(self._below),
            "warned": sorted(self._warned),
            "last_checked_step": self._last_checked_step,
            "history": {name: history.state() for name, history in self._history.items()},
            "zero_named": sorted(self._zero_named),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (a state from before the history was kept loads too)."""
        self._below = dict(state.get("below", {}))
        self._warned = set(state.get("warned", []))
        self._last_checked_step = state.get("last_checked_step")
        self._history = {name: RatioHistory.from_state(h) for name, h in state.get("history", {}).items()}
        self._zero_named = set(state.get("zero_named", []))


@dataclass(frozen=True)
class DominationOptions:
    """The weight-domination check's options, validated and normalised once for every shell
    (their meaning: :class:`~lightning_conditioning.WeightDominationCallback`).

    Example:
        >>> DominationOptions(every_n_steps=10, threshold=1).threshold
        1.0
    """

    every_n_steps: int = 100
    threshold: float = 1e-4
    update_threshold: float = 0.0
    patience: int = 3
    layer_types: Sequence[type[nn.Module]] | None = None
    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    log_imbalance: bool = True
    fall_factor: float | None = 1000.0

    def __post_init__(self) -> None:
        check_options(self.every_n_steps, self.threshold, self.update_threshold, self.patience, self.fall_factor)
        set_ = object.__setattr__
        set_(self, "threshold", float(self.threshold))
        set_(self, "update_threshold", float(self.update_threshold))
        set_(self, "fall_factor", float(self.fall_factor) if self.fall_factor is not None else None)
        set_(self, "layer_types", checked_layer_types(self.layer_types))
        set_(self, "include", list(self.include) if self.include is not None else None)
        set_(self, "exclude", list(self.exclude) if self.exclude is not None else None)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The options' names, in declaration order."""
        return tuple(f.name for f in fields(cls))

    def as_kwargs(self) -> dict[str, Any]:
        """``{name: value}`` of every option (to hand them on by name)."""
        return {name: getattr(self, name) for name in self.names()}


def check_options(
    every_n_steps: Any, threshold: Any, update_threshold: Any, patience: Any, fall_factor: Any = 1000.0
) -> None:
    """Raise a clear error for a bad weight-domination option.

    Example:
        >>> check_options(100, 1e-4, 0.0, 3, fall_factor=0.5)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: fall_factor must be None or a finite number > 1 (a fall of the ratio ...), got 0.5
    """
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise ValueError(f"every_n_steps must be an int >= 1, got {every_n_steps!r}")
    if not (isinstance(threshold, (int, float)) and threshold > 0 and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a positive finite number, got {threshold!r}")
    if not (isinstance(update_threshold, (int, float)) and 0 <= update_threshold < math.inf):
        raise ValueError(f"update_threshold must be a finite number >= 0, got {update_threshold!r}")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"patience must be an int >= 1, got {patience!r}")
    if fall_factor is not None and (
        isinstance(fall_factor, bool) or not isinstance(fall_factor, (int, float)) or not 1 < fall_factor < math.inf
    ):
        raise ValueError(
            "fall_factor must be None or a finite number > 1 (a fall of the ratio from "
            f"its own peak, e.g. 1000), got {fall_factor!r}"
        )

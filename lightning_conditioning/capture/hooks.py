"""Capture of layer inputs and output gradients: the one place that touches hooks.

A :class:`~lightning_conditioning.capture.adapters.LayerAdapter` turns one layer kind's input ``x`` and output
gradient ``∂L/∂h`` into
Gram matrices (sums of row outer products) and unit activity counts. :class:`LayerCapture`
registers a forward hook per layer that, while capture is active, reduces the input to a
``d × d`` Gram at once (no activation is kept alive) and registers a tensor hook on the layer
output, which receives exactly ``∂L/∂h`` in the backward pass (safe with in-place ReLU, unlike
``register_full_backward_hook``).

Per-example gradient convention: for a batch-mean loss over ``B`` examples autograd hands each
example ``g/B``, so rows of the output gradient are multiplied by ``B`` (``loss_reduction=
"mean"``, ``B`` = the leading dimension of the layer output) times ``grad_multiplier`` (set by
the callback, e.g. the number of accumulated micro-batches). For conv layers every spatial
position is a row, as in the paper; both second moments are means over their rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_conditioning.capture.adapters import LayerAdapter
from lightning_conditioning.capture.experts import ExpertsCapture
from lightning_conditioning.capture.functional import (
    KIND_OF,
    FunctionalCapture,
    WeightUse,
    compiled,
    row_range,
    weight_uses,
)
from lightning_conditioning.capture.plan import AnalysisPlan
from lightning_conditioning.capture.rows import in_dtype, without_autocast

# which layers are analysed: lightning_conditioning.capture.selection (its names import from here too)
from lightning_conditioning.capture.selection import checked_layer_types as checked_layer_types
from lightning_conditioning.capture.selection import coverage as coverage
from lightning_conditioning.capture.selection import find_layers as find_layers
from lightning_conditioning.capture.selection import last_linear_name as last_linear_name
from lightning_conditioning.capture.selection import select_layers as select_layers
from lightning_conditioning.capture.selection import uncovered_modules as uncovered_modules
from lightning_conditioning.capture.selection import uncovered_reason as uncovered_reason
from lightning_conditioning.capture.selection import user_name as user_name
from lightning_conditioning.capture.shared_inputs import InputSharing
from lightning_conditioning.distributed.owners import (
    ReduceTo,
    Shardable,
    merge_sketches,
    owners_of,
    sum_windows,
    unpack,
)
from lightning_conditioning.maths.accumulate import LayerWindow
from lightning_conditioning.maths.moments import LayerMoments, moments_to_cpu
from lightning_conditioning.maths.sampling import RowSampler
from lightning_conditioning.maths.sketch import BLOCK_ROWS

__all__ = ["LayerCapture"]


def _module_device(module: nn.Module) -> torch.device:
    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return torch.device("cpu")


class LayerCapture:
    """Hooks that fill one :class:`LayerWindow` per layer while ``active`` is True.

    Args:
        layers: ``{name: (module, adapter)}``, e.g. from :func:`find_layers`.
        statistics_dtype: dtype of the Gram GEMMs (float32 default; inputs in lower precision
            are upcast, float64 inputs stay float64). Sums are always accumulated in float64.
        loss_reduction: ``"mean"`` multiplies output gradients by the batch size (the
            leading dimension), ``"token_mean"`` by the number of tokens the loss averages over
            (:attr:`loss_tokens` when set, else the rows of the layer's output), ``"sum"``
            leaves them.
        include_bias: add the homogeneous coordinate (a trailing 1) to the inputs of layers
            that have a bias.
        model: the model holding the layers: with it, weights used functionally inside other
            modules' forwards are captured too
            (:mod:`~lightning_conditioning.capture.functional`).
        max_rows: the most rows a moment takes in a window, over its passes (a layer's
            forward, or its output's gradient): a pass past what is left is sampled uniformly
            and scaled to stand for its rows (None: every row;
            :mod:`~lightning_conditioning.maths.sampling`). Conv layers
            (``LayerAdapter.samples_rows``) and lookups are not sampled.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 2))
        >>> capture = LayerCapture(find_layers(model))
        >>> capture.attach()
        >>> capture.active = True
        >>> model(torch.randn(5, 3)).mean().backward()
        >>> capture.windows["0"].input.rows, capture.windows["0"].grad.rows
        (5, 5)
        >>> capture.detach()
    """

    def __init__(
        self,
        layers: dict[str, tuple[nn.Module, LayerAdapter]],
        *,
        statistics_dtype: torch.dtype = torch.float32,
        loss_reduction: Literal["mean", "token_mean", "sum"] = "mean",
        include_bias: bool = False,
        model: nn.Module | None = None,
        plan: AnalysisPlan | None = None,
        max_rows: int | None = None,
    ) -> None:
        self.layers = layers
        #: draws at most ``max_rows`` rows of each pass into each moment (None: every row;
        #: :mod:`~lightning_conditioning.maths.sampling`)
        self.sampler = RowSampler(max_rows) if max_rows is not None else None
        #: how each moment is kept (None: every moment dense)
        self.plan = plan
        self.statistics_dtype = statistics_dtype
        self.loss_reduction = loss_reduction
        self.include_bias = include_bias
        self.model = model
        self.active = False
        #: extra factor on every output-gradient row (e.g. accumulation steps / loss scale)
        self.grad_multiplier: float = 1.0
        #: with ``loss_reduction="token_mean"``: how many tokens the loss of the pass being
        #: captured averages over (None: each layer's output rows)
        self.loss_tokens: int | None = None
        #: rows that came in through functional calls, per layer (since attach)
        self.functional_calls: dict[str, int] = {}
        self._inside: dict[int, int] = {}  # id(layer module) -> its forwards running now
        self._hosts: list[int] = []  # ids of the host modules whose forward entered the mode
        self._batch_hints: list[int] = []  # examples in the attention module running now
        self._mode: FunctionalCapture | None = None
        self._uses: dict[int, list[WeightUse]] = {}
        self._attention_parts: set[int] = set()
        self.windows: dict[str, LayerWindow] = {}
        #: the layers this window captures (None: all; see :mod:`lightning_conditioning.capture.turns`)
        self.turn: frozenset[str] | None = None
        self._handles: list[RemovableHandle] = []
        #: bumped at every reset: an output gradient belongs to the window of its forward
        self._generation = 0
        self._widest = 0  # the widest leading dimension of an output in the window
        #: the process that holds each layer's dense sums after :meth:`all_reduce` (sharded by
        #: owner; empty: every process holds all, or one process)
        self.owners: dict[str, int] = {}
        #: output gradients that arrived after their window was finished (ignored)
        self.late_gradients = 0
        #: layers whose Σx is another layer's, read from the same input tensor
        self.sharing = InputSharing()
        #: the experts of fused expert modules (:mod:`~lightning_conditioning.capture.experts`)
        self.experts = ExpertsCapture(self)
        #: the examples of the pass running now (the model's first input's leading dimension),
        #: for layers whose rows are flattened tokens (experts, routers); None: not known
        self.pass_examples: int | None = None

    @property
    def attached(self) -> bool:
        """Whether hooks are registered."""
        return bool(self._handles)

    def attach(self) -> None:
        """Allocate the windows on each layer's device and register the forward hooks."""
        if self.attached:
            return
        self._prepare_functional()
        hooked: set[int] = set()
        for name, (module, adapter) in self.layers.items():
            if name not in self.windows:
                input_dim, grad_dim, units = adapter.dims(module)
                homogeneous = self.include_bias and adapter.has_bias(module)
                self.windows[name] = LayerWindow(
                    input_dim,
                    grad_dim,
                    units,
                    _module_device(module),
                    homogeneous=homogeneous,
                    diagonal_input=adapter.diagonal_input,
                    input_sketch=self._sketch_rank(name, "input"),
                    grad_sketch=self._sketch_rank(name, "grad"),
                    sampler=self.sampler if adapter.samples_rows else None,
                )
            if not adapter.module_hook:
                continue
            hook = torch.compiler.disable(functools.partial(self._forward_hook, name, module))
            # always called (also when the forward raises): it ends the layer's "inside" mark
            self._handles.append(module.register_forward_hook(hook, with_kwargs=True, always_call=True))
            if self._mode is not None and id(module) not in hooked:
                hooked.add(id(module))  # its own forward runs: the functional path leaves it
                self._handles.append(module.register_forward_pre_hook(torch.compiler.disable(self._enter_layer)))
        self._handles.extend(self.experts.attach())
        if self.model is not None and (
            self.experts.modules or any(getattr(adapter, "routed", False) for _, adapter in self.layers.values())
        ):
            self._handles.append(
                self.model.register_forward_pre_hook(torch.compiler.disable(self._enter_model), with_kwargs=True)
            )
        if self._mode is None:
            return
        for host in _hosts(self.model, self.layers):  # type: ignore[arg-type]
            self._handles.append(
                host.register_forward_pre_hook(torch.compiler.disable(self._enter_host), with_kwargs=True)
            )
            self._handles.append(host.register_forward_hook(torch.compiler.disable(self._leave_host), always_call=True))

    def _sketch_rank(self, layer: str, moment: str) -> tuple[int, int] | None:
        """The sketch rows ℓ and block rows the plan gives a moment (None: kept dense)."""
        planned = self.plan.of(layer, moment) if self.plan is not None else None
        if planned is None or planned.method != "sketch" or planned.rank is None:
            return None
        return planned.rank, planned.block or BLOCK_ROWS

    def _prepare_functional(self) -> None:
        """The functional mode, when a model is given and some layer weight can be used
        functionally (see :mod:`~lightning_conditioning.capture.functional`)."""
        self._uses = weight_uses(self.layers)
        if self.model is None or not self._uses or compiled(self.model):
            self._mode = None
            return
        self._mode = FunctionalCapture(set(self._uses), self._functional_call)
        # an attention module and its out_proj: the examples are the attention's batch
        self._attention_parts = {
            id(m) for a in self.model.modules() if isinstance(a, nn.MultiheadAttention) for m in (a, *a.children())
        }

    def _enter_model(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        first = next((t for t in (*args, *kwargs.values()) if isinstance(t, Tensor) and t.dim() >= 1), None)
        self.pass_examples = int(first.shape[0]) if first is not None and first.dim() >= 2 else None

    def routed_examples(self, tokens: int) -> int:
        """The factor undoing the loss's mean (``loss_reduction``) for rows that are a pass's
        ``tokens`` flattened (experts, routers): the pass's examples for a batch-mean loss (the
        model's first input's leading dimension; ``tokens`` when not known), the loss's tokens
        (or ``tokens``) for a token mean, 1 for a sum."""
        if self.loss_reduction == "sum":
            return 1
        if self.loss_reduction == "token_mean":
            return self.loss_tokens or tokens
        return self.pass_examples or tokens

    def _enter_layer(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self.active:
            self._inside[id(module)] = self._inside.get(id(module), 0) + 1

    def _enter_host(self, host: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if (
            not self.active or self._mode is None or torch._C._current_graph_task_id() != -1
        ):  # a checkpoint's recomputation
            return
        if not self._hosts:
            self._mode.__enter__()
        self._hosts.append(id(host))
        if isinstance(host, nn.MultiheadAttention):
            query = args[0] if args else kwargs.get("query")
            batched = isinstance(query, Tensor) and query.dim() == 3
            self._batch_hints.append(int(query.shape[0 if host.batch_first else 1]) if batched else 1)  # type: ignore[union-attr]

    def _leave_host(self, host: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not self._hosts or self._hosts[-1] != id(host):
            return
        self._hosts.pop()
        if isinstance(host, nn.MultiheadAttention) and self._batch_hints:
            self._batch_hints.pop()
        if not self._hosts and self._mode is not None:
            self._mode.__exit__(None, None, None)

    def detach(self) -> None:
        """Remove every hook (idempotent). The windows are kept."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.active = False

    def reset(self) -> None:
        """Empty this turn's windows, the only ones that take rows (gradients of forwards
        captured before are ignored from now)."""
        for window in self.turn_windows.values():
            window.reset()
        self.sharing.reset()
        self._generation += 1
        self._widest = 0
        self.owners = {}

    @property
    def turn_windows(self) -> dict[str, LayerWindow]:
        """The windows of the layers this window captures (:attr:`turn`)."""
        if self.turn is None:
            return self.windows
        return {name: window for name, window in self.windows.items() if name in self.turn}

    def allocate(self) -> None:
        """Hold the sums of this turn's windows now (see :meth:`LayerWindow.allocate`)."""
        sharing = self.sharing
        for name, window in self.turn_windows.items():
            window.allocate(with_input=name not in sharing.known or name in sharing.unshared)

    def moments(self, *, take: bool = False) -> dict[str, LayerMoments]:
        """The finished window of every layer (CPU, float64; one host copy per device). With
        ``take`` the windows hand their sums over (no copy on the host) and are reset; call
        :meth:`reset` after it, so that gradients of earlier forwards are ignored."""
        shared = {
            name
            for name, window in self.turn_windows.items()  # (read before a take resets)
            if window.lookup_leading == 1 and self._widest > 1
        }
        self.sharing.finish()
        followers, lost = dict(self.sharing.followers), dict(self.sharing.lost)
        moments = {
            name: replace(window.moments(take=take), owner=self.owners.get(name), expert=self.experts.slots.get(name))
            for name, window in self.turn_windows.items()
        }
        for name in followers if take else ():  # its Σx is the leader's: no sum of its own
            self.windows[name].input.release()
        for name in shared:  # looked up once for all the examples: no per-example gradient
            found = moments[name]
            found.grad_second_moment, found.grad_rows, found.shared_lookup = None, 0, True
        moments = moments_to_cpu(moments)
        for name, leader in followers.items():  # one Σx (the same tensor) for both
            lead = moments[leader]
            moments[name] = replace(
                moments[name],
                input_second_moment=lead.input_second_moment,
                input_rows=lead.input_rows,
                input_gram_roundoff=lead.input_gram_roundoff,
                input_sampling=lead.input_sampling,
                shared_input=leader,
            )
        for name, leader in lost.items():
            moments[name] = replace(
                moments[name],
                input_second_moment=None,
                input_rows=0,
                shared_input=leader or None,
                shared_input_lost=True,
            )
        return moments

    @property
    def generation(self) -> int:
        """The window's number: bumped at every reset (an output gradient of an earlier
        window's forward is ignored)."""
        return self._generation

    def dtype_for(self, tensor: Tensor) -> torch.dtype:
        """The GEMM dtype of ``tensor``'s rows (see :meth:`_dtype_for`)."""
        return self._dtype_for(tensor)

    def _dtype_for(self, tensor: Tensor) -> torch.dtype:
        """The GEMM dtype: ``statistics_dtype``, or the tensor's own if wider (float64 runs)."""
        return torch.promote_types(tensor.dtype, self.statistics_dtype)

    def _forward_hook(
        self,
        name: str,
        expected: nn.Module,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Any,
    ) -> None:
        # a deep copy of the model carries this hook too: only our own module counts, and
        # activation checkpointing re-runs forwards inside backward: those are no new rows
        if module is not expected:
            return
        count = self._inside.get(id(module), 0)
        if count:  # its own forward is over (see _enter_layer)
            self._inside[id(module)] = count - 1
        if not self.active:
            return
        if torch._C._current_graph_task_id() != -1:
            return
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, Tensor) or not isinstance(output, Tensor):
            return
        self._record(name, module, x, output, None)

    def _record(
        self, name: str, module: nn.Module, x: Tensor, output: Tensor, columns: slice | None, batch: int | None = None
    ) -> None:
        """Add a layer's input rows now, and its output gradient (``output[..., columns]``)
        when the backward pass reaches it."""
        # the widest leading dimension of the window's outputs: its examples (see moments())
        self._widest = max(self._widest, int(output.shape[0]) if output.dim() > 1 else 1)
        if self.turn is not None and name not in self.turn:
            return  # not this layer's turn
        window = self.windows[name]
        if window.device != x.device:  # the model moved after attach(): follow it
            window.to(x.device)
        adapter = self.layers[name][1]
        if adapter.rows_are_last_dimension:  # another layer's Σx may hold these rows already
            action = self.sharing.on_input(
                name, x, functools.partial(self._same_rows, name), functools.partial(self._copyable, name)
            )
            if action == "copy":
                assert self.sharing.copy_from is not None
                window.copy_input_from(self.windows[self.sharing.copy_from])
            if action in ("shared", "lost"):  # only the cheap per-unit extremes of its own
                with torch.no_grad():
                    rows = x.detach().reshape(-1, x.shape[-1])
                    window.add_units(rows.amax(0).to(torch.float64), rows.amin(0).to(torch.float64))
                window.input.note_precision(x.dtype)
                self._follow_output(name, module, output, columns, batch)
                return
        # autocast would run out-of-place GEMMs (bmm) in bf16/fp16: the Grams keep their dtype
        with torch.no_grad(), without_autocast(x.device):
            rows = x.detach()
            if rows.is_floating_point():  # token ids stay integers
                rows = in_dtype(rows, self._dtype_for(x), window.input)
            unit_max, unit_min = adapter.accumulate_input(module, rows, window.input)
            if adapter.diagonal_input and rows.dim() >= 2:  # a lookup: one batch of indices
                window.lookup_leading = max(window.lookup_leading, int(rows.shape[0]))
            window.input.note_precision(x.dtype)
            window.add_units(unit_max, unit_min)
        self._follow_output(name, module, output, columns, batch)

    def _follow_output(
        self, name: str, module: nn.Module, output: Tensor, columns: slice | None, batch: int | None
    ) -> None:
        """Catch the output gradient (``output[..., columns]``) when the backward reaches it."""
        if output.requires_grad:
            scale = self._example_factor(self.layers[name][1], module, output, batch)
            output.register_hook(functools.partial(self._grad_hook, name, module, scale, self._generation, columns))

    def _same_rows(self, name: str, leader: str) -> bool:
        """Whether ``leader``'s Σx of a tensor is ``name``'s Σx of the same tensor (kept
        dense or sketched, whichever the leader's is: a follower reports the leader's)."""
        window, theirs = self.windows[name], self.windows[leader]
        return (
            type(self.layers[name][1]) is type(self.layers[leader][1])
            and window.device == theirs.device
            and window.reads_rows_like(theirs)
        )

    def _copyable(self, name: str, leader: str) -> bool:
        """Whether ``leader``'s Σx sum can become ``name``'s (the same kind and shape)."""
        return self.windows[name].shares_rows_with(self.windows[leader])

    def _example_factor(self, adapter: LayerAdapter, module: nn.Module, output: Tensor, batch: int | None) -> int:
        """The factor undoing the loss's mean (see ``loss_reduction``)."""
        if self.loss_reduction == "sum":
            return 1
        if self.loss_reduction == "token_mean":
            return self.loss_tokens or adapter.token_count(module, output)
        return batch if batch is not None else adapter.batch_size(module, output)

    def _grad_hook(
        self, name: str, module: nn.Module, scale: int, generation: int, columns: slice | None, grad: Tensor
    ) -> None:
        if generation != self._generation:  # its window was finished or discarded meanwhile
            self.late_gradients += 1
            return
        adapter = self.layers[name][1]
        window = self.windows[name]
        if columns is not None:
            grad = grad[..., columns]
        with torch.no_grad(), without_autocast(grad.device):
            factor = scale * self.grad_multiplier
            adapter.accumulate_grad(
                module, in_dtype(grad.detach(), self._dtype_for(grad), window.grad), window.grad, factor * factor
            )
            window.grad.note_precision(grad.dtype)

    def _functional_call(self, function: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        """A weight of an analysed layer used through ``F.linear``/``F.embedding``/``conv``."""
        if not self.active or torch._C._current_graph_task_id() != -1:
            return
        x = args[0] if args else kwargs.get("input")
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        if not isinstance(x, Tensor) or not isinstance(output, Tensor) or not isinstance(weight, Tensor):
            return
        found = row_range(weight)
        if found is None:
            return
        parameter, first, end = found
        batch = self._batch_hints[-1] if self._batch_hints else None
        kind = KIND_OF[function]
        for use in self._uses.get(parameter, []):
            module, adapter = self.layers[use.layer]
            if use.kind != kind or self._inside.get(id(module)) or not first <= use.rows.start < use.rows.stop <= end:
                continue  # another kind (a tied weight), its own forward, or another slice
            if kind == "conv" and not _same_conv(module, args, kwargs):
                continue
            columns = None
            if (use.rows.start, use.rows.stop) != (first, end):
                columns = slice(use.rows.start - first, use.rows.stop - first)
            if function is F.embedding:  # an embedding's output has no row slices
                columns = None
            self.functional_calls[use.layer] = self.functional_calls.get(use.layer, 0) + 1
            in_attention = id(module) in self._attention_parts  # its batch is the attention's
            if getattr(adapter, "routed", False) and self.loss_reduction == "mean":
                batch = self.pass_examples  # rows of flattened tokens (a router)
            self._record(
                use.layer,
                module,
                x,
                output,
                columns,
                batch if in_attention or getattr(adapter, "routed", False) else None,
            )

    def all_reduce(
        self,
        reduce: Callable[[Tensor, str], Tensor],
        world_size: int = 1,
        rank: int = 0,
        *,
        reduce_to: ReduceTo | None = None,
        shardable: Shardable | None = None,
    ) -> None:
        """Combine every window over processes.

        ``reduce(tensor, op)`` takes a 1-D tensor and ``"sum"`` or ``"max"`` (e.g.
        ``Collectives.all_reduce``). First a maximum: per-unit extremes (minima negated), the
        precisions the rows and Grams had (the coarsest sets every rank's floor), and which
        layers share another's Σx (a layer shares only if it does on every rank). Then the
        sums and row counts (:func:`~lightning_conditioning.distributed.owners.sum_windows`), so
        uneven per-rank batches weigh correctly. With ``reduce_to(tensor, owner)`` (an in-place
        sum into one process) each layer's dense sums go to its owner only
        (:attr:`owners`; ``shardable(layer, dim)`` may keep a moment on every rank).
        """
        turn = self.turn_windows
        windows = list(turn.values())
        self.owners = {}
        if not windows:
            return
        device = windows[0].device
        names = list(turn)
        self.sharing.finish()
        maxima = [window.unit_max for window in windows]
        minima = [window.unit_min for window in windows]
        precision = [v for window in windows for v in window.precisions()]
        precision += [self._widest, *self.sharing.states(names, self._copyable)]
        precision_tensor = torch.tensor(precision, dtype=torch.float64, device=device)
        flat = reduce(torch.cat([*maxima, *[-m for m in minima], precision_tensor]), "max")
        offset = unpack(flat, maxima)
        offset += unpack(-flat[offset : offset + sum(m.numel() for m in minima)], minima)
        values = flat[offset:].tolist()
        width = LayerWindow.PRECISIONS
        for index, window in enumerate(windows):  # and whether a lookup was shared: ranks agree
            window.set_precisions(values[width * index : width * (index + 1)])
        self._widest = int(values[width * len(windows)])
        for follower, leader in self.sharing.agree(names, values[width * len(windows) + 1 :]):
            self.windows[follower].copy_input_from(self.windows[leader])
        apart = set(self.sharing.followers) | set(self.sharing.lost)

        if reduce_to is not None and world_size > 1:
            self.owners = owners_of(turn, dict(self.sharing.followers), apart, world_size, shardable)
        merge_sketches(turn, apart, self.owners, reduce, reduce_to, world_size, rank)
        sum_windows(turn, apart, self.owners, reduce, reduce_to, rank)  # and the row counts


def _hosts(model: nn.Module, layers: Mapping[str, tuple[nn.Module, LayerAdapter]]) -> list[nn.Module]:
    """The modules whose forward may use analysed weights functionally: each layer's parent,
    and every module whose layers exist only functionally (an attention)."""
    wanted = {id(module) for module, _ in layers.values()}
    hosts: dict[int, nn.Module] = {}
    for module, adapter in layers.values():
        if not adapter.module_hook:
            hosts[id(module)] = module
    for parent in model.modules():
        if any(id(child) in wanted for child in parent.children()):
            hosts[id(parent)] = parent
    return list(hosts.values())


def _same_conv(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a functional conv call uses the module's own stride/padding/dilation/groups."""
    if not isinstance(module, nn.modules.conv._ConvNd):
        return False
    names = ("stride", "padding", "dilation", "groups")
    given = dict(zip(names, args[3:]), **{k: v for k, v in kwargs.items() if k in names})

    def norm(value: Any) -> Any:
        if isinstance(value, int):
            return (value,) * len(module.kernel_size)
        return tuple(value) if isinstance(value, (list, tuple)) else value

    defaults = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    return all(norm(given.get(k, defaults[k])) == norm(getattr(module, k)) for k in names) and (
        module.padding_mode == "zeros"
    )

"""Which layers are analysed: the layer kinds, ``include`` / ``exclude``, the modules left out
(with the reason) and the share of weights covered; and why a selection analyses none, in
words for the user. Pure: the capture (:mod:`lightning_conditioning.capture.hooks`) hooks what is
selected here."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from torch import nn

from lightning_conditioning.capture.adapters import ConvMode, LayerAdapter
from lightning_conditioning.capture.registry import adapter_for, registered_layer_types


class Selection(Protocol):
    """What a selection is made of (:class:`~lightning_conditioning.analysis.options.ConditioningOptions`
    has it)."""

    @property
    def layer_types(self) -> Sequence[type[nn.Module]] | None: ...
    @property
    def include(self) -> Sequence[str] | None: ...
    @property
    def exclude(self) -> Sequence[str] | None: ...
    @property
    def conv_mode(self) -> ConvMode: ...


__all__ = [
    "checked_layer_types",
    "select_layers",
    "find_layers",
    "uncovered_modules",
    "uncovered_reason",
    "coverage",
    "user_name",
    "last_linear_name",
    "selection_problem",
    "Selection",
]


def checked_layer_types(layer_types: Sequence[type[nn.Module]] | None) -> tuple[type[nn.Module], ...] | None:
    """``layer_types`` as a tuple (``None`` stays ``None``: every kind with an adapter, decided
    when layers are selected, so that a later :func:`register_adapter` counts).

    Raises:
        TypeError: if an entry is not an ``nn.Module`` subclass.

    Example:
        >>> checked_layer_types([nn.Linear])
        (<class 'torch.nn.modules.linear.Linear'>,)
    """
    if layer_types is None:
        return None
    if isinstance(layer_types, type) or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in layer_types):
        raise TypeError(f"layer_types must be a list of nn.Module subclasses, got {layer_types!r}")
    return tuple(layer_types)


def select_layers(
    model: nn.Module,
    layer_types: Sequence[type[nn.Module]] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> dict[str, nn.Module]:
    """Submodules that are instances of ``layer_types`` (default: every kind with an adapter)
    whose qualified name matches one of the ``include`` glob patterns (all when None) and none
    of ``exclude``, in module order.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> list(select_layers(model, exclude=["2"]))
        ['0']
    """
    kinds = tuple(layer_types) if layer_types is not None else registered_layer_types()
    layers: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        name = user_name(name)
        if not name or not isinstance(module, kinds):
            continue
        if _selected(name, include, exclude) and name not in layers:
            layers[name] = module
    return layers


_WRAPPERS = re.compile(r"(?:^|\.)(?:_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)(?=\.|$)")


def user_name(name: str) -> str:
    """A module's qualified name without the fragments that wrappers insert (FSDP, activation
    checkpointing, ``torch.compile``), so keys do not depend on the strategy.

    Example:
        >>> user_name("net.0._fsdp_wrapped_module._checkpoint_wrapped_module.fc")
        'net.0.fc'
        >>> user_name("_orig_mod.fc")
        'fc'
    """
    return _WRAPPERS.sub("", name).lstrip(".")


def _selected(name: str, include: Sequence[str] | None, exclude: Sequence[str] | None) -> bool:
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not (exclude is not None and any(fnmatch.fnmatchcase(name, p) for p in exclude))


def find_layers(
    model: nn.Module,
    layer_types: Sequence[type[nn.Module]] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    conv_mode: ConvMode = "channel",
) -> dict[str, tuple[nn.Module, LayerAdapter]]:
    """:func:`select_layers` that have an adapter, paired with it.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> list(find_layers(model, include=["2"]))
        ['2']
    """
    layers: dict[str, tuple[nn.Module, LayerAdapter]] = {}
    for name, module in select_layers(model, layer_types, include, exclude).items():
        adapter = adapter_for(module, conv_mode)
        if adapter is None:
            continue
        parts = adapter.sublayers(module)
        if parts is None:
            layers[name] = (module, adapter)
            continue
        for suffix, part in parts.items():  # e.g. an attention's q/k/v projections
            full = f"{name}.{suffix}"
            if exclude is None or not any(fnmatch.fnmatchcase(full, p) for p in exclude):
                layers[full] = (module, part)
    return layers


def uncovered_modules(
    model: nn.Module,
    layers: Mapping[str, nn.Module | tuple[nn.Module, Any]],
    layer_types: Sequence[type[nn.Module]] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[tuple[str, str, int, str]]:
    """Weight-bearing modules that no adapter covers: ``(name, type name, parameters, why)``.

    A module bears weights when it owns a trainable parameter with two or more dimensions (a
    matrix or a kernel: normalisation scales and biases are vectors). Modules in ``layers``
    (analysed) or inside one of them, modules the ``include`` / ``exclude`` patterns leave out,
    and modules of a kind the user left out of ``layer_types`` that has an adapter, are not
    reported: those were choices.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.LSTM(8, 8), nn.LayerNorm(8))
        >>> [entry[:3] for entry in uncovered_modules(model, find_layers(model))]
        [('1', 'LSTM', 576)]
        >>> uncovered_modules(nn.Linear(3, 2), {})[0][3]
        'the model is itself one layer, which has no name to log it under: wrap it, e.g. nn.Sequential(model)'
    """
    analysed = [entry[0] if isinstance(entry, tuple) else entry for entry in layers.values()]
    inside = {id(sub) for module in analysed for sub in module.modules()}
    covered_kinds = registered_layer_types()
    out = []
    for name, module in model.named_modules():
        name = user_name(name)
        if id(module) in inside or not _selected(name, include, exclude):
            continue
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not any(p.dim() >= 2 for p in own):
            continue
        if layer_types is not None and isinstance(module, covered_kinds):
            continue  # a covered kind the user chose not to analyse
        reason = (
            "the model is itself one layer, which has no name to log it under: wrap it, e.g. nn.Sequential(model)"
            if not name and isinstance(module, covered_kinds)
            else uncovered_reason(module)
        )
        out.append((name, type(module).__name__, sum(p.numel() for p in own), reason))
    return out


def uncovered_reason(module: nn.Module) -> str:
    """Why a weight-bearing module is not analysed, in a few words.

    Example:
        >>> uncovered_reason(nn.GRU(2, 2))
        'a recurrent layer: no adapter (its weights act on every time step)'
    """
    if isinstance(module, nn.RNNBase):
        return "a recurrent layer: no adapter (its weights act on every time step)"
    if not any(True for _ in module.children()):
        return "a layer kind with no adapter"
    names = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad and p.dim() >= 2]
    return (
        f"its own parameter(s) {', '.join(names)} (e.g. a position embedding, a class token "
        "or a bias table: no layer of their own)"
    )


def coverage(model: nn.Module, layers: Mapping[str, tuple[nn.Module, Any]]) -> tuple[int, int, int]:
    """``(analysed, weights, total)``: trainable parameters in the weights of analysed layers,
    in all weight matrices and kernels (two or more dimensions), and in all; shared (tied)
    parameters count once.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.LSTM(8, 2))
        >>> coverage(model, find_layers(model))
        (32, 112, 152)
    """
    trainable = {id(p): p for p in model.parameters() if p.requires_grad}
    matrices = {key for key, p in trainable.items() if p.dim() >= 2}
    analysed = {id(p) for module, _ in layers.values() for p in module.parameters()} & matrices
    return (
        sum(trainable[k].numel() for k in analysed),
        sum(trainable[k].numel() for k in matrices),
        sum(p.numel() for p in trainable.values()),
    )


def last_linear_name(model: nn.Module) -> str | None:
    """Qualified name of the last ``nn.Linear`` in ``named_modules()`` order, or None.

    Example:
        >>> last_linear_name(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        '2'
        >>> last_linear_name(nn.Sequential(nn.ReLU())) is None
        True
    """
    names = [user_name(name) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return names[-1] if names else None


def selection_problem(model: nn.Module, options: Selection, layers: Mapping[str, Any]) -> str | None:
    """Why the selection analyses nothing, or which ``include`` pattern matched no layer; in
    words that name the filter and the layers it could have matched.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> from lightning_conditioning.analysis.options import ConditioningOptions
        >>> print(selection_problem(model, ConditioningOptions(include=["head"]), {}))
        ... # doctest: +NORMALIZE_WHITESPACE
        include=['head'] matched none of the 2 analysable layers (patterns match the whole
        qualified name, e.g. '*head'): 0, 2. Nothing will be analysed.
    """
    analysable = list(find_layers(model, options.layer_types, None, None, options.conv_mode))
    kinds = options.layer_types or registered_layer_types()
    kind_names = ", ".join(sorted({kind.__name__.lstrip("_") for kind in kinds}))
    if not analysable:
        return (
            f"{type(model).__name__} has no layer of the analysed kinds ({kind_names}). "
            "Nothing will be analysed. Other kinds need an adapter (`register_adapter`)."
        )
    shown = ", ".join(analysable[:12]) + (f", … ({len(analysable) - 12} more)" if len(analysable) > 12 else "")
    hint = "(patterns match the whole qualified name, e.g. '*head')"
    unmatched = [p for p in options.include or () if not any(fnmatch.fnmatchcase(name, p) for name in analysable)]
    if unmatched and not layers:
        return (
            f"include={list(unmatched)} matched none of the {len(analysable)} analysable layers "
            f"{hint}: {shown}. Nothing will be analysed."
        )
    if unmatched:
        return (
            f"include pattern(s) {unmatched} matched none of the {len(analysable)} analysable layers {hint}: {shown}."
        )
    if not layers:
        return (
            f"exclude={list(options.exclude or ())} removed every layer that include kept; "
            f"the analysable layers are: {shown}. Nothing will be analysed."
        )
    return None


def coverage_lines(
    who: str,
    model: nn.Module,
    layers: Mapping[str, tuple[nn.Module, Any]],
    loss_reduction: str,
    reduction_reason: str | None,
    uncovered: Sequence[tuple[str, str, int, str]],
) -> tuple[str, str | None]:
    """``(line, warning)``: what is analysed and how, and what is not (None: nothing left out).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.LSTM(8, 2))
        >>> line, warning = coverage_lines("Monitor", model, find_layers(model), "mean", None,
        ...                                uncovered_modules(model, find_layers(model)))
        >>> line.split(" (")[0]
        'Monitor: analysing 1 layers holding 29% of the 112 trainable weight-matrix parameters'
        >>> warning.split(":")[1]
        ' 1 weight-bearing module(s) are not analysed'
    """
    analysed, weights, total = coverage(model, layers)
    share = f"{100.0 * analysed / weights:.0f}%" if weights else "none"
    convention = {
        "mean": "× the batch size (a per-example mean loss)",
        "token_mean": "× the tokens the loss averages over, one row per token",
        "sum": "as they are (a summed loss)",
    }[loss_reduction]
    why = f"; {reduction_reason}" if reduction_reason else ""
    line = (
        f"{who}: analysing {len(layers)} layers holding {share} of the {weights:,} "
        f"trainable weight-matrix parameters ({total:,} trainable in all: the rest are "
        f"biases and scales); output gradients {convention}{why}."
    )
    if not uncovered:
        return line, None
    listed = "; ".join(
        f"{name or '(the model)'} ({kind}, {count:,} parameters): {reason}"
        for name, kind, count, reason in uncovered[:8]
    )
    more = f"; and {len(uncovered) - 8} more" if len(uncovered) > 8 else ""
    return line, (
        f"{who}: {len(uncovered)} weight-bearing module(s) are not analysed: {listed}{more}. "
        "Teach the capture a layer kind with `lightning_conditioning.register_adapter`."
    )

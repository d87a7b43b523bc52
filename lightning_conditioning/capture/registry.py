"""The layer registry: which adapter serves which module type.

:func:`adapter_for` picks an adapter by ``isinstance`` (latest registration first) from the
registry that :func:`register_adapter` extends; the default set of analysed layers is every
registered kind (:func:`registered_layer_types`): ``nn.Linear``, convolutions, ``nn.Embedding``,
``nn.MultiheadAttention``, Hugging Face's ``Conv1D``, and the fused experts and routers of
mixture-of-experts models (:mod:`~lightning_conditioning.capture.expert_adapters`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from torch import nn

from lightning_conditioning.capture.adapters import (
    ConvChannelAdapter,
    ConvMode,
    ConvPatchAdapter,
    LayerAdapter,
    LinearAdapter,
)
from lightning_conditioning.capture.expert_adapters import FusedExperts, FusedExpertsAdapter, Router, RouterAdapter
from lightning_conditioning.capture.sequence_adapters import AttentionAdapter, Conv1DAdapter, EmbeddingAdapter

__all__ = ["AdapterFactory", "register_adapter", "registered_layer_types", "adapter_for"]

AdapterFactory = Callable[[nn.Module, ConvMode], LayerAdapter]


#: ``(module type, factory)``; a type given as ``"package.module:Class"`` (a library that is
#: not a dependency, e.g. Hugging Face's ``Conv1D``) counts once that module is imported
_REGISTRY: list[tuple[type[nn.Module] | str, AdapterFactory]] = [
    (nn.Linear, lambda module, mode: LinearAdapter()),
    (nn.modules.conv._ConvNd, lambda module, mode: ConvPatchAdapter() if mode == "patch" else ConvChannelAdapter()),
    (nn.Embedding, lambda module, mode: EmbeddingAdapter()),
    (nn.MultiheadAttention, lambda module, mode: AttentionAdapter()),
    ("transformers.pytorch_utils:Conv1D", lambda module, mode: Conv1DAdapter()),
    (FusedExperts, lambda module, mode: FusedExpertsAdapter()),  # (structural kinds: any family)
    (Router, lambda module, mode: RouterAdapter()),
]


def _resolved(module_type: type[nn.Module] | str) -> type[nn.Module] | None:
    """The type of a registry entry; a ``"module:Class"`` entry only once its module is loaded
    (never imported here: a model using the class has imported it already)."""
    if not isinstance(module_type, str):
        return module_type
    module_name, _, class_name = module_type.partition(":")
    loaded = sys.modules.get(module_name)
    found = getattr(loaded, class_name, None) if loaded is not None else None
    return found if isinstance(found, type) and issubclass(found, nn.Module) else None


def register_adapter(module_type: type[nn.Module] | str, factory: AdapterFactory) -> None:
    """Teach the capture a new layer kind; later registrations win over earlier ones.

    ``module_type`` may be given as ``"package.module:Class"`` for a class of a library that
    should not be imported just for this (it counts once the library is loaded).

    That is all it takes: the default layer selection is every registered kind
    (:func:`registered_layer_types`).

    Example:
        >>> class MyLinear(nn.Linear): ...
        >>> register_adapter(MyLinear, lambda module, mode: LinearAdapter())
        >>> MyLinear in registered_layer_types()
        True
        >>> _ = _REGISTRY.pop()  # (undo, for this example only)
    """
    _REGISTRY.append((module_type, factory))


def registered_layer_types() -> tuple[type[nn.Module], ...]:
    """Every module type that has an adapter (the default set of analysed layers).

    Example:
        >>> [t.__name__ for t in registered_layer_types()][:4]
        ['Linear', '_ConvNd', 'Embedding', 'MultiheadAttention']
    """
    resolved = (_resolved(module_type) for module_type, _ in _REGISTRY)
    return tuple(dict.fromkeys(t for t in resolved if t is not None))


def adapter_for(module: nn.Module, conv_mode: ConvMode = "channel") -> LayerAdapter | None:
    """The adapter for a module (``isinstance`` match, latest registration first), or None.

    Example:
        >>> type(adapter_for(nn.Conv2d(3, 4, 3), "patch")).__name__, adapter_for(nn.ReLU())
        ('ConvPatchAdapter', None)
    """
    for module_type, factory in reversed(_REGISTRY):
        resolved = _resolved(module_type)
        if resolved is not None and isinstance(module, resolved):
            return factory(module, conv_mode)
    return None

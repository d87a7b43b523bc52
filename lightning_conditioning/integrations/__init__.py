"""Other training frameworks, over the same Lightning-free core.

:mod:`~lightning_conditioning.integrations.huggingface`: ``ConditioningTrainerCallback`` and
``WeightDominationTrainerCallback`` for the Hugging Face ``Trainer`` (``pip install
"lightning-conditioning[hf]"``). Names are imported on first use, so importing this package
imports neither ``transformers`` nor ``torch``.

Example::

    from lightning_conditioning.integrations import ConditioningTrainerCallback
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_conditioning.integrations.huggingface import (
        ConditioningTrainerCallback,
        WeightDominationTrainerCallback,
    )

_LAZY = {
    "ConditioningTrainerCallback": "lightning_conditioning.integrations.huggingface",
    "WeightDominationTrainerCallback": "lightning_conditioning.integrations.huggingface",
}

__all__ = ["ConditioningTrainerCallback", "WeightDominationTrainerCallback"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_conditioning.integrations' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

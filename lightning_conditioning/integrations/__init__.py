"""Other training frameworks, over the same Lightning-free core.

:mod:`~lightning_conditioning.integrations.huggingface`: ``ConditioningTrainerCallback`` and
``WeightDominationTrainerCallback`` for the Hugging Face ``Trainer`` (``pip install
"lightning-conditioning[hf]"``). Names are imported on first use, so importing this package
imports neither ``transformers`` nor ``torch``.

Example::

    from lightning_conditioning.integrations import ConditioningTrainerCallback
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_conditioning.lazy import lazy_names

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


__getattr__ = lazy_names(__name__, _LAZY, globals())

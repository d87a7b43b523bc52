"""Lightning callbacks: thin shells around capture, spectra, domination maths and sinks."""

from lightning_conditioning.callbacks.conditioning import ConditioningCallback
from lightning_conditioning.callbacks.weight_domination import WeightDominationCallback

__all__ = ["ConditioningCallback", "WeightDominationCallback"]

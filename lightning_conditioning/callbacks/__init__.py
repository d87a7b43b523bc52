"""Lightning callbacks: thin shells around capture, spectra and sinks."""

from lightning_conditioning.callbacks.conditioning import ConditioningCallback

__all__ = ["ConditioningCallback"]

"""Opt-in auto-registration through Lightning's ``lightning.pytorch.callbacks_factory``.

Installing the package registers :func:`callbacks_factory` as an entry point, but it adds
nothing unless the environment variable ``LIGHTNING_CONDITIONING_AUTO`` is ``1`` / ``true`` /
``yes``. Then every ``Trainer`` of the environment carries one ConditioningCallback
(``LIGHTNING_CONDITIONING_EVERY_N_STEPS`` sets its schedule, default 100). If the user also
passes a ConditioningCallback, the automatic one removes itself at ``setup``: never two.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl

from lightning_conditioning.callbacks.conditioning import ConditioningCallback

__all__ = ["ENV_AUTO", "ENV_EVERY_N_STEPS", "AutoConditioningCallback", "callbacks_factory"]

ENV_AUTO = "LIGHTNING_CONDITIONING_AUTO"
ENV_EVERY_N_STEPS = "LIGHTNING_CONDITIONING_EVERY_N_STEPS"


class AutoConditioningCallback(ConditioningCallback):
    """The ConditioningCallback added by the entry point; steps aside for a user's own.

    Example:
        >>> AutoConditioningCallback().yields_to_others
        True
    """

    yields_to_others = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        callbacks: list[pl.Callback] = getattr(trainer, "callbacks")  # noqa: B009
        if any(isinstance(cb, ConditioningCallback) and cb is not self for cb in callbacks):
            # a new list: Lightning is iterating over the old one right now
            setattr(trainer, "callbacks", [cb for cb in callbacks if cb is not self])  # noqa: B010
            return
        super().setup(trainer, pl_module, stage)


def callbacks_factory() -> list[pl.Callback]:
    """Entry point of ``lightning.pytorch.callbacks_factory``: ``[]`` unless opted in.

    Example:
        >>> os.environ.pop(ENV_AUTO, None) and None
        >>> callbacks_factory()
        []
    """
    if os.environ.get(ENV_AUTO, "").strip().lower() not in ("1", "true", "yes", "on"):
        return []
    every = os.environ.get(ENV_EVERY_N_STEPS, "").strip()
    try:
        every_n_steps = int(every) if every else None
    except ValueError as error:
        raise ValueError(f"{ENV_EVERY_N_STEPS} must be an integer, got {every!r}") from error
    return [AutoConditioningCallback(every_n_steps=every_n_steps)]

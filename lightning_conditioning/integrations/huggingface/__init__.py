"""Hugging Face ``Trainer`` callbacks: thin shells over the Lightning-free monitors, driven by
the Trainer's hooks and logging through its reporting integrations (``report_to``), with the
Lightning callbacks' keys and steps. ``pip install "lightning-conditioning[hf]"``; README
"Hugging Face Trainer".

Example::

    Trainer(model, args, train_dataset=data, callbacks=[
        ConditioningTrainerCallback(every_n_steps=50), WeightDominationTrainerCallback(every_n_steps=50)]).train()
"""

from __future__ import annotations

from lightning_conditioning.integrations.huggingface.conditioning import ConditioningTrainerCallback
from lightning_conditioning.integrations.huggingface.domination import WeightDominationTrainerCallback

__all__ = ["ConditioningTrainerCallback", "WeightDominationTrainerCallback"]

"""Hugging Face ``Trainer`` callbacks: the conditioning analysis and the weight-domination check.

Thin shells over the Lightning-free core (:class:`~lightning_conditioning.ConditioningMonitor`,
:class:`~lightning_conditioning.WeightDominationMonitor`), driven by the Trainer's hooks: the
monitor is built in ``on_train_begin``, a step opens in ``on_step_begin``, hooks on the model
read each micro-batch's ``labels`` / ``num_items_in_batch`` and the gradient reaching its loss
(:mod:`~lightning_conditioning.capture.loss_watch`), weight domination is checked in
``on_pre_optimizer_step`` and the window finishes in ``on_optimizer_step``. The keys and steps
are the Lightning callbacks' (step 0 is the initialisation), logged through the Trainer's own
reporting integrations (``report_to``). Needs ``pip install "lightning-conditioning[hf]"``;
README "Hugging Face Trainer".

Example::

    conditioning = ConditioningTrainerCallback(every_n_steps=50)
    args = TrainingArguments("out", report_to=["tensorboard"], max_steps=1000)
    Trainer(model, args, train_dataset=data,
            callbacks=[conditioning, WeightDominationTrainerCallback(every_n_steps=50)]).train()
    conditioning.results["lm_head"].grad.lambda_max   # TensorBoard: train/conditioning/lm_head/…
"""

from __future__ import annotations

from lightning_conditioning.integrations.huggingface.conditioning import ConditioningTrainerCallback
from lightning_conditioning.integrations.huggingface.domination import WeightDominationTrainerCallback

__all__ = ["ConditioningTrainerCallback", "WeightDominationTrainerCallback"]

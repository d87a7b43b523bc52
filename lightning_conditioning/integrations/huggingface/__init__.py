"""Hugging Face ``Trainer`` callbacks: the conditioning analysis and the weight-domination check.

Two thin shells over the Lightning-free core, the counterparts of the Lightning callbacks:
:class:`ConditioningTrainerCallback` drives a :class:`~lightning_conditioning.ConditioningMonitor`
and :class:`WeightDominationTrainerCallback` a
:class:`~lightning_conditioning.WeightDominationMonitor` from the Trainer's hooks. They log the
same keys as the Lightning callbacks (``conditioning/{layer}/{quantity}``,
``weight_domination/{layer}/{quantity}``), at the same steps (``state.global_step`` when the
optimizer step began: step 0 is the initialisation), through the Trainer's own reporting
integrations (``report_to``: TensorBoard, W&B, MLflow, …). Needs ``transformers`` (with
``accelerate``): ``pip install "lightning-conditioning[hf]"``.

How the hooks map (one optimizer step of ``gradient_accumulation_steps`` micro-batches):

=========================  ===================================================================
``on_train_begin``         build the monitor on ``model`` (hooks); find the Trainer that calls
                           us, for its reporting callbacks
``on_step_begin``          open the step (``monitor.begin(state.global_step)``); capture on
model forward (pre-hook)   each micro-batch's ``labels`` / ``num_items_in_batch``: the tokens
                           its loss divides by
model ``loss`` (grad hook) what the Trainer multiplied the model's loss by before ``backward``
                           (``1/gradient_accumulation_steps``, ``num_processes``, the fp16 loss
                           scale): read off the gradient reaching it
``on_pre_optimizer_step``  weight domination: gradients after unscaling, DDP averaging and the
                           Trainer's clipping (``max_grad_norm``)
``on_optimizer_step``      finish the window / the check (the update applied) and report
``on_train_end``           drop an open window, remove every hook (results stay readable)
=========================  ===================================================================

Example::

    from transformers import Trainer, TrainingArguments
    from lightning_conditioning.integrations import (
        ConditioningTrainerCallback, WeightDominationTrainerCallback)

    conditioning = ConditioningTrainerCallback(every_n_steps=50)
    args = TrainingArguments("out", report_to=["tensorboard"], max_steps=1000)
    trainer = Trainer(model, args, train_dataset=data,
                      callbacks=[conditioning, WeightDominationTrainerCallback(every_n_steps=50)])
    trainer.train()                # TensorBoard: train/conditioning/lm_head/grad_lambda_max, …
    conditioning.results["lm_head"].grad.lambda_max
"""

from __future__ import annotations

from lightning_conditioning.integrations.huggingface.conditioning import ConditioningTrainerCallback
from lightning_conditioning.integrations.huggingface.domination import WeightDominationTrainerCallback
from lightning_conditioning.integrations.huggingface.shell import _MISSING

__all__ = ["ConditioningTrainerCallback", "WeightDominationTrainerCallback"]


_EXAMPLE = """
A tiny GPT-2, two optimizer steps, every step analysed and checked, read back from the
Trainer's TensorBoard run with the package's report reader:

>>> import contextlib, io, tempfile, torch
>>> from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
>>> from transformers.utils import logging as hf_logging
>>> from lightning_conditioning.report.reader import load_run
>>> hf_logging.set_verbosity_error()
>>> _ = torch.manual_seed(0)
>>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64,
...                                    n_positions=16, bos_token_id=0, eos_token_id=0))
>>> data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 64, (8, 12))]
>>> conditioning = ConditioningTrainerCallback(every_n_steps=1, warn_diagnosis=False)
>>> domination = WeightDominationTrainerCallback(every_n_steps=1)
>>> with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()):
...     args = TrainingArguments(folder, max_steps=2, per_device_train_batch_size=4,
...                              report_to=["tensorboard"], use_cpu=True, save_strategy="no",
...                              disable_tqdm=True)
...     trainer = Trainer(model, args, train_dataset=data,
...                       callbacks=[conditioning, domination])
...     _ = trainer.train()  # (stdout: the Trainer prints its own logs)
...     run = load_run(folder)
>>> key = "train/conditioning/lm_head/grad_lambda_max"  # TensorBoard prefixes train/
>>> logged = run.scalars[1][key]  # float32 in the event file
>>> run.conditioning_steps(), round(logged / conditioning.results["lm_head"].grad.lambda_max, 6)
([0, 1], 1.0)
>>> "train/weight_domination/lm_head/grad_weight_ratio" in run.scalars[1]
True
>>> "train/conditioning/transformer.h.0.attn/attention_entropy_min" in run.scalars[1]  # attention
True
"""


def _doctests() -> dict[str, str]:
    """The executed example, only where ``transformers`` and ``accelerate`` are installed."""
    if _MISSING is not None:
        return {}
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return {}
    return {"trainer_callbacks": _EXAMPLE}


__test__ = _doctests()

"""The per-example convention: which factor undoes the loss's mean in the output gradients.

Autograd hands each row of a layer's output the gradient of the *mean* loss. The paper's
statistics need per-example gradients, so rows are multiplied by the number of terms the loss
averages over:

- ``"mean"``: a loss averaged over the ``B`` examples of a batch (classification): the factor
  is ``B``, the leading dimension of the layer's output.
- ``"token_mean"``: a loss averaged over tokens (language models: Hugging Face's causal-LM,
  masked-LM, token-classification and seq2seq losses): the factor is the number of tokens in
  the loss (:func:`loss_tokens` reads it off the labels), or the rows of the layer's output
  when it is not known. Every token is a row of Σx and Σ∇h.
- ``"sum"``: a summed loss, factor 1.
- ``"auto"`` (the default): ``"token_mean"`` when the model holds a Hugging Face model with a
  token-level head (:func:`token_level_model`), else ``"mean"``.

Example:
    >>> from torch import nn
    >>> resolve_loss_reduction(nn.Linear(2, 2), "auto")
    ('mean', None)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch  # noqa: F401  (the examples)
from torch import Tensor, nn

__all__ = ["LOSS_REDUCTIONS", "LossReduction", "token_level_model", "resolve_loss_reduction", "loss_tokens"]

LossReduction = Literal["auto", "mean", "token_mean", "sum"]
LOSS_REDUCTIONS: tuple[str, ...] = ("auto", "mean", "token_mean", "sum")

#: Hugging Face head classes whose loss averages over tokens (suffixes of the class name);
#: the causal ones shift the labels by one position
_TOKEN_HEADS = ("ForCausalLM", "LMHeadModel", "ForMaskedLM", "ForTokenClassification", "ForConditionalGeneration")
_CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel")
_IGNORE_INDEX = -100


def token_level_model(model: nn.Module) -> nn.Module | None:
    """The first Hugging Face model inside ``model`` whose loss averages over tokens, or None.

    Recognised by its class (defined in ``transformers``, name ending in ``ForCausalLM``,
    ``LMHeadModel``, ``ForMaskedLM``, ``ForTokenClassification`` or
    ``ForConditionalGeneration``); ``transformers`` is never imported here.

    Example:
        >>> token_level_model(nn.Sequential(nn.Linear(2, 2))) is None
        True
    """
    for module in model.modules():
        cls = type(module)
        if cls.__module__.startswith("transformers.") and cls.__name__.endswith(_TOKEN_HEADS):
            return module
    return None


def resolve_loss_reduction(model: nn.Module, requested: str) -> tuple[str, str | None]:
    """``(reduction, why)``: ``"auto"`` made concrete for ``model`` (``why`` says what was
    detected, None when nothing was).

    Example:
        >>> resolve_loss_reduction(nn.Linear(2, 2), "token_mean")
        ('token_mean', None)
    """
    if requested != "auto":
        return requested, None
    found = token_level_model(model)
    if found is None:
        return "mean", None
    return "token_mean", f"{type(found).__name__} averages its loss over tokens"


def loss_tokens(batch: Any, model: nn.Module) -> int | None:
    """How many tokens a Hugging Face token-level loss averages over for ``batch``: the labels
    that are not ``-100``, after the causal models' shift by one position. None when the batch
    carries no ``labels`` tensor or the model has no token-level head.

    Example:
        >>> class GPT2LMHeadModel(nn.Module): ...
        >>> GPT2LMHeadModel.__module__ = "transformers.models.gpt2.modeling_gpt2"
        >>> labels = torch.tensor([[5, 6, 7, -100], [1, 2, 3, 4]])
        >>> loss_tokens({"input_ids": labels, "labels": labels}, GPT2LMHeadModel())
        5
    """
    head = token_level_model(model)
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if head is None or not isinstance(labels, Tensor):
        return None
    if type(head).__name__.endswith(_CAUSAL_HEADS):
        labels = labels[..., 1:]
    return max(1, int((labels != _IGNORE_INDEX).sum()))

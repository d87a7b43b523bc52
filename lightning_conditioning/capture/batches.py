"""Batches and outputs of the models people train, read for the extra passes.

The defaults of a pass, for the batches and models people train (README "Fisher, probe
batches"):

- **Forward** (:func:`default_forward`): ``module(batch)`` for a tensor batch,
  ``module(batch[0])`` for ``(inputs, targets, ...)``, ``module(**batch)`` for a dict batch
  (Hugging Face style; keys the forward does not name are left out). A LightningModule without
  a ``forward`` of its own is called through its only sub-module that holds parameters
  (:func:`forward_module_name`), or the callback fails at setup naming ``forward_fn=``.
- **Outputs** (:func:`logits_of`): a tensor, an object or dict with ``logits`` (Hugging Face
  ``ModelOutput``), or a tuple whose first element is the logits.
- **Empirical loss** (:func:`default_loss`): the model's own ``loss`` when its outputs carry
  one (Hugging Face, given ``labels``: causal LMs shift them themselves), else mean
  cross-entropy against ``batch[1]`` or ``batch["labels"]``.
- **True Fisher** (:func:`sampled_loss`): labels drawn per position from the softmax over the
  class dimension (the last one for ``.logits`` outputs, Hugging Face's ``(B, T, V)``), and the
  mean cross-entropy over the positions, computed here from the logits (the sampled label of a
  position is drawn from that position's prediction: nothing to shift). The positions are those
  the model's own loss scores (labels not -100, one earlier for causal LMs), so the true and the
  empirical Fisher cover the same tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_conditioning.capture.conventions import token_level_model

__all__ = [
    "ForwardFn",
    "LossFn",
    "SampleLossFn",
    "defines_forward",
    "forward_module_name",
    "default_forward",
    "forward_kwargs",
    "logits_of",
    "batch_labels",
    "default_loss",
    "class_dim_of",
    "sampled_cross_entropy",
    "position_mask",
    "shifts_labels",
    "sampled_loss",
    "sampled_positions",
    "label_generator",
]

#: ``forward_fn(pl_module, batch) -> outputs`` (a tensor of logits, or anything
#: :func:`logits_of` reads when the default losses are used)
ForwardFn = Callable[[nn.Module, Any], Any]
#: ``loss_fn(outputs, batch) -> loss`` with the batch's own labels (empirical Fisher)
LossFn = Callable[[Any, Any], Tensor]
#: ``sample_fn(outputs, generator) -> loss`` with labels drawn from the model (true Fisher)
SampleLossFn = Callable[[Any, torch.Generator], Tensor]

#: the batch key of the targets (Hugging Face), and cross-entropy's "no target here" value
LABELS = "labels"
IGNORE_INDEX = -100
#: Hugging Face heads whose own loss scores position t against label t + 1 (as
#: :func:`lightning_conditioning.capture.conventions.loss_tokens` reads them)
_CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel")


# ---------------------------------------------------------------------- the forward
def defines_forward(module: nn.Module) -> bool:
    """Whether ``module``'s class has a ``forward`` of its own (not ``nn.Module``'s
    unimplemented one, nor ``LightningModule.forward``, which only calls that one).

    Example:
        >>> defines_forward(nn.Linear(2, 2)), defines_forward(nn.Module())
        (True, False)
    """
    forward = type(module).forward
    if forward is nn.Module.forward:
        return False
    lightning = getattr(forward, "__module__", "").split(".")[0] in ("lightning", "pytorch_lightning")
    return not (lightning and getattr(forward, "__qualname__", "") == "LightningModule.forward")


def forward_module_name(module: nn.Module, needed_by: str = "the extra passes") -> str:
    """The module the default forward calls: ``""`` (``module`` itself) when it defines
    ``forward``, else the name of its only child holding parameters (when ``module`` holds none
    of its own and that child defines ``forward``). Anything else raises a ``TypeError`` that
    names ``forward_fn=``.

    Example:
        >>> class Wrapper(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net, self.loss = nn.Linear(2, 2), nn.CrossEntropyLoss()
        >>> forward_module_name(nn.Linear(2, 2)), forward_module_name(Wrapper())
        ('', 'net')
    """
    if defines_forward(module):
        return ""
    holders = [name for name, child in module.named_children() if _holds_parameters(child)]
    own = next(module.parameters(recurse=False), None) is not None
    if not own and len(holders) == 1 and defines_forward(module.get_submodule(holders[0])):
        return holders[0]
    kind = type(module).__name__
    why = (
        f"its parameters are spread over {', '.join(holders)}"
        if len(holders) > 1
        else "no single sub-module with a forward holds all its parameters"
    )
    call = f"module.{holders[0]}(batch[0])" if holders else "...(batch[0])"
    raise TypeError(
        f"{needed_by} call the model, but {kind} has no forward method ({why}): pass "
        f"forward_fn=, a function (module, batch) -> logits (or outputs with .logits), e.g. "
        f"forward_fn=lambda module, batch: {call}, or define {kind}.forward"
    )


def _holds_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def default_forward(module: nn.Module, batch: Any, keep_labels: bool = True) -> Any:
    """Call ``module`` on a batch: ``module(batch)`` for a tensor, ``module(batch[0])`` for
    ``(inputs, targets, ...)``, ``module(**batch)`` for a dict (:func:`forward_kwargs`).

    ``keep_labels=False`` (the true Fisher) leaves ``batch["labels"]`` out, so that a Hugging
    Face model does not compute a loss against the data's labels that nobody reads.

    Example:
        >>> default_forward(nn.Identity(), (torch.ones(2), torch.zeros(2)))
        tensor([1., 1.])
        >>> default_forward(nn.Identity(), {"input": torch.ones(1), "labels": torch.zeros(1)})
        tensor([1.])
    """
    if isinstance(batch, Tensor):
        return module(batch)
    if isinstance(batch, Mapping):
        return module(**forward_kwargs(module, batch, keep_labels))
    if isinstance(batch, (tuple, list)) and batch:
        return module(batch[0])
    raise TypeError(
        f"cannot find the inputs in a batch of type {type(batch).__name__}: pass "
        "forward_fn=lambda module, batch: module(...) to the callback"
    )


def forward_kwargs(module: nn.Module, batch: Mapping[Any, Any], keep_labels: bool = True) -> dict[str, Any]:
    """The keyword arguments of ``module(**batch)``: the batch's keys that ``module.forward``
    names (all of them when it takes ``**kwargs``). Without ``keep_labels``, ``labels`` is left
    out, except for encoder-decoder models given no ``decoder_input_ids`` (T5, BART: they make
    their decoder inputs from the labels).

    Example:
        >>> forward_kwargs(nn.Linear(2, 2), {"input": 1, "labels": 2, "index": 3})
        {'input': 1}
    """
    names, any_keyword = _forward_signature(module)
    decoder_from_labels = "decoder_input_ids" in names and not (
        {"decoder_input_ids", "decoder_inputs_embeds"} & set(batch)
    )
    drop = set() if keep_labels or decoder_from_labels else {LABELS}
    kwargs = {
        key: value
        for key, value in batch.items()
        if isinstance(key, str) and key not in drop and (any_keyword or key in names)
    }
    if not kwargs:
        raise TypeError(
            f"none of the batch's keys {sorted(map(str, batch))} is an argument of "
            f"{type(module).__name__}.forward: pass forward_fn=lambda module, batch: module(...) "
            "to the callback"
        )
    return kwargs


def _forward_signature(module: nn.Module) -> tuple[set[str], bool]:
    """The names ``module.forward`` takes by keyword, and whether it takes ``**kwargs`` too
    (assumed when the signature cannot be read)."""
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return set(), True
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = {p.name for p in parameters if p.kind in keyword}
    return names, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


# ---------------------------------------------------------------------- outputs and labels
def logits_of(outputs: Any) -> Tensor:
    """The logits in a model's outputs: the tensor itself, ``outputs["logits"]`` /
    ``outputs.logits`` (Hugging Face ``ModelOutput`` is both), or a tuple's first element.

    Example:
        >>> logits_of({"loss": torch.tensor(1.0), "logits": torch.zeros(2, 3)}).shape
        torch.Size([2, 3])
        >>> logits_of((torch.zeros(2, 3), torch.ones(1))).shape
        torch.Size([2, 3])
    """
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        logits = outputs.get("logits")
    elif isinstance(outputs, (tuple, list)):
        logits = outputs[0] if outputs else None
        if isinstance(logits, Tensor) and logits.dim() == 0:
            raise TypeError(
                "the first element of the model's output tuple is a scalar (a loss?), not "
                "logits: pass forward_fn= returning the logits, or sample_fn= / loss_fn="
            )
    else:
        logits = getattr(outputs, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(
        f"cannot find logits in model outputs of type {type(outputs).__name__} (read: a tensor, "
        "outputs.logits / outputs['logits'], or a tuple's first element): pass sample_fn= (true "
        "Fisher) or loss_fn= (probe batches), or forward_fn= returning the logits, to the callback"
    )


def _structured(outputs: Any) -> bool:
    """Outputs read through ``logits`` (Hugging Face style): classes are their last dim."""
    return not isinstance(outputs, (Tensor, tuple, list))


def _own_loss(outputs: Any) -> Tensor | None:
    """The scalar loss the model computed itself (Hugging Face given ``labels``), if any."""
    if isinstance(outputs, (Tensor, tuple, list)):
        return None
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    return loss if isinstance(loss, Tensor) and loss.dim() == 0 else None


def batch_labels(batch: Any) -> Tensor | None:
    """The data's targets: ``batch[1]`` of a tuple batch, ``batch["labels"]`` of a dict.

    Example:
        >>> batch_labels((torch.zeros(2, 3), torch.tensor([0, 2])))
        tensor([0, 2])
        >>> batch_labels({"input_ids": torch.zeros(2, 3)}) is None
        True
    """
    if isinstance(batch, Mapping):
        labels = batch.get(LABELS)
    elif isinstance(batch, (tuple, list)) and len(batch) > 1:
        labels = batch[1]
    else:
        labels = None
    return labels if isinstance(labels, Tensor) else None


def class_dim_of(logits: Tensor, labels: Tensor | None, structured: bool) -> int:
    """The dimension of ``logits`` that holds the classes, said by the data, never guessed.

    Logits of 1 or 2 dimensions: the last. From 3 dimensions on, integer ``labels`` decide when
    their shape matches exactly one layout: ``(N, *)`` for ``(N, *, classes)`` logits (-1), or
    for ``(N, classes, *)`` (1, PyTorch's cross-entropy convention). Otherwise ``logits`` read
    from ``.logits`` (``structured``) follow Hugging Face: classes last. Anything else raises a
    ``ValueError`` that names the option to pass.

    Example:
        >>> class_dim_of(torch.zeros(2, 5, 7), torch.zeros(2, 5, dtype=torch.long), structured=False)
        -1
        >>> class_dim_of(torch.zeros(2, 5, 7), torch.zeros(2, 7, dtype=torch.long), structured=False)
        1
        >>> class_dim_of(torch.zeros(2, 5, 7), None, structured=True)
        -1
    """
    if logits.dim() <= 2:
        return -1
    if labels is not None and not labels.is_floating_point():
        last = tuple(labels.shape) == tuple(logits.shape[:-1])
        second = tuple(labels.shape) == (logits.shape[0], *logits.shape[2:])
        if last != second:
            return -1 if last else 1
    if structured:
        return -1
    raise ValueError(
        f"cannot tell which dimension of the {tuple(logits.shape)} logits holds the classes "
        "(the batch has no labels of a matching shape): pass sample_fn=functools.partial("
        "sampled_cross_entropy, class_dim=1) for (N, classes, *) logits or class_dim=-1 for "
        "(N, *, classes), from lightning_conditioning.capture.passes (loss_fn= for probe batches)"
    )


# ---------------------------------------------------------------------- losses
def default_loss(outputs: Any, batch: Any) -> Tensor:
    """The empirical loss of a pass: the model's own ``loss`` when its outputs carry one
    (Hugging Face given ``labels``), else mean cross-entropy of :func:`logits_of` against
    :func:`batch_labels` (ignore index -100; the class dimension from :func:`class_dim_of`).

    Example:
        >>> float(default_loss(torch.zeros(2, 4), (None, torch.tensor([0, 3])))) == float(torch.log(torch.tensor(4.0)))
        True
        >>> float(default_loss({"loss": torch.tensor(0.5), "logits": torch.zeros(2, 4)}, {}))
        0.5
    """
    own = _own_loss(outputs)
    if own is not None:
        return own
    logits, labels = logits_of(outputs), batch_labels(batch)
    if labels is None:
        raise TypeError(
            "cannot find the targets in the batch (batch[1], or batch['labels'] of a dict) and the "
            "model's outputs carry no loss: pass loss_fn=lambda outputs, batch: ... to the callback"
        )
    if logits.dim() > 2 and class_dim_of(logits, labels, _structured(outputs)) == -1:
        logits = logits.movedim(-1, 1)  # to cross-entropy's (N, classes, *)
        if labels.is_floating_point() and labels.dim() == logits.dim():  # class probabilities
            labels = labels.movedim(-1, 1)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


def sampled_cross_entropy(
    outputs: Tensor, generator: torch.Generator, class_dim: int = 1, mask: Tensor | None = None
) -> Tensor:
    """Mean cross-entropy against labels drawn from the softmax of ``outputs`` over
    ``class_dim`` (the true Fisher): ``(N, classes)`` logits, or one label per position of
    ``(N, classes, *)`` (``class_dim=1``, PyTorch's layout) or ``(N, *, classes)``
    (``class_dim=-1``, Hugging Face's ``(B, T, V)``). ``mask`` (the positions' shape; nonzero =
    kept) leaves positions out of the mean. The draw uses ``generator`` only, never the global
    RNG, one label per position in row-major order of the positions.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> float(sampled_cross_entropy(torch.zeros(3, 2), g)) == float(torch.log(torch.tensor(2.0)))
        True
        >>> float(sampled_cross_entropy(torch.zeros(1, 3, 4), g, class_dim=-1)) == float(torch.log(torch.tensor(4.0)))
        True
    """
    classes_last = outputs.movedim(class_dim, -1)
    flat = classes_last.reshape(-1, classes_last.shape[-1])
    probabilities = torch.softmax(flat.detach().float(), dim=-1).cpu()
    labels = torch.multinomial(probabilities, 1, generator=generator).reshape(-1).to(outputs.device)
    if mask is None:
        return F.cross_entropy(flat, labels)
    keep = (mask.reshape(-1) != 0).to(flat.device)
    losses = F.cross_entropy(flat, labels, reduction="none")
    return (losses * keep).sum() / keep.sum().clamp_min(1)


def position_mask(batch: Any, positions: tuple[int, ...], causal: bool = False) -> Tensor | None:
    """Which positions of a dict batch the sampled loss averages over (shape ``positions``):
    those the model's own loss scores, i.e. labels not -100 (padding, tokens a masked LM does
    not predict), one position earlier for a ``causal`` model (position t predicts label t + 1;
    the last one predicts nothing); without labels, ``decoder_attention_mask``, else (no
    decoder inputs) ``attention_mask``. None when the batch has none of a matching shape.

    Example:
        >>> position_mask({"attention_mask": torch.tensor([[1, 1, 0]])}, (1, 3))
        tensor([[1, 1, 0]])
        >>> position_mask({"labels": torch.tensor([[5, -100, 2]])}, (1, 3))
        tensor([[ True, False,  True]])
        >>> position_mask({"labels": torch.tensor([[5, -100, 2]])}, (1, 3), causal=True)
        tensor([[False,  True, False]])
    """
    if not isinstance(batch, Mapping):
        return None
    labels = batch.get(LABELS)
    scored = None
    if isinstance(labels, Tensor) and not labels.is_floating_point():
        scored = labels.ne(IGNORE_INDEX)
        if causal:
            scored = torch.cat([scored[..., 1:], torch.zeros_like(scored[..., :1])], dim=-1)
    candidates = [scored, batch.get("decoder_attention_mask")]
    if "decoder_input_ids" not in batch:
        candidates.append(batch.get("attention_mask"))
    for mask in candidates:
        if isinstance(mask, Tensor) and tuple(mask.shape) == positions:
            return mask
    return None


def shifts_labels(model: nn.Module) -> bool:
    """Whether ``model`` holds a Hugging Face causal LM, whose own loss shifts the labels.

    Example:
        >>> shifts_labels(nn.Linear(2, 2))
        False
    """
    head = token_level_model(model)
    return head is not None and type(head).__name__.endswith(_CAUSAL_HEADS)


def _sampling(outputs: Any, batch: Any, causal: bool) -> tuple[Tensor, int, Tensor | None]:
    """``(logits, class dim, position mask)`` of the true Fisher's default loss."""
    logits = logits_of(outputs)
    dim = class_dim_of(logits, batch_labels(batch), _structured(outputs))
    positions = tuple(logits.movedim(dim, -1).shape[:-1])
    return logits, dim, position_mask(batch, positions, causal)


def sampled_loss(outputs: Any, batch: Any, generator: torch.Generator, causal: bool = False) -> Tensor:
    """The true Fisher's default loss: :func:`sampled_cross_entropy` of :func:`logits_of`, the
    class dimension from :func:`class_dim_of`, over the positions of :func:`position_mask`
    (``causal``: the model shifts its labels, :func:`shifts_labels`). The loss is computed here
    from the logits, never by the model: a sampled label belongs to the position that predicted
    it, so there is nothing to shift.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> out = {"logits": torch.zeros(1, 3, 4)}   # Hugging Face layout: (B, T, V)
        >>> float(sampled_loss(out, {"input_ids": torch.zeros(1, 3)}, g)) == float(torch.log(torch.tensor(4.0)))
        True
    """
    logits, dim, mask = _sampling(outputs, batch, causal)
    return sampled_cross_entropy(logits, generator, class_dim=dim, mask=mask)


def sampled_positions(outputs: Any, batch: Any, causal: bool = False) -> int:
    """How many positions :func:`sampled_loss` averages over (the ``token_mean`` factor).

    Example:
        >>> out = {"logits": torch.zeros(2, 3, 4)}
        >>> sampled_positions(out, {"labels": torch.tensor([[1, 2, -100], [1, 2, 3]])}, causal=True)
        3
    """
    logits, dim, mask = _sampling(outputs, batch, causal)
    if mask is None:
        return max(1, logits.numel() // max(1, int(logits.shape[dim])))
    return max(1, int(mask.ne(0).sum()))


def label_generator(seed: int, rank: int, step: int, index: int) -> torch.Generator:
    """The private CPU generator of the ``index``-th extra pass (counted from 1 over the run)
    at ``step`` on process ``rank``: the true Fisher's labels are reproducible from it.

    Example:
        >>> a, b = label_generator(0, 0, 5, 1), label_generator(0, 0, 5, 1)
        >>> torch.equal(torch.rand(2, generator=a), torch.rand(2, generator=b))
        True
    """
    return torch.Generator().manual_seed(hash((seed, rank, step, index)) & 0x7FFF_FFFF_FFFF_FFFF)


# ---------------------------------------------------------------------- isolation

"""Which Lightning strategies the callbacks can serve, said at fit start (never silently empty).

Supported and tested on CPU with 2 gloo processes: single device, DDP (every flavour), and
FSDP2 as data parallelism (``ModelParallelStrategy`` with ``tensor_parallel_size=1``).
Not supported, with the reason and what to do:

- **Tensor parallelism** (``ModelParallelStrategy(tensor_parallel_size > 1)``): a parallelised
  layer's inputs or outputs are split over ranks, so its statistics would be those of a shard.
- **DeepSpeed**: it keeps gradients (ZeRO ≥ 2) and weights (ZeRO-3) in partitioned buffers of
  its own, so the weight-domination check would see none; and its float16 loss scaler is not
  Lightning's, so the conditioning could not undo it. Lightning runs DeepSpeed on CUDA only;
  nothing here could be tested (no GPU was available), so both callbacks step aside.
- **Classic FSDP** (``FSDPStrategy``): flat parameters; not tested here (Lightning refuses it on
  the CPU); both callbacks step aside with a pointer to FSDP2.

Example:
    >>> unsupported("conditioning", object()) is None
    True
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_only

from lightning_conditioning.notify import warn

__all__ = ["unsupported", "prefix_state_key", "rank_zero_warn", "loss_scale"]


@rank_zero_only
def rank_zero_warn(message: str) -> None:
    """A warning from the world's process zero, at the user's line (``trainer.fit(...)``), not
    inside Lightning or this package (:func:`lightning_conditioning.notify.warn`)."""
    warn(message)


def unsupported(kind: str, strategy: Any) -> str | None:
    """Why a callback of ``kind`` (``"conditioning"`` / ``"weight domination"``) cannot serve
    ``strategy`` (a Lightning strategy), with what to do; None when it can."""
    name = type(strategy).__name__
    if name == "ModelParallelStrategy" and int(getattr(strategy, "_tensor_parallel_size", 1) or 1) > 1:
        size = strategy._tensor_parallel_size
        data = getattr(strategy, "_data_parallel_size", 1)
        devices = size * data if isinstance(data, int) else "N"
        return (
            f"tensor parallelism (tensor_parallel_size={size}) splits a layer's inputs or "
            "outputs over ranks: its statistics would be those of a shard (ModelParallelStrategy() "
            "with its defaults makes every device of the node tensor-parallel). For FSDP2 alone, "
            "which is supported, pass ModelParallelStrategy(data_parallel_size="
            f"{devices}, tensor_parallel_size=1); or use DDP."
        )
    if "DeepSpeed" in name:
        return (
            "DeepSpeed keeps gradients and weights in partitioned buffers of its own and scales "
            f"float16 losses with its own scaler, so the {kind} numbers would be missing or "
            "wrong; this was not tested (Lightning runs DeepSpeed on CUDA only). Use FSDP2 "
            "(ModelParallelStrategy with tensor_parallel_size=1) or DDP."
        )
    if name == "FSDPStrategy":
        return (
            "classic FSDP flattens parameters and was not tested (Lightning refuses it on the "
            "CPU). Use FSDP2 (ModelParallelStrategy with tensor_parallel_size=1), which is tested."
        )
    return None


def prefix_state_key(callback: Any, set_up: bool) -> str:
    """The checkpoint key of a stateful callback: one state per prefix, whatever its options
    (a resumed run may change its schedule and keep what it learned).

    Lightning checks at ``Trainer(...)`` that no two stateful callbacks share a key, with a
    message that does not say what to change. Until the Trainer sets the callback up its key
    also carries the instance, so that check passes and :func:`check_one_per_prefix` (called
    at setup, before any checkpoint is read or written) raises an error that names ``prefix=``.

    Example:
        >>> from lightning_conditioning import ConditioningCallback
        >>> prefix_state_key(ConditioningCallback(prefix="a"), set_up=True)
        "ConditioningCallback{'prefix': 'a'}"
    """
    key = callback._generate_state_key(prefix=callback.prefix)
    return key if set_up else f"{key}@{id(callback):x}"


def loss_scale(trainer: Any) -> float:
    """The float16 ``GradScaler``'s current scale of a Lightning Trainer (1 without one).

    Example:
        >>> from types import SimpleNamespace
        >>> loss_scale(SimpleNamespace(precision_plugin=SimpleNamespace()))
        1.0
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None else 1.0

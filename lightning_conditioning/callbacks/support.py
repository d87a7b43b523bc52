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

__all__ = ["unsupported"]


def unsupported(kind: str, strategy: Any) -> str | None:
    """Why a callback of ``kind`` (``"conditioning"`` / ``"weight domination"``) cannot serve
    ``strategy`` (a Lightning strategy), with what to do; None when it can."""
    name = type(strategy).__name__
    if name == "ModelParallelStrategy" and int(getattr(strategy, "_tensor_parallel_size", 1) or 1) > 1:
        return (f"tensor parallelism (tensor_parallel_size={strategy._tensor_parallel_size}) splits "
                "a layer's inputs or outputs over ranks: its statistics would be those of a shard. "
                "Use data parallelism only (tensor_parallel_size=1: FSDP2), or DDP.")
    if "DeepSpeed" in name:
        return ("DeepSpeed keeps gradients and weights in partitioned buffers of its own and scales "
                f"float16 losses with its own scaler, so the {kind} numbers would be missing or "
                "wrong; this was not tested (Lightning runs DeepSpeed on CUDA only). Use FSDP2 "
                "(ModelParallelStrategy with tensor_parallel_size=1) or DDP.")
    if name == "FSDPStrategy":
        return ("classic FSDP flattens parameters and was not tested (Lightning refuses it on the "
                "CPU). Use FSDP2 (ModelParallelStrategy with tensor_parallel_size=1), which is tested.")
    return None

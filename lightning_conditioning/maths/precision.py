"""Which dtype the Gram GEMMs run in: ``statistics_dtype="auto"`` decided per device.

float64 Grams resolve eigenvalues down to ~1e-11·λmax, float32 Grams only to ~1e-3·λmax
(:mod:`lightning_conditioning.maths.resolution`). CPUs run float64 GEMMs at half the float32 rate,
and at the default schedule the analysis is a few percent of training either way
(``benchmarks/RESULTS.md``), so ``"auto"`` is float64 there. Accelerators differ by 2× (data
centre GPUs) to 64× (consumer GPUs): ``"auto"`` times one GEMM of each dtype once per device and
takes float64 when it is at most :data:`MAX_FLOAT64_SLOWDOWN` times slower.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch

__all__ = ["STATISTICS_DTYPES", "MAX_FLOAT64_SLOWDOWN", "gram_dtype_for", "float64_slowdown"]

#: the accepted values of ``statistics_dtype``
STATISTICS_DTYPES: tuple[str, ...] = ("auto", "float32", "float64")
#: ``"auto"`` keeps float64 Grams on a device whose float64 GEMM is at most this much slower
MAX_FLOAT64_SLOWDOWN = 8.0

_MEASURED: dict[torch.device, float] = {}


def float64_slowdown(device: torch.device, size: int = 1024, repeats: int = 3) -> float:
    """Time of a ``size``³ float64 GEMM over a float32 one on ``device`` (best of ``repeats``;
    measured once per device and cached)."""
    if device in _MEASURED:
        return _MEASURED[device]
    seconds = {}
    for dtype in (torch.float32, torch.float64):
        # deterministic values: the device's random stream is the user's (training untouched)
        a = torch.linspace(-1.0, 1.0, size * size, device=device, dtype=dtype).reshape(size, size)
        best = float("inf")
        for _ in range(repeats + 1):  # the first run warms the kernels up
            torch.cuda.synchronize(device) if device.type == "cuda" else None
            start = time.perf_counter()
            a @ a
            torch.cuda.synchronize(device) if device.type == "cuda" else None
            best = min(best, time.perf_counter() - start)
        seconds[dtype] = best
    _MEASURED[device] = seconds[torch.float64] / max(seconds[torch.float32], 1e-12)
    return _MEASURED[device]


def gram_dtype_for(
    option: str, devices: Iterable[torch.device], *, slowdown: Callable[[torch.device], float] = float64_slowdown
) -> torch.dtype:
    """The Gram dtype for ``statistics_dtype=option`` on the model's ``devices``.

    Example:
        >>> gram_dtype_for("auto", [torch.device("cpu")])
        torch.float64
        >>> gram_dtype_for("auto", [torch.device("cuda", 0)], slowdown=lambda device: 64.0)
        torch.float32
    """
    if option not in STATISTICS_DTYPES:
        raise ValueError(f"statistics_dtype must be one of {STATISTICS_DTYPES}, got {option!r}")
    if option != "auto":
        return torch.float64 if option == "float64" else torch.float32
    accelerators = {d for d in devices if d.type not in ("cpu", "meta")}
    if all(slowdown(d) <= MAX_FLOAT64_SLOWDOWN for d in accelerators):
        return torch.float64
    return torch.float32

"""Micro-benchmarks of the package's hot kernels against their alternatives.

A section of ``python benchmarks/perf.py``; alone::

    python benchmarks/kernels.py [--rounds 15]

Each alternative is prototyped in this file and measured side by side with the package's
code (step-interleaved, medians; see ``harness.py``). Two proposals first measured here were
adopted; the former code is kept here as the baseline.

1. **Gram accumulation** (every captured step). Before: ``rows.T @ rows`` in float32, then
   ``sum_outer.add_(gram, alpha=w)`` into the float64 window: on the CPU a mixed-dtype
   in-place add first materialises a float64 copy of the Gram (one more d² pass and d²·8
   bytes). Adopted: ``pending.addmm_(rows.T, rows, alpha=w)`` into a float32 buffer per
   window (GEMM and accumulation fused, no temporary), folded into the float64 sum every 16
   additions and when the window is read (``accumulate.SecondMomentSum``). Also measured:
   ``mm`` + same-dtype ``add_`` (the minimal variant), and a block-triangular Gram (only the
   upper blocks of a 2×2 split: 3/4 of the FLOPs, the lower blocks mirrored when read).
2. **Unit extremes**: ``amax`` + ``amin`` (two passes) vs ``torch.aminmax`` (one pass; it
   turned out slower here, so the package keeps ``amax`` + ``amin``).
3. **End to end**: a gathered step of the MLP with the package's ``LayerCapture`` vs the
   same capture with the former float64 accumulation (``Float64Sum``); and the precision of
   both over a 16-step window against a float64-GEMM capture (all attached at once).
4. **Patch-mode row subsampling** (measured, not adopted): Σx of three ResNet-20 convs from
   one output position in 4 (a stride-2 lattice of positions, offset chosen at random: an
   unbiased estimate), against the full im2col Gram: time, and the relative error of λmax,
   κ_50 and κ_100 for each of the 4 offsets.
5. **Spectral norm** (WeightDominationCallback, 3 per layer per check). Adopted in commit
   efc67ac: ``sqrt(eigvalsh(G)[-1])`` with ``G`` the float64 Gram of the short side of
   ``W``, instead of ``torch.linalg.matrix_norm(W, ord=2)`` (a full SVD). Kept as evidence:
   both routes per weight shape and for one whole check of the MLP, ResNet-20 and ResNet-56.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from harness import PERCENTS, Kind, interleave, medians, section_main, sgd, train_step, workload
from schedule import weight_domination_work
from torch import Tensor, nn

from lightning_conditioning.capture.adapters import ConvPatchAdapter
from lightning_conditioning.capture.hooks import LayerCapture, find_layers, select_layers
from lightning_conditioning.maths.accumulate import SecondMomentSum
from lightning_conditioning.maths.domination import frobenius_norm, spectral_norm
from lightning_conditioning.maths.spectra import summarize_spectrum, symmetric_eigenvalues


def spectral_norm_svd(matrix: Tensor) -> float:
    """σmax as the package took it before commit efc67ac: ``matrix_norm(ord=2)`` (an SVD)."""
    matrix = matrix.detach().reshape(matrix.shape[0], -1).to(device="cpu", dtype=torch.float64)
    return float(torch.linalg.matrix_norm(matrix, ord=2)) if matrix.numel() else 0.0


class Float64Sum(SecondMomentSum):
    """The accumulation before the pending buffer: every Gram formed in its own dtype, then
    added to the float64 sum (a mixed-dtype ``add_``: a float64 copy of it first)."""

    def add(self, gram: Tensor, rows: int, row_sum: Tensor | None = None, weight: float = 1.0) -> None:
        self.sum_outer.add_(gram, alpha=weight)
        if self.sum_rows is not None and row_sum is not None:
            self.sum_rows.add_(row_sum)
        self.rows += rows

    def add_rows(self, rows: Tensor, weight: float = 1.0) -> None:
        total = rows.sum(0) if self.sum_rows is not None else None
        self.add(rows.T @ rows, rows.shape[0], total, weight)


def float64_capture(layers: dict[str, Any]) -> LayerCapture:
    """A ``LayerCapture`` whose windows accumulate as before (:class:`Float64Sum`)."""
    capture = LayerCapture(layers)
    capture.attach()
    capture.detach()
    for window in capture.windows.values():
        window.input.__class__ = Float64Sum
        window.grad.__class__ = Float64Sum
    return capture


def triangular_gram(into: Tensor, rows: Tensor) -> None:
    """``into += rowsᵀ rows`` on the diagonal and upper blocks of a 2×2 split only."""
    half = rows.shape[1] // 2
    left, right = rows[:, :half], rows[:, half:]
    into[:half, :half].addmm_(left.T, left)
    into[:half, half:].addmm_(left.T, right)
    into[half:, half:].addmm_(right.T, right)


def accumulation_kinds(device: torch.device) -> dict[str, Kind]:
    """The MLP's largest Gram (784 features, 256 rows) and its extremes, package vs others."""
    rows = torch.relu(torch.randn(256, 784, device=device))
    sum64 = torch.zeros(784, 784, dtype=torch.float64, device=device)
    acc32 = torch.zeros(784, 784, device=device)
    return {
        "gram: mm + add_ into float64 (before)": lambda: sum64.add_(rows.T @ rows, alpha=1.0),
        "gram: mm only (floor)": lambda: rows.T @ rows,
        "gram: mm + add_ into float32 (minimal variant)": lambda: acc32.add_(rows.T @ rows, alpha=1.0),
        "gram: addmm_ into float32 (package)": lambda: acc32.addmm_(rows.T, rows),
        "gram: block-triangular addmm_ into float32 (alternative)": lambda: triangular_gram(acc32, rows),
        "extremes: amax + amin (package)": lambda: (rows.amax(0), rows.amin(0)),
        "extremes: aminmax (alternative)": lambda: torch.aminmax(rows, dim=0),
    }


def end_to_end(rounds: int, device: torch.device, window: int = 16) -> dict[str, Any]:
    """Gathered MLP steps, package vs former accumulation; and the precision of both."""
    load = workload("mlp", device)
    net, x, y = load.net, load.x, load.y
    optimizer = sgd(net)
    layers = find_layers(net)
    package, before = LayerCapture(layers), float64_capture(layers)
    captures = (package, before)

    def plain() -> None:
        for other in captures:
            other.detach()
        train_step(net, optimizer, x, y)

    def run(capture: LayerCapture) -> Kind:
        def step() -> None:  # a non-final step of a window: the sums just grow
            for other in captures:
                if other is not capture:
                    other.detach()
            capture.attach()
            capture.active = True
            train_step(net, optimizer, x, y)
            capture.active = False

        return step

    def fold() -> None:
        for w in package.windows.values():
            w.input.fold()
            w.grad.fold()

    kinds = {
        "plain": plain,
        "gathered (package)": run(package),
        "gathered (before: float64 add of each Gram)": run(before),
        "fold float32 into float64 (package, every 16 adds)": fold,
    }
    run(package)()  # allocate the pending buffers
    med = medians(interleave(kinds, rounds, device, warmup=2))
    # precision over one window: both and a float64-GEMM reference attached at once
    exact = LayerCapture(layers, statistics_dtype=torch.float64)
    for capture in (*captures, exact):
        capture.attach()
        capture.reset()
        capture.active = True
    for _ in range(window):
        train_step(net, optimizer, x, y)
    deviation = {"package": 0.0, "before": 0.0}
    reference = exact.moments()
    for label, capture in (("package", package), ("before", before)):
        capture.detach()
        for name, moments in capture.moments().items():
            ref = reference[name]
            for m, r in (
                (moments.input_second_moment, ref.input_second_moment),
                (moments.grad_second_moment, ref.grad_second_moment),
            ):
                assert m is not None and r is not None
                e_m, e_r = symmetric_eigenvalues(m), symmetric_eigenvalues(r)
                deviation[label] = max(deviation[label], float((e_m - e_r).abs().max() / e_r[0]))
    exact.detach()
    plain_s = med["plain"]
    return {
        "median_ms": {k: 1e3 * v for k, v in med.items()},
        "gathered / plain (package)": med["gathered (package)"] / plain_s,
        "gathered / plain (before)": med["gathered (before: float64 add of each Gram)"] / plain_s,
        **{f"max |eigenvalue − float64 reference| / λmax, {window}-step window, {k}": v for k, v in deviation.items()},
    }


def _patch_gram(conv: nn.Conv2d, x: Tensor) -> tuple[Tensor, int]:
    cols = ConvPatchAdapter.columns(conv, x)
    return cols @ cols.T, cols.shape[1]


def _lattice(conv: nn.Conv2d, factor: int) -> nn.Conv2d:
    """The same conv on a pre-padded input with its stride multiplied by ``factor``: one
    output position in ``factor²`` (a lattice coset chosen by cropping the input)."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    sub = nn.Conv2d(
        conv.in_channels, conv.out_channels, (kh, kw), bias=False, stride=(factor * sh, factor * sw), dilation=(dh, dw)
    )
    return sub.to(conv.weight.device)


def subsampling(rounds: int, device: torch.device, factor: int = 2) -> dict[str, Any]:
    """Patch-mode row subsampling, measured and not adopted: one output position in
    ``factor²`` on a lattice with a random offset (unbiased over the offset). Per ResNet-20
    layer: Gram time full vs subsampled, and the relative error of λmax, κ_50 and κ_100 of
    Σx for each of the ``factor²`` offsets (their average Gram equals the full one)."""
    load = workload("resnet20", device)
    inputs: dict[str, Tensor] = {}
    names = ("layer1.0.conv1", "layer2.0.conv2", "layer3.2.conv2")
    modules = dict(load.net.named_modules())
    handles = [
        modules[n].register_forward_pre_hook(functools.partial(lambda n, m, a: inputs.__setitem__(n, a[0].detach()), n))
        for n in names
    ]
    with torch.no_grad():
        load.net(load.x)
    for handle in handles:
        handle.remove()
    out: dict[str, Any] = {}
    for name in names:
        conv, x = modules[name], inputs[name]
        assert isinstance(conv, nn.Conv2d)
        padding: tuple[int, ...] = tuple(conv.padding)  # type: ignore[arg-type]  # numbers here
        padded = F.pad(x, [p for size in reversed(padding) for p in (size, size)])
        sub = _lattice(conv, factor)
        stride = conv.stride
        shifts = [(i, j) for i in range(factor) for j in range(factor)]
        crops = [padded[..., i * stride[0] :, j * stride[1] :] for i, j in shifts]
        full, rows = _patch_gram(conv, x)
        exact = summarize_spectrum(symmetric_eigenvalues(full.double() / rows), PERCENTS)
        errors: dict[str, list[float]] = {"λmax": [], "κ_50": [], "κ_100": [], "rank": []}
        for crop in crops:
            gram, sampled = _patch_gram(sub, crop)
            summary = summarize_spectrum(symmetric_eigenvalues(gram.double() / sampled), PERCENTS)
            errors["λmax"].append(abs(summary.lambda_max / exact.lambda_max - 1))
            errors["κ_50"].append(abs(summary.kappa[50] / exact.kappa[50] - 1))
            errors["κ_100"].append(abs(summary.kappa[100] / exact.kappa[100] - 1))
            errors["rank"].append(summary.rank / exact.rank)
        kinds = {"full": lambda: _patch_gram(conv, x), "subsampled": lambda: _patch_gram(sub, crops[0])}
        med = medians(interleave(kinds, rounds, device))
        out[name] = {
            "dim": full.shape[0],
            "rows": rows,
            "gram ms, full": 1e3 * med["full"],
            f"gram ms, 1 in {factor * factor}": 1e3 * med["subsampled"],
            **{
                f"max relative error, {k}" if k != "rank" else "min rank / full rank": (
                    max(v) if k != "rank" else min(v)
                )
                for k, v in errors.items()
            },
        }
    return out


SVD = "SVD matrix_norm ord=2 (before efc67ac)"
GRAM = "package: eigvalsh of Gram (since efc67ac)"


def spectral_kinds(rounds: int) -> dict[str, Any]:
    """The SVD route vs the package's Gram route on the weight shapes of the MLP and ResNets."""
    shapes = {
        "784→256": (256, 784),
        "256→256": (256, 256),
        "256→10": (10, 256),
        "conv 64×64×3×3": (64, 576),
        "conv 16×16×3×3": (16, 144),
    }
    out: dict[str, Any] = {}
    for label, shape in shapes.items():
        weight = torch.randn(*shape)
        kinds = {SVD: lambda: spectral_norm_svd(weight), GRAM: lambda: spectral_norm(weight)}
        med = medians(interleave(kinds, rounds, torch.device("cpu")))
        svd, gram = spectral_norm_svd(weight), spectral_norm(weight)
        out[label] = {**{k: 1e3 * v for k, v in med.items()}, "relative difference": abs(svd - gram) / svd}
    return out


def weight_domination_svd(net: nn.Module, lr: float = 0.01) -> Kind:
    """``schedule.weight_domination_work`` with every σmax taken by the former SVD route."""
    weights = [m.weight for m in select_layers(net).values() if isinstance(m.weight, nn.Parameter)]

    def run() -> None:
        for weight in weights:
            if weight.grad is None:
                continue
            spectral_norm_svd(weight), spectral_norm_svd(weight.grad)
            frobenius_norm(weight), frobenius_norm(weight.grad)
            before = weight.detach().clone()
            spectral_norm_svd((before - lr * weight.grad) - before)
        for weight in weights:
            frobenius_norm(weight)

    return run


def weight_domination(rounds: int, device: torch.device) -> dict[str, dict[str, float]]:
    """One WeightDominationCallback check, SVD route vs the package's Gram route (ms)."""
    out = {}
    for name in ("mlp", "resnet20", "resnet56"):
        load = workload(name, device)
        train_step(load.net, sgd(load.net), load.x, load.y)  # gradients to check
        kinds = {SVD: weight_domination_svd(load.net), GRAM: weight_domination_work(load.net)}
        out[name] = {k: 1e3 * v for k, v in medians(interleave(kinds, rounds, device)).items()}
    return out


def measure(rounds: int, device: torch.device) -> dict[str, Any]:
    """Every comparison of the module docstring."""
    return {
        "accumulation_ms": {
            k: 1e3 * v for k, v in medians(interleave(accumulation_kinds(device), rounds, device)).items()
        },
        "end_to_end": end_to_end(rounds, device),
        "spectral_norm_ms": spectral_kinds(rounds),
        "weight_domination_ms": weight_domination(max(5, rounds // 3), device),
        "patch_subsampling": subsampling(max(5, rounds // 3), device),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return section_main(__doc__, measure, 15, argv)


if __name__ == "__main__":
    main()

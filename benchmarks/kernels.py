"""Micro-benchmarks of the package's hot kernels against proposed replacements.

A section of ``python benchmarks/perf.py``; alone::

    python benchmarks/kernels.py [--rounds 15]

Nothing here changes the package: each proposal is prototyped in this file and measured
side by side with the current code (step-interleaved, medians; see ``harness.py``).

1. **Gram accumulation** (every captured step, Linear layers). Today: ``rows.T @ rows`` in
   float32, then ``sum_outer.add_(gram, alpha=w)`` into the float64 window: on the CPU a
   mixed-dtype in-place add first materialises a float64 copy of the Gram (one more d² pass
   and d²·8 bytes). Proposed: ``acc32.addmm_(rows.T, rows, alpha=w)`` into a float32 buffer
   per window (GEMM and accumulation fused, no temporary), folded into the float64 sum once
   at the window's end.
2. **Unit extremes**: ``amax`` + ``amin`` (two passes) vs ``torch.aminmax`` (one pass; it
   turned out slower here, so the prototype below keeps ``amax`` + ``amin``).
3. **End to end**: a gathered step of the MLP with the current ``LayerCapture`` vs a
   ``FusedCapture`` prototype doing 1 for Linear layers; and the precision of both over
   a 16-step window against a float64-GEMM capture (all three attached to the model at once).
4. **Spectral norm** (WeightDominationCallback, 3 per layer per check). Proposed here and
   adopted in commit efc67ac: ``sqrt(eigvalsh(G)[-1])`` with ``G`` the float64 Gram of the
   short side of ``W``, instead of ``torch.linalg.matrix_norm(W, ord=2)`` (a full SVD). Kept
   as evidence: both routes per weight shape and for one whole check of the MLP, ResNet-20
   and ResNet-56.
"""

from __future__ import annotations

import argparse
import functools
import json
from typing import Any

import torch
from torch import Tensor, nn

from harness import Kind, interleave, medians, pick_device, sgd, train_step, workload
from schedule import weight_domination_work
from lightning_conditioning.adapters import LinearAdapter
from lightning_conditioning.capture import LayerCapture, find_layers, select_layers
from lightning_conditioning.domination import frobenius_norm, spectral_norm
from lightning_conditioning.spectra import symmetric_eigenvalues


def spectral_norm_svd(matrix: Tensor) -> float:
    """σmax as the package took it before commit efc67ac: ``matrix_norm(ord=2)`` (an SVD)."""
    matrix = matrix.detach().reshape(matrix.shape[0], -1).to(device="cpu", dtype=torch.float64)
    return float(torch.linalg.matrix_norm(matrix, ord=2)) if matrix.numel() else 0.0


class FusedCapture(LayerCapture):
    """Prototype: Linear layers accumulate ``addmm_`` into float32 window buffers, folded
    into the float64 sums once, by :meth:`moments` (i.e. at the window's end)."""

    acc: dict[str, tuple[Tensor, Tensor]]

    def attach(self) -> None:
        super().attach()
        if not hasattr(self, "acc"):
            self.acc = {
                name: (
                    torch.zeros(w.input.dim, w.input.dim, device=w.input.sum_outer.device),
                    torch.zeros(w.grad.dim, w.grad.dim, device=w.grad.sum_outer.device),
                )
                for name, w in self.windows.items()
            }

    def _forward_hook(self, name: str, expected: nn.Module, module: nn.Module, args: tuple[Any, ...],
                      kwargs: dict[str, Any], output: Any) -> None:
        if not self.active or module is not expected or not isinstance(self.layers[name][1], LinearAdapter):
            return super()._forward_hook(name, expected, module, args, kwargs, output)
        x = args[0] if args else kwargs["input"]
        window = self.windows[name]
        with torch.no_grad():
            rows = x.detach().reshape(-1, x.shape[-1])
            self.acc[name][0].addmm_(rows.T, rows)
            window.input.rows += rows.shape[0]
            window.add_units(rows.amax(0), rows.amin(0))
        if output.requires_grad:
            output.register_hook(functools.partial(self._fused_grad, name, int(output.shape[0])))

    def _fused_grad(self, name: str, scale: int, grad: Tensor) -> None:
        with torch.no_grad():
            rows = grad.detach().reshape(-1, grad.shape[-1])
            factor = scale * self.grad_multiplier
            self.acc[name][1].addmm_(rows.T, rows, alpha=factor * factor)
            self.windows[name].grad.rows += rows.shape[0]

    def flush(self) -> None:
        """Fold the float32 buffers into the float64 window sums (once per window)."""
        for name, (acc_in, acc_grad) in self.acc.items():
            self.windows[name].input.sum_outer.add_(acc_in)
            self.windows[name].grad.sum_outer.add_(acc_grad)
            acc_in.zero_()
            acc_grad.zero_()

    def moments(self) -> dict[str, Any]:
        self.flush()
        return super().moments()

    def reset(self) -> None:
        super().reset()
        for acc_in, acc_grad in getattr(self, "acc", {}).values():
            acc_in.zero_()
            acc_grad.zero_()


def accumulation_kinds(device: torch.device) -> dict[str, Kind]:
    """The MLP's largest Gram (784 features, 256 rows) and its extremes, current vs proposed."""
    rows = torch.relu(torch.randn(256, 784, device=device))
    sum64 = torch.zeros(784, 784, dtype=torch.float64, device=device)
    acc32 = torch.zeros(784, 784, device=device)
    return {
        "gram: mm + add_ into float64 (current)": lambda: sum64.add_(rows.T @ rows, alpha=1.0),
        "gram: mm only (floor)": lambda: rows.T @ rows,
        "gram: addmm_ into float32 (proposed)": lambda: acc32.addmm_(rows.T, rows),
        "extremes: amax + amin (current)": lambda: (rows.amax(0), rows.amin(0)),
        "extremes: aminmax (alternative)": lambda: torch.aminmax(rows, dim=0),
    }


def end_to_end(rounds: int, device: torch.device, window: int = 16) -> dict[str, Any]:
    """Gathered MLP steps, current vs prototype; and the prototype's precision over a window."""
    load = workload("mlp", device)
    net, x, y = load.net, load.x, load.y
    optimizer = sgd(net)
    layers = find_layers(net)
    current, fused = LayerCapture(layers), FusedCapture(layers)

    def plain() -> None:
        current.detach(), fused.detach()
        train_step(net, optimizer, x, y)

    def run(capture: LayerCapture) -> Kind:
        def step() -> None:  # a non-final step of a window: the sums just grow
            (fused if capture is current else current).detach()
            capture.attach()
            capture.active = True
            train_step(net, optimizer, x, y)
            capture.active = False

        return step

    kinds = {
        "plain": plain,
        "gathered (current)": run(current),
        "gathered (fused prototype)": run(fused),
        "fold float32 into float64 (prototype, once per window)": lambda: fused.flush(),
    }
    run(fused)()  # allocate the prototype's buffers
    med = medians(interleave(kinds, rounds, device, warmup=2))
    # precision over one window: current, prototype and a float64-GEMM reference attached at once
    exact = LayerCapture(layers, statistics_dtype=torch.float64)
    for capture in (current, fused, exact):
        capture.attach()
        capture.reset()
        capture.active = True
    for _ in range(window):
        train_step(net, optimizer, x, y)
    deviation = {"current": 0.0, "fused prototype": 0.0}
    reference = exact.moments()
    for label, capture in (("current", current), ("fused prototype", fused)):
        capture.detach()
        for name, moments in capture.moments().items():
            ref = reference[name]
            for m, r in ((moments.input_second_moment, ref.input_second_moment),
                         (moments.grad_second_moment, ref.grad_second_moment)):
                assert m is not None and r is not None
                e_m, e_r = symmetric_eigenvalues(m), symmetric_eigenvalues(r)
                deviation[label] = max(deviation[label], float((e_m - e_r).abs().max() / e_r[0]))
    exact.detach()
    plain_s = med["plain"]
    return {
        "median_ms": {k: 1e3 * v for k, v in med.items()},
        "gathered / plain (current)": med["gathered (current)"] / plain_s,
        "gathered / plain (fused prototype)": med["gathered (fused prototype)"] / plain_s,
        f"window {window} / plain (fused prototype, fold amortised)": (
            med["gathered (fused prototype)"] + med["fold float32 into float64 (prototype, once per window)"] / window
        ) / plain_s,
        **{f"max |eigenvalue − float64 reference| / λmax, {window}-step window, {k}": v
           for k, v in deviation.items()},
    }


SVD = "SVD matrix_norm ord=2 (before efc67ac)"
GRAM = "package: eigvalsh of Gram (since efc67ac)"


def spectral_kinds(rounds: int) -> dict[str, Any]:
    """The SVD route vs the package's Gram route on the weight shapes of the MLP and ResNets."""
    shapes = {"784→256": (256, 784), "256→256": (256, 256), "256→10": (10, 256),
              "conv 64×64×3×3": (64, 576), "conv 16×16×3×3": (16, 144)}
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
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    result = measure(args.rounds, pick_device())
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

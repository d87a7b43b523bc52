"""The eigenvalue phase alone: one symmetric PSD solve per moment size, several ways.

A section of ``python benchmarks/perf.py``; alone::

    python benchmarks/eigen.py [--sizes 64 128 256 512 1024 2048] [--rounds 5]

The package takes **float64** ``torch.linalg.eigvalsh`` **on the CPU** (through
``spectra.symmetric_eigenvalues``, which also symmetrises, drops zero-variance units and sorts)
and needs the *whole* spectrum (κ_p for p < 100 and the smallest nonzero eigenvalue), off the
training hot path: once per analysed window. Compared, interleaved per size (seconds per
matrix, random Wishart matrices of full rank):

``torch f64``           ``torch.linalg.eigvalsh`` float64: what the package calls;
``package``             ``symmetric_eigenvalues`` (symmetrise + zero-diagonal check + sort);
``torch f32``           ``torch.linalg.eigvalsh`` in float32 (κ beyond ~1e6 unresolved);
``torch f64 batched``   one call on ``(4, d, d)``, per matrix (equal-size layers, d ≤ 512);
``scipy evd``           ``scipy.linalg.eigh(driver="evd", eigvals_only=True)`` (LAPACK syevd);
``scipy evr top-1``     ``scipy.linalg.eigh(driver="evr", subset_by_index=[d-1, d-1])``: λmax
                        only, not enough for κ_p;
``cuda f64``            ``torch.linalg.eigvalsh`` float64 on the GPU (only when one is present).

Plus the analysis of whole models: every moment of a ResNet-56 in channel mode (114 solves of
size 16-64) one by one vs batched by size, and the package's full per-layer analysis.
torch's and scipy's solvers are interleaved in separate groups: scipy's OpenBLAS threads
keep spinning after a call and slowed the next MKL solve by up to 2× when they were mixed.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Any

import scipy.linalg
import torch
from harness import Kind, interleave, medians, pick_device, random_psd, workload

from lightning_conditioning import analyse_layer
from lightning_conditioning.capture.adapters import ConvMode
from lightning_conditioning.capture.hooks import LayerCapture, find_layers
from lightning_conditioning.maths.spectra import symmetric_eigenvalues

BATCH = 4
SIZES = (64, 128, 256, 512, 1024, 2048)


def solvers(dim: int, device: torch.device) -> tuple[dict[str, Kind], dict[str, int]]:
    """The kinds of the module docstring for one size; with matrices solved per call."""
    matrix = random_psd(dim)
    single = matrix.float()
    array = matrix.numpy()
    kinds: dict[str, Kind] = {
        "torch f64": lambda: torch.linalg.eigvalsh(matrix),
        "package": lambda: symmetric_eigenvalues(matrix),
        "torch f32": lambda: torch.linalg.eigvalsh(single),
        "scipy evd": lambda: scipy.linalg.eigh(array, eigvals_only=True, driver="evd"),
        "scipy evr top-1": lambda: scipy.linalg.eigh(
            array, eigvals_only=True, driver="evr", subset_by_index=[dim - 1, dim - 1]
        ),
    }
    per_call = {name: 1 for name in kinds}
    if dim <= 512:
        stack = random_psd(dim, batch=BATCH)
        kinds["torch f64 batched"] = lambda: torch.linalg.eigvalsh(stack)
        per_call["torch f64 batched"] = BATCH
    if device.type == "cuda":
        on_device = matrix.to(device)
        kinds["cuda f64"] = lambda: torch.linalg.eigvalsh(on_device)
        per_call["cuda f64"] = 1
    return kinds, per_call


def by_size(sizes: tuple[int, ...], rounds: int, device: torch.device) -> dict[int, dict[str, float]]:
    """Median seconds per matrix of every solver, per size.

    torch's and scipy's solvers are interleaved in two separate groups: scipy's OpenBLAS
    threads spin for a while after each call and slowed the next MKL solve by up to 2× when
    the two were mixed (d = 1024: 141 vs 58 ms).
    """
    out: dict[int, dict[str, float]] = {}
    for dim in sizes:
        kinds, per_call = solvers(dim, device)
        extra = 0 if dim >= 1024 else 2 * rounds  # small sizes are cheap: more rounds
        row: dict[str, float] = {}
        for group in (False, True):
            chosen = {name: fn for name, fn in kinds.items() if name.startswith("scipy") == group}
            row.update(medians(interleave(chosen, rounds + extra, device)))
        out[dim] = {name: row[name] / per_call[name] for name in kinds}
    return out


def model_analysis(name: str, conv_mode: ConvMode, rounds: int, device: torch.device) -> dict[str, float]:
    """Every moment of one model: solved one by one, batched by size, and fully analysed (ms)."""
    load = workload(name, device)
    capture = LayerCapture(find_layers(load.net, conv_mode=conv_mode))
    capture.attach()
    capture.active = True
    torch.nn.functional.cross_entropy(load.net(load.x), load.y).backward()
    capture.detach()
    moments = capture.moments()
    matrices = [m for w in moments.values() for m in (w.input_second_moment, w.grad_second_moment)]
    groups: dict[int, list[torch.Tensor]] = defaultdict(list)
    for matrix in matrices:
        assert matrix is not None
        groups[matrix.shape[0]].append(matrix)
    stacks = [torch.stack(group) for group in groups.values()]

    def one_by_one() -> None:
        for matrix in matrices:
            torch.linalg.eigvalsh(matrix)

    def batched() -> None:
        for stack in stacks:
            torch.linalg.eigvalsh(stack)

    def package() -> None:
        for layer, window in moments.items():
            analyse_layer(layer, 0, window).metrics()

    kinds: dict[str, Kind] = {"one by one": one_by_one, "batched by size": batched, "analyse_layer": package}
    med = medians(interleave(kinds, rounds, torch.device("cpu")))
    return {"solves": len(matrices), "sizes": len(groups), **{k: 1e3 * v for k, v in med.items()}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    device = pick_device()
    result: dict[str, Any] = {
        "by_size_ms": {
            d: {k: 1e3 * v for k, v in row.items()}
            for d, row in by_size(tuple(args.sizes), args.rounds, device).items()
        },
        "resnet56_channel_ms": model_analysis("resnet56", "channel", 3 * args.rounds, device),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

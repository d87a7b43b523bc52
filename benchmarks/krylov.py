"""The approximate solver (``lightning_conditioning.maths.krylov.LanczosSolver``) against dense float64.

One command (about 5-8 minutes on the 2-core CPU with the defaults)::

    python benchmarks/krylov.py [--sizes 1024 2048 4096] [--rounds 3] [--seeds 40]
                                [--dim 1024] [--large-dim 4096] [--large-seeds 5]
                                [--threads N] [--solver-threads N] [--json out.json]

Three sections:

``time``      seconds per solve, ``torch.linalg.eigvalsh`` (what ``DenseSolver`` calls) and
              ``LanczosSolver()`` (defaults) on the same matrix (Wishart of ``d/8`` rows plus
              ``0.01·I``: full rank, a bulk and an atom), interleaved per round
              in a seeded random order (drift of a shared machine hits both alike); medians
              and their ratio.
``coverage``  ``--seeds`` trials per spectrum at ``--dim`` (a fresh random eigenbasis or rows
              and a fresh solver seed per trial): λmax's relative error and whether the dense
              λmax lies in ``[lower[0], upper[0]]``; for p in 50, 80, 90, 99 whether the dense
              ``λ_{⌈p·d/100⌉}`` (paper definition, zeros included) lies in ``quantile(k)``'s
              ``[low, high]``, and for p = 100 the smallest nonzero eigenvalue in
              ``smallest_nonzero()``'s; how often the interval is resolved (``low > 0`` or an
              exact zero), its median ``high/low`` and the estimate's median relative error.
              Spectra with an atom (rank-deficient, clusters) also check the indices next to it.
``large``     the same at ``--large-dim`` (one matrix per spectrum, ``--large-seeds`` solver
              seeds).

Eigenvalues under the resolution floor (``floor_rtol(dim=d)·λmax``) count as zeros, as in the
package's dense path.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_conditioning.maths.krylov import LanczosSolver
from lightning_conditioning.maths.resolution import floor_rtol

PERCENTS = (50, 80, 90, 99, 100)
SPECTRA = ("power", "power2", "flat", "outliers", "clusters", "rank_gauss", "rank_decay")


def orthogonal(dim: int, generator: torch.Generator) -> Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed)."""
    q, r = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=generator))
    return q * r.diagonal().sign()


def make_matrix(kind: str, dim: int, generator: torch.Generator) -> Tensor:
    """A symmetric PSD test matrix of one of the :data:`SPECTRA` kinds.

    power / power2: ``λ_i = i^-1`` / ``i^-2``; flat: uniform in ``[1, 2]``; outliers: a bulk
    uniform in ``[0.5, 1]`` and ``100, 100, 50, 20, 10`` (a repeated one); clusters: ``4, 3, 2,
    1`` with ``d/4`` copies each; rank_gauss: ``RᵀR/n`` of ``n = d/4`` Gaussian rows (rank
    ``d/4``, nonzero spectrum well away from 0); rank_decay: the same with column scales
    ``j^-1/2`` (nonzero spectrum decaying towards 0).
    """
    if kind.startswith("rank"):
        rows = torch.randn(dim // 4, dim, dtype=torch.float64, generator=generator)
        if kind == "rank_decay":
            rows = rows * torch.arange(1, dim + 1, dtype=torch.float64) ** -0.5
        return rows.T @ rows / rows.shape[0]
    index = torch.arange(1, dim + 1, dtype=torch.float64)
    if kind == "power":
        values = index**-1.0
    elif kind == "power2":
        values = index**-2.0
    elif kind == "flat":
        values = 1.0 + torch.rand(dim, dtype=torch.float64, generator=generator)
    elif kind == "outliers":
        values = 0.5 + 0.5 * torch.rand(dim, dtype=torch.float64, generator=generator)
        values[:5] = torch.tensor([100.0, 100.0, 50.0, 20.0, 10.0], dtype=torch.float64)
    elif kind == "clusters":
        values = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64).repeat_interleave(dim // 4)
    else:
        raise ValueError(f"unknown spectrum {kind!r}")
    basis = orthogonal(dim, generator)
    return (basis * values) @ basis.T


def dense_truth(matrix: Tensor) -> Tensor:
    """Dense float64 eigenvalues, descending, those under the resolution floor set to 0."""
    values = torch.linalg.eigvalsh(matrix).flip(0)
    floor = floor_rtol(dim=matrix.shape[0]) * float(values[0])
    return torch.where(values > floor, values, torch.zeros_like(values))


def boundary_indices(kind: str, dim: int) -> list[int]:
    """Indices next to an atom's edge (where the statistical part of the bar matters)."""
    if kind.startswith("rank"):
        rank = dim // 4
        return [rank - 5, rank - 1, rank, rank + 1, rank + 2, rank + 5, rank + 20]
    if kind == "clusters":
        return [j * dim // 4 + offset for j in (1, 2, 3) for offset in (-1, 0, 1)]
    return []


def check(solver: LanczosSolver, matrix: Tensor, truth: Tensor, kind: str) -> dict[str, Any]:
    """One trial: λmax error and bracket, and every κ_p's interval against the truth."""
    dim = int(truth.numel())
    solved = solver(matrix)
    quantile = solved.quantile
    assert quantile is not None and solved.lower is not None and solved.upper is not None
    result: dict[str, Any] = {
        "lmax_error": abs(float(solved.eigenvalues[0]) / float(truth[0]) - 1.0),
        "lmax_covered": float(solved.lower[0]) <= float(truth[0]) <= float(solved.upper[0]),
    }
    rank = int((truth > 0).sum())
    for percent in PERCENTS:
        if percent == 100:
            estimate, low, high = quantile.smallest_nonzero()  # type: ignore[attr-defined]
            value = float(truth[rank - 1])
        else:
            k = math.ceil(round(percent * dim / 100.0, 9))
            estimate, low, high = quantile(k)
            value = float(truth[k - 1])
        result[f"p{percent}"] = interval_record(estimate, low, high, value)
    result["boundary"] = [
        interval_record(*quantile(k), float(truth[k - 1]))["covered"] for k in boundary_indices(kind, dim)
    ]
    return result


def interval_record(estimate: float, low: float, high: float, value: float) -> dict[str, Any]:
    """Whether ``value`` lies in ``[low, high]``, whether the interval resolves it, its width
    ``high/low`` and the estimate's relative error."""
    resolved = low > 0 or high == 0
    return {
        "covered": low <= value <= high,
        "resolved": resolved,
        "width": high / low if low > 0 else (1.0 if high == 0 else math.inf),
        "error": abs(estimate / value - 1.0) if value > 0 else (0.0 if estimate == 0 else math.inf),
    }


def summarize(kind: str, trials: list[dict[str, Any]]) -> dict[str, Any]:
    """Coverage counts, medians and maxima over the trials of one spectrum."""
    count = len(trials)
    summary: dict[str, Any] = {
        "spectrum": kind,
        "trials": count,
        "lmax_error_max": max(t["lmax_error"] for t in trials),
        "lmax_covered": sum(t["lmax_covered"] for t in trials),
    }
    for percent in PERCENTS:
        records = [t[f"p{percent}"] for t in trials]
        summary[f"p{percent}"] = {
            "covered": sum(r["covered"] for r in records),
            "resolved": sum(r["resolved"] for r in records),
            "width_median": statistics.median(r["width"] for r in records),
            "error_median": statistics.median(r["error"] for r in records),
        }
    flags = [flag for t in trials for flag in t["boundary"]]
    summary["boundary"] = {"covered": sum(flags), "checked": len(flags)}
    return summary


def coverage(dim: int, seeds: int, fresh_matrix: bool, solver_options: dict[str, Any]) -> list[dict[str, Any]]:
    """Every spectrum, ``seeds`` trials each."""
    summaries = []
    for kind in SPECTRA:
        trials = []
        matrix = truth = None
        for seed in range(seeds):
            if fresh_matrix or matrix is None:
                matrix = make_matrix(kind, dim, torch.Generator().manual_seed(10_000 + seed))
                truth = dense_truth(matrix)
            assert truth is not None
            trials.append(check(LanczosSolver(seed=seed, **solver_options), matrix, truth, kind))
        summaries.append(summarize(kind, trials))
        print(format_summary(dim, summaries[-1]), flush=True)
    return summaries


def format_summary(dim: int, summary: dict[str, Any]) -> str:
    count = summary["trials"]
    cells = []
    for percent in PERCENTS:
        cell = summary[f"p{percent}"]
        width = cell["width_median"]
        cells.append(
            f"{cell['covered']}/{count} (res {cell['resolved']}, ×{width:.3g}, err {cell['error_median']:.2g})"
            if math.isfinite(width)
            else f"{cell['covered']}/{count} (res {cell['resolved']}, (0, x])"
        )
    boundary = summary["boundary"]
    edge = f"{boundary['covered']}/{boundary['checked']}" if boundary["checked"] else "-"
    return (
        f"| {dim} | {summary['spectrum']} | {summary['lmax_error_max']:.1e} | "
        f"{summary['lmax_covered']}/{count} | " + " | ".join(cells) + f" | {edge} |"
    )


def timing(sizes: list[int], rounds: int, solver_options: dict[str, Any]) -> list[dict[str, Any]]:
    """Median seconds of eigvalsh and LanczosSolver per size, interleaved per round."""
    rows = []
    for dim in sizes:
        generator = torch.Generator().manual_seed(dim)
        factor = torch.randn(dim, dim // 8, dtype=torch.float64, generator=generator)
        matrix = factor @ factor.T / (dim // 8) + 0.01 * torch.eye(dim, dtype=torch.float64)
        solver = LanczosSolver(**solver_options)
        kinds: dict[str, Callable[[], object]] = {
            "eigvalsh": lambda: torch.linalg.eigvalsh(matrix),
            "lanczos": lambda: solver(matrix),
        }
        times: dict[str, list[float]] = {name: [] for name in kinds}
        order = random.Random(dim)
        names = list(kinds)
        for index in range(rounds + 1):  # one warm-up round
            order.shuffle(names)
            for name in names:
                start = time.perf_counter()
                kinds[name]()
                if index:
                    times[name].append(time.perf_counter() - start)
        dense, approximate = (statistics.median(times[name]) for name in ("eigvalsh", "lanczos"))
        rows.append(
            {
                "dim": dim,
                "eigvalsh_s": dense,
                "lanczos_s": approximate,
                "ratio": dense / approximate,
                "eigvalsh_all": times["eigvalsh"],
                "lanczos_all": times["lanczos"],
            }
        )
        print(f"| {dim} | {dense:.3f} | {approximate:.3f} | {dense / approximate:.2f} |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[1024, 2048, 4096])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--large-dim", type=int, default=4096)
    parser.add_argument("--large-seeds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument(
        "--solver-threads", type=int, default=None, help="LanczosSolver(threads=...): its own thread count"
    )
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--probes", type=int, default=None)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    options = {
        name: value
        for name, value in (("steps", args.steps), ("probes", args.probes), ("threads", args.solver_threads))
        if value is not None
    }
    print(f"threads {torch.get_num_threads()}, solver {LanczosSolver(**options)!r}\n")
    results: dict[str, Any] = {"threads": torch.get_num_threads(), "options": options}
    if args.sizes:
        print("| d | eigvalsh s | LanczosSolver s | ratio |\n|---|---|---|---|")
        results["time"] = timing(args.sizes, args.rounds, options)
    header = (
        "\n| d | spectrum | λmax max rel. err | λmax in bounds | "
        + " | ".join(f"κ_{p}: covered (resolved, median high/low, est. err)" for p in PERCENTS)
        + " | next to atom |\n|"
        + "---|" * 10
    )
    if args.seeds:
        print(header)
        results["coverage"] = coverage(args.dim, args.seeds, True, options)
    if args.large_seeds and args.large_dim:
        print(header)
        results["large"] = coverage(args.large_dim, args.large_seeds, False, options)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()

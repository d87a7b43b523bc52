"""Overhead of ConditioningCallback on a ResNet-20-shaped CNN (CIFAR-sized random data).

Measures side by side in one process, interleaved step by step so that machine drift cancels
(whole-run interleaving was too coarse here: ±10% run-to-run noise):

1. Every round runs, on the same model and batch and in rotating order, a plain training step
   (no hooks), an idle step (hooks registered, capture off), an analysed step (capture on,
   then the callback's own analysis: moments, eigenvalues, κ_p, metrics), the bare covariance
   GEMMs of the same shapes (one ``XᵀX`` per layer input and output gradient, rows pre-laid
   out as contiguous float32 matrices) and the float64 ``eigvalsh`` of every moment.
   A schedule of one analysed step every n costs ``((n-1)·t_idle + t_analysed) / (n·t_plain)``.
2. Cross-check inside Lightning: whole ``Trainer.fit`` runs, plain vs the callback at
   ``every_n_steps=1``, interleaved.

Usage::

    python benchmarks/overhead.py [--depth 20] [--batch 128] [--rounds 25]
                                  [--conv-mode channel|patch] [--out results.json]

Medians. Absolute times on a shared CPU are noise; read the ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from harness import Classifier, StepTimer, capture_steps, clock, sgd
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_conditioning import ConditioningCallback
from lightning_conditioning.analysis.options import REGULAR_PERIOD
from lightning_conditioning.capture.hooks import LayerCapture, find_layers
from lightning_conditioning.models import cifar_resnet

DEFAULT_EVERY_N_STEPS = REGULAR_PERIOD  # the default schedule: every 100 steps after its early ones
CPU = torch.device("cpu")


def run(net: nn.Module, data: DataLoader, steps: int, callback: pl.Callback | None) -> tuple[list[float], float]:
    """Train ``steps`` steps; returns per-step times (first step dropped) and total fit time."""
    timer = StepTimer()
    callbacks = ([callback] if callback is not None else []) + [timer]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    start = time.perf_counter()
    trainer.fit(Classifier(copy.deepcopy(net)), data)
    return timer.times[1:], time.perf_counter() - start


def bare_floor(capture: LayerCapture) -> tuple[Callable[[], None], Callable[[], None]]:
    """Closures doing only the covariance GEMMs, and only the eigvalsh, of the captured shapes.

    Rows are pre-laid out as contiguous ``(rows, d)`` float32 matrices, one ``XᵀX`` per layer
    input and per output gradient: the arithmetic any implementation must do.
    """
    shapes = [(w.input.rows, w.input.dim, w.grad.rows, w.grad.dim) for w in capture.windows.values()]
    rows = [(torch.randn(ri, di), torch.randn(rg, dg)) for ri, di, rg, dg in shapes]
    moments = [(torch.eye(di, dtype=torch.float64), torch.eye(dg, dtype=torch.float64)) for _, di, _, dg in shapes]

    def gemms() -> None:
        for x_rows, g_rows in rows:
            x_rows.T @ x_rows
            g_rows.T @ g_rows

    def eigens() -> None:
        for a, b in moments:
            torch.linalg.eigvalsh(a)
            torch.linalg.eigvalsh(b)

    return gemms, eigens


def step_interleaved(depth: int, batch: int, conv_mode: str, rounds: int) -> dict[str, list[float]]:
    """Per round, one step of each kind on the same model, in rotating order:

    ``plain`` (no hooks), ``idle`` (hooks registered, capture off), ``analysed`` (capture on,
    then the callback's own analysis of the window: moments, eigenvalues, κ_p, metrics), and
    the bare GEMMs / eigvalsh of the same shapes.
    """
    torch.manual_seed(0)
    net = cifar_resnet(depth)
    optimizer = sgd(net)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    capture = LayerCapture(find_layers(net, conv_mode=conv_mode))  # type: ignore[arg-type]
    steps = capture_steps(capture, net, optimizer, x, y)
    steps["gathered"]()  # one captured step to learn the shapes for the floor
    gemms, eigens = bare_floor(capture)
    capture.reset()
    kinds: dict[str, Callable[[], Any]] = {
        "plain": steps["plain"],
        "idle": steps["idle"],
        "analysed": steps["analysed"],
        "gemms": gemms,
        "eigvalsh": eigens,
    }
    for fn in kinds.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in kinds}
    names = list(kinds)
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(clock(kinds[name], CPU))
    capture.detach()
    return times


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=25, help="step-interleaved rounds")
    parser.add_argument("--fit-steps", type=int, default=10, help="steps per whole-fit run")
    parser.add_argument("--fit-repeats", type=int, default=3, help="whole-fit repetitions")
    parser.add_argument("--conv-mode", default="channel", choices=["channel", "patch"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    times = step_interleaved(args.depth, args.batch, args.conv_mode, args.rounds)
    med = {k: statistics.median(v) for k, v in times.items()}
    plain, idle, analysed = med["plain"], med["idle"], med["analysed"]

    def schedule_ratio(every: int) -> float:
        return ((every - 1) * idle + analysed) / (every * plain)

    # cross-check inside Lightning: whole fits, plain vs every step, interleaved
    torch.manual_seed(0)
    net = cifar_resnet(args.depth)
    n = args.batch * args.fit_steps
    data = DataLoader(TensorDataset(torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))), batch_size=args.batch)
    fits: dict[str, list[float]] = {"plain": [], "every_step": []}
    makers: dict[str, Callable[[], pl.Callback | None]] = {
        "plain": lambda: None,
        "every_step": lambda: ConditioningCallback(every_n_steps=1, conv_mode=args.conv_mode),
    }
    for repeat in range(args.fit_repeats + 1):
        for name in list(makers) if repeat % 2 else list(reversed(makers)):
            _, total = run(net, data, args.fit_steps, makers[name]())
            if repeat:  # the first repetition is warm-up
                fits[name].append(total)

    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "model": f"cifar_resnet({args.depth}), batch {args.batch}, conv_mode={args.conv_mode}",
        "rounds": args.rounds,
        "median_ms": {k: 1e3 * v for k, v in med.items()},
        "ratios": {
            f"default schedule (every {DEFAULT_EVERY_N_STEPS})": schedule_ratio(DEFAULT_EVERY_N_STEPS),
            "every 16 steps": schedule_ratio(16),
            "every step": analysed / plain,
            "idle hooks": idle / plain,
            "analysed / (plain + gemms)": analysed / (plain + med["gemms"]),
            "analysed / (plain + gemms + eigvalsh)": analysed / (plain + med["gemms"] + med["eigvalsh"]),
            "whole fit, every step / plain (Lightning)": statistics.median(fits["every_step"])
            / statistics.median(fits["plain"]),
        },
    }
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()

"""ConditioningCallback (+ WeightDominationCallback) overhead by schedule, step-interleaved.

A section of ``python benchmarks/perf.py``; alone::

    python benchmarks/schedule.py [--workload resnet20] [--conv-mode channel] [--rounds 7]

Per round, on the same model and batch, in a random order (see ``harness.py``):

``plain``      a training step, no hooks;
``idle``       hooks registered, capture off (a step the schedule skips);
``gathered``   capture on: Grams of every layer input and output gradient summed into the
               float64 window (a non-final step of a ``window_steps`` window);
``analysed``   ``gathered`` + the callback's analysis of the window (moments, float64
               eigenvalues, κ_p, Kronecker statistics, metric dict), as in
               ``analyse_capture`` (the monitor's analysis) without loggers;
``analysis``   that analysis alone, of a window filled once;
``wd``         WeightDominationCallback's work at a checked step (float64 spectral and
               Frobenius norms of every weight, gradient and applied update, weight snapshot);
``gemms``      the bare Gram GEMMs of the captured shapes (one ``XᵀX`` per layer input and
               output gradient, rows pre-laid out as contiguous float32 ``(rows, d)``);
``eigvalsh``   float64 ``torch.linalg.eigvalsh`` (CPU) of a random PSD matrix of every shape.

Both callbacks analysing one step in n cost ``((n-1)·skipped + analysed + wd) / (n·plain)``
with ``skipped = plain + hook``, ``hook`` the separately measured cost of the inactive hooks
(the measured ``idle`` step is a noisier estimate of the same; both are reported);
``window_steps=n, every_n_steps=n`` costs ``((n-1)·gathered + analysed + wd) / (n·plain)``.
A cross-check runs the real callbacks inside ``Trainer.fit`` (``lightning_check``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from typing import Any

import lightning.pytorch as pl
import torch
from harness import (
    Classifier,
    Kind,
    StepTimer,
    analyse,
    capture_steps,
    interleave,
    medians,
    pick_device,
    random_psd,
    sgd,
    train_step,
    workload,
)
from torch import nn

from lightning_conditioning import ConditioningCallback, WeightDominationCallback
from lightning_conditioning.analysis.options import REGULAR_PERIOD
from lightning_conditioning.capture.adapters import ConvMode
from lightning_conditioning.capture.hooks import LayerCapture, find_layers, select_layers
from lightning_conditioning.maths.domination import frobenius_norm, weight_statistics

DEFAULT_EVERY = REGULAR_PERIOD  # the default schedule: every 100 steps after its early ones (0, 1, 2, …, 64)


def weight_domination_work(net: nn.Module, lr: float = 0.01) -> Kind:
    """WeightDominationCallback's work at one checked step, on the current weights and grads.

    ``on_before_optimizer_step``: σmax and ‖·‖_F of weight and gradient (float64, CPU) and a
    weight snapshot; ``on_train_batch_end``: σmax of the applied update (here ``-lr·grad``)
    and the Frobenius norms of the imbalance.
    """
    weights = [m.weight for m in select_layers(net).values() if isinstance(m.weight, nn.Parameter)]

    def run() -> None:
        stats, snapshots = [], []
        for weight in weights:
            if weight.grad is None:
                continue
            stats.append(weight_statistics(weight, weight.grad))
            snapshots.append((weight.detach().clone(), weight.grad))
        for index, (before, grad) in enumerate(snapshots):
            after = before - lr * grad  # the update SGD would apply
            stats[index] = stats[index].with_update(after - before)
        for weight in weights:
            frobenius_norm(weight)

    return run


def bare_floor(capture: LayerCapture, device: torch.device) -> tuple[Kind, Kind]:
    """Closures doing only the Gram GEMMs, and only the float64 eigvalsh, of the captured shapes.

    One ``XᵀX`` per layer input and output gradient on contiguous float32 ``(rows, d)``
    matrices (one buffer per distinct shape), and ``eigvalsh`` of a random PSD matrix of every
    moment's size on the CPU: the arithmetic any implementation of the analysis must do.
    """
    shapes = [(w.input.rows, w.input.dim) for w in capture.windows.values()]
    shapes += [(w.grad.rows, w.grad.dim) for w in capture.windows.values()]
    buffers = {shape: torch.randn(*shape, device=device) for shape in set(shapes)}
    rows = [buffers[shape] for shape in shapes]
    moments = [random_psd(dim) for _, dim in shapes]

    def gemms() -> None:
        for matrix in rows:
            matrix.T @ matrix

    def eigens() -> None:
        for moment in moments:
            torch.linalg.eigvalsh(moment)

    return gemms, eigens


def step_kinds(name: str, conv_mode: ConvMode, device: torch.device) -> tuple[dict[str, Kind], LayerCapture]:
    """The step kinds of the module docstring for one workload, sharing model and batch."""
    load = workload(name, device)
    net, x, y = load.net, load.x, load.y
    optimizer = sgd(net)
    capture = LayerCapture(find_layers(net, conv_mode=conv_mode))

    # a second capture, filled once, for the analysis alone (and the shapes of the floor)
    filled = LayerCapture(find_layers(net, conv_mode=conv_mode))
    filled.attach()
    filled.active = True
    train_step(net, optimizer, x, y)
    filled.detach()
    gemms, eigens = bare_floor(filled, device)
    kinds: dict[str, Kind] = {
        **capture_steps(capture, net, optimizer, x, y),
        "analysis": lambda: analyse(filled),
        "wd": weight_domination_work(net),
        "gemms": gemms,
        "eigvalsh": eigens,
    }
    return kinds, capture


def inactive_hook_seconds(device: torch.device, calls: int = 4000, rounds: int = 9) -> float:
    """Seconds one registered but inactive capture hook adds to one layer call.

    20 tiny ``Linear(1, 1)`` layers called ``calls`` times in all, with the capture attached
    (inactive) and detached, interleaved: the hook's cost without the noise of a whole step.
    """
    layers = nn.Sequential(*[nn.Linear(1, 1) for _ in range(20)]).to(device)
    x = torch.zeros(1, 1, device=device)
    capture = LayerCapture(find_layers(layers))

    def run(attached: bool) -> Kind:
        def go() -> None:
            capture.attach() if attached else capture.detach()
            with torch.no_grad():
                for _ in range(calls // 20):
                    layers(x)

        return go

    med = medians(interleave({"without": run(False), "with": run(True)}, rounds, device))
    capture.detach()
    return max(0.0, (med["with"] - med["without"]) / calls)


def schedule_ratios(med: dict[str, float]) -> dict[str, float]:
    """Time ratios vs plain training of every schedule, from the medians (any one unit).

    A step the schedule skips costs ``skipped = plain + hook``, the plain step plus the
    separately measured cost of the inactive hooks (``hook``: calls per step × cost per call,
    a few µs): the measured ``idle`` step carries the ±5% noise of a whole step, which at
    every 100 steps outweighs the analysed step itself. The ``measured idle`` variants use it.
    """
    plain, idle, gathered = med["plain"], med["idle"], med["gathered"]
    analysed, wd = med["analysed"], med["wd"]
    skipped = plain + med.get("hook", 0.0)

    def every(n: int, between: float, extra: float = wd) -> float:
        return ((n - 1) * between + analysed + extra) / (n * plain)

    return {
        "every step": (analysed + wd) / plain,
        "every 16": every(16, skipped),
        f"default (every {DEFAULT_EVERY})": every(DEFAULT_EVERY, skipped),
        "window 16 (Grams every step, eigen every 16)": every(16, gathered),
        "every 16, measured idle": every(16, idle),
        f"default (every {DEFAULT_EVERY}), measured idle": every(DEFAULT_EVERY, idle),
        "conditioning only, every step": analysed / plain,
        "conditioning only, every 16": every(16, skipped, 0.0),
        f"conditioning only, default (every {DEFAULT_EVERY})": every(DEFAULT_EVERY, skipped, 0.0),
        "conditioning only, window 16": every(16, gathered, 0.0),
        "weight domination only, every step": (plain + wd) / plain,
        "idle / plain (noise)": idle / plain,
        "hook / plain": med.get("hook", 0.0) / plain,
        "gathered / plain": gathered / plain,
        "analysed / (plain + gemms + eigvalsh)": analysed / (plain + med["gemms"] + med["eigvalsh"]),
        "gathered / (plain + gemms)": gathered / (plain + med["gemms"]),
        "gemms / plain (floor - 1)": med["gemms"] / plain,
    }


def measure(name: str, conv_mode: ConvMode, rounds: int, device: torch.device) -> dict[str, Any]:
    """Step-interleaved medians and schedule ratios of one workload."""
    kinds, capture = step_kinds(name, conv_mode, device)
    times = interleave(kinds, rounds, device)
    capture.detach()
    med = medians(times)
    layers = len(capture.windows)
    med["hook"] = layers * inactive_hook_seconds(device)  # each layer is called once per step
    dims = sorted({w.input.dim for w in capture.windows.values()} | {w.grad.dim for w in capture.windows.values()})
    return {
        "workload": name,
        "conv_mode": conv_mode if name != "mlp" else "-",
        "layers": layers,
        "moment_dims": dims,
        "rounds": rounds,
        "median_ms": {k: 1e3 * v for k, v in med.items()},
        "ratios": schedule_ratios(med),
    }


def lightning_check(
    name: str, conv_mode: ConvMode, rounds: int, device: torch.device, tensorboard: bool = False
) -> dict[str, float]:
    """The real callbacks inside ``Trainer.fit``, step-interleaved within one fit.

    Both callbacks at ``every_n_steps=2``: even steps are analysed, odd steps idle (hooks
    registered, capture off), so ``median(analysed) / median(idle)`` compares like with like
    under the same drift. With ``tensorboard`` the analysed steps also write everything the
    TensorBoard sink writes (scalars, histograms, depth-profile figure, spectra file).
    """
    load = workload(name, device)
    batches = [(load.x.cpu(), load.y.cpu())] * (2 * rounds + 2)
    timer = StepTimer(device)
    callbacks: list[pl.Callback] = [
        ConditioningCallback(every_n_steps=2, conv_mode=conv_mode),
        WeightDominationCallback(every_n_steps=2),
        timer,
    ]
    with tempfile.TemporaryDirectory() as root:
        logger: Any = pl.loggers.TensorBoardLogger(root) if tensorboard else False
        trainer = pl.Trainer(
            accelerator=device.type,
            devices=1,
            max_steps=len(batches),
            callbacks=callbacks,
            logger=logger,
            log_every_n_steps=1,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            default_root_dir=root,
        )
        trainer.fit(Classifier(load.net), torch.utils.data.DataLoader(batches, batch_size=None))  # type: ignore[arg-type]
    times = timer.times[2:]  # the first pair is warm-up
    analysed, idle = statistics.median(times[0::2]), statistics.median(times[1::2])
    return {"analysed_ms": 1e3 * analysed, "idle_ms": 1e3 * idle, "analysed / idle": analysed / idle}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="resnet20", help="mlp | resnet20 | resnet56 | ...")
    parser.add_argument("--conv-mode", default="channel", choices=["channel", "patch"])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    device = pick_device()
    result = measure(args.workload, args.conv_mode, args.rounds, device)
    result["lightning"] = lightning_check(args.workload, args.conv_mode, args.rounds, device)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

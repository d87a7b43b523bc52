"""Cost of ``statistics_dtype="float64"`` against ``"float32"`` Gram GEMMs (issue #12), one run.

A section of ``python benchmarks/perf.py``; alone::

    python benchmarks/precision.py [--threads 2] [--rounds 31] [--mlp-rounds 61] [--workloads mlp resnet20]

Per workload (the 784-256×4-10 MLP at batch 256; ResNet-20 at batch 128, channel mode), one
model, batch and optimizer, and per round in a fresh random order (``harness.interleave``):

``plain``            a training step, no hooks;
``idle``             hooks registered, capture off (a step the schedule skips);
``gathered <dtype>`` capture on with ``LayerCapture(statistics_dtype=<dtype>)``, no analysis;
``analysed <dtype>`` ``gathered <dtype>`` + the callback's analysis and the window's reset;
``gemms <dtype>``    the bare Gram GEMMs of the captured shapes in that dtype.

Every kind first removes the hooks of the other dtype's capture, so each step carries only its
own. ConditioningCallback alone (no WeightDominationCallback), one step analysed in n:
``((n-1)·(plain + hook) + analysed) / (n·plain)`` (``schedule.schedule_ratios``' convention;
``hook`` = the inactive hooks, measured apart). The sums are float64 in both dtypes; only the
GEMMs change. A cross-check runs the real callback at ``every_n_steps=2`` inside
``Trainer.fit`` per dtype (``StepTimer``; analysed / idle step).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import warnings
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import schedule  # noqa: E402
from harness import (  # noqa: E402
    Classifier,
    ForeignLoad,
    Kind,
    StepTimer,
    capture_steps,
    interleave,
    medians,
    pick_device,
    sgd,
    table,
    train_step,
    workload,
)

from lightning_conditioning import ConditioningCallback  # noqa: E402
from lightning_conditioning.capture.hooks import LayerCapture, find_layers  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64}
SCHEDULES = ("every step", "every 16", f"default (every {schedule.DEFAULT_EVERY})")
LABELS = {"mlp": "MLP 784-256×4-10, batch 256", "resnet20": "ResNet-20, batch 128, channel"}


def kinds_for(name: str, device: torch.device) -> tuple[dict[str, Kind], dict[str, LayerCapture]]:
    """The kinds of the module docstring, sharing one model, batch and optimizer."""
    load = workload(name, device)
    net, x, y = load.net, load.x, load.y
    optimizer = sgd(net)
    captures = {d: LayerCapture(find_layers(net, conv_mode="channel"), statistics_dtype=t) for d, t in DTYPES.items()}
    kinds: dict[str, Kind] = {}
    for dtype, capture in captures.items():
        others = [c for d, c in captures.items() if d != dtype]

        def alone(fn: Kind, others: list[LayerCapture] = others) -> Kind:
            def run() -> None:
                for other in others:
                    other.detach()
                fn()

            return run

        steps = capture_steps(capture, net, optimizer, x, y)
        if dtype == "float32":  # plain and idle do not depend on the dtype: once
            kinds["plain"], kinds["idle"] = alone(steps["plain"]), alone(steps["idle"])
        kinds[f"gathered {dtype}"] = alone(steps["gathered"])
        kinds[f"analysed {dtype}"] = alone(steps["analysed"])
    # the captured shapes, from one step; the bare GEMMs of those shapes in either dtype
    probe = LayerCapture(find_layers(net, conv_mode="channel"))
    probe.attach()
    probe.active = True
    train_step(net, optimizer, x, y)
    probe.detach()
    shapes = [(w.input.rows, w.input.dim) for w in probe.windows.values()]
    shapes += [(w.grad.rows, w.grad.dim) for w in probe.windows.values()]
    for dtype, torch_dtype in DTYPES.items():
        buffers = {s: torch.randn(*s, device=device, dtype=torch_dtype) for s in set(shapes)}

        def gemms(rows: list[torch.Tensor] = [buffers[s] for s in shapes]) -> None:
            for matrix in rows:
                matrix.T @ matrix

        kinds[f"gemms {dtype}"] = gemms
    return kinds, captures


def ratios(med: dict[str, float], dtype: str) -> dict[str, float]:
    """Schedule ratios of ConditioningCallback alone at one dtype, from the medians."""
    q = schedule.schedule_ratios(
        {
            **med,
            "gathered": med[f"gathered {dtype}"],
            "analysed": med[f"analysed {dtype}"],
            "wd": 0.0,
            "gemms": med[f"gemms {dtype}"],
            "eigvalsh": 0.0,
        }
    )
    out = {s: q[f"conditioning only, {s}"] for s in SCHEDULES}
    out["gathered / plain"] = q["gathered / plain"]
    out["gemms / plain"] = q["gemms / plain (floor - 1)"]
    return out


def lightning_check(name: str, dtype: str, rounds: int, device: torch.device) -> float:
    """The real ConditioningCallback at ``every_n_steps=2`` in one fit: median analysed / idle step."""
    load = workload(name, device)
    batches = [(load.x.cpu(), load.y.cpu())] * (2 * rounds + 2)
    timer = StepTimer(device)
    callback = ConditioningCallback(every_n_steps=2, statistics_dtype=dtype)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator=device.type,
            devices=1,
            max_steps=len(batches),
            callbacks=[callback, timer],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            default_root_dir=root,
        )
        trainer.fit(Classifier(load.net), torch.utils.data.DataLoader(batches, batch_size=None))  # type: ignore[arg-type]
    times = timer.times[2:]  # the first pair is warm-up
    return statistics.median(times[0::2]) / statistics.median(times[1::2])


def measure(name: str, rounds: int, device: torch.device, fit_rounds: int = 9) -> dict[str, Any]:
    with ForeignLoad() as foreign:  # CPU share other processes took meanwhile
        kinds, captures = kinds_for(name, device)
        times = interleave(kinds, rounds, device)
        for capture in captures.values():
            capture.detach()
        med = medians(times)
        med["hook"] = len(captures["float32"].windows) * schedule.inactive_hook_seconds(device)
        fit = {d: lightning_check(name, d, fit_rounds, device) for d in DTYPES}
    by_dtype = {d: ratios(med, d) for d in DTYPES}
    return {
        "workload": name,
        "conv_mode": "-" if name == "mlp" else "channel",
        "rounds": rounds,
        "foreign_cpu_share": foreign.share,
        "median_ms": {k: 1e3 * v for k, v in med.items()},
        "ratios": by_dtype,
        "float64 / float32": {k: by_dtype["float64"][k] / by_dtype["float32"][k] for k in by_dtype["float32"]},
        "fit, analysed / idle": fit,
    }


def render(results: list[dict[str, Any]]) -> str:
    """Model × schedule × dtype ratios vs plain training, and float64 / float32."""
    head = ["configuration (ConditioningCallback alone)", "schedule", "float32", "float64", "float64 / float32"]
    rows = [
        [
            LABELS.get(r["workload"], r["workload"]),
            s,
            f"{r['ratios']['float32'][s]:.2f}×",
            f"{r['ratios']['float64'][s]:.2f}×",
            f"{r['float64 / float32'][s]:.3f}",
        ]
        for r in results
        for s in (*SCHEDULES, "gathered / plain", "gemms / plain")
    ]
    rows += [
        [
            LABELS.get(r["workload"], r["workload"]),
            "Trainer.fit every 2: analysed / idle",
            f"{r['fit, analysed / idle']['float32']:.2f}×",
            f"{r['fit, analysed / idle']['float64']:.2f}×",
            f"{r['fit, analysed / idle']['float64'] / r['fit, analysed / idle']['float32']:.3f}",
        ]
        for r in results
    ]
    plain = ", ".join(
        f"{r['workload']} plain {r['median_ms']['plain']:.1f} ms ({r['rounds']} rounds, other processes "
        f"took {100 * (r.get('foreign_cpu_share') or 0):.0f}% of the CPU)"
        for r in results
    )
    return table(head, rows) + f"\n\nMedians for scale only: {plain}."


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["mlp", "resnet20"], choices=list(LABELS))
    parser.add_argument("--rounds", type=int, default=31, help="interleaved rounds, ResNet-20")
    parser.add_argument("--mlp-rounds", type=int, default=61, help="interleaved rounds, MLP (4 ms steps)")
    parser.add_argument("--fit-rounds", type=int, default=15, help="analysed/idle pairs of the Trainer.fit check")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    device = pick_device()
    results = [
        measure(n, args.mlp_rounds if n == "mlp" else args.rounds, device, args.fit_rounds) for n in args.workloads
    ]
    print(render(results))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"torch_threads": torch.get_num_threads(), "results": results}, handle, indent=2)
    return results


if __name__ == "__main__":
    main()

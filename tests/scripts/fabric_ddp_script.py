"""Standalone 2-process Lightning Fabric run (CPU, gloo) of ``ConditioningMonitor``.

    python tests/scripts/fabric_ddp_script.py OUT.json [ddp|ddp_spawn]

A float64 MLP trains a few SGD steps; at each step rank 0 and rank 1 get a different, uneven
number of rows (:data:`SIZES`). Rank 0 writes every analysed step (each logged scalar and the
full spectra of Σx and Σ∇h) and the trained parameters to ``OUT.json``; rank 1 writes the
same from its side to ``OUT.json.rank1`` (every rank must end with all results).
``tests/integrations/test_fabric.py`` compares them with one process over the union of the rows.
Importable without side effects: the test reuses the model, the data and the record format.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_conditioning.analysis.results import LayerConditioning
from lightning_conditioning.distributed.collectives import Collectives
from lightning_conditioning.monitors.conditioning import ConditioningMonitor

#: rows of rank 0 and rank 1 at each step: uneven, and a different split every step
SIZES = ((10, 6), (5, 11), (13, 3))
LR = 0.1
OPTIONS: dict[str, Any] = {"every_n_steps": 1, "statistics_dtype": "float64"}


def make_model() -> nn.Sequential:
    """The same float64 12-16-5 MLP on every call (float64: the per-row arithmetic does not
    depend on how rows are split over processes)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5)).double()


def step_data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The union of both ranks' rows at ``step``. Feature 0 is > 0 on every row (a full unit),
    feature 1 never (a dead unit), feature 2 only on rank 0's rows: dead on rank 1 and full on
    rank 0 locally, neither over both (the per-unit extremes are combined with a "max")."""
    generator = torch.Generator().manual_seed(100 + step)
    n = sum(SIZES[step])
    x = torch.randn(n, 12, generator=generator, dtype=torch.float64)
    x[:, 0] = x[:, 0].abs() + 0.1
    x[:, 1] = -x[:, 1].abs()
    x[:, 2] = x[:, 2].abs() + 0.1
    x[rank_rows(step, 1), 2] *= -1
    return x, torch.randint(0, 5, (n,), generator=generator)


def rank_rows(step: int, rank: int) -> slice:
    """Which rows of :func:`step_data` rank ``rank`` trains on at ``step``."""
    start = sum(SIZES[step][:rank])
    return slice(start, start + SIZES[step][rank])


def record(step: int, results: dict[str, LayerConditioning]) -> dict[str, Any]:
    """One analysed step: every logged scalar and the full eigenvalues of Σx and Σ∇h."""
    metrics: dict[str, float] = {}
    eigenvalues: dict[str, dict[str, list[float]]] = {}
    for name, result in results.items():
        metrics.update(result.metrics())
        eigenvalues[name] = {
            label: summary.eigenvalues.tolist()
            for label, summary in (("input", result.input), ("grad", result.grad))
            if summary is not None
        }
    return {"step": step, "metrics": metrics, "eigenvalues": eigenvalues}


def probe_collectives(group: Collectives) -> dict[str, list[float]]:
    """``reduce`` on rank-dependent values: what "sum" and "max" give, and what the caller's
    tensor holds afterwards (Fabric reduces in place)."""
    out: dict[str, list[float]] = {}
    for op in ("sum", "max"):
        value = float(group.rank + 1)
        tensor = torch.tensor([value, -value], dtype=torch.float64)
        out[op] = group.reduce(tensor, op).tolist()
        out[f"{op}_input_after"] = tensor.tolist()
    return out


def train(fabric: Any, out: str) -> None:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    fabric_model, optimizer = fabric.setup(model, optimizer)
    # the hooks go on the user's module (the one Fabric wraps; its forward is what runs),
    # registered after setup so they sit on the module's final device
    group = Collectives.fabric(fabric)
    monitor = ConditioningMonitor(fabric_model.module, collectives=group, **OPTIONS)
    records = []
    for step in range(len(SIZES)):
        x, y = step_data(step)
        rows = rank_rows(step, fabric.global_rank)
        with monitor.track(step):
            loss = nn.functional.cross_entropy(fabric_model(x[rows]), y[rows])
            fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if monitor.updated:
            records.append(record(step, monitor.results))
    monitor.close()
    payload = {
        "world_size": fabric.world_size,
        "strategy": type(fabric.strategy).__name__,
        "steps": records,
        "collectives": probe_collectives(group),
        "params": {name: p.detach().reshape(-1).tolist() for name, p in model.named_parameters()},
    }
    path = Path(out) if fabric.global_rank == 0 else Path(f"{out}.rank{fabric.global_rank}")
    path.write_text(json.dumps(payload))
    # a process group left to the interpreter's exit once aborted a rank in CI ("terminate
    # called without an active exception", exit -6): end it here, both ranks together
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main(out: str, strategy: str = "ddp") -> None:
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy)
    fabric.launch(train, out)


if __name__ == "__main__":
    main(*sys.argv[1:])

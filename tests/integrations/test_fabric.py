"""``ConditioningMonitor`` under Lightning Fabric: one process in-process, two (CPU DDP, gloo)
through ``scripts/fabric_ddp_script.py`` run as a subprocess (Fabric's ``ddp`` launcher re-runs the
script for rank 1; under pytest it would re-launch pytest)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import REPOSITORY, SCRIPTS
from scripts.fabric_ddp_script import LR, OPTIONS, SIZES, make_model, rank_rows, record, step_data
from torch import nn

from lightning_conditioning.distributed.collectives import Collectives
from lightning_conditioning.monitors.conditioning import ConditioningMonitor

SCRIPT = SCRIPTS / "fabric_ddp_script.py"
WORLD = len(SIZES[0])


def _params(model: nn.Module) -> dict[str, list[float]]:
    return {name: p.detach().reshape(-1).tolist() for name, p in model.named_parameters()}


# ---------------------------------------------------------------------- one-process references
def reference_union() -> dict[str, Any]:
    """One process, each step's batch the union of both ranks' rows.

    The moments need every output-gradient row to be the per-example gradient ∇ℓ_i: a summed
    loss with ``loss_reduction="sum"``. DDP's update is the mean over ranks of per-rank mean
    losses, ``Σ_i ∇ℓ_i / (world · n_rank(i))``: weights that differ between ranks with uneven
    batches, so no single weighted loss gives both (its output-gradient rows would carry the
    weights). The update therefore comes from a second, untracked backward of the weighted loss.
    """
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    monitor = ConditioningMonitor(model, collectives=None, **{**OPTIONS, "loss_reduction": "sum"})
    records = []
    for step, sizes in enumerate(SIZES):
        x, y = step_data(step)
        with monitor.track(step):
            nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        optimizer.zero_grad()
        weights = torch.cat([torch.full((n,), 1.0 / (WORLD * n), dtype=torch.float64) for n in sizes])
        (weights * nn.functional.cross_entropy(model(x), y, reduction="none")).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        assert monitor.updated
        records.append(record(step, monitor.results))
    monitor.close()
    return {"steps": records, "params": _params(model)}


def reference_micro_batches() -> dict[str, Any]:
    """One process, each rank's rows as a micro-batch of one step: the batch-mean loss divided
    by the number of micro-batches (the update is DDP's), ``grad_multiplier`` = that number
    (with ``loss_reduction="mean"`` every row is then ∇ℓ_i again)."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    monitor = ConditioningMonitor(model, collectives=None, **OPTIONS)
    records = []
    for step in range(len(SIZES)):
        x, y = step_data(step)
        for rank in range(WORLD):
            rows = rank_rows(step, rank)
            with monitor.track(step, grad_multiplier=WORLD, last_micro_batch=rank == WORLD - 1):
                (nn.functional.cross_entropy(model(x[rows]), y[rows]) / WORLD).backward()
        optimizer.step()
        optimizer.zero_grad()
        assert monitor.updated
        records.append(record(step, monitor.results))
    monitor.close()
    return {"steps": records, "params": _params(model)}


def _assert_same(actual: dict[str, Any], expected: dict[str, Any], rel: float, params_abs: float) -> None:
    assert [r["step"] for r in actual["steps"]] == [r["step"] for r in expected["steps"]]
    for got, want in zip(actual["steps"], expected["steps"]):
        step = want["step"]
        assert set(got["metrics"]) == set(want["metrics"]), step
        for key, value in want["metrics"].items():
            assert got["metrics"][key] == pytest.approx(value, rel=rel), (step, key)
        assert got["eigenvalues"].keys() == want["eigenvalues"].keys()
        for layer, spectra in want["eigenvalues"].items():
            assert got["eigenvalues"][layer].keys() == spectra.keys()
            for label, values in spectra.items():
                # structural zeros (e.g. Σ∇h of the logits: softmax gradients sum to 0) are
                # round-off: compared on the scale of λmax, everything else relatively
                floor = 1e-12 * max(values)
                assert got["eigenvalues"][layer][label] == pytest.approx(values, rel=rel, abs=floor), (
                    step,
                    layer,
                    label,
                )
    assert actual["params"].keys() == expected["params"].keys()
    for name, values in expected["params"].items():
        assert actual["params"][name] == pytest.approx(values, rel=0, abs=params_abs), name


def test_references_agree_and_see_the_designed_units() -> None:
    """The two one-process references are the same run; the data has, in the first layer's
    input, one full unit, one dead unit and one that is dead on rank 1 only."""
    union, micro = reference_union(), reference_micro_batches()
    _assert_same(micro, union, rel=1e-10, params_abs=1e-12)
    for r in union["steps"]:
        assert r["metrics"]["conditioning/0/dead_input_units"] == 1.0
        assert r["metrics"]["conditioning/0/full_input_units"] == 1.0


# ---------------------------------------------------------------------- two processes
def _run_script(out: Path, timeout: float = 300) -> str:
    """Run the 2-process script; whatever happens, its whole process group is killed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(out), "ddp"],
        env=env,
        cwd=out.parent,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        try:  # rank 1 lives in the same session: never leave it behind
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    assert process.returncode == 0, output[-4000:]
    return output


@pytest.mark.slow
def test_fabric_ddp_uneven_ranks_equal_one_process(tmp_path: Path) -> None:
    out = tmp_path / "fabric_ddp.json"
    _run_script(out)
    rank0 = json.loads(out.read_text())
    rank1 = json.loads(Path(f"{out}.rank1").read_text())
    assert rank0["world_size"] == 2 and rank0["strategy"] == "DDPStrategy"
    # every rank ends with all results (eigen-solves shared out, then summed back)
    assert rank1 == rank0
    # Collectives.fabric: "sum" and "max" over gloo (rank r holds [r+1, -(r+1)])
    probe = rank0["collectives"]
    assert probe["sum"] == [3.0, -3.0] and probe["max"] == [2.0, -1.0]
    assert len(rank0["steps"]) == len(SIZES)
    for r in rank0["steps"]:  # the "max" reduction made feature 2 neither dead nor full
        assert r["metrics"]["conditioning/0/dead_input_units"] == 1.0
        assert r["metrics"]["conditioning/0/full_input_units"] == 1.0
        assert all(math.isfinite(v) for v in r["metrics"].values())
    _assert_same(rank0, reference_union(), rel=1e-6, params_abs=1e-10)
    _assert_same(rank0, reference_micro_batches(), rel=1e-6, params_abs=1e-10)
    leftovers = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout
    assert not leftovers.strip(), leftovers


# ---------------------------------------------------------------------- one process, in-process
def _plain_loop() -> dict[str, Any]:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    monitor = ConditioningMonitor(model, collectives=None, **OPTIONS)
    records = []
    for step in range(len(SIZES)):
        x, y = step_data(step)
        with monitor.track(step):
            nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        if monitor.updated:
            records.append(record(step, monitor.results))
    monitor.close()
    return {"steps": records, "params": _params(model)}


def _fabric_loop(hooked: str) -> tuple[dict[str, Any], list[str]]:
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    fabric.launch()
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    fabric_model, optimizer = fabric.setup(model, optimizer)
    group = Collectives.fabric(fabric)
    assert (group.world_size, group.rank, group.distributed) == (1, 0, False)
    target = fabric_model.module if hooked == "module" else fabric_model
    monitor = ConditioningMonitor(target, collectives=group, **OPTIONS)
    names = monitor.layer_names
    records = []
    for step in range(len(SIZES)):
        x, y = step_data(step)
        with monitor.track(step):
            fabric.backward(nn.functional.cross_entropy(fabric_model(x), y))
        optimizer.step()
        optimizer.zero_grad()
        if monitor.updated:
            records.append(record(step, monitor.results))
    monitor.close()
    return {"steps": records, "params": _params(model)}, names


def _strip(run: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The run with ``prefix`` taken out of layer names."""

    def rename(key: str) -> str:
        return key.replace(prefix, "")

    steps = [
        {
            "step": r["step"],
            "metrics": {rename(k): v for k, v in r["metrics"].items()},
            "eigenvalues": {rename(k): v for k, v in r["eigenvalues"].items()},
        }
        for r in run["steps"]
    ]
    return {"steps": steps, "params": run["params"]}


@pytest.mark.parametrize("hooked", ["module", "wrapped"])
def test_fabric_one_process_equals_plain_loop(hooked: str) -> None:
    """The monitor in a one-device Fabric loop gives the plain PyTorch loop's numbers, hooked
    on the user's module (``fabric_model.module``) or on Fabric's wrapper (the same layers,
    named under ``_forward_module.``)."""
    plain = _plain_loop()
    fabric, names = _fabric_loop(hooked)
    assert len(plain["steps"]) == len(SIZES)
    if hooked == "module":
        assert names == ["0", "2"]
    else:
        assert names == ["_forward_module.0", "_forward_module.2"]
        fabric = _strip(fabric, "_forward_module.")
    _assert_same(fabric, plain, rel=1e-12, params_abs=1e-12)

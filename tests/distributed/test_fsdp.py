"""FSDP2 for real on CPU: Lightning's ``ModelParallelStrategy`` (``fully_shard``), 2 processes,
gloo, through ``scripts/fsdp_script.py`` run as a subprocess (the strategy's launcher re-runs it).

Every logged conditioning and weight-domination scalar of the 2-rank run equals the single-process
run on the same global batches (1e-6 relative): the capture sees each rank's activations and
the sums are reduced through the strategy; the weight norms come from Gram sums over the
``DTensor`` shards, never from a gathered weight. Training is bit-identical with and without
the callbacks on each backend.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPOSITORY, SCRIPTS

SCRIPT = SCRIPTS / "fsdp_script.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("torch.distributed.fsdp") is None, reason="torch.distributed.fsdp missing"
    ),
]


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free ports, all bound at once while they are picked (runs started side
    by side must not pick the same one: Lightning's own pick raced, EADDRINUSE)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def _start(out: Path, mode: str, monitored: bool, fisher: str = "empirical", port: int = 0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY), **({"MASTER_PORT": str(port)} if port else {})}
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(out), mode, "1" if monitored else "0", fisher],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPOSITORY,
    )


def _result(process: subprocess.Popen, out: Path) -> dict:
    try:
        _, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-4000:]
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """The five runs, side by side (each is mostly an interpreter importing torch and Lightning
    on one core: together they take a third of the time one after the other)."""
    base = tmp_path_factory.mktemp("fsdp")
    specs = {
        f"{mode}_{int(monitored)}": (mode, monitored, "empirical")
        for mode in ("fsdp2", "single")
        for monitored in (True, False)
    }
    specs["fsdp2_true"] = ("fsdp2", True, "true")
    ports = iter(_free_ports(len(specs)))
    started = {name: _start(base / name, *spec, port=next(ports)) for name, spec in specs.items()}
    return {name: _result(process, base / name) for name, process in started.items()}


def test_fsdp2_scalars_equal_one_process(runs: dict[str, dict]) -> None:
    sharded, single = runs["fsdp2_1"]["history"], runs["single_1"]["history"]
    assert sorted(sharded) == sorted(single) == ["0", "1", "2"]
    for step, row in single.items():
        assert set(sharded[step]) == set(row), step
        assert any(k.startswith("weight_domination/") and k.endswith("grad_weight_ratio") for k in row)
        assert any(k.startswith("conditioning/") and k.endswith("fim_lambda_max") for k in row)
        for key, value in row.items():
            assert sharded[step][key] == pytest.approx(value, rel=1e-6, abs=1e-300), (step, key)


def test_fsdp2_training_is_bit_identical_with_the_callbacks(runs: dict[str, dict]) -> None:
    for mode in ("fsdp2", "single"):
        assert runs[f"{mode}_1"]["parameters"] == runs[f"{mode}_0"]["parameters"], mode
    # and the sharded run trained the same model as one process (up to summation order)
    for name, value in runs["single_0"]["parameters"].items():
        flat = [v for row in value for v in (row if isinstance(row, list) else [row])]
        other = [v for row in runs["fsdp2_0"]["parameters"][name] for v in (row if isinstance(row, list) else [row])]
        assert max(abs(a - b) for a, b in zip(flat, other)) < 1e-12, name


def test_fsdp2_true_fisher_runs_with_finite_numbers(runs: dict[str, dict]) -> None:
    """Labels are drawn per rank from generators seeded by the rank, so the numbers equal a
    single process's only in distribution; they must be there and finite."""
    history = runs["fsdp2_true"]["history"]
    values = [v for row in history.values() for k, v in row.items() if k.startswith("conditioning/")]
    assert values and all(math.isfinite(v) for v in values)

"""DDP for real on CPU: 2 processes, gloo. The analysis sums over ranks before any eigenvalue."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from ddp_common import run
from helpers import REPOSITORY, SCRIPTS


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    """The same run in one process, the reference of every DDP test (run once)."""
    out = tmp_path_factory.mktemp("single")
    run(out, strategy="auto", devices=1)
    return json.loads((out / "rank0.json").read_text())["metrics"]


def _check_against_single(out: Path, single: dict[str, float]) -> None:
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    # every rank ends with all results (eigen work was split, then gathered)
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    assert set(ranks[0]["metrics"]) == set(single)
    for key, value in single.items():
        assert ranks[0]["metrics"][key] == pytest.approx(value, rel=1e-6), key
    # only rank 0 logged, and what it logged is what it holds
    logged = (out / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header, row = logged[0].split(","), logged[1].split(",")
    csv_metrics = {k: float(v) for k, v in zip(header, row) if k.startswith("conditioning/") and v}
    for key, value in csv_metrics.items():
        assert value == pytest.approx(ranks[0]["metrics"][key], rel=1e-6), key


def test_ddp_fork_uneven_ranks_equal_one_process(tmp_path: Path, single: dict[str, float]) -> None:
    out = tmp_path / "ddp"
    out.mkdir()
    run(out, strategy="ddp_fork", devices=2)
    _check_against_single(out, single)


def test_ddp_fork_each_dense_moment_is_held_by_its_owner_only(tmp_path: Path) -> None:
    """The dense moments are reduced to one owner each (not all-reduced): each of the two
    ranks holds about half the moment bytes of one process, and the numbers are one process's."""
    alone, ddp = tmp_path / "single", tmp_path / "ddp"
    alone.mkdir(), ddp.mkdir()
    run(alone, strategy="auto", devices=1, width=64)
    run(ddp, strategy="ddp_fork", devices=2, width=64)
    single = json.loads((alone / "rank0.json").read_text())
    _check_against_single(ddp, single["metrics"])
    held = [json.loads((ddp / f"rank{r}.json").read_text())["moment_bytes"] for r in (0, 1)]
    assert all(b < 0.6 * single["moment_bytes"] for b in held), (held, single["moment_bytes"])
    assert sum(held) == pytest.approx(single["moment_bytes"], rel=0.05)  # the others' diagonals


def test_ddp_fork_merges_sketched_moments_like_one_process(tmp_path: Path) -> None:
    """A 600-wide layer's Σ∇h does not fit 512 KiB dense (2.9 MB): it is sketched on each
    rank and the sketches are merged; 16 rows fit the sketch, so both are exact and equal."""
    budget = 512 << 10
    from ddp_common import make_net

    from lightning_conditioning.capture.hooks import find_layers
    from lightning_conditioning.capture.plan import plan_analysis

    plan = plan_analysis(find_layers(make_net(width=600)), budget)
    assert plan.of("0", "grad").method == "sketch"  # (names inside RankData carry "net.")
    alone, ddp = tmp_path / "single", tmp_path / "ddp"
    alone.mkdir(), ddp.mkdir()
    run(alone, strategy="auto", devices=1, width=600, memory_budget=budget)
    run(ddp, strategy="ddp_fork", devices=2, width=600, memory_budget=budget)
    _check_against_single(ddp, json.loads((alone / "rank0.json").read_text())["metrics"])
    assert "conditioning/net.0/grad_lambda_max" in json.loads((ddp / "rank0.json").read_text())["metrics"]


def test_ddp_fork_layers_that_share_an_input_on_one_rank_only_equal_one_process(tmp_path: Path) -> None:
    """Rank 0's two layers read one tensor (one Σx), rank 1's read a copy each: the ranks agree
    to keep two sums (rank 0 copies the shared one), and the numbers are one process's."""
    alone, ddp = tmp_path / "single", tmp_path / "ddp"
    alone.mkdir()
    ddp.mkdir()
    run(alone, strategy="auto", devices=1, shared=True)
    run(ddp, strategy="ddp_fork", devices=2, shared=True)
    single = json.loads((alone / "rank0.json").read_text())["metrics"]
    assert single["conditioning/net.b/input_lambda_max"] == single["conditioning/net.a/input_lambda_max"]
    _check_against_single(ddp, single)


def test_ddp_fork_with_batchnorm_logs_finite_numbers(tmp_path: Path) -> None:
    run(tmp_path, strategy="ddp_fork", devices=2, batch_norm=True)
    metrics = json.loads((tmp_path / "rank0.json").read_text())["metrics"]
    assert metrics and all(math.isfinite(v) for v in metrics.values())
    assert "conditioning/net.3/fim_kappa_100" in metrics


@pytest.mark.slow
def test_standalone_ddp_script(tmp_path: Path, single: dict[str, float]) -> None:
    out = tmp_path / "ddp"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "ddp_standalone.py"), str(out)],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = process.communicate(timeout=180)
    finally:
        # never leave a process behind: the whole session (rank 1 included) goes
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert process.returncode == 0, output[-3000:]
    _check_against_single(out, single)
    leftovers = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout
    assert not leftovers.strip(), leftovers


def test_ddp_probe_batches_leave_a_distributed_sampler_run_bit_identical(tmp_path: Path) -> None:
    """Under 2-rank DDP with Lightning's DistributedSampler (shuffled) and Dropout, probe batches
    change nothing: every rank's final parameters equal those of the run without the callback."""
    import torch
    from ddp_common import run_shuffled

    plain, probed = tmp_path / "plain", tmp_path / "probed"
    plain.mkdir(), probed.mkdir()
    run_shuffled(plain, probe_batches=0)
    run_shuffled(probed, probe_batches=2)
    for rank in (0, 1):
        a, b = (torch.load(folder / f"params{rank}.pt") for folder in (plain, probed))
        assert a["sampler"] == b["sampler"] == "DistributedSampler"
        assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"]))

"""The README's main job runs end to end on the shipped MNIST sample (reduced size)."""

from __future__ import annotations

from pathlib import Path

import pytest

from example_projects import quickstart


def test_quickstart_runs_and_logs(tmp_path: Path) -> None:
    callback = quickstart.main(["--steps", "21", "--every-n-steps", "10", "--out", str(tmp_path)])
    assert set(callback.results) == {f"net.{i}" for i in (1, 3, 5, 7, 9, 11)}
    assert all(r.status == "ok" and r.step == 20 for r in callback.results.values())
    # MNIST's blank border pixels are "dead" inputs of the first layer
    assert callback.results["net.1"].dead_input_units > 50
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


@pytest.mark.slow
def test_mnist_mlp_smoke(tmp_path: Path) -> None:
    from example_projects.mnist_mlp import main as mnist_mlp

    result = mnist_mlp.main(["--smoke", "--out", str(tmp_path)])
    assert set(result["summary"]) == {"plain-default", "plain-he", "bn-default", "bn-he"}
    assert (tmp_path / "results.md").read_text().count("reproduced") >= 2
    for figure in ("depth_profile_init.png", "loss_and_units.png"):
        assert (tmp_path / "figures" / figure).stat().st_size > 10_000


def test_fim_validation_smoke(tmp_path: Path) -> None:
    from example_projects.fim_validation import main as fim_validation

    results = fim_validation.main(["--smoke", "--out", str(tmp_path)])
    assert set(results) == {"Plain-3", "BN-3"}
    for entry in results.values():
        for kind in ("true", "empirical"):
            assert entry[kind]["full"]["lambda_max"] > 0
            assert set(entry[kind]["exact"]) == set(entry[kind]["kron"])
    assert (tmp_path / "figures" / "exact_vs_kronecker.png").stat().st_size > 10_000


def test_weight_domination_smoke(tmp_path: Path) -> None:
    from example_projects.weight_domination import main as weight_domination

    result = weight_domination.main(["--smoke", "--out", str(tmp_path)])
    assert result["fig4"]["10111"]["blocked"] == ["net.3"]
    assert result["fig4"]["10111"]["warned"] == ["net.3"]
    assert result["fig4"]["11111"]["warned"] == []
    assert len(result["a11"]["history"]) == 3
    for figure in ("fig4_masks.png", "a11_deep_bn.png"):
        assert (tmp_path / "figures" / figure).stat().st_size > 10_000


@pytest.mark.slow
def test_tiny_lm_smoke(tmp_path: Path) -> None:
    from example_projects.tiny_lm import main as tiny_lm

    result = tiny_lm.main(["--smoke", "--out", str(tmp_path)])
    runs = result["runs"]
    assert {run["variant"] for run in runs} == {"final_ln", "no_final_ln"}
    # every weight layer (embeddings, q/k/v/out projections, MLP, head) is analysed at every
    # analysed step, read back from the TensorBoard log, with finite positive numbers
    for run in runs:
        assert len(run["layers"]) == 2 + 6 * 2 + 1
        for table in run["conditioning"].values():
            for layer in run["layers"]:
                for moment in ("input", "grad", "fim"):
                    assert 0 < table[layer][f"{moment}_lambda_max"] < float("inf")
    # the package's numbers equal the example's float64 reference (embeddings, head, token_mean)
    assert all(ok for ok, _ in result["summary"]["checks"].values())
    assert (tmp_path / "results.md").read_text().count(": holds.**") == 3
    for figure in ("depth_profile.png", "lambda_max_training.png", "head_final_norm.png", "embedding.png"):
        assert (tmp_path / "figures" / figure).stat().st_size > 10_000

"""The ResNet examples (cifar_resnet, imagenet_resnet) run end to end at smoke size.

One torch thread inside each run (the examples restore the previous count afterwards): on a
small shared CPU, multi-threaded convolutions of these tiny nets are several times slower.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("mlxtend")


@pytest.mark.slow
def test_cifar_resnet_smoke_full_recipe_path(tmp_path: Path) -> None:
    """--smoke: four archs × 2 seeds on FakeData through the CIFAR pipeline, epochs, tables."""
    from example_projects.cifar_resnet import main as cifar
    from example_projects.cifar_resnet import tables

    result = cifar.main(["--smoke", "--threads", "1", "--out", str(tmp_path)])
    runs = result["runs"]
    assert {(r["arch"], r["seed"]) for r in runs} == {(a, s) for a in cifar.ARCHS for s in (0, 1)}
    for run in runs:
        assert run["epochs"] == 2 and run["steps"] == 8  # 128 fake images / batch 32, 2 epochs
        assert 0.0 <= run["test_error"] <= 1.0 and math.isfinite(run["best_val_error"])
        assert len(run["val_error"]) == 2 and all(math.isfinite(v) for v in run["loss"])
        analysed = run["analyses"]
        assert sorted(map(int, analysed)) == list(range(0, 8, 2))
        for values in analysed.values():
            for key in (
                "input_lambda_max",
                "fim_lambda_max",
                "grad_weight_ratio",
                "weight_spectral_norm",
                "weight_fro",
            ):
                assert math.isfinite(values[key]) and values[key] > 0, key
    assert {r["layer"] for r in runs} == {"model.fc", "model.fc.linear"}
    # every run left TensorBoard events and its run.json
    assert len(list(tmp_path.rglob("run.json"))) == 8
    assert len(list(tmp_path.rglob("events.out.tfevents.*"))) >= 8
    # tables.py on the smoke outputs: one row (depth 8), four columns, n=2 per cell
    text = tables.main([str(tmp_path), "--out", str(tmp_path / "t.md")])
    assert text == (tmp_path / "t.md").read_text() == (tmp_path / "tables.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 8 |"))
    assert row.count("(n=2)") == 4
    # the paper's numbers appear beside ours for CIFAR-10
    fake = [dict(r, data="cifar10", depth=110) for r in runs]
    assert "6.10 ± 0.09" in tables.render(tables.collect(fake))
    # figures and results.md
    for name in ("last_layer_fake_depth8.png", "training_loss_fake.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 10_000
    results = (tmp_path / "results.md").read_text()
    assert "## Verdicts" in results and results.count("reproduced") >= 6
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["summaries"]) == 8 and any("Fig. 9" in name for name in summary["verdicts"])
    # --from-runs rebuilds the reports from the run.json files without training
    rebuilt = cifar.main(["--from-runs", str(tmp_path / "fake"), "--out", str(tmp_path / "rebuilt")])
    assert rebuilt["checks"] == result["checks"] and rebuilt["tables"] == text
    assert "rebuilt from the run.json files" in (tmp_path / "rebuilt" / "results.md").read_text()


@pytest.mark.slow
def test_cifar_resnet_cpu_scale_path(tmp_path: Path) -> None:
    """The default (offline MNIST sample, step-mode) path at a tiny size: analysis every step."""
    from example_projects.cifar_resnet import main as cifar

    result = cifar.main(
        [
            "--depths",
            "8",
            "--steps",
            "12",
            "--batch-size",
            "16",
            "--limit",
            "256",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert [r["arch"] for r in result["runs"]] == ["resnet", "lastbn"]
    for run in result["runs"]:
        assert run["data"] == "mnist" and run["steps"] == 12 and len(run["loss"]) == 12
        assert sorted(map(int, run["analyses"])) == list(range(12))
    assert len(result["checks"]) == 6 and all(isinstance(ok, bool) for ok, _ in result["checks"].values())
    assert (tmp_path / "figures" / "last_layer_mnist_depth8.png").stat().st_size > 10_000
    assert "| ResNetLastBN-8 |" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_imagenet_resnet_smoke_last_bn(tmp_path: Path) -> None:
    """--smoke --last-bn: torchvision ResNet-18 + LastBN on 64×64 FakeData, both callbacks."""
    from example_projects.imagenet_resnet import main as imagenet

    record = imagenet.main(["--smoke", "--last-bn", "--threads", "1", "--every-n-steps", "6", "--out", str(tmp_path)])
    assert record["layer"] == "model.fc.linear" and record["steps"] == 6 and record["epochs"] == 1
    assert 0.0 <= record["val_top1_error"] <= record["val_top5_error"] + 1 and record["val_top5_error"] <= 1
    assert record["analysed_layers"] == 21  # 20 convs + the Linear of torchvision's ResNet-18
    analysis = record["analyses"]["0"]
    assert all(math.isfinite(analysis[k]) for k in ("input_lambda_max", "grad_weight_ratio", "weight_fro"))
    assert (tmp_path / "resnet18-lastbn" / "version_0" / "run.json").exists()
    assert list((tmp_path / "resnet18-lastbn").rglob("events.out.tfevents.*"))
    assert (tmp_path / "figures" / "last_layer.png").stat().st_size > 10_000
    results = (tmp_path / "results.md").read_text()
    assert "resnet18 + LastBN | fake" in results and "29.38" in results

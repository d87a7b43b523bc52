"""One sink per logger kind, checked against what each real backend stored (no network)."""

from __future__ import annotations

import glob
import json
import logging
import math
import re
import struct
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import RecordingLogger, SequentialClassifier, loader, seeded
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from torch import nn

from lightning_conditioning import ConditioningCallback, WeightDominationCallback, sinks
from lightning_conditioning.report.reader import load_run
from lightning_conditioning.views import publication as views_publication
from lightning_conditioning.views.spectra_file import SPECTRA_FILENAME, read_spectra


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def messages() -> Iterator[list[str]]:
    """INFO messages of the sinks (a handler of our own: works also under `-p no:logging`)."""
    sinks.ANNOUNCER.seen.clear()
    handler, logger = _Messages(), logging.getLogger("lightning_conditioning.sinks")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.messages
    logger.removeHandler(handler)
    logger.setLevel(level)


class Layout(pl.Callback):
    """What a callback flag would do: the custom-scalars layout at fit start, rank zero."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            sinks.publish_tensorboard_layout(trainer.loggers)


def _net(odd_name: str | None = None) -> nn.Sequential:
    net = seeded(lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5)))
    if odd_name is not None:  # a layer whose name MLflow would reject
        layer = net[2]
        del net[2]
        net.add_module(odd_name, layer)
    return net


def _run(
    logger: Logger | list[Logger],
    steps: int = 2,
    net: nn.Module | None = None,
    callbacks: list[pl.Callback] | None = None,
) -> tuple[ConditioningCallback, WeightDominationCallback]:
    x, y = torch.randn(32, 12, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 5
    conditioning = ConditioningCallback(every_n_steps=1, log_figures=True)
    domination = WeightDominationCallback(every_n_steps=1)
    trainer = pl.Trainer(
        max_steps=steps,
        logger=logger,
        callbacks=[conditioning, domination, *(callbacks or [])],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(SequentialClassifier(net if net is not None else _net()), loader(x, y, 16))
    return conditioning, domination


def _assert_matches(stored: dict[str, float], callback: ConditioningCallback, rel: float = 1e-6) -> None:
    expected = {k: v for r in callback.results.values() for k, v in r.metrics().items()}
    assert expected
    for key, value in expected.items():
        assert stored[key] == pytest.approx(value, rel=rel), key


def test_tensorboard_histograms_figure_layout_and_spectra(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    callback, _ = _run(logger, callbacks=[Layout()])
    logger.experiment.flush()
    assert sinks.publish_tensorboard_layout([logger]) == 0  # one layout per run
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert "custom_scalars__config__" in tags["tensors"]
    assert [e.step for e in events.Images("conditioning/depth_profile")] == [0, 1]
    for layer in ("net.0", "net.2"):
        assert f"conditioning/{layer}/input_log10_eigenvalues" in tags["histograms"]
        assert f"weight_domination/{layer}/grad_weight_ratio" in tags["scalars"]
    last = {tag: events.Scalars(tag)[-1].value for tag in tags["scalars"]}
    _assert_matches(last, callback)
    records = read_spectra(Path(logger.log_dir) / SPECTRA_FILENAME)
    assert [(r["step"], r["layer"]) for r in records] == [(0, "net.0"), (0, "net.2"), (1, "net.0"), (1, "net.2")]
    held = callback.results["net.2"].input.eigenvalues.tolist()
    assert records[-1]["input_eigenvalues"] == pytest.approx(held, rel=1e-8, abs=1e-12 * held[0])


def test_layout_charts_every_layer_per_quantity() -> None:
    layout = sinks.tensorboard_layout(kappa_percents=(50, 99.5))
    charts = {title: chart for section in layout.values() for title, chart in section.items()}
    assert charts["Σ∇h log10 λmax"] == ["Multiline", ["conditioning/[^/]+/log10_grad_lambda_max$"]]
    assert charts["sub-FIM log10 κ_99.5%"][1] == ["conditioning/[^/]+/log10_fim_kappa_99_5$"]
    assert charts["σmax(ΔW)/σmax(W)"][1] == ["weight_domination/[^/]+/update_weight_ratio$"]
    assert sinks.tensorboard_layout(domination_prefix=None).keys().isdisjoint({"weight_domination per layer"})


def _charts_matching(layout: dict[str, dict[str, list[Any]]], tag: str) -> list[str]:
    """Titles of the charts whose regexes match ``tag`` (TensorBoard searches each regex)."""
    return [
        title
        for section in layout.values()
        for title, (_, patterns) in section.items()
        if any(re.search(pattern, tag) for pattern in patterns)
    ]


def test_layout_matches_every_logged_key_kind() -> None:
    from types import SimpleNamespace

    from lightning_conditioning import schema

    layout = sinks.tensorboard_layout(conditioning_prefix="cond", kappa_percents=(50, 80, 99.5))
    statuses = {50: "exact", 80: "lower_bound", 99.5: "infinite"}
    summary = SimpleNamespace(lambda_max=2.0, rank=3, kappa={50: 2.0, 80: 1e9, 99.5: math.inf}, kappa_status=statuses)
    quantities = [q for m in schema.MOMENTS for q in schema.summary_quantities(m, summary)]
    # every declared group's quantities, and one of each indexed family (per head, per expert)
    indexed = {"attention": "attention_entropy_h3", "routing": "load_share_e2"}
    assert set(indexed) == {group.kind for group in schema.GROUPS if group.indexed}
    quantities += [q for group in schema.GROUPS if group.section for q in group.names] + list(indexed.values())
    assert {"dead_experts", "lr_lambda_max", "input_outlier_ratio", "grad_kept_rows"} <= set(quantities)
    assert "grad_rank" in quantities and "fim_kappa_80_lower_bound" in quantities
    for quantity in quantities:  # every per-layer scalar has exactly one chart: λmax and
        # measured κ_p through their log10 copies (the charts have no log axis)
        parsed = schema.parse_quantity(quantity)
        assert parsed is not None
        charted = (
            schema.log10_quantity(quantity)
            if parsed.kind == "lambda_max" or (parsed.kind == "kappa" and parsed.status == "exact")
            else quantity
        )
        assert len(_charts_matching(layout, schema.key("cond", "blocks.0", charted))) == 1, quantity
        if charted != quantity:
            assert _charts_matching(layout, schema.key("cond", "blocks.0", quantity)) == []
    assert _charts_matching(layout, "cond/net.0/grad_rank") == ["Σ∇h rank"]
    assert _charts_matching(layout, "cond/net.0/input_kappa_80_lower_bound") == ["Σx κ_80% ≥"]
    assert _charts_matching(layout, "cond/net.0/log10_input_kappa_80") == ["Σx log10 κ_80%"]
    assert _charts_matching(layout, "cond/net.0/fim_kappa_99_5_infinite") == ["sub-FIM κ_p = ∞"]
    assert _charts_matching(layout, "weight_domination/dominated_layers") == ["dominated layers"]
    assert _charts_matching(layout, "cond/net.0/log10_input_kappa_100") == []  # p not in the layout
    domination = [
        q for q in schema.DOMINATION_QUANTITIES if _charts_matching(layout, schema.key("weight_domination", "fc", q))
    ]
    assert sorted(domination) == ["grad_weight_ratio", "grad_weight_ratio_fro", "update_weight_ratio"]


def test_csv_scalars_and_spectra_match_the_callback(tmp_path: Path, messages: list[str]) -> None:
    logger = CSVLogger(tmp_path, name="csv")
    callback, domination = _run(logger, steps=3)
    run = load_run(logger.log_dir)
    assert run.kind == "csv" and run.conditioning_steps() == [0, 1, 2]
    _assert_matches(run.scalars[2], callback)
    for name, stats in domination.results.items():
        assert run.scalars[2][f"weight_domination/{name}/grad_weight_ratio"] == pytest.approx(
            stats.grad_weight_ratio, rel=1e-6
        )
    record = run.spectra[2]["net.0"]
    result = callback.results["net.0"]
    assert record["input_units"] == 12 and record["dead_input_units"] == result.dead_input_units
    assert record["grad_eigenvalues"] == pytest.approx(result.grad.eigenvalues.tolist(), rel=1e-8)
    for moment in ("input", "grad"):  # each matrix's own floor and structural rank
        summary = getattr(result, moment)
        assert record[f"{moment}_rank"] == summary.rank and record[f"{moment}_floor_rtol"] == summary.rtol > 0
        assert record[f"{moment}_structural_rank"] == summary.structural_rank > 0
    assert record["rank_rtol"] == record["input_floor_rtol"]  # version-1 readers
    assert run.layer_order == ["net.0", "net.2"]
    assert sum("CSVLogger stores no figures" in m for m in messages) == 1


@pytest.mark.slow
def test_mlflow_local_file_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow", reason="mlflow (or mlflow-skinny) is a test/loggers extra")
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow >= 3.7 refuses file: stores otherwise
    uri = f"file:{tmp_path}/mlruns"
    logger = MLFlowLogger(experiment_name="conditioning", tracking_uri=uri)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback, _ = _run(logger, net=_net(odd_name="head[κ]"))
    assert not [w for w in caught if "MLFlow only allows" in str(w.message)]
    client = MlflowClient(tracking_uri=uri)
    stored = {}
    for key in {k for r in callback.results.values() for k in r.metrics()}:
        history = client.get_metric_history(logger.run_id, sinks.mlflow_metric_name(key))
        stored[key] = [m.value for m in sorted(history, key=lambda m: m.step)][-1]
    assert "conditioning/net.head___/input_lambda_max" in {sinks.mlflow_metric_name(k) for k in stored}
    _assert_matches(stored, callback)
    spectra = [a.path for a in client.list_artifacts(logger.run_id, "conditioning_spectra")]
    figures = [a.path for a in client.list_artifacts(logger.run_id, "conditioning_figures")]
    assert spectra == ["conditioning_spectra/step_00000000.jsonl", "conditioning_spectra/step_00000001.jsonl"]
    assert len(figures) == 2 and all(f.endswith(".png") for f in figures)


def _wandb_records(path: str) -> Iterator[bytes]:
    """Records of a .wandb file (LevelDB log format: 32 KiB blocks of crc32, length, type)."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # block trailer padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            yield pending


def _wandb_history(run_dir: Path) -> list[dict[str, Any]]:
    pytest.importorskip("wandb.proto.wandb_internal_pb2", reason="cannot read .wandb files")
    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb")):
        for raw in _wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
    return rows


@pytest.mark.slow
def test_wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb", reason="wandb is a test/loggers extra")
    from lightning.pytorch.loggers import WandbLogger

    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_GIT": "true",
    }.items():
        monkeypatch.setenv(key, value)
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="conditioning")
    try:
        callback, _ = _run(logger)
    finally:
        wandb.finish()
    # W&B's service process writes the offline file asynchronously: under load the last
    # records can land after finish() returns, so wait (bounded) for the step's keys
    expected = {k for r in callback.results.values() for k in r.metrics()}
    deadline = time.monotonic() + 60
    while True:
        rows = _wandb_history(tmp_path)
        step1 = {k: v for row in rows if row.get("trainer/global_step") == 1 for k, v in row.items()}
        if expected <= set(step1) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    _assert_matches(step1, callback)
    assert step1["conditioning/net.2/grad_log10_eigenvalues/_type"] == "histogram"
    assert step1["conditioning/depth_profile/_type"] == "image-file"


def test_other_logger_gets_scalars_and_one_message(messages: list[str]) -> None:
    logger = RecordingLogger()
    callback, _ = _run(logger)
    assert logger.history[1]["conditioning/net.0/input_lambda_max"] == callback.results["net.0"].input.lambda_max
    assert logger.history[1]["weight_domination/dominated_layers"] == 0
    assert sum("RecordingLogger gets the conditioning scalars only" in m for m in messages) == 1


def test_figures_skipped_once_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, messages: list[str]
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setattr(views_publication, "matplotlib_available", lambda: False)
    logger = TensorBoardLogger(tmp_path, name="tb")
    _run(logger)
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    assert events.Tags()["images"] == [] and events.Tags()["histograms"]
    assert sum("matplotlib is not installed" in m for m in messages) == 1


def test_switches_and_nonfinite_layers(tmp_path: Path) -> None:
    callback, _ = _run(RecordingLogger(), steps=1)
    results = dict(callback.results)
    results["net.0"] = type(results["net.0"])(**{**vars(results["net.0"]), "status": "nonfinite"})
    logger = CSVLogger(tmp_path, name="csv")
    sinks.publish_conditioning([logger], results, 7, histograms=False, figures=False)
    assert not (Path(logger.log_dir) / SPECTRA_FILENAME).exists()
    sinks.publish_conditioning([logger], results, 8)
    records = read_spectra(Path(logger.log_dir) / SPECTRA_FILENAME)
    assert [(r["layer"], r["status"], r["input_eigenvalues"]) for r in records][0] == ("net.0", "nonfinite", None)
    assert math.isclose(records[1]["input_eigenvalues"][0], results["net.2"].input.lambda_max, rel_tol=1e-8)


def test_the_layout_is_written_by_default_and_a_users_own_is_kept(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def layouts(logger: TensorBoardLogger) -> list[bytes]:
        logger.experiment.flush()
        events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
        events.Reload()
        if "custom_scalars__config__" not in events.Tags()["tensors"]:
            return []
        return [e.tensor_proto.string_val[0] for e in events.Tensors("custom_scalars__config__")]

    ours = TensorBoardLogger(tmp_path, name="ours")
    _run(ours)
    assert len(layouts(ours)) == 1 and b"input_lambda_max" in layouts(ours)[0]
    theirs = TensorBoardLogger(tmp_path, name="theirs")
    theirs.experiment.add_custom_scalars({"mine": {"loss": ["Multiline", ["loss"]]}})
    theirs.experiment.flush()
    _run(theirs)
    kept = layouts(theirs)
    assert len(kept) == 1 and b"mine" in kept[0] and b"input_lambda_max" not in kept[0]


def test_tensorboard_gets_log10_copies_for_its_linear_charts(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="log10")
    callback, _ = _run(logger, steps=1)
    logger.experiment.flush()
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    result = callback.results["net.0"]
    assert result.input is not None
    stored = events.Scalars("conditioning/net.0/log10_input_lambda_max")[0].value
    assert stored == pytest.approx(math.log10(result.input.lambda_max), rel=1e-6)
    # lower bounds and infinities get no log10 copy: they are not values
    tags = events.Tags()["scalars"]
    assert not any(
        t.startswith("conditioning/") and "log10_" in t and t.endswith(("_lower_bound", "_infinite")) for t in tags
    )

"""``python -m lightning_conditioning report``: CSV and TensorBoard runs, figures, bad input."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import SequentialClassifier, loader, seeded
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from lightning_conditioning import ConditioningCallback, WeightDominationCallback, __version__
from lightning_conditioning.report.cli import FIGURE_FILES, main
from lightning_conditioning.report.reader import load_run
from lightning_conditioning.views.spectra_file import SPECTRA_FILENAME


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One 3-step run logged to TensorBoard and CSV at once: {"tensorboard": dir, "csv": dir}."""
    root = tmp_path_factory.mktemp("runs")
    x, y = torch.randn(48, 10, generator=torch.Generator().manual_seed(3)), torch.arange(48) % 4
    net = seeded(lambda: nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)))
    loggers = [TensorBoardLogger(root, name="tb"), CSVLogger(root, name="csv")]
    trainer = pl.Trainer(
        max_steps=3,
        logger=loggers,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
        callbacks=[ConditioningCallback(every_n_steps=1, log_figures=False), WeightDominationCallback(every_n_steps=1)],
    )
    trainer.fit(SequentialClassifier(net), loader(x, y, 16))
    loggers[0].experiment.flush()
    return {"tensorboard": Path(loggers[0].log_dir), "csv": Path(loggers[1].log_dir)}


def _error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("lightning-conditioning: error: ")
    return err


@pytest.mark.parametrize("kind", ["csv", "tensorboard"])
def test_report_table_figures_and_diagnosis(
    runs: dict[str, Path], kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(runs[kind]), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{kind} run" in out and "Step 2: 3 layers" in out
    assert "net.0" in out.split("Diagnosis")[0] and "No findings" in out
    header = next(line.split() for line in out.splitlines() if line.startswith("#  layer"))
    last = next(line.split() for line in out.splitlines() if line.startswith("3  net.4"))
    assert last[header.index("rank(Σ∇h)")] == "3/4"  # the softmax takes one direction of Σ∇h
    for name in FIGURE_FILES:
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


def test_report_step_and_layer_order(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(runs["csv"]), "--step", "1", "--no-figures", "-q"]) == 0
    out = capsys.readouterr().out
    assert "Step 1:" in out and "»" not in out
    rows = [line.split()[1] for line in out.splitlines() if line[:1].isdigit()]
    assert rows[:3] == ["net.0", "net.2", "net.4"]
    tb, csv = load_run(runs["tensorboard"]), load_run(runs["csv"])
    tb_table, csv_table = tb.conditioning(2), csv.conditioning(2)
    assert list(tb_table) == list(csv_table) == ["net.0", "net.2", "net.4"]
    # sizes from the spectra file, ranks from the scalars
    assert (csv_table["net.0"]["input_dim"], csv_table["net.4"]["grad_dim"]) == (10.0, 4.0)
    assert csv_table["net.0"]["input_rank"] == 10.0
    for layer, row in csv_table.items():  # TensorBoard stores float32
        assert tb_table[layer] == pytest.approx(row, rel=1e-6), layer
    assert _error_line(capsys, ["report", str(runs["csv"]), "--step", "7"]).rstrip().endswith("0, 1, 2")


def test_run_still_being_written(runs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["csv"], run)
    with (run / "metrics.csv").open("a") as f:
        f.write("0.5,0.1,")  # a row cut short by the writer
    with (run / SPECTRA_FILENAME).open("a") as f:
        f.write('{"step": 3, "layer": "net.0", "input_eig')
    data = load_run(run)
    assert data.conditioning_steps() == [0, 1, 2] and sorted(data.spectra) == [0, 1, 2]


def test_truncated_event_file_reads_complete_records(runs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["tensorboard"], run)
    (events,) = run.glob("events.out.tfevents.*")
    events.write_bytes(events.read_bytes()[:-50])
    assert load_run(run).conditioning_steps()[:2] == [0, 1]


def test_bad_run_directories_give_one_error_line(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "no such directory" in _error_line(capsys, ["report", str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    assert "is empty" in _error_line(capsys, ["report", str(tmp_path / "empty")])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hello")
    assert "holds no run" in _error_line(capsys, ["report", str(foreign)])
    (foreign / "metrics.csv").write_text("epoch,loss\n0,1.0\n")
    assert "no 'step' column" in _error_line(capsys, ["report", str(foreign)])
    (foreign / "metrics.csv").write_text("step,loss\n0,1.0\n")
    assert "no conditioning scalars" in _error_line(capsys, ["report", str(foreign)])
    (foreign / "metrics.csv").write_text("")
    assert "is empty" in _error_line(capsys, ["report", str(foreign)])
    bad_spectra = tmp_path / "bad_spectra"
    shutil.copytree(runs["csv"], bad_spectra)
    (bad_spectra / SPECTRA_FILENAME).write_text("import os\n")
    assert "not a lightning-conditioning/spectra file" in _error_line(capsys, ["report", str(bad_spectra)])
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "events.out.tfevents.1.host").write_bytes(b"\x00garbage" * 40)
    assert "no conditioning scalars" in _error_line(capsys, ["report", str(garbage)])
    both = tmp_path / "both"
    shutil.copytree(runs["csv"], both / "a")
    shutil.copytree(runs["csv"], both / "b")
    assert "holds 2 runs" in _error_line(capsys, ["report", str(both)])


def test_version_and_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"lightning-conditioning {__version__}"
    assert main([]) == 2


def test_module_entry_point_exits_cleanly(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lightning_conditioning", "report", str(tmp_path / "nope"), "-q"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == f"lightning-conditioning: error: {tmp_path / 'nope'}: no such directory"


# ------------------------------------------------------------------ keys, tables, figures (no run)
def _summary(statuses: dict[float, str], rank: int = 3) -> object:
    from types import SimpleNamespace

    kappa = {
        p: (math.inf if s == "infinite" else math.nan if s == "undefined" else 10.0 * p) for p, s in statuses.items()
    }
    return SimpleNamespace(lambda_max=2.0, rank=rank, kappa=kappa, kappa_status=statuses)


def test_split_metrics_round_trips_every_key_kind() -> None:
    from lightning_conditioning import schema
    from lightning_conditioning.views.tables import kappa_percents, split_metrics

    statuses = {50: "exact", 80: "lower_bound", 99.5: "infinite", 100: "undefined"}
    rows = {"net.0": {}, "net.2": {}}
    for row in rows.values():
        for moment in schema.MOMENTS:
            row.update(schema.summary_quantities(moment, _summary(statuses)))
        row.update({"dead_input_units": 1.0, "full_input_units": 2.0})
    assert {"input_rank", "grad_kappa_80_lower_bound", "fim_kappa_99_5_infinite"} <= set(rows["net.0"])
    assert "input_kappa_100" not in rows["net.0"]  # undefined κ_p is not logged
    flat = {schema.key("train-conditioning", layer, q): v for layer, row in rows.items() for q, v in row.items()}
    domination = {q: 0.5 for q in schema.DOMINATION_QUANTITIES}
    flat.update({schema.key("weight_domination", "net.0", q): v for q, v in domination.items()})
    flat.update({f"weight_domination/{schema.DOMINATED_LAYERS}": 1.0, "loss": 3.0, "a/b/unknown": 4.0})
    split = split_metrics(flat)
    assert split.conditioning == rows and list(split.conditioning) == ["net.0", "net.2"]
    assert split.domination == {"net.0": domination} and split.dominated_layers == 1.0
    assert kappa_percents(split.conditioning) == ["50", "80", "99_5"]
    assert kappa_percents({"fc": {"grad_kappa_80_lower_bound": 1.0}}, ("input",)) == []


def test_metrics_reexports_the_schema() -> None:
    from lightning_conditioning import schema
    from lightning_conditioning.views import tables as metrics

    assert metrics.DOMINATION_QUANTITIES is schema.DOMINATION_QUANTITIES
    assert metrics.percent_text is schema.percent_text
    assert metrics.is_conditioning_quantity("grad_kappa_80_infinite")
    assert metrics.is_conditioning_quantity("fim_rank") and not metrics.is_conditioning_quantity("grad_weight_ratio")


def _marked_table() -> dict[str, dict[str, float]]:
    table = {
        f"net.{2 * i}": {
            "input_lambda_max": 1.0,
            "grad_lambda_max": 0.5,
            "input_rank": 8.0,
            "input_dim": 8.0,
            "grad_rank": 4.0,
            "input_kappa_50": 3.0 + i,
            "input_kappa_100": 40.0 + i,
            "grad_kappa_100": 7.0,
        }
        for i in range(4)
    }
    del table["net.2"]["input_kappa_100"]
    table["net.2"]["input_kappa_100_lower_bound"] = 1.23e6
    table["net.2"]["input_rank"] = 5.0
    del table["net.4"]["input_kappa_100"]
    table["net.4"]["input_kappa_100_infinite"] = 1.0
    return table


def test_layer_table_prints_lower_bounds_infinities_and_ranks() -> None:
    from lightning_conditioning.report.tables import format_layer_table

    table = _marked_table()  # the table shows κ_50, the κ the diagnosis quotes: mark those
    del table["net.2"]["input_kappa_50"], table["net.4"]["input_kappa_50"]
    table["net.2"]["input_kappa_50_lower_bound"] = 1.23e6
    table["net.4"]["input_kappa_50_infinite"] = 1.0
    lines = format_layer_table(table).splitlines()
    header = lines[0].split()
    assert header[2:6] == ["λmax(Σx)", "κ50(Σx)", "rank(Σx)", "λmax(Σ∇h)"] and "rank(Σ∇h)" in header
    cells = {line.split()[1]: line.split() for line in lines[1:]}
    column = header.index("κ50(Σx)")
    assert [cells[n][column] for n in ("net.0", "net.2", "net.4")] == ["3", "≥1.23e+06", "∞"]
    assert cells["net.2"][header.index("rank(Σx)")] == "5/8"
    assert cells["net.2"][header.index("rank(Σ∇h)")] == "4"  # size unknown: the rank alone


def test_depth_profile_marks_non_measurements() -> None:
    pytest.importorskip("matplotlib")
    from lightning_conditioning.views import figures

    figure = figures.depth_profile_figure(_marked_table())
    ax = figure.axes[3]  # κ_p of Σx
    lines = ax.get_lines()
    kappa_100 = next(line for line in lines if line.get_label() == r"$\kappa_{100\%}$")
    ys = list(kappa_100.get_ydata())
    assert ys[0] == 40.0 and math.isnan(ys[1]) and math.isnan(ys[2]) and ys[3] == 43.0
    bounds = [line for line in lines if line.get_marker() == "^"]
    assert len(bounds) == 1 and bounds[0].get_markerfacecolor() == "none"
    assert list(bounds[0].get_xdata()) == [2] and list(bounds[0].get_ydata()) == [1.23e6]
    infinite = [line for line in lines if line.get_marker() == r"$\infty$"]
    assert len(infinite) == 1 and list(infinite[0].get_xdata()) == [3]
    assert infinite[0].get_ydata()[0] > 0.9 and not infinite[0].get_clip_on()  # axes fraction
    assert ax.get_ylim()[1] > 1.23e6 * 3  # headroom: the bound stays under the ∞ row
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert any("bound" in t for t in legend) and any("structural" in t for t in legend)
    # a table without markers draws neither
    clean = {
        n: {k: v for k, v in row.items() if "_lower_bound" not in k and "_infinite" not in k}
        for n, row in _marked_table().items()
    }
    plain = figures.depth_profile_figure(clean).axes[3].get_lines()
    assert not [line for line in plain if line.get_marker() in ("^", r"$\infty$")]


def test_training_figure_marks_non_measurements() -> None:
    pytest.importorskip("matplotlib")
    from lightning_conditioning.views import figures

    history = {
        0: {"fc": {"grad_lambda_max": 1.0, "grad_kappa_100": 5.0}},
        9: {"fc": {"grad_lambda_max": 1.0, "grad_kappa_100_lower_bound": 1e9}},
        99: {"fc": {"grad_lambda_max": 1.0, "grad_kappa_100_infinite": 1.0}},
    }
    ax = figures.training_figure(history).axes[4]  # κ of Σ∇h
    markers = {line.get_marker(): line for line in ax.get_lines()}
    assert list(markers["^"].get_xdata()) == [10] and list(markers["^"].get_ydata()) == [1e9]
    assert list(markers[r"$\infty$"].get_xdata()) == [100]
    assert ax.get_legend() is not None


def test_units_figure_shows_an_embeddings_unused_rows() -> None:
    from lightning_conditioning.views.figures import units_figure

    table = {
        "emb": {"unused_rows": 28.0, "input_units": 50.0},
        "fc": {"dead_input_units": 1.0, "full_input_units": 0.0, "input_units": 32.0},
    }
    ax = units_figure(table, step=0).axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[-1] == "unused table rows (embeddings)"
    grey = [p.get_height() for p in ax.containers[-1].patches]
    assert grey[0] == pytest.approx(28 / 50) and math.isnan(grey[1])

"""``python -m lightning_conditioning report``: CSV and TensorBoard runs, figures, bad input."""

from __future__ import annotations

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
from lightning_conditioning.report.spectra_file import SPECTRA_FILENAME


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One 3-step run logged to TensorBoard and CSV at once: {"tensorboard": dir, "csv": dir}."""
    root = tmp_path_factory.mktemp("runs")
    x, y = torch.randn(48, 10, generator=torch.Generator().manual_seed(3)), torch.arange(48) % 4
    net = seeded(lambda: nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                                       nn.Linear(16, 4)))
    loggers = [TensorBoardLogger(root, name="tb"), CSVLogger(root, name="csv")]
    trainer = pl.Trainer(
        max_steps=3, logger=loggers, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, accelerator="cpu", devices=1,
        callbacks=[ConditioningCallback(every_n_steps=1, log_figures=False),
                   WeightDominationCallback(every_n_steps=1)],
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
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == f"lightning-conditioning: error: {tmp_path / 'nope'}: no such directory"

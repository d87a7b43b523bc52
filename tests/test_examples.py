"""The README's main job runs end to end on the shipped MNIST sample (reduced size)."""

from __future__ import annotations

from pathlib import Path

from example_projects import quickstart


def test_quickstart_runs_and_logs(tmp_path: Path) -> None:
    callback = quickstart.main(["--steps", "21", "--every-n-steps", "10", "--out", str(tmp_path)])
    assert set(callback.results) == {f"net.{i}" for i in (1, 3, 5, 7, 9, 11)}
    assert all(r.status == "ok" and r.step == 20 for r in callback.results.values())
    # MNIST's blank border pixels are "dead" inputs of the first layer
    assert callback.results["net.1"].dead_input_units > 50
    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0

"""What publishing one analysed step costs, per logger output, and a cheaper figure.

A section of ``python benchmarks/perf.py``; alone::

    python benchmarks/logging_cost.py [--rounds 5]

The callback publishes on global rank zero, in the training loop, right after the analysis
(``publish_conditioning``). With Lightning's default logger (TensorBoard) that is scalars,
log10-eigenvalue histograms, the spectra file and the depth-profile figure (``log_figures``
and ``log_histograms`` default to True). Kinds, interleaved, on the results of one analysed
step of the workload:

``scalars``              ``publish_conditioning(histograms=False, figures=False)``;
``+ histograms/spectra`` ``histograms=True, figures=False``;
``+ figure``             ``histograms=False, figures=True``;
``figure, constrained``  build the depth-profile figure and render it with Agg (what
                         ``SummaryWriter.add_figure`` does), as today (``layout="constrained"``);
``figure, no layout``    the same figure with its layout engine switched off before rendering
                         (an alternative: fixed margins instead of constrained layout).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from typing import Any

import torch
from harness import Kind, interleave, medians, sgd, train_step, workload

from lightning_conditioning import analyse_layer
from lightning_conditioning.capture.hooks import LayerCapture, find_layers


def analysed_results(name: str) -> dict[str, Any]:
    """Results of one analysed step of a workload (CPU)."""
    load = workload(name, torch.device("cpu"))
    capture = LayerCapture(find_layers(load.net))
    capture.attach()
    capture.active = True
    train_step(load.net, sgd(load.net), load.x, load.y)
    capture.detach()
    return {layer: analyse_layer(layer, 0, window) for layer, window in capture.moments().items()}


def measure(name: str, rounds: int) -> dict[str, float]:
    """Median ms of every kind of the module docstring for one workload."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from lightning_conditioning.sinks import publish_conditioning
    from lightning_conditioning.sinks.base import Publication

    results = analysed_results(name)
    steps = iter(range(1_000_000))

    def publish(histograms: bool, figures: bool) -> Kind:
        return lambda: publish_conditioning([logger], results, next(steps), histograms=histograms, figures=figures)

    def render(layout: bool) -> Kind:
        def run() -> None:
            figure = Publication(results, 0).figure
            assert figure is not None
            if not layout:
                figure.set_layout_engine("none")
            FigureCanvasAgg(figure).draw()

        return run

    with tempfile.TemporaryDirectory() as root:
        logger = TensorBoardLogger(root)
        kinds = {
            "scalars": publish(False, False),
            "+ histograms/spectra": publish(True, False),
            "+ figure": publish(False, True),
            "figure, constrained (current)": render(True),
            "figure, no layout engine (alternative)": render(False),
        }
        med = medians(interleave(kinds, rounds, torch.device("cpu")))
        logger.experiment.close()
    return {k: 1e3 * v for k, v in med.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workloads", nargs="+", default=["mlp", "resnet20"])
    args = parser.parse_args(argv)
    result = {name: measure(name, args.rounds) for name in args.workloads}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

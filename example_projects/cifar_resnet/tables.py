"""Tables 1 and 2 of the paper from finished runs: test error (%), mean ± std over seeds.

    python -m example_projects.cifar_resnet.tables runs/cifar_resnet            # every run.json below
    python -m example_projects.cifar_resnet.tables runs/cifar_resnet --metric best --out tables.md

Reads every ``run.json`` that :mod:`example_projects.cifar_resnet.main` wrote (one per
arch/depth/seed, in the TensorBoard log dir), groups them by dataset, architecture and depth,
and prints one Markdown table per dataset: rows = depth, columns = ResNet, PreResNet,
PreResNetv1, ResNetLastBN (those present), each cell "ours mean ± std (n seeds) · paper
mean ± std". ``--metric final`` (default) is the test error after the last epoch;
``best`` is the lowest per-epoch test error (what fb.resnet.torch prints as "best top1").
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from example_projects.cifar_resnet.model import ARCHS, LABELS

# Huang et al. (2020), Tables 1 and 2: test error (%) mean ± std over five seeds.
PAPER: dict[str, dict[str, dict[int, tuple[float, float]]]] = {
    "cifar10": {
        "resnet": {56: (7.52, 0.30), 110: (6.89, 0.52), 230: (7.35, 0.64), 1202: (9.42, 3.10)},
        "preresnet": {56: (6.89, 0.09), 110: (6.25, 0.08), 230: (6.12, 0.21), 1202: (6.07, 0.10)},
        "preresnetv1": {56: (6.75, 0.26), 110: (6.37, 0.24), 230: (6.32, 0.21), 1202: (7.89, 0.58)},
        "lastbn": {56: (6.50, 0.22), 110: (6.10, 0.09), 230: (5.94, 0.18), 1202: (5.68, 0.14)},
    },
    "cifar100": {
        "resnet": {56: (29.60, 0.41), 110: (28.3, 1.09), 230: (29.25, 0.44), 1202: (30.49, 4.44)},
        "preresnet": {56: (29.29, 0.44), 110: (27.58, 0.12), 230: (26.72, 0.33), 1202: (26.23, 0.26)},
        "preresnetv1": {56: (29.60, 0.21), 110: (28.54, 0.26), 230: (27.92, 0.34), 1202: (30.07, 2.04)},
        "lastbn": {56: (28.82, 0.38), 110: (27.05, 0.23), 230: (25.80, 0.10), 1202: (25.51, 0.27)},
    },
}
TITLES = {"cifar10": "Table 1 (CIFAR-10)", "cifar100": "Table 2 (CIFAR-100)"}

Errors = dict[tuple[str, str, int], list[float]]


def load_runs(root: Path) -> list[dict[str, Any]]:
    """Every ``run.json`` under ``root`` (sorted by path)."""
    return [json.loads(path.read_text()) for path in sorted(Path(root).rglob("run.json"))]


def collect(runs: Iterable[dict[str, Any]], metric: str = "final") -> Errors:
    """``{(data, arch, depth): [test error % of each seed]}``; runs without the metric are skipped."""
    key = "test_error" if metric == "final" else "best_val_error"
    errors: Errors = defaultdict(list)
    for run in runs:
        value = run.get(key)
        if value is not None and math.isfinite(value):
            errors[(run["data"], run["arch"], int(run["depth"]))].append(100.0 * float(value))
    return dict(errors)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def render(errors: Errors, metric: str = "final") -> str:
    """One Markdown table per dataset, rows = depth, columns = architectures present."""
    if not errors:
        return "No finished runs with a test error."
    blocks: list[str] = []
    for data in sorted({d for d, _, _ in errors}):
        archs = [a for a in ARCHS if any(k[:2] == (data, a) for k in errors)]
        depths = sorted({depth for d, _, depth in errors if d == data})
        paper = PAPER.get(data, {})
        title = TITLES.get(data, f"data: {data} (no paper numbers)")
        when = "at the end of training" if metric == "final" else "at the best epoch"
        blocks += [
            f"**{title}** — test error (%) {when}, mean ± std over seeds; paper's number after the dot.",
            "",
            "| depth | " + " | ".join(LABELS[a] for a in archs) + " |",
            "|---" * (len(archs) + 1) + "|",
        ]
        for depth in depths:
            cells = []
            for arch in archs:
                values = errors.get((data, arch, depth))
                ours = "—"
                if values:
                    mean, std = mean_std(values)
                    ours = f"{mean:.2f} ± {std:.2f} (n={len(values)})"
                reference = paper.get(arch, {}).get(depth)
                cells.append(ours + (f" · {reference[0]:.2f} ± {reference[1]:.2f}" if reference else ""))
            blocks.append(f"| {depth} | " + " | ".join(cells) + " |")
        blocks.append("")
    return "\n".join(blocks).rstrip() + "\n"


def main(argv: list[str] | None = None) -> str:
    """CLI: print (and optionally write) the tables for every run under a folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="folder holding the runs (searched recursively for run.json)")
    parser.add_argument("--metric", choices=["final", "best"], default="final")
    parser.add_argument("--out", default=None, help="also write the tables to this Markdown file")
    args = parser.parse_args(argv)
    text = render(collect(load_runs(Path(args.root)), args.metric), args.metric)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    main()

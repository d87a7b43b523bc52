"""Figures 6-9 of the paper from finished runs (log-log over iterations, as the paper draws them)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from example_projects.cifar_resnet.model import ARCHS, LABELS

COLORS: dict[str, str] = {
    "resnet": "tab:red",
    "preresnet": "tab:green",
    "preresnetv1": "tab:orange",
    "lastbn": "tab:blue",
}
PANELS: tuple[tuple[str, str], ...] = (
    ("loss", "(a) training loss (batch)"),
    ("input_lambda_max", "(b) λmax(Σx), input of the last linear layer"),
    ("fim_lambda_max", "(c) λmax(Σx)·λmax(Σ∇h) (its sub-FIM)"),
    ("weight_norms", "(d) ‖W‖: σmax (solid), Frobenius (dashed)"),
    ("grad_weight_ratio", "(e) σmax(∇W) / σmax(W)"),
    ("negative_bn_beta_fraction", "(f) fraction of BN shifts β < 0"),
)


def series(run: dict[str, Any], key: str) -> tuple[np.ndarray, np.ndarray]:
    steps = sorted(run["analyses"], key=int)
    return (
        np.array([int(s) for s in steps], dtype=float),
        np.array([run["analyses"][s].get(key, math.nan) for s in steps], dtype=float),
    )


def diverged_at(run: dict[str, Any]) -> int | None:
    bad = [step for step, value in enumerate(run["loss"]) if not math.isfinite(value)]
    return bad[0] if bad else None


def _panel_values(run: dict[str, Any], key: str) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """(x, y, linestyle) curves of one panel for one run."""
    if key == "loss":
        loss = np.asarray(run["loss"], dtype=float)
        return [(np.arange(1, len(loss) + 1), loss, "-")]
    if key == "weight_norms":
        (s1, sigma), (s2, fro) = series(run, "weight_spectral_norm"), series(run, "weight_fro")
        return [(s1 + 1, sigma, "-"), (s2 + 1, fro, "--")]
    steps, values = series(run, key)
    return [(steps + 1, values, "-")]


def plot_last_layer(runs: list[dict[str, Any]], path: Path, title: str, by_depth: bool = False) -> Path:
    """Six panels on the last linear layer for the runs of one depth (Figs. 6, 7 and 9).

    A run whose loss went non-finite is labelled with the step, and the y-range is set by the
    runs that did not diverge (the diverged curve leaves the axes instead of squashing them).
    ``by_depth``: colour by depth instead of architecture (Fig. 6: one architecture, all depths).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    ordered = sorted(runs, key=lambda r: (ARCHS.index(r["arch"]), r["depth"], r["seed"]))
    depths = sorted({r["depth"] for r in runs})
    palette = plt.get_cmap("viridis")
    first_seed = min(r["seed"] for r in runs)
    stable = [r for r in ordered if diverged_at(r) is None] or ordered
    for ax, (key, label) in zip(axes.flat, PANELS):
        for run in ordered:
            first, diverged = run["seed"] == first_seed, diverged_at(run)
            name = f"{LABELS[run['arch']]}-{run['depth']}" + ("" if first else f" seed {run['seed']}")
            if diverged is not None:
                name += f" (diverged: NaN at step {diverged})"
            color = (
                palette(0.85 * depths.index(run["depth"]) / max(len(depths) - 1, 1))
                if by_depth
                else COLORS[run["arch"]]
            )
            style = {"color": color, "alpha": 1.0 if first else 0.35, "lw": 1.4 if first else 0.8}
            for index, (x, y, ls) in enumerate(_panel_values(run, key)):
                ax.plot(x, y, ls=ls, label=name if index == 0 else None, **style)
        ax.set_xscale("log")
        values = np.concatenate([y for run in stable for _, y, _ in _panel_values(run, key)])
        values = values[np.isfinite(values)]
        if key != "negative_bn_beta_fraction":
            ax.set_yscale("log")
            positive = values[values > 0]
            if len(positive):
                ax.set_ylim(positive.min() / 2, positive.max() * 5)
        elif len(values):
            ax.set_ylim(max(0.0, values.min() - 0.1), min(1.0, values.max() + 0.1))
        if key == "loss":
            ax.axhline(math.log(10), color="k", ls=":", lw=1, label="ln 10 (random guess)")
        ax.set_xlabel("iteration + 1")
        ax.set_ylabel(label.split(") ", 1)[1])
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="both", alpha=0.25)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=9, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.045 * (1 + (len(labels) - 1) // 4), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_training_loss(runs: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Fig. 8: per-epoch mean training loss, one panel per architecture, one line per depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_arch: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        if run.get("mode", "epochs") == "epochs" and run["epochs"] >= 2:
            by_arch[run["arch"]].append(run)
    if not by_arch:
        return None
    archs = [a for a in ARCHS if a in by_arch]
    fig, axes = plt.subplots(1, len(archs), figsize=(4.5 * len(archs), 3.8), sharey=True, squeeze=False)
    for ax, arch in zip(axes[0], archs):
        for run in sorted(by_arch[arch], key=lambda r: (r["depth"], r["seed"])):
            loss = np.asarray(run["loss"], dtype=float)
            per_epoch = np.array_split(loss, run["epochs"])
            curve = [float(np.mean(chunk)) for chunk in per_epoch if len(chunk)]
            ax.plot(np.arange(1, len(curve) + 1), curve, label=f"depth {run['depth']} seed {run['seed']}")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean training loss")
        ax.set_title(LABELS[arch])
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_all(runs: list[dict[str, Any]], out: Path) -> list[Path]:
    """Every figure for a set of runs; returns the PNG paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for data in sorted({r["data"] for r in runs}):
        mine = [r for r in runs if r["data"] == data]
        for depth in sorted({r["depth"] for r in mine}):
            at_depth = [r for r in mine if r["depth"] == depth]
            groups = [
                ("last_layer", ("resnet", "lastbn"), "ResNet vs ResNetLastBN (cf. paper Figs. 6, 7)"),
                ("preact", ("resnet", "preresnet", "preresnetv1"), "ResNet, PreResNet, PreResNetv1 (cf. paper Fig. 9)"),
            ]
            for stem, archs, caption in groups:
                chosen = [r for r in at_depth if r["arch"] in archs]
                if len({r["arch"] for r in chosen}) >= 2 or (stem == "last_layer" and chosen):
                    paths.append(
                        plot_last_layer(
                            chosen,
                            out / f"{stem}_{data}_depth{depth}.png",
                            f"Last linear layer, depth {depth}, data: {data}: {caption}",
                        )
                    )
        depths = sorted({r["depth"] for r in mine})
        for arch in ("resnet", "lastbn") if len(depths) > 1 else ():
            chosen = [r for r in mine if r["arch"] == arch]
            if len({r["depth"] for r in chosen}) > 1:
                paths.append(
                    plot_last_layer(
                        chosen,
                        out / f"{arch}_depths_{data}.png",
                        f"Last linear layer of {LABELS[arch]} across depths, data: {data} (cf. paper Fig. 6)",
                        by_depth=True,
                    )
                )
        loss_figure = plot_training_loss(
            mine, out / f"training_loss_{data}.png", f"Training loss per epoch, data: {data} (cf. paper Fig. 8)"
        )
        if loss_figure is not None:
            paths.append(loss_figure)
    return paths

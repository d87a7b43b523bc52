"""The tiny_lm figures, drawn from the runs as read back (:mod:`.analysis`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from example_projects.tiny_lm.analysis import GROUPS, LABELS, MOMENTS, VARIANTS, dom, smoothed, steps_of, value

__all__ = ["plot"]


def short(name: str) -> str:
    """``blocks.2.self_attn.q_proj`` → ``2.q``; ``blocks.2.linear1`` → ``2.fc1``."""
    if not name.startswith("blocks."):
        return name
    _, index, *rest = name.split(".")
    tail = rest[-1]
    return f"{index}." + {
        "q_proj": "q",
        "k_proj": "k",
        "v_proj": "v",
        "out_proj": "out",
        "linear1": "fc1",
        "linear2": "fc2",
    }.get(tail, tail)


def plot(runs: list[dict[str, Any]], summary: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_conditioning.views.figures import kappa_marker_legend, plot_kappa

    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    seed0 = {v: next((r for r in runs if r["variant"] == v), None) for v in VARIANTS}
    base = seed0["final_ln"] or runs[0]
    steps, end = summary["steps"], summary["end"]
    shown = sorted({0, summary["early"], end})  # initialisation, the first analysed step after it, the end
    layers = base["layers"]
    x = np.arange(1, len(layers) + 1)

    # 1. depth profiles at a few steps
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    styles = {"final_ln": "-", "no_final_ln": "--"}
    drawn_any: set[str] = set()
    for col, moment in enumerate(MOMENTS):
        for row, quantity in enumerate((f"{moment}_lambda_max", f"{moment}_kappa_50")):
            ax = axes[row][col]
            drawn: set[str] = set()
            for variant, run in seed0.items():
                if run is None:
                    continue
                for index, step in enumerate(shown):
                    label = f"step {step}, {LABELS[variant]}"
                    if row == 0:
                        ax.semilogy(
                            x,
                            [value(run, step, n, quantity) for n in layers],
                            styles[variant],
                            marker="o",
                            ms=3,
                            color=f"C{index}",
                            label=label,
                        )
                    else:
                        rows = [run["conditioning"][str(step)].get(n) for n in layers]
                        before = len(ax.lines)
                        drawn |= plot_kappa(ax, list(x), rows, moment, "50", colour=f"C{index}", index=index)
                        ax.lines[before].set_linestyle(styles[variant])
            ax.set_xticks(list(x), [short(n) for n in layers], rotation=90, fontsize=7)
            for b in range(len(base["groups"]["q_proj"])):  # block boundaries
                ax.axvline(2.5 + 6 * b, color="0.8", lw=0.8, zorder=0)
            ax.axvline(len(layers) - 0.5, color="0.8", lw=0.8, zorder=0)
            ax.set_title(f"{'λmax' if row == 0 else 'κ50%'}({MOMENTS[moment]}) across depth")
            ax.grid(True, which="major", axis="y", alpha=0.3)
            if row == 1:
                kappa_marker_legend(ax, drawn, fontsize=7)
                if not drawn and ax.get_legend() is not None:
                    ax.get_legend().remove()
            drawn_any |= drawn
    handles, labels = axes[0][0].get_legend_handles_labels()
    order = [i + k * len(shown) for i in range(len(shown)) for k in range(len(handles) // len(shown))]
    fig.legend(
        [handles[i] for i in order],
        [labels[i] for i in order],
        loc="upper center",
        ncol=len(shown),
        fontsize=8,
        bbox_to_anchor=(0.5, 0.962),
    )
    fig.suptitle(
        f"Seed {base['seed']}, layers in forward order (2.q = block 2's query projection, fc1/fc2 = its MLP; "
        "grey lines: block boundaries). Solid: final LayerNorm before the head; dashed: none.",
        y=0.99,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.935))
    paths.append(out / "depth_profile.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    # 2. λmax over training per layer group
    fig, axes = plt.subplots(2, 3, figsize=(17, 9), sharex=True)
    for row, variant in enumerate(VARIANTS):
        mine = [r for r in runs if r["variant"] == variant]
        for col, moment in enumerate(MOMENTS):
            ax = axes[row][col]
            for index, group in enumerate(GROUPS):
                for k, run in enumerate(mine):
                    names = [n for n in run["groups"][group] if n != "pos"]
                    per_layer = np.array([[value(run, s, n, f"{moment}_lambda_max") for s in steps] for n in names])
                    median = np.exp(np.nanmedian(np.log(per_layer), axis=0))
                    ax.semilogy(
                        steps,
                        median,
                        "-" if k == 0 else ":",
                        color=f"C{index}",
                        lw=1.6 if k == 0 else 1.0,
                        label=group if k == 0 else None,
                    )
                    if k == 0 and len(names) > 1:
                        ax.fill_between(
                            steps,
                            np.nanmin(per_layer, axis=0),
                            np.nanmax(per_layer, axis=0),
                            color=f"C{index}",
                            alpha=0.12,
                            lw=0,
                        )
            ax.set_title(f"λmax({MOMENTS[moment]}) — {LABELS[variant]}")
            ax.set_xlabel("step")
            ax.grid(True, which="major", alpha=0.3)
            if col == 0:
                ax.legend(fontsize=7, ncol=2)
    fig.suptitle(
        "λmax over training per layer group: median over the blocks (band: min–max over the blocks, "
        "seed 0); dotted: seed 1. 'embedding' is the token embedding; q, k and v share Σx"
    )
    fig.tight_layout()
    paths.append(out / "lambda_max_training.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    # 3. the head with and without a final LayerNorm
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    panels = [
        ("loss", "(a) training loss (20-step mean), ○ validation"),
        ("input_lambda_max", "(b) λmax(Σx), the head's input"),
        ("fim_lambda_max", "(c) λmax of the head's sub-FIM"),
        ("input_kappa_50", "(d) κ50%(Σx), the head's input"),
        ("weight_spectral_norm", "(e) σmax(W_head)"),
        ("grad_weight_ratio", "(f) σmax(∇W)/σmax(W), head"),
    ]
    for ax, (key, title) in zip(axes.flat, panels):
        for index, variant in enumerate(VARIANTS):
            for k, run in enumerate(r for r in runs if r["variant"] == variant):
                style = "-" if k == 0 else ":"
                label = f"{LABELS[variant]}, seed {run['seed']}"
                if key == "loss":
                    ax.plot(*smoothed(run["train_loss"]), style, color=f"C{index}", label=label)
                    ax.plot(
                        [int(s) for s in run["val_loss"]],
                        list(run["val_loss"].values()),
                        "o",
                        color=f"C{index}",
                        mfc="none",
                    )
                elif key in ("weight_spectral_norm", "grad_weight_ratio"):
                    ds = sorted(int(s) for s in run["domination"])
                    ax.semilogy(ds, [dom(run, s, "head", key) for s in ds], style, color=f"C{index}", label=label)
                else:
                    ax.semilogy(
                        steps_of(run),
                        [value(run, s, "head", key) for s in steps_of(run)],
                        style,
                        color=f"C{index}",
                        label=label,
                    )
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "head_final_norm.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    # 4. the token embedding: Σx is the characters' frequencies
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    corpus = np.sort(np.asarray(base["corpus_counts"], dtype=float))[::-1]
    corpus /= corpus.sum()
    ax = axes[0]
    ax.semilogy(np.arange(1, len(corpus) + 1), corpus, "k-", label="character frequency, training text")
    if base["tok_input_eigenvalues"] is not None:
        eigen = np.asarray(base["tok_input_eigenvalues"], dtype=float)
        shown_eigen = np.where(eigen > 0, eigen, np.nan)
        ax.semilogy(
            np.arange(1, len(eigen) + 1),
            shown_eigen,
            "o",
            ms=3,
            color="C0",
            label=f"eigenvalues of Σx(tok), step {base['spectra_step']} (one batch)",
        )
        zeros = int((eigen <= 0).sum())
        ax.text(
            0.98,
            0.9,
            f"{zeros} of {len(eigen)} eigenvalues are 0:\ncharacters absent from the batch",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=8,
        )
    ax.set_xlabel("rank")
    ax.set_title("token embedding: Σx = diag(character frequencies)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax = axes[1]
    for index, (quantity, label) in enumerate(
        (
            ("input_lambda_max", "λmax(Σx)"),
            ("input_kappa_50", "κ50%(Σx)"),
            ("grad_lambda_max", "λmax(Σ∇h)"),
            ("grad_kappa_50", "κ50%(Σ∇h)"),
        )
    ):
        ax.semilogy(
            steps,
            [value(base, s, "tok", quantity) for s in steps],
            "-o" if "input" in quantity else "-s",
            ms=3,
            color=f"C{index}",
            label=label,
        )
    ax.set_xlabel("step")
    ax.set_title("token embedding over training: Σx is the data, Σ∇h the model")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "embedding.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths

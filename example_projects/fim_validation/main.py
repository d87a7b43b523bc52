"""Claim 4 (Figs. 1-2, App. B): exact full FIM and sub-FIMs vs the Kronecker approximation.

    python -m example_projects.fim_validation.main            # full size: ~2 minutes on 2 cores
    python -m example_projects.fim_validation.main --smoke    # CI size

An 8-layer (and a 4-layer), 24-wide MLP without biases on 12×12 MNIST (centre crop 20, resize
12) at initialisation (PyTorch's default ``nn.Linear`` init = the Torch7 reset the paper
calls random initialization), Plain vs BN. For the true Fisher F and the empirical M it
computes, on the same N examples:

* the exact full FIM and each layer's exact sub-FIM (``lightning_conditioning.analysis.exact``), and
* the Kronecker approximation Σx ⊗ Σ∇h from ConditioningCallback (for F: labels sampled from
  the model, averaged over ``--samples`` draws by a ``window_steps`` window at lr 0),

and reports λmax, κ50 and κ80 of each. Writes ``summary.json``, figures and ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from example_projects.data import mnist_5k, mnist_images
from lightning_conditioning import ConditioningCallback
from lightning_conditioning.analysis.exact import exact_fisher_spectra
from lightning_conditioning.report import conditioning_table
from lightning_conditioning.schema import format_percent, kappa_reading

PERCENTS = (50, 80)


def mlp(depth: int, width: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    features = 144
    for _ in range(depth - 1):
        layers += [nn.Linear(features, width, bias=False), *([nn.BatchNorm1d(width)] if batch_norm else []), nn.ReLU()]
        features = width
    layers.append(nn.Linear(features, 10, bias=False))
    return nn.Sequential(*layers)


class Frozen(pl.LightningModule):
    """Trains nothing (lr 0): every analysed pass sees the initial network."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def kronecker(net: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str, samples: int) -> dict[str, dict[str, float]]:
    """The callback's Σx ⊗ Σ∇h statistics per layer (one full batch; F averaged over draws)."""
    steps = samples if kind == "true" else 1
    callback = ConditioningCallback(
        every_n_steps=steps,
        window_steps=steps,
        kappa_percents=PERCENTS,
        fisher=kind,
        statistics_dtype="float64",
        log_histograms=False,
        log_figures=False,
    )  # type: ignore[arg-type]
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Frozen(net), DataLoader(TensorDataset(x, y), batch_size=len(x)))
    return conditioning_table(callback.results)


def _kappa(row: dict[str, float], percent: float) -> float:
    """κ_p of the sub-FIM: the measurement, or its lower bound (``inf`` when exactly zero)."""
    reading = kappa_reading(row, "fim", format_percent(percent))
    return reading[0] if reading else math.nan


def analyse(
    depth: int, width: int, batch_norm: bool, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace
) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    net = mlp(depth, width, batch_norm)
    names = [f"{i}" for i, m in enumerate(net) if isinstance(m, nn.Linear)]
    out: dict[str, Any] = {"layers": names}
    for kind in ("true", "empirical"):
        exact = exact_fisher_spectra(net.double(), x.double(), y, kind=kind, percents=PERCENTS)  # type: ignore[arg-type]
        net.float()
        approx = kronecker(net, x, y, kind, args.samples)
        out[kind] = {
            "full": {"lambda_max": exact.full.lambda_max, **{f"kappa_{p}": exact.full.kappa[p] for p in PERCENTS}},
            "exact": {
                n: {"lambda_max": s.lambda_max, **{f"kappa_{p}": s.kappa[p] for p in PERCENTS}}
                for n, s in exact.layers.items()
            },
            "kron": {
                n: {
                    "lambda_max": approx[f"net.{n}"]["fim_lambda_max"],
                    **{f"kappa_{p}": _kappa(approx[f"net.{n}"], p) for p in PERCENTS},
                }
                for n in names
            },
        }
    return out


def agreement(entry: dict[str, Any]) -> dict[str, float]:
    """Median over layers of |log10(Kronecker / exact)| per quantity (0 = identical)."""
    result = {}
    for quantity in ("lambda_max", *(f"kappa_{p}" for p in PERCENTS)):
        # a κ_p that is infinite (λ_p exactly zero) on either side has no ratio: such layers
        # are left out, and a quantity with none left reads nan
        pairs = [(entry["kron"][n][quantity], entry["exact"][n][quantity]) for n in entry["exact"]]
        errors = [abs(math.log10(k / e)) for k, e in pairs if math.isfinite(k) and math.isfinite(e)]
        result[quantity] = float(np.median(errors)) if errors else math.nan
    return result


def verdicts(results: dict[str, Any]) -> dict[str, tuple[bool, str]]:
    """Criteria fixed before the run, with their evidence."""
    checks: dict[str, tuple[bool, str]] = {}
    depths = sorted({key.split("-")[1] for key in results}, key=int)
    story, evidence = True, []
    for depth in depths:
        plain, bn = results[f"Plain-{depth}"], results[f"BN-{depth}"]
        for kind, label in (("true", "F"), ("empirical", "M")):
            p, b = plain[kind]["full"], bn[kind]["full"]
            ok = (
                p["lambda_max"] < 1e-2 * b["lambda_max"]
                and p["kappa_50"] > b["kappa_50"]
                and p["kappa_80"] > b["kappa_80"]
            )
            story &= ok
            evidence.append(
                f"{depth} layers {label}: λmax {p['lambda_max']:.2g} vs {b['lambda_max']:.2g}, "
                f"κ50 {p['kappa_50']:.3g} vs {b['kappa_50']:.3g}"
            )
    checks["claim 4: full FIM — Plain has a vanishing λmax and worse κ than BN"] = (story, "; ".join(evidence))
    for name in ("Plain", "BN"):
        worst = max(
            np.nanmax(list(agreement(results[k][kind]).values()))
            for k in results
            if k.startswith(name)
            for kind in ("true", "empirical")
        )
        lam = max(
            agreement(results[k][kind])["lambda_max"]
            for k in results
            if k.startswith(name)
            for kind in ("true", "empirical")
        )
        checks[f"claim 4: Kronecker approximation within a factor 2 of the exact sub-FIMs ({name})"] = (
            worst <= math.log10(2),
            f"largest median |log10 ratio| over quantities {worst:.2f} (λmax alone {lam:.2f})",
        )
    return checks


DISCUSSION = """## Discussion

- Since 2026-11-29 κ_p follows the paper's definition (footnote 2: λ_p is the ⌈p·d/100⌉-th of
  all d eigenvalues, zeros included; `docs/numerics.md`). Before, λ_p was taken among the
  nonzero eigenvalues only. The full FIM of these nets has fewer nonzero eigenvalues than
  parameters (rank ≤ examples × classes), so its κ50/κ80 rose (8-layer Plain F κ50
  4.95e4 → 9.44e4, BN 1.71e3 → 2.78e3) and the Kronecker κ80 of some Plain layers is a lower
  bound or infinite (dead units): such layers are left out of the agreement medians, and a
  quantity with no layer left reads nan. The verdicts did not change: the full FIM still tells
  the paper's story, and the factor-2 criterion still fails on κ (now by up to 1.15 decades for
  Plain, 0.89 for BN), not on λmax.

- The full FIM tells the paper's story: at initialisation the Plain 8-layer net's λmax is
  ~3e-5 (the paper reports ≈1e-5) against ~27 for BN (paper: ≈1; deep BN nets at init have
  growing gradients toward the input, see `../mnist_mlp`), and Plain is worse conditioned
  (κ50, κ80) for both F and M.
- For the Plain nets, the Kronecker approximation Σx ⊗ Σ∇h that the callback reports tracks
  the exact sub-FIMs' λmax closely: within ~5-10% on every layer for F (median |log10 ratio|
  0.02), within 25% for M (0.05-0.09). The condition numbers agree less well: κ50 within a
  factor 1.3-3 and κ80 within a factor 1.3-5 (worst: the 4-layer net's M, 0.71), so the
  factor-2 criterion fails on κ, not on λmax. The approximation drops the correlation between
  x and ∇h, which shifts the middle of the spectrum more than its top.
- For the BN nets it overestimates λmax of the lower layers by 2.5-4× and agrees within a
  factor 2 higher up. With BatchNorm in train mode an example's logits depend on the whole
  batch, so its weight gradient is not the outer product ∇h_i x_iᵀ that the Kronecker form
  assumes, and the correlation the factorisation drops is largest where the gradients grow
  (the lower layers). The ordering across layers and the Plain/BN contrast survive, which is
  what the paper's Figs. 1-2 use; absolute λmax of BN layers is an upper estimate here.
"""


def plot(results: dict[str, Any], out: Path) -> Path:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    keys = list(results)
    fig, axes = plt.subplots(len(keys), 3, figsize=(13, 3.4 * len(keys)), squeeze=False)
    for row, key in enumerate(keys):
        entry = results[key]["true"]
        layers = list(range(1, len(entry["exact"]) + 1))
        for col, quantity in enumerate(("lambda_max", "kappa_50", "kappa_80")):
            ax = axes[row][col]
            ax.semilogy(layers, [v[quantity] for v in entry["exact"].values()], "o-", label="exact sub-FIM")
            ax.semilogy(layers, [v[quantity] for v in entry["kron"].values()], "s--", label="Σx ⊗ Σ∇h (callback)")
            ax.axhline(entry["full"][quantity], color="k", lw=1, ls=":", label="full FIM")
            ax.set_title(f"{key}: {quantity.replace('_', ' ')} (true Fisher F)")
            ax.set_xlabel("layer index")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.set_ylabel(quantity.replace("lambda_max", "λmax").replace("kappa_", "κ"))
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "exact_vs_kronecker.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--width", type=int, default=24)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--samples", type=int, default=8, help="label draws per example for F")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/fim_validation")
    parser.add_argument("--results", default=None)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--from-summary", default=None, help="rewrite results and figures from a summary.json")
    args = parser.parse_args(argv)
    if args.from_summary:
        saved = json.loads(Path(args.from_summary).read_text())
        stored = argparse.Namespace(**saved["args"])
        out = Path(args.from_summary).parent
        plot(saved["results"], out / "figures")
        write_results(
            saved["results"], stored, saved["seconds"], Path(args.results or out / "results.md"), saved["command"]
        )
        return saved["results"]
    if args.smoke:
        args.depths, args.width, args.examples, args.samples = [3], 8, 32, 2
    start = time.time()
    x_all, y_all = mnist_5k(args.seed)
    x = mnist_images(x_all[: args.examples], crop=20, size=12).reshape(args.examples, -1)
    y = y_all[: args.examples]
    results = {
        f"{name}-{depth}": analyse(depth, args.width, name == "BN", x, y, args)
        for depth in args.depths
        for name in ("Plain", "BN")
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds = time.time() - start
    command = (
        "python -m example_projects.fim_validation.main " + " ".join(argv if argv is not None else sys.argv[1:])
    ).strip()
    (out / "summary.json").write_text(
        json.dumps({"results": results, "args": vars(args), "seconds": seconds, "command": command}, indent=1)
    )
    plot(results, out / "figures")
    write_results(results, args, seconds, Path(args.results or out / "results.md"), command)
    return results


def write_results(results: dict[str, Any], args: argparse.Namespace, seconds: float, path: Path, command: str) -> None:
    lines = [
        "# fim_validation: measured results",
        "",
        f"Command: `{command}` ({seconds:.0f} s, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}). "
        f"{args.examples} examples of 12×12 MNIST, width {args.width}, no biases, at initialisation; "
        f"F from the exact expectation (exact) vs {args.samples} label draws per example (Kronecker).",
        "",
        "## Full FIM (exact)",
        "",
        "| net | F λmax | F κ50 | F κ80 | M λmax | M κ50 | M κ80 |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        cells = [
            f"{r[k]['full'][q]:.3g}" for k in ("true", "empirical") for q in ("lambda_max", "kappa_50", "kappa_80")
        ]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Kronecker approximation vs exact sub-FIM",
        "",
        "Median over layers of |log10(Kronecker / exact)| (0.30 = a factor 2):",
        "",
        "| net | Fisher | λmax | κ50 | κ80 |",
        "|---|---|---|---|---|",
    ]
    for key, r in results.items():
        for kind in ("true", "empirical"):
            a = agreement(r[kind])
            lines.append(
                f"| {key} | {'F' if kind == 'true' else 'M'} | {a['lambda_max']:.2f} | {a['kappa_50']:.2f} | {a['kappa_80']:.2f} |"
            )
    lines += ["", "Per-layer numbers (λmax exact / Kronecker, F):", ""]
    for key, r in results.items():
        pairs = ", ".join(
            f"{n}: {r['true']['exact'][n]['lambda_max']:.3g} / {r['true']['kron'][n]['lambda_max']:.3g}"
            for n in r["layers"]
        )
        lines.append(f"- {key}: {pairs}")
    lines += ["", "Figure: `figures/exact_vs_kronecker.png`.", ""]
    checks = verdicts(results)
    verdict_lines = [
        "## Verdicts",
        "",
        "Criteria fixed before running: Plain's full-FIM λmax below 1% of BN's and its κ50, κ80 above BN's, "
        "for F and M at every depth; the Kronecker approximation within a factor 2 (median over layers "
        "of |log10(Kronecker/exact)| ≤ 0.30) for λmax, κ50 and κ80.",
        "",
    ]
    verdict_lines += [f"- **{c}: {'reproduced' if ok else 'NOT reproduced'}.** {e}" for c, (ok, e) in checks.items()]
    lines[3:3] = [""] + verdict_lines
    if not args.smoke:
        lines.append(DISCUSSION)
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()

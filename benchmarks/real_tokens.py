"""Real tokens per step (issue #21): GPT-2 small at the tokens a fine-tuning step uses, default
options, against plain training, against the previous default options, and against float64.

Usage (from the repository root)::

    python benchmarks/real_tokens.py --out benchmarks/results/real_tokens.json   # ~10 min here
    python benchmarks/real_tokens.py --only steps --steps 6      # one section
    python benchmarks/real_tokens.py --device cuda --out benchmarks/results/real_tokens_cuda.json
    python benchmarks/real_tokens.py --from-json benchmarks/results/real_tokens.json  # re-render

Sections (GPT-2 small: ``transformers.GPT2Config()``, 124M parameters, vocabulary 50,257, random
weights and tokens, AdamW; every section builds its model from the same seed):

``steps``     steps alternate plain / analysed (``every_n_steps=2``, every other option at its
              default) at ``--batch × --length`` tokens: the median plain step and every
              analysed step (the first included) as a ratio to it. The previous default
              options (every layer in every window, ``memory_budget`` three quarters of the
              parameter bytes, every row) run beside them at ``--batch × --small-length``.
              Then how the analysed step's extra time grows with the tokens: GPT-2 at full
              width and vocabulary with ``--growth-blocks`` blocks at ``--batch`` and
              ``4 × --batch`` sequences (passes past ``max_rows`` are sampled), every layer in
              every window (``step_overhead=None``: both sizes analyse the same layers). The default
              schedule's cost over a run follows from the measured steps (steps 0, 1, 2, 4, …,
              64, then every 100).
``accuracy``  one window at ``--batch × --length`` tokens: the default plan (all layers,
              ``step_overhead=None``: turns change which step a layer is analysed at, not its
              numbers, ``tests/monitors/test_turns.py``) against float64 references built from the
              window's own rows, caught by hooks of our own (the smaller Gram of the rows, float64
              ``eigvalsh``; fewer rows than half the width: ARPACK's λmax, κ_50 structurally
              infinite; the embeddings through a float64 monitor of their own). λmax relative
              error of every moment, κ_50 agreement.
``memory``    peak resident memory of a child process that trains ``--memory-steps`` steps with the
              default monitor and weight-domination monitor (default schedules: both check step
              0; the conditioning analyses steps 0, 1, 2), against one that
              trains them without; the training process's own peak (parameters, gradients,
              AdamW state and activations) is the plain child's peak over its resident set after
              the imports. GPT-2 small at ``--batch × --length`` tokens, then a Llama-7B-shaped
              block (``real_sizes.llama``: hidden 4096, intermediate 11008, vocabulary 1024) at
              ``--llama-batch × --llama-length``. The children are forked from a server that
              imported torch and transformers once.
``ranks``     moments sharded by owner (:mod:`owner_ranks`): GPT-2 at full width with
              ``--rank-layers`` blocks, 1 process against 2 (gloo), the finished-moment bytes each
              holds and the numbers against one process.

Ratios, not absolute times, mean something on a shared CPU: every section logs the CPU share
other processes took while it ran.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
import warnings
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import owner_ranks  # noqa: E402
from harness import ForeignLoad, machine, table, write_results  # noqa: E402
from real_sizes import adamw, gpt2, llama, proc_status, release_free_memory, sync, token_batches  # noqa: E402

from lightning_conditioning import ConditioningMonitor, WeightDominationMonitor  # noqa: E402
from lightning_conditioning.analysis.options import EARLY_STEPS, REGULAR_PERIOD  # noqa: E402
from lightning_conditioning.maths.resolution import floor_rtol  # noqa: E402
from lightning_conditioning.maths.spectra import summarize_spectrum  # noqa: E402

# benchmarks/kernels.py would shadow the `kernels` package that transformers looks for
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != HERE]

MIB = 1 << 20


def log(message: str) -> None:
    print(f"[real_tokens] {message}", file=sys.stderr, flush=True)


def monitor_for(model: torch.nn.Module, messages: list[str], **options: Any) -> ConditioningMonitor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ConditioningMonitor(model, info=messages.append, warn=messages.append, warn_diagnosis=False, **options)


def previous_budget(model: torch.nn.Module) -> int:
    """The previous default ``memory_budget="auto"``: three quarters of the parameter bytes,
    at least 64 MiB."""
    own = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    return max(64 * MIB, own * 3 // 4)


def lm_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ids: torch.Tensor,
    device: torch.device,
    monitors: list[Any],
    step: int,
) -> float:
    """One step (labels = inputs) inside every monitor's ``track``; its seconds."""
    batch = {"input_ids": ids, "labels": ids}
    sync(device)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        for monitor in monitors:
            if isinstance(monitor, ConditioningMonitor):
                stack.enter_context(monitor.track(step))
                monitor.set_loss_tokens(monitor.loss_tokens_for(batch))
        model(**batch).loss.backward()
    for monitor in monitors:
        if isinstance(monitor, WeightDominationMonitor):
            monitor.before_optimizer_step(step)
    optimizer.step()
    for monitor in monitors:
        if isinstance(monitor, WeightDominationMonitor):
            monitor.after_optimizer_step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - start


def schedule_count(steps: int) -> int:
    return sum(1 for s in range(steps) if s in EARLY_STEPS or s % REGULAR_PERIOD == 0)


def steps_at(
    args: argparse.Namespace,
    device: torch.device,
    length: int,
    previous: bool,
    batch: int | None = None,
    blocks: int | None = None,
    steps: int | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    model = gpt2(device, False, blocks=blocks)
    optimizer = adamw(model)
    batch = batch or args.batch
    batches = token_batches(model.config.vocab_size, batch, length, 4, device)
    messages: list[str] = []
    options: dict[str, Any] = {"every_n_steps": 2}
    if previous:
        options.update(step_overhead=None, memory_budget=previous_budget(model), max_rows=None)
    options.update(overrides)
    monitor = monitor_for(model, messages, **options)
    times: dict[str, list[float]] = {"plain": [], "analysed": []}
    layers: list[int] = []
    count = steps or (args.previous_steps if previous else args.steps)
    for step in range(count):
        seconds = lm_step(model, optimizer, batches[step % 4], device, [monitor], step)
        analysed = step % 2 == 0
        times["analysed" if analysed else "plain"].append(seconds)
        if analysed:
            layers.append(len(monitor.window_results))
        log(
            f"{'previous' if previous else 'default'} {batch}x{length} step {step}: "
            f"{'analysed' if analysed else 'plain'} {seconds:.1f} s"
        )
    plain = statistics.median(times["plain"])
    extra = statistics.mean(t - plain for t in times["analysed"])
    out = {
        "tokens": batch * length,
        "options": "previous" if previous else ", ".join(["default", *(f"{k}={v}" for k, v in overrides.items())]),
        "blocks": model.config.n_layer,
        "sampling_note": next((m for m in messages if "max_rows=" in m), None),
        "plain_s": plain,
        "analysed_s": times["analysed"],
        "plain_all_s": times["plain"],
        "ratios": [t / plain for t in times["analysed"]],
        "first_ratio": times["analysed"][0] / plain,
        "max_ratio": max(times["analysed"]) / plain,
        "mean_extra_s": extra,
        "layers_per_window": layers,
        "layers": len(monitor.layer_names),
        "plan": monitor.plan.summary() if monitor.plan else None,
        "turn_note": next((m for m in messages if "take turns" in m), None),
    }
    for steps in (1000, 10000):
        out[f"schedule_ratio_{steps}"] = 1 + schedule_count(steps) * extra / (steps * plain)
    monitor.close()
    return out


def section_steps(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The full model at ``--batch × --length`` tokens; the previous default options at
    ``--batch × --small-length``; then the growth of the extra time: GPT-2 at full width and
    vocabulary with ``--growth-blocks`` blocks (the activations of 12 blocks at 4 × 2,048 tokens
    do not fit this machine) at ``--batch`` and ``4 × --batch`` sequences of ``--length``."""
    out = {"full": steps_at(args, device, args.length, False)}
    if args.small_default:
        out["small"] = steps_at(args, device, args.small_length, False)
    if args.previous_steps:
        out["previous_small"] = steps_at(args, device, args.small_length or args.length, True)
    if "small" in out:  # under the sampling limit every row enters: the extra grows with them
        out["extra_growth_small"] = out["full"]["mean_extra_s"] / max(out["small"]["mean_extra_s"], 1e-9)
        out["token_growth_small"] = out["full"]["tokens"] / out["small"]["tokens"]
    return out


def _blocks(count: int) -> str:
    return f"{count} block" if count == 1 else f"{count} blocks"


def section_growth(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """How the analysed step's extra time grows with the tokens past ``max_rows``: GPT-2 at full
    width and vocabulary with ``--growth-blocks`` blocks (the activations of 12 blocks at
    4 × 2,048 tokens do not fit this machine) at ``--batch`` and ``4 × --batch`` sequences of
    ``--length``, ``--growth-steps`` alternating steps each.

    Every layer is analysed in every window at both sizes (``step_overhead=None``), so the two
    extras are the same work: what the tokens change. With turns (the default) a window takes
    the layers whose modelled cost fits a share of the plain step at the rows kept, so the two
    sizes' windows hold different layers (2 and 3 of 11 in one run, which read 3.85×: a
    comparison of different work, not growth); that share is bounded by construction and the
    ``steps`` section measures it."""
    every_layer = {"step_overhead": None}
    low = steps_at(args, device, args.length, False, blocks=args.growth_blocks, steps=args.growth_steps, **every_layer)
    high = steps_at(
        args,
        device,
        args.length,
        False,
        batch=4 * args.batch,
        blocks=args.growth_blocks,
        steps=args.growth_steps,
        **every_layer,
    )
    return {
        "low": low,
        "high": high,
        "extra_growth": high["mean_extra_s"] / max(low["mean_extra_s"], 1e-9),
        "token_growth": high["tokens"] / low["tokens"],
    }


def reference_from_rows(rows: torch.Tensor) -> tuple[float, float, str]:
    """``(λmax, κ_50, κ_50 status)`` of the mean ``rowsᵀ rows / n`` in float64, from the smaller
    Gram (``n × n`` when the rows are fewer than the width: the same nonzero spectrum), the rest
    exact zeros; summarised by the package's own rule at the floor of float64 Grams of float32
    rows (what the default plan's moments are held at on the CPU). When the rows are fewer than
    half the width, λ_50 is a structural zero (the rank is at most the rows): κ_50 is infinite
    and only λmax is solved, by ARPACK on the rows (the ``n × n`` Gram of the 50,257-wide
    head's gradient rows alone took 28 s)."""
    count, dim = rows.shape
    work = rows.to(torch.float64)
    if count < math.ceil(0.5 * dim):
        return _top_eigenvalue(work), math.inf, "infinite"
    gram = work @ work.T if count < dim else work.T @ work
    values = torch.linalg.eigvalsh((gram + gram.T) * 0.5).flip(0).clamp_min(0) / count
    values = torch.cat([values, values.new_zeros(dim - values.numel())]) if values.numel() < dim else values
    summary = summarize_spectrum(
        values, (50,), rtol=floor_rtol(rows=count, dim=dim, row_eps=torch.finfo(torch.float32).eps), max_rank=count
    )
    return summary.lambda_max, summary.kappa.get(50, math.nan), str(summary.kappa_status.get(50))


def _top_eigenvalue(rows: torch.Tensor) -> float:
    """λmax of ``rowsᵀ rows / n`` (float64 rows) by ARPACK to 1e-13, matrix-free."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    count, dim = rows.shape

    def apply(vector: Any) -> Any:
        v = torch.from_numpy(vector.reshape(-1)).to(torch.float64)
        return (rows.T @ (rows @ v) / count).numpy()

    value = eigsh(
        LinearOperator((dim, dim), matvec=apply, dtype="float64"), k=1, which="LA", tol=1e-13, return_eigenvectors=False
    )
    return float(value[0])


def section_accuracy(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The default plan's numbers against float64 references built from the window's own rows:
    every analysed layer's input rows and output-gradient rows are caught by hooks of our own
    (gradients scaled by the loss's tokens, as the monitor's per-example convention does) and
    solved through the smaller Gram; the embeddings (token counts, a lookup shared by the batch)
    through a float64 monitor of their own. The default monitor's analysis is waited for first
    (seconds), then the references are solved with every core."""
    model = gpt2(device, False)
    messages: list[str] = []
    default = monitor_for(model, messages, every_n_steps=1, analysis="background", step_overhead=None)
    tables = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Embedding)]
    reference = monitor_for(
        model,
        messages,
        every_n_steps=1,
        analysis="sync",
        step_overhead=None,
        statistics_dtype="float64",
        include=tables,
    )
    assert default.plan is not None and default.capture is not None
    ids = token_batches(model.config.vocab_size, args.batch, args.length, 1, device)[0]
    batch = {"input_ids": ids, "labels": ids}
    tokens = default.loss_tokens_for(batch)
    caught: dict[tuple[str, str], torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = []
    for name in default.capture.layers:
        if name in tables:
            continue

        def keep(module: Any, inputs: Any, output: torch.Tensor, name: str = name) -> None:
            caught[(name, "input")] = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float().cpu()
            if output.requires_grad:
                output.register_hook(
                    lambda g: caught.__setitem__(
                        (name, "grad"), g.detach().reshape(-1, g.shape[-1]).float().cpu() * float(tokens or 1)
                    )
                )

        handles.append(modules[name].register_forward_hook(keep))
    start = time.perf_counter()
    with default.track(0), reference.track(0):
        for monitor in (default, reference):
            monitor.set_loss_tokens(tokens)
        model(**batch).loss.backward()
    log(f"accuracy: the window's forward and backward took {time.perf_counter() - start:.0f} s")
    for handle in handles:
        handle.remove()
    # the default analysis takes seconds; the references then have every core (solved beside
    # the window's own work, they slowed it more than they saved: 196 s against 177 s)
    default.wait()
    log(f"accuracy: the default analysis done at {time.perf_counter() - start:.0f} s")
    references = {key: reference_from_rows(caught.pop(key)) for key in list(caught)}
    seconds = time.perf_counter() - start
    log(f"accuracy: references solved at {seconds:.0f} s")
    rows_out: list[dict[str, Any]] = []
    for name, result in default.window_results.items():
        for label in ("input", "grad"):
            mine = getattr(result, label)
            if name in tables:
                truth = getattr(reference.window_results[name], label)
                known = (truth.lambda_max, truth.kappa.get(50, math.nan), truth.kappa_status.get(50)) if truth else None
                reference_kind = "float64 monitor"
            else:
                known = references.get((name, label))
                reference_kind = "float64 rows Gram"
            if mine is None and known is None:  # measured by neither (a lookup shared by the batch)
                continue
            if mine is None or known is None:
                raise RuntimeError(f"{name} {label}: measured on one side only")
            true_lambda, true_kappa, true_status = known
            plan = default.plan.of(name, label)
            kappa, status = mine.kappa.get(50, math.nan), mine.kappa_status.get(50)
            rows_out.append(
                {
                    "layer": name,
                    "moment": label,
                    "dim": plan.dim if plan else None,
                    "method": plan.method if plan else None,
                    "reference": reference_kind,
                    "lambda_max": mine.lambda_max,
                    "reference_lambda_max": true_lambda,
                    "lambda_rel_error": abs(mine.lambda_max - true_lambda) / true_lambda if true_lambda else 0.0,
                    "kappa_50": kappa,
                    "kappa_50_status": status,
                    "reference_kappa_50": true_kappa,
                    "reference_kappa_50_status": true_status,
                    "kappa_agrees": (
                        status == true_status
                        and (
                            kappa == true_kappa
                            or (
                                math.isfinite(kappa)
                                and math.isfinite(true_kappa)
                                and max(kappa, true_kappa) / min(kappa, true_kappa) <= 1.1
                            )
                        )
                    ),
                    "full_spectrum": mine.eigenvalues is not None,
                }
            )
    default.close()
    reference.close()
    errors = [r["lambda_rel_error"] for r in rows_out]
    return {
        "tokens": args.batch * args.length,
        "window_s": seconds,
        "moments": rows_out,
        "max_lambda_rel_error": max(errors),
        "within_1e-3": sum(e <= 1e-3 for e in errors),
        "count": len(rows_out),
        "kappa_agree": sum(bool(r["kappa_agrees"]) for r in rows_out),
        "plan": default.plan.summary(),
    }


def memory_child(args: argparse.Namespace) -> dict[str, Any]:
    base = proc_status().get("VmRSS", 0)  # after the imports: the interpreter, torch, transformers
    device = torch.device(args.device)
    model = llama(device, False) if args.model == "llama" else gpt2(device, False)
    optimizer = adamw(model)
    batch, length = (args.llama_batch, args.llama_length) if args.model == "llama" else (args.batch, args.length)
    batches = token_batches(model.config.vocab_size, batch, length, args.memory_steps, device)
    monitors: list[Any] = []
    messages: list[str] = []
    if args.monitor:
        # both at their default schedules: each checks step 0, so the peak holds one check of each
        monitors = [
            monitor_for(model, messages),
            WeightDominationMonitor(model, warn=messages.append, info=messages.append, optimizer=optimizer),
        ]
    times = [lm_step(model, optimizer, batches[s], device, monitors, s) for s in range(args.memory_steps)]
    status = proc_status()
    out = {"monitor": bool(args.monitor), "rss_base": base, "rss_peak": status.get("VmHWM", 0), "steps_s": times}
    if args.monitor:
        conditioning = monitors[0]
        out["plan"] = conditioning.plan.summary() if conditioning.plan else None
        out["layers_analysed"] = len(conditioning.results)
        out["snapshot_budget"] = monitors[1].snapshot_budget
    if device.type == "cuda":
        out["cuda_peak"] = int(torch.cuda.max_memory_allocated(device))
    return out


def _memory_entry(namespace: dict[str, Any], connection: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        connection.send(memory_child(argparse.Namespace(**namespace)))


def memory_pair(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """Peak resident memory of a child that trains ``model`` with both monitors, against one
    that trains it without. The children are forked from a server that imported torch and
    transformers once (``forkserver``, before any thread pool started): each saves the import
    (about 10 s here), and its peak (``VmHWM``) and base are its own."""
    context = multiprocessing.get_context("forkserver")
    runs = {}
    for monitored in (False, True):
        receive, send = context.Pipe(duplex=False)
        child = context.Process(
            target=_memory_entry, args=({**vars(args), "model": model, "monitor": int(monitored)}, send)
        )
        child.start()
        send.close()
        try:
            runs["monitored" if monitored else "plain"] = receive.recv()
        except EOFError as error:
            raise RuntimeError(f"memory child failed (exit code {child.exitcode})") from error
        finally:
            child.join()
    plain, mon = runs["plain"], runs["monitored"]
    training_peak = plain["rss_peak"] - plain["rss_base"]
    extra = (mon["rss_peak"] - mon["rss_base"]) - training_peak
    tokens = args.llama_batch * args.llama_length if model == "llama" else args.batch * args.length
    return {
        "tokens": tokens,
        "plain": plain,
        "monitored": mon,
        "training_peak": training_peak,
        "extra_peak": extra,
        "extra_share": extra / training_peak,
    }


def section_memory(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """GPT-2 small at ``--batch × --length`` tokens, then (``out["llama"]``) a Llama-7B-shaped
    block (``real_sizes.llama``) at ``--llama-batch × --llama-length``."""
    out = memory_pair(args, "gpt2")
    if args.llama_length:
        out["llama"] = memory_pair(args, "llama")
    return out


def section_ranks(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """:mod:`owner_ranks`: GPT-2 at full width with ``--rank-layers`` blocks, 1 process against
    2 (gloo on the CPU), ``--rank-batch × --rank-length`` tokens in all."""
    return owner_ranks.section_ranks(
        argparse.Namespace(
            device=args.device, world=2, layers=args.rank_layers, batch=args.rank_batch, length=args.rank_length
        )
    )


def _steps_row(s: dict[str, Any]) -> list[str]:
    return [
        f"{s['options']}, {_blocks(s.get('blocks', 12))}, {s['tokens']} tokens",
        f"{s['plain_s']:.1f} s",
        ", ".join(f"{r:.2f}×" for r in s["ratios"]),
        f"{s['mean_extra_s']:.1f} s",
        f"{s['schedule_ratio_1000']:.4f}×",
        f"{s['schedule_ratio_10000']:.4f}×",
        f"{s['layers_per_window']} of {s['layers']}",
    ]


def _duration(name: str, entry: dict[str, Any]) -> str:
    return f"{name} {entry['seconds']:.0f} s (other processes {100 * (entry['foreign'] or 0):.0f}% CPU)"


def render(out: dict[str, Any]) -> str:
    lines = [
        f"Device {out['device']}, {out['machine'].get('cpu', '')}; total {out['total_s']:.0f} s; "
        f"sections: " + ", ".join(_duration(k, v) for k, v in out["durations"].items()),
        "",
    ]
    steps = out.get("steps")
    if steps:
        rows = []
        for key in ("full", "small", "previous_small"):
            if key in steps:
                rows.append(_steps_row(steps[key]))
        growth = out.get("growth") or {}
        for key in ("low", "high"):
            if key in growth:
                rows.append(_steps_row(growth[key]))
        lines += [
            "GPT-2 small, steps alternating plain / analysed:",
            "",
            table(
                [
                    "options, tokens per step",
                    "plain step",
                    "analysed steps (first first)",
                    "mean extra",
                    "default schedule, 1,000 steps",
                    "10,000 steps",
                    "layers per window",
                ],
                rows,
            ),
            "",
        ]
        if growth:
            lines += [
                f"Extra time of an analysed step grew {growth['extra_growth']:.2f}× when the tokens grew "
                f"{growth['token_growth']:.0f}× ({_blocks(growth['low']['blocks'])}, {growth['low']['tokens']} → "
                f"{growth['high']['tokens']} tokens, every layer in every window: passes past max_rows are sampled).",
                *([f"Sampling: {growth['high']['sampling_note']}"] if growth["high"].get("sampling_note") else []),
                "",
            ]
        if "extra_growth_small" in steps:
            lines += [
                f"Under the limit ({steps['small']['tokens']} → {steps['full']['tokens']} tokens, 12 blocks) "
                f"every row enters: the extra grew {steps['extra_growth_small']:.2f}×.",
                "",
            ]
    accuracy = out.get("accuracy")
    if accuracy:
        worst = sorted(accuracy["moments"], key=lambda r: -r["lambda_rel_error"])[:5]
        lines += [
            f"Accuracy, one window of {accuracy['tokens']} tokens (plan: {accuracy['plan']}): "
            f"λmax within 1e-3 of float64 for {accuracy['within_1e-3']} of {accuracy['count']} moments "
            f"(largest error {accuracy['max_lambda_rel_error']:.1e}); κ_50 agrees (status, and value "
            f"within 1.1×) for {accuracy['kappa_agree']} of {accuracy['count']}.",
            "",
            table(
                ["layer", "moment", "d", "method", "reference", "λmax rel. error", "κ_50", "reference κ_50"],
                [
                    [
                        r["layer"],
                        r["moment"],
                        r["dim"],
                        r["method"],
                        r["reference"],
                        f"{r['lambda_rel_error']:.1e}",
                        f"{r['kappa_50']:.4g} ({r['kappa_50_status']})",
                        f"{r['reference_kappa_50']:.4g} ({r['reference_kappa_50_status']})",
                    ]
                    for r in worst
                ],
            ),
            "",
        ]
    memory = out.get("memory")
    for title, found in (("GPT-2 small", memory), ("Llama-7B-shaped block", (memory or {}).get("llama"))):
        if found:
            lines += [
                f"Memory, {title} at {found['tokens']} tokens: training process's own peak "
                f"{found['training_peak'] / MIB:,.0f} MiB; extra peak with both monitors "
                f"{found['extra_peak'] / MIB:,.0f} MiB = {100 * found['extra_share']:.1f}% "
                f"(plan: {found['monitored'].get('plan')}). Steps (step 0 checked by both monitors): "
                + ", ".join(f"{t:.1f} s" for t in found["monitored"]["steps_s"])
                + " against "
                + ", ".join(f"{t:.1f} s" for t in found["plain"]["steps_s"])
                + " plain.",
                "",
            ]
    ranks = out.get("ranks")
    if ranks:
        lines += [
            f"Moments by owner, GPT-2 at full width with {ranks['layers']} blocks, {ranks['tokens']} tokens: "
            f"one process held {ranks['single_bytes'] / MIB:,.1f} MiB of finished moments, each of "
            f"{ranks['world']} ranks "
            + ", ".join(f"{b / MIB:,.1f}" for b in ranks["rank_bytes"])
            + " MiB ("
            + ", ".join(f"{100 * r:.0f}%" for r in ranks["rank_share"])
            + "); the ranks' numbers "
            + ("equal each other" if ranks["ranks_equal"] else "DIFFER between ranks")
            + f", λmax within {ranks['lambda_max_rel_diff']:.1e} and κ_50 within "
            f"{ranks['kappa_50_rel_diff']:.1e} of one process ({ranks['compared']} exact λmax compared). "
            f"{len(ranks['intervals'])} λmax of sketched moments are intervals on the ranks (a sketch merged "
            "over ranks is no longer one exact block); they hold one process's value: "
            f"{ranks['intervals_hold_reference']}.",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--only",
        nargs="+",
        default=["steps", "growth", "accuracy", "memory", "ranks"],
        choices=["steps", "growth", "accuracy", "memory", "ranks"],
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument(
        "--small-length",
        type=int,
        default=64,
        help="sequence length of the previous-default row (and of the default row --small-default)",
    )
    parser.add_argument(
        "--small-default",
        action="store_true",
        help="also the default options at --batch × --small-length (12 blocks, under the limit)",
    )
    parser.add_argument("--growth-blocks", type=int, default=1, help="GPT-2 blocks of the growth section")
    parser.add_argument("--growth-steps", type=int, default=2, help="alternating steps per growth size, analysed first")
    parser.add_argument(
        "--steps", type=int, default=2, help="alternating steps of the full model, analysed first (2: analysed, plain)"
    )
    parser.add_argument(
        "--previous-steps",
        type=int,
        default=2,
        help="steps with the previous default options at the small size (0: none)",
    )
    parser.add_argument(
        "--memory-steps", type=int, default=1, help="steps per memory child (step 0, the peak: both monitors check it)"
    )
    parser.add_argument("--llama-batch", type=int, default=1)
    parser.add_argument(
        "--llama-length",
        type=int,
        default=512,
        help="tokens per sequence of the Llama-7B-shaped block in the memory section (0: none)",
    )
    parser.add_argument("--rank-layers", type=int, default=2, help="GPT-2 blocks in the ranks section")
    parser.add_argument("--rank-batch", type=int, default=4)
    parser.add_argument("--rank-length", type=int, default=128)
    parser.add_argument("--model", default="gpt2", choices=["gpt2", "llama"], help=argparse.SUPPRESS)
    parser.add_argument("--out")
    parser.add_argument("--from-json")
    parser.add_argument("--monitor", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        [
            "torch",
            "transformers",
            "transformers.models.gpt2.modeling_gpt2",
            "transformers.models.llama.modeling_llama",
            "lightning_conditioning",
        ]
    )
    if args.from_json:
        with open(args.from_json) as handle:
            out = json.load(handle)
        print(render(out))
        return out
    device = torch.device(args.device)
    out: dict[str, Any] = {"machine": machine(), "device": str(device), "args": vars(args), "durations": {}}
    start = time.perf_counter()
    sections = {
        "steps": section_steps,
        "growth": section_growth,
        "accuracy": section_accuracy,
        "memory": section_memory,
        "ranks": section_ranks,
    }
    for name in args.only:
        log(f"{name} ...")
        began = time.perf_counter()
        release_free_memory()
        with ForeignLoad() as foreign, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[name] = sections[name](args, device)
        out["durations"][name] = {"seconds": time.perf_counter() - began, "foreign": foreign.share}
        log(f"{name}: {out['durations'][name]['seconds']:.0f} s")
    out["total_s"] = time.perf_counter() - start
    write_results(out, render(out), args.out, log)
    return out


if __name__ == "__main__":
    main()

"""Real sizes (issue #15): GPT-2 small with its 50,257-token vocabulary and a Llama-7B-shaped
block, at the package's default settings, against plain training and against the exact path.

Usage (from the repository root)::

    python benchmarks/real_sizes.py --out benchmarks/results/real_sizes.json   # full, < 10 min quiet
    python benchmarks/real_sizes.py --quick      # smoke run on shrunken shapes (same code paths)
    python benchmarks/real_sizes.py --device cuda --out benchmarks/results/real_sizes_cuda.json
    python benchmarks/real_sizes.py --from-json benchmarks/results/real_sizes.json  # re-render

What it measures, in one process (plus two child processes for peak RSS):

``gpt2_memory``  GPT-2 small (``transformers.GPT2Config()`` defaults, 124M parameters, vocab
                 50,257, random weights and tokens, AdamW): peak resident memory of a child
                 process that trains a few steps with the monitor at default settings, against
                 one that trains the same steps without it (``VmHWM`` after a warm-up step, and
                 ``ru_maxrss``); beside it the bytes the monitor's tensors hold: the plan's
                 sums, plus the window's means while an analysis runs, plus one eigen-solve's
                 copy. On CUDA also ``torch.cuda.max_memory_allocated``.
``gpt2_steps``   step-interleaved rounds (``harness.interleave``): a plain step, an idle step
                 (hooks registered, capture off), an analysed step with the analysis in the
                 training thread (its forward/backward and its ``end()`` timed apart; the
                 analysis split into gather, solves by method and size, summaries), and the
                 bare kernels of the captured shapes (float64 Gram GEMMs of the dense moments,
                 Frequent Directions updates of the sketched ones).
``gpt2_run``     whole runs of ``--steps`` steps, default schedule (0, 1, 2, 4, …, 64, then every
                 100), ``analysis="auto"``, against plain runs of the same batches from the same
                 initial weights; runs alternate (plain, monitored, monitored, plain, …) and the
                 ratio is the median over pairs. Every step is timed; steps are classed as
                 captured, slowed by an analysis in the background thread, or idle.
``gpt2_error``   one window seen by two monitors at once: the default one, and a reference that
                 keeps every moment the default plan sketched as a dense float64 sum and solves it
                 with ``eigvalsh``; λmax error, whether each true λmax (and λmax of the sub-FIM)
                 lies in its certified interval, and κ_p statuses against the dense values.
``llama``        a Llama-7B-shaped block (``LlamaForCausalLM``, hidden 4096, intermediate 11008,
                 one layer, 32 heads, vocab 1024): plan, plain step, analysed step (time, peak
                 memory), then the exact path: the same window with every moment dense
                 (11,008² float64 sums), reference spectra from those sums (a randomized range
                 finder, exact because a window of B·T rows has rank ≤ B·T, checked against the
                 trace and against ``eigvalsh`` on one 4096² moment), the time of one dense
                 4096² ``eigvalsh``, and the 11,008² one extrapolated by d³ (labelled).

Ratios, not absolute times, are what mean something on a shared CPU; every section logs the CPU
share other processes took while it ran. On CUDA every clock is synchronised and memory comes
from the CUDA allocator; eigen-solves stay on the CPU, as in the package.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from harness import ForeignLoad, interleave, machine, medians, table, write_results  # noqa: E402

import lightning_conditioning.analysis.results as results_module  # noqa: E402
import lightning_conditioning.monitors.conditioning as monitor_module  # noqa: E402
from lightning_conditioning import ConditioningMonitor  # noqa: E402
from lightning_conditioning.analysis.results import analyse_layer  # noqa: E402
from lightning_conditioning.analysis.window import release_heap  # noqa: E402
from lightning_conditioning.maths.accumulate import moments_to_cpu  # noqa: E402
from lightning_conditioning.maths.sketch import FrequentDirections  # noqa: E402
from lightning_conditioning.maths.solvers import SolvedSpectrum  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
PERCENTS = (50, 80, 100)


# ----------------------------------------------------------------------------- small helpers
def now() -> float:
    return time.perf_counter()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def log(message: str) -> None:
    print(f"[real_sizes] {message}", file=sys.stderr, flush=True)


def proc_status() -> dict[str, int]:
    """Current and peak resident set (bytes) of this process, from ``/proc/self/status``."""
    try:
        with open("/proc/self/status") as handle:
            text = handle.read()
    except OSError:
        return {}
    out = {}
    for key in ("VmRSS", "VmHWM"):
        found = re.search(key + r":\s+(\d+)\s+kB", text)
        if found:
            out[key] = int(found.group(1)) * 1024
    return out


def release_free_memory() -> None:
    """Garbage-collect and hand freed heap memory back to the OS (the package's own
    ``release_heap``: glibc ``malloc_trim``), so that the resident set before a phase counts
    live memory only (freed chunks kept in malloc's arenas would otherwise be reused unseen by
    the next phase)."""
    gc.collect()
    release_heap()


def reset_peak(device: torch.device) -> bool:
    """Reset the peak resident set (Linux ``clear_refs`` 5) and the CUDA peak; whether the
    RSS peak could be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peaks(device: torch.device) -> dict[str, int]:
    out = {"rss_now": proc_status().get("VmRSS", 0), "rss_peak": proc_status().get("VmHWM", 0)}
    if device.type == "cuda":
        out["cuda_peak"] = int(torch.cuda.max_memory_allocated(device))
        out["cuda_now"] = int(torch.cuda.memory_allocated(device))
    return out


def training_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """The model's own memory: parameters, gradients (same size) and the optimizer's state."""
    params = {id(p): p for p in model.parameters()}
    p_bytes = sum(p.numel() * p.element_size() for p in params.values())
    state = sum(
        v.numel() * v.element_size()
        for s in optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    )
    return {
        "parameters": p_bytes,
        "gradients": p_bytes,
        "optimizer_state": state,
        "parameters_gradients_optimizer": 2 * p_bytes + state,
        "parameters_optimizer": p_bytes + state,
        "parameter_count": sum(p.numel() for p in params.values()),
    }


def quiet_monitor(model: torch.nn.Module, messages: list[str] | None = None, **options: Any) -> ConditioningMonitor:
    """A monitor whose notes go to ``messages`` and whose warnings are kept too (not printed)."""
    sink = messages if messages is not None else []
    options.setdefault("warn_diagnosis", False)
    return ConditioningMonitor(model, info=sink.append, warn=lambda m: sink.append("WARNING " + m), **options)


def plan_rows(plan: Any) -> list[dict[str, Any]]:
    return [
        {
            "layer": m.layer,
            "moment": m.moment,
            "dim": m.dim,
            "method": m.method,
            "nbytes": m.nbytes,
            "rank": m.rank,
            "reason": m.reason,
        }
        for m in plan.moments
    ]


def plan_digest(plan: Any) -> dict[str, Any]:
    """Counts and bytes per method, and per (method, dim)."""
    by: dict[str, dict[str, Any]] = {}
    for m in plan.moments:
        key = f"{m.method} {m.dim}" + (f" ℓ={m.rank}" if m.rank else "")
        entry = by.setdefault(key, {"method": m.method, "dim": m.dim, "rank": m.rank, "count": 0, "nbytes": 0})
        entry["count"] += 1
        entry["nbytes"] += m.nbytes
    return {
        "summary": plan.summary(),
        "budget": plan.budget,
        "nbytes": plan.nbytes,
        "skipped_layers": plan.skipped_layers,
        "groups": sorted(by.values(), key=lambda e: (e["method"], e["dim"])),
    }


def window_bytes(plan: Any) -> dict[str, int]:
    """Bytes the analysis of a finished window allocates on top of the plan's sums: the working
    copies of the largest dense solve (the plan's ``workspace``). The means are the sums
    themselves, handed over (no copy), and so are the sketches."""
    return {"solve_workspace": plan.workspace, "transient": plan.workspace}


# ----------------------------------------------------------------------------- instrumentation
class Probe:
    """Timing wrappers around the package's analysis entry points, installed from the benchmark
    (module attributes replaced; the package is not edited): ``gather_moments`` and
    ``analyse_moments`` as the monitor calls them (also in its background thread), and every
    solver call (method and size of each solve)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._saved: list[tuple[Any, str, Any]] = []

    def clear(self) -> None:
        self.events = []

    def _add(self, kind: str, start: float, **extra: Any) -> None:
        self.events.append(
            {"kind": kind, "start": start, "seconds": now() - start, "thread": threading.current_thread().name, **extra}
        )

    def install(self) -> Probe:
        gather, analyse, solver_for = (
            monitor_module.gather_moments,
            monitor_module.analyse_moments,
            results_module.solver_for,
        )

        def timed_gather(*args: Any, **kwargs: Any) -> Any:
            start = now()
            out = gather(*args, **kwargs)
            self._add("gather", start)
            return out

        def timed_analyse(moments: Any, step: int, *args: Any, **kwargs: Any) -> Any:
            start = now()
            out = analyse(moments, step, *args, **kwargs)
            self._add("analyse", start, step=step)
            return out

        probe = self

        class TimedSolver:
            def __init__(self, solver: Any, layer: str) -> None:
                self.solver, self.layer, self.name = solver, layer, solver.name

            def __call__(self, matrix: Any) -> Any:
                start = now()
                out = self.solver(matrix)
                probe._add("solve", start, method=self.name, dim=int(matrix.shape[0]), layer=self.layer)
                return out

        def timed_solver_for(plan: Any, name: str, matrix: Any) -> Any:
            return TimedSolver(solver_for(plan, name, matrix), name)

        for module, attr, new in (
            (monitor_module, "gather_moments", timed_gather),
            (monitor_module, "analyse_moments", timed_analyse),
            (results_module, "solver_for", timed_solver_for),
        ):
            self._saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, new)
        return self

    def remove(self) -> None:
        for module, attr, old in reversed(self._saved):
            setattr(module, attr, old)
        self._saved.clear()

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] == kind]

    def solve_breakdown(self) -> list[dict[str, Any]]:
        groups: dict[tuple[str, int], list[float]] = {}
        for e in self.of("solve"):
            groups.setdefault((e["method"], e["dim"]), []).append(e["seconds"])
        return [
            {"method": k[0], "dim": k[1], "count": len(v), "seconds": sum(v)}
            for k, v in sorted(groups.items(), key=lambda kv: -sum(kv[1]))
        ]


# ----------------------------------------------------------------------------- models and steps
def gpt2(device: torch.device, quick: bool, seed: int = 0, blocks: int | None = None) -> torch.nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    # quick: a shrunken GPT-2 (2 blocks, width 512, vocab 8192) that still plans dense, sketched
    # and diagonal moments; the full run uses the library defaults (124M, vocab 50257)
    config = (
        transformers.GPT2Config(n_layer=2, n_embd=512, n_head=8, vocab_size=8192, n_positions=256)
        if quick
        else transformers.GPT2Config(**({"n_layer": blocks} if blocks else {}))
    )
    return transformers.GPT2LMHeadModel(config).to(device)


def llama(device: torch.device, quick: bool, seed: int = 0) -> torch.nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    hidden, ff, heads = (1024, 2752, 8) if quick else (4096, 11008, 32)
    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=ff,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=1024,
        max_position_embeddings=512,
    )
    return transformers.LlamaForCausalLM(config).to(device)


def token_batches(
    vocab: int, batch: int, length: int, count: int, device: torch.device, seed: int = 1
) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, length), generator=generator).to(device) for _ in range(count)]


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4)


def lm_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    ids: torch.Tensor,
    device: torch.device,
    monitor: ConditioningMonitor | None = None,
    step: int = 0,
) -> dict[str, Any]:
    """One training step of a causal LM on ``ids`` (labels = inputs), inside the monitor's
    protocol when one is given (``begin`` / ``capture_pass`` / ``end``, what ``track`` does),
    timed in parts: forward+backward, the monitor's ``end`` (where a window is analysed or handed
    to the background), the optimizer step."""
    batch = {"input_ids": ids, "labels": ids}
    sync(device)
    start = now()
    captured = monitor is not None and monitor.begin(step)
    if captured:
        monitor.set_loss_tokens(monitor.loss_tokens_for(batch))
    with monitor.capture_pass() if captured else contextlib.nullcontext():
        model(**batch).loss.backward()
    sync(device)
    after_backward = now()
    if monitor is not None:
        monitor.end(step)
    after_end = now()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        model.zero_grad(set_to_none=True)
    sync(device)
    end = now()
    return {
        "total": end - start,
        "fb": after_backward - start,
        "end": after_end - after_backward,
        "opt": end - after_end,
        "captured": captured,
    }


# ----------------------------------------------------------------------------- GPT-2: memory (children)
def memory_child(args: argparse.Namespace) -> dict[str, Any]:
    """Inside a child process: build GPT-2 + AdamW, one warm-up step, then ``steps`` steps with
    or without the monitor (default settings); peak memory over those steps."""
    device = torch.device(args.device)
    model = gpt2(device, args.quick)
    optimizer = adamw(model)
    batches = token_batches(model.config.vocab_size, args.batch, args.length, args.memory_steps + 1, device)
    lm_step(model, optimizer, batches[0], device)  # AdamW state allocated
    release_free_memory()
    base = proc_status().get("VmRSS", 0)
    could_reset = reset_peak(device)
    cuda_base = int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else 0
    messages: list[str] = []
    plan = None
    start = now()
    monitor = quiet_monitor(model, messages) if args.monitor else None
    if monitor is not None:
        plan = monitor.plan
    steps = [lm_step(model, optimizer, batches[1 + s], device, monitor, s) for s in range(args.memory_steps)]
    if monitor is not None:
        monitor.close()
    seconds = now() - start
    out = {
        "monitor": bool(args.monitor),
        "rss_base": base,
        "peak_reset": could_reset,
        **peaks(device),
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "training": training_bytes(model, optimizer),
        "seconds": seconds,
        "steps": [round(s["total"], 4) for s in steps],
        "cuda_base": cuda_base,
    }
    if plan is not None:
        out["plan"] = plan_digest(plan)
        out["window"] = window_bytes(plan)
        out["analyses"] = monitor.analyses if monitor is not None else 0
    return out


def gpt2_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Run the plain and the monitored child (in that order), each in a fresh process."""
    out: dict[str, Any] = {}
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "monitored": []}
    for _ in range(max(args.memory_pairs, 1)):  # alternating pairs: the allocator's state varies
        for monitored in (False, True):
            command = [
                sys.executable,
                os.path.abspath(__file__),
                "--child-memory",
                "--monitor",
                str(int(monitored)),
                "--device",
                args.device,
                "--batch",
                str(args.batch),
                "--length",
                str(args.length),
                "--memory-steps",
                str(args.memory_steps),
                "--threads",
                str(torch.get_num_threads()),
            ]
            if args.quick:
                command.append("--quick")
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"memory child failed ({done.returncode}):\n{done.stderr[-4000:]}")
            runs["monitored" if monitored else "plain"].append(json.loads(done.stdout.strip().splitlines()[-1]))

    def over(run: dict[str, Any]) -> int:
        return int(run["rss_peak"] - run["rss_base"])

    # the worst case: the largest monitored peak against the smallest plain one
    plain = min(runs["plain"], key=over)
    mon = max(runs["monitored"], key=over)
    out["plain"], out["monitored"] = plain, mon
    out["peaks_over_base"] = {kind: [over(r) for r in rs_] for kind, rs_ in runs.items()}
    model = mon["training"]
    out["extra_rss_peak"] = over(mon) - over(plain)
    out["extra_ru_maxrss"] = max(r["ru_maxrss"] for r in runs["monitored"]) - min(r["ru_maxrss"] for r in runs["plain"])
    out["accounted_persistent"] = mon["plan"]["nbytes"]
    out["accounted_peak"] = mon["plan"]["nbytes"] + mon["window"]["transient"]
    if args.device == "cuda":
        out["extra_cuda_peak"] = (mon["cuda_peak"] - mon["cuda_base"]) - (plain["cuda_peak"] - plain["cuda_base"])
    for key in ("extra_rss_peak", "extra_ru_maxrss", "accounted_persistent", "accounted_peak", "extra_cuda_peak"):
        if key in out:
            out[key + "_share"] = out[key] / model["parameters_gradients_optimizer"]
            out[key + "_share_of_parameters_optimizer"] = out[key] / model["parameters_optimizer"]
    return out


# ----------------------------------------------------------------------------- GPT-2: step kinds
def gpt2_steps(
    args: argparse.Namespace, model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device, probe: Probe
) -> dict[str, Any]:
    """Step-interleaved: plain / idle / analysed (analysis in the training thread) / bare kernels."""
    optimizer = adamw(model)
    messages: list[str] = []
    monitor = quiet_monitor(model, messages, every_n_steps=1, analysis="sync")
    capture = monitor.capture
    assert capture is not None and monitor.plan is not None
    plan = monitor.plan
    counter = {"step": 0, "batch": 0}
    parts: dict[str, list[dict[str, Any]]] = {"plain": [], "idle": [], "analysed": []}

    def next_ids() -> torch.Tensor:
        counter["batch"] += 1
        return batches[counter["batch"] % len(batches)]

    def plain() -> None:
        capture.detach()
        parts["plain"].append(lm_step(model, optimizer, next_ids(), device))

    def idle() -> None:
        capture.attach()
        parts["idle"].append(lm_step(model, optimizer, next_ids(), device))

    def analysed() -> None:
        capture.attach()
        counter["step"] += 1
        probe.clear()
        record = lm_step(model, optimizer, next_ids(), device, monitor, counter["step"])
        record["gather"] = sum(e["seconds"] for e in probe.of("gather"))
        record["analyse"] = sum(e["seconds"] for e in probe.of("analyse"))
        record["solves"] = probe.solve_breakdown()
        parts["analysed"].append(record)

    rows = args.batch * args.length
    dense_dims: dict[int, int] = {}
    sketch_dims: dict[tuple[int, int], int] = {}
    for m in plan.moments:
        if m.method == "dense":
            dense_dims[m.dim] = dense_dims.get(m.dim, 0) + 1
        elif m.method == "sketch":
            sketch_dims[(m.dim, int(m.rank or 0))] = sketch_dims.get((m.dim, int(m.rank or 0)), 0) + 1
    dtype = capture.statistics_dtype
    gram_rows = {d: torch.randn(rows, d, device=device) for d in dense_dims}
    sums = {d: torch.zeros(d, d, dtype=dtype, device=device) for d in dense_dims}
    sketch_rows = {key: torch.randn(rows, key[0], device=device) for key in sketch_dims}
    sketches = {key: FrequentDirections(key[0], key[1], device) for key in sketch_dims}

    def bare_grams() -> None:  # what the dense capture must do at least: rows → d² sums
        for d, count in dense_dims.items():
            for _ in range(count):
                r = gram_rows[d].to(dtype)
                sums[d].addmm_(r.T, r)

    def bare_sketch() -> None:  # Frequent Directions updates of the sketched moments
        for key, count in sketch_dims.items():
            for _ in range(count):  # a one-step window: each moment's sketch starts empty
                sketches[key].reset()
                sketches[key].add_rows(sketch_rows[key])

    kinds: dict[str, Callable[[], None]] = {
        "plain": plain,
        "idle": idle,
        "analysed": analysed,
        "bare_grams": bare_grams,
        "bare_sketch": bare_sketch,
    }
    times = interleave(kinds, args.rounds, device, warmup=1, seed=0)
    # the warm-up round's records are the first of each list: drop them
    parts = {k: v[1:] for k, v in parts.items()}
    monitor.close()
    med = medians(times)

    def median_of(kind: str, field: str) -> float:
        return statistics.median(r[field] for r in parts[kind])

    solves: dict[tuple[str, int], list[float]] = {}
    counts: dict[tuple[str, int], int] = {}
    for record in parts["analysed"]:
        for s in record["solves"]:
            solves.setdefault((s["method"], s["dim"]), []).append(s["seconds"])
            counts[(s["method"], s["dim"])] = s["count"]
    solve_rows = sorted(
        ({"method": k[0], "dim": k[1], "count": counts[k], "seconds": statistics.median(v)} for k, v in solves.items()),
        key=lambda r: -r["seconds"],
    )
    out = {
        "rounds": args.rounds,
        "rows_per_window": rows,
        "statistics_dtype": str(dtype),
        "plan": plan_digest(plan),
        "median_s": med,
        "plain": {f: median_of("plain", f) for f in ("total", "fb", "opt")},
        "idle": {f: median_of("idle", f) for f in ("total", "fb", "opt")},
        "analysed": {f: median_of("analysed", f) for f in ("total", "fb", "end", "opt", "gather", "analyse")},
        "solves": solve_rows,
        "dense_dims": dense_dims,
        "sketch_dims": {f"{d} ℓ={r}": c for (d, r), c in sketch_dims.items()},
    }
    p, a = out["plain"], out["analysed"]
    out["capture_s"] = a["fb"] - p["fb"]
    out["analysis_sync_s"] = a["end"]
    out["solve_s"] = sum(r["seconds"] for r in solve_rows)
    out["summaries_s"] = a["analyse"] - out["solve_s"]
    out["publish_s"] = a["end"] - a["analyse"] - a["gather"]
    out["ratios"] = {
        "idle/plain": med["idle"] / med["plain"],
        "analysed/plain": med["analysed"] / med["plain"],
        "captured fb/plain fb": a["fb"] / p["fb"],
        "bare_grams/plain": med["bare_grams"] / med["plain"],
        "bare_sketch/plain": med["bare_sketch"] / med["plain"],
        "every 100, sync": (99 * med["idle"] + med["analysed"]) / (100 * med["plain"]),
        "every 100, sync, hooks at plain cost": (99 * med["plain"] + med["analysed"]) / (100 * med["plain"]),
    }
    return out


# ----------------------------------------------------------------------------- GPT-2: whole runs
def gpt2_runs(
    args: argparse.Namespace, model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device, probe: Probe
) -> dict[str, Any]:
    """Plain and monitored runs of ``args.steps`` steps from the same weights and batches,
    alternating (ABBA…); the monitored runs use the defaults (schedule, ``analysis="auto"``)."""
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    runs: list[dict[str, Any]] = []
    order = []
    for index in range(args.pairs):
        order += ["plain", "monitored"] if index % 2 == 0 else ["monitored", "plain"]
    for kind in order:
        model.load_state_dict(initial)
        optimizer = adamw(model)
        gc.collect()
        probe.clear()
        messages: list[str] = []
        sync(device)
        built = now()
        monitor = quiet_monitor(model, messages) if kind == "monitored" else None
        construct = now() - built
        records = []
        sync(device)
        start = now()
        for step in range(args.steps):
            in_flight = monitor is not None and monitor._background.pending
            record = lm_step(model, optimizer, batches[step % len(batches)], device, monitor, step)
            record["in_flight"] = in_flight
            records.append(record)
        closing = now()
        if monitor is not None:
            monitor.close()  # collects the analysis still in flight
        sync(device)
        end = now()
        run = {
            "kind": kind,
            "seconds": end - start,
            "close_s": end - closing,
            "construct_s": construct,
            "steps": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in records],
        }
        if monitor is not None:
            run["analyses"] = monitor.analyses
            run["analysed_steps"] = monitor.analysed_steps
            run["background"] = [
                {"step": e["step"], "seconds": e["seconds"], "thread": e["thread"]} for e in probe.of("analyse")
            ]
            run["gather_s"] = sum(e["seconds"] for e in probe.of("gather"))
            run["messages"] = [m for m in messages if "analysis done" in m or "eigen-analysis" in m][:8]
            monitor = None
        runs.append(run)
        log(f"gpt2 run {kind}: {run['seconds']:.1f} s")
    del initial
    plain_runs = [r for r in runs if r["kind"] == "plain"]
    monitored_runs = [r for r in runs if r["kind"] == "monitored"]
    ratios = [m["seconds"] / p["seconds"] for p, m in zip(plain_runs, monitored_runs)]
    plain_step = statistics.median(s["total"] for r in plain_runs for s in r["steps"][1:])
    plain_fb = statistics.median(s["fb"] for r in plain_runs for s in r["steps"][1:])

    def breakdown(run: dict[str, Any]) -> dict[str, Any]:
        steps = run["steps"]
        captured = [s for s in steps if s["captured"]]
        flight = [s for s in steps if s["in_flight"] and not s["captured"]]
        idle = [s for s in steps if not s["in_flight"] and not s["captured"]]
        return {
            "captured_steps": len(captured),
            "capture_extra_s": sum(s["fb"] - plain_fb for s in captured),
            "end_s": sum(s["end"] for s in steps),  # gather + hand-off + any wait for the previous analysis
            "in_flight_steps": len(flight),
            "in_flight_extra_s": sum(s["total"] - plain_step for s in flight),
            "idle_steps": len(idle),
            "idle_extra_s": sum(s["total"] - plain_step for s in idle),
            "close_s": run["close_s"],
            "background_analysis_s": sum(b["seconds"] for b in run.get("background", [])),
        }

    def episodes(run: dict[str, Any]) -> list[dict[str, Any]]:
        """Per analysed step: the extra time (over the plain median step) of it and of every
        following step up to the next analysed one, or the run's end and close()."""
        steps, out_ = run["steps"], []
        marks = [i for i, s in enumerate(steps) if s["captured"]]
        for j, first in enumerate(marks):
            last = marks[j + 1] if j + 1 < len(marks) else len(steps)
            extra = sum(s["total"] - plain_step for s in steps[first:last])
            if j + 1 == len(marks):
                extra += run["close_s"]
            out_.append({"step": first, "steps": last - first, "extra_s": extra})
        return out_

    runs_episodes = [episodes(r) for r in monitored_runs]
    isolated = [e["extra_s"] for eps in runs_episodes for e in eps if e["step"] >= 16]
    steady = statistics.median(isolated) if isolated else None
    return {
        "episodes": runs_episodes,
        "isolated_analysis_extra_s": steady,
        "steady_state_ratio_estimate": None if steady is None else 1 + steady / (100 * plain_step),
        "steps": args.steps,
        "pairs": args.pairs,
        "order": order,
        "run_seconds": {
            "plain": [r["seconds"] for r in plain_runs],
            "monitored": [r["seconds"] for r in monitored_runs],
        },
        "ratios": ratios,
        "ratio_median": statistics.median(ratios),
        "plain_step_median_s": plain_step,
        "plain_fb_median_s": plain_fb,
        "analyses": monitored_runs[0]["analyses"],
        "analysed_steps": monitored_runs[0]["analysed_steps"],
        "construct_s": [r["construct_s"] for r in monitored_runs],
        "breakdown": [breakdown(r) for r in monitored_runs],
        "background": [r["background"] for r in monitored_runs],
        "messages": monitored_runs[0]["messages"],
        "runs": runs if args.keep_steps else None,
    }


def schedule_segments(steps: int) -> list[list[int]]:
    """Steps ``0 … steps-1`` cut before every step the default schedule analyses: each segment
    is one analysed step and the skipped steps after it (``[0], [1], [2, 3], [4 … 7], …``)."""
    from lightning_conditioning.analysis.options import ConditioningOptions

    options = ConditioningOptions()
    marks = [s for s in range(steps) if options.should_analyse(s)] + [steps]
    return [list(range(a, b)) for a, b in zip(marks[:-1], marks[1:])]


def gpt2_segments(
    args: argparse.Namespace, model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device, probe: Probe
) -> dict[str, Any]:
    """A monitored run and a plain run of ``args.steps`` steps each, interleaved by segment.

    The monitored run is the default monitor (default schedule, ``analysis="auto"``) seeing
    steps 0 … N-1 in order; it is cut into segments (an analysed step and the skipped steps up
    to the next analysed one), and every segment ends by collecting the analysis still in the
    background (``monitor.wait()``, timed with the segment), so that nothing of it runs during
    the plain segment that follows. Each monitored segment is paired with a plain segment of
    the same steps and batches (hooks removed), in a random order per pair; the model and
    optimizer are shared (costs do not depend on the weights). Drift of the shared machine
    thus hits both alike at the scale of a segment. The wait at a segment's end charges the
    run with a little more than it would pay unsegmented (the next segment's first forward
    would still overlap the analysis). ``--pairs`` repeats the whole sequence with a fresh
    monitor."""
    import random

    optimizer = adamw(model)
    segments = schedule_segments(args.steps)
    order = random.Random(0)
    reps = []
    for rep in range(args.pairs):
        messages: list[str] = []
        probe.clear()
        sync(device)
        built = now()
        monitor = quiet_monitor(model, messages)
        construct = now() - built
        capture = monitor.capture
        assert capture is not None
        rows = []
        for segment in segments:
            kinds = ["plain", "monitored"]
            order.shuffle(kinds)
            row: dict[str, Any] = {"first": segment[0], "steps": len(segment), "order": kinds}
            for kind in kinds:
                if kind == "plain":
                    capture.detach()
                    sync(device)
                    start = now()
                    records = [lm_step(model, optimizer, batches[s % len(batches)], device) for s in segment]
                    sync(device)
                    row["plain_s"] = now() - start
                    row["plain_steps"] = [round(r["total"], 5) for r in records]
                    row["plain_fb"] = [round(r["fb"], 5) for r in records]
                else:
                    capture.attach()
                    sync(device)
                    start = now()
                    records = []
                    for s in segment:
                        in_flight = monitor._background.pending
                        record = lm_step(model, optimizer, batches[s % len(batches)], device, monitor, s)
                        record["in_flight"] = in_flight
                        records.append(record)
                    waited = now()
                    in_flight_at_end = monitor._background.pending
                    monitor.wait()
                    sync(device)
                    end = now()
                    row["monitored_s"] = end - start
                    row["wait_s"] = end - waited
                    row["in_flight_at_end"] = in_flight_at_end
                    row["monitored_steps"] = [
                        {k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in records
                    ]
            rows.append(row)
        background = [{"step": e["step"], "seconds": e["seconds"], "thread": e["thread"]} for e in probe.of("analyse")]
        gathers = sum(e["seconds"] for e in probe.of("gather"))
        analyses, analysed_steps = monitor.analyses, monitor.analysed_steps
        monitor.close()
        plain_total = sum(r["plain_s"] for r in rows)
        monitored_total = sum(r["monitored_s"] for r in rows)
        reps.append(
            {
                "construct_s": construct,
                "segments": rows,
                "background": background,
                "gather_s": gathers,
                "analyses": analyses,
                "analysed_steps": analysed_steps,
                "plain_s": plain_total,
                "monitored_s": monitored_total,
                "ratio": monitored_total / plain_total,
                "messages": [m for m in messages if "analysis" in m][:6],
            }
        )
        log(f"gpt2 segmented runs {rep + 1}: plain {plain_total:.1f} s, monitored {monitored_total:.1f} s")
    plain_step = statistics.median(t for r in reps for seg in r["segments"] for t in seg["plain_steps"])
    plain_fb = statistics.median(t for r in reps for seg in r["segments"] for t in seg["plain_fb"])
    segment_rows = []
    for index, segment in enumerate(reps[0]["segments"]):
        extras = [r["segments"][index]["monitored_s"] - r["segments"][index]["plain_s"] for r in reps]
        monitored_steps = [st for r in reps for st in r["segments"][index]["monitored_steps"]]
        captured = [st for st in monitored_steps if st["captured"]]
        others = [st for st in monitored_steps if not st["captured"]]
        active = [st for st in monitored_steps if st["captured"] or st["in_flight"]]
        waits = [r["segments"][index]["wait_s"] for r in reps]
        # the steps an analysis touches (its captured step, the steps it runs beside in the
        # background) and the final wait, against as many plain steps at the median
        active_extra = (sum(st["total"] for st in active) + sum(waits) - plain_step * len(active)) / len(reps)
        segment_rows.append(
            {
                "active_steps": len(active) / len(reps),
                "active_extra_s": active_extra,
                "idle_steps": (len(monitored_steps) - len(active)) / len(reps),
                "first": segment["first"],
                "steps": segment["steps"],
                "plain_s": statistics.median(r["segments"][index]["plain_s"] for r in reps),
                "monitored_s": statistics.median(r["segments"][index]["monitored_s"] for r in reps),
                "extra_s": statistics.median(extras),
                "capture_extra_s": statistics.median(st["fb"] for st in captured) - plain_fb if captured else 0.0,
                "end_s": statistics.median(st["end"] for st in captured) if captured else 0.0,
                "in_flight_steps": sum(1 for st in others if st["in_flight"]) / len(reps),
                "other_steps_extra_s": (sum(st["total"] for st in others) - plain_step * len(others)) / len(reps),
                "wait_s": statistics.median(r["segments"][index]["wait_s"] for r in reps),
                "in_flight_at_end": any(r["segments"][index]["in_flight_at_end"] for r in reps),
            }
        )
    isolated = [r["active_extra_s"] for r in segment_rows if r["first"] >= 16 and r["steps"] >= 16]
    steady = statistics.median(isolated) if isolated else None
    ratios = [r["ratio"] for r in reps]
    # less exposed to drift: the steps no analysis touches (hooks idle) at the plain median
    composed = (sum(r["active_extra_s"] for r in segment_rows) + plain_step * args.steps) / (plain_step * args.steps)
    return {
        "composed_ratio": composed,
        "method": "segment-interleaved",
        "steps": args.steps,
        "pairs": args.pairs,
        "ratios": ratios,
        "ratio_median": statistics.median(ratios),
        "run_seconds": {"plain": [r["plain_s"] for r in reps], "monitored": [r["monitored_s"] for r in reps]},
        "plain_step_median_s": plain_step,
        "plain_fb_median_s": plain_fb,
        "analyses": reps[0]["analyses"],
        "analysed_steps": reps[0]["analysed_steps"],
        "construct_s": [r["construct_s"] for r in reps],
        "segments": segment_rows,
        "background": [r["background"] for r in reps],
        "isolated_analysis_extra_s": steady,
        "steady_state_ratio_estimate": None if steady is None else 1 + steady / (100 * plain_step),
        "messages": reps[0]["messages"],
        "raw": reps if args.keep_steps else None,
    }


# ----------------------------------------------------------------------------- error against dense
def _inside(value: float, low: float, high: float, slack: float = 1e-9) -> bool:
    return low * (1 - slack) - 1e-300 <= value <= high * (1 + slack) + 1e-300


def kappa_agreement(
    true: float, true_status: str, est: float, est_status: str, bounds: tuple[float, float] | None
) -> str:
    """How an approximate κ_p relates to the dense one."""
    if est_status == "infinite":
        return "both ∞" if true_status == "infinite" or math.isinf(true) else "wrongly ∞"
    if est_status == "lower_bound":
        if math.isinf(true) or true_status == "infinite":
            return "≥ bound (true ∞)"
        return "≥ bound holds" if true >= est * (1 - 1e-9) else "bound violated"
    if est_status == "estimate":
        if bounds is None:
            return "estimate, no interval"
        return "inside interval" if _inside(true, *bounds) else "outside interval"
    if est_status in ("exact",):
        if math.isinf(true) or math.isinf(est):
            return "both ∞" if math.isinf(true) and math.isinf(est) else "mismatch"
        return "exact, rel. diff %.1e" % (abs(est - true) / max(abs(true), 1e-300))
    return est_status


def compare_moments(plan: Any, approx: dict[str, Any], exact: dict[str, Any]) -> list[dict[str, Any]]:
    """Every moment the plan sketched, against the same moment kept dense."""
    rows = []
    for m in plan.moments:
        if m.method != "sketch" or m.layer not in exact or m.layer not in approx:
            continue
        a_layer, e_layer = approx[m.layer], exact[m.layer]
        a, e = getattr(a_layer, m.moment), getattr(e_layer, m.moment)
        if a is None or e is None:
            rows.append({"layer": m.layer, "moment": m.moment, "dim": m.dim, "missing": True})
            continue
        low, high = a.lambda_max_bounds or (a.lambda_max, a.lambda_max)
        row: dict[str, Any] = {
            "layer": m.layer,
            "moment": m.moment,
            "dim": m.dim,
            "rank": m.rank,
            "rows": a_layer.input_rows if m.moment == "input" else a_layer.grad_rows,
            "solver": a.solver,
            "exact": bool(a.exact),
            "reference_solver": e.solver,
            "lambda_true": e.lambda_max,
            "lambda_est": a.lambda_max,
            "lambda_low": low,
            "lambda_high": high,
            "lambda_rel_err": abs(a.lambda_max - e.lambda_max) / e.lambda_max if e.lambda_max else 0.0,
            "lambda_inside": _inside(e.lambda_max, low, high),
            "interval_rel_width": (high - low) / e.lambda_max if e.lambda_max else 0.0,
            "kappa": {},
        }
        for p in PERCENTS:
            row["kappa"][str(p)] = {
                "true": e.kappa.get(p),
                "true_status": e.kappa_status.get(p),
                "est": a.kappa.get(p),
                "est_status": a.kappa_status.get(p),
                "bounds": a.kappa_bounds.get(p),
                "agreement": kappa_agreement(
                    e.kappa.get(p, math.nan),
                    e.kappa_status.get(p, ""),
                    a.kappa.get(p, math.nan),
                    a.kappa_status.get(p, ""),
                    a.kappa_bounds.get(p),
                ),
            }
        fa, fe = a_layer.fim, e_layer.fim
        if fa is not None and fe is not None:
            f_low, f_high = fa.lambda_max_bounds or (fa.lambda_max, fa.lambda_max)
            row["fim_lambda_true"], row["fim_lambda_inside"] = fe.lambda_max, _inside(fe.lambda_max, f_low, f_high)
            row["fim_lambda_rel_err"] = abs(fa.lambda_max - fe.lambda_max) / fe.lambda_max if fe.lambda_max else 0.0
        rows.append(row)
    return rows


def summarize_errors(rows: list[dict[str, Any]]) -> dict[str, Any]:
    rows = [r for r in rows if not r.get("missing")]
    agreements: dict[str, int] = {}
    for r in rows:
        for p, k in r["kappa"].items():
            key = f"κ_{p}: {k['agreement'].split(',')[0]}"
            agreements[key] = agreements.get(key, 0) + 1
    tight = [
        r["kappa"]["100"]["est"] / r["kappa"]["100"]["true"]
        for r in rows
        if r["kappa"]["100"]["est_status"] == "lower_bound" and r["kappa"]["100"]["true_status"] == "exact"
    ]
    below_one = sum(
        1 for r in rows for k in r["kappa"].values() if k["est_status"] == "lower_bound" and (k["est"] or 0) < 1
    )
    return {
        "kappa100_bound_over_true_median": statistics.median(tight) if tight else None,
        "kappa100_bound_over_true_min": min(tight) if tight else None,
        "kappa_lower_bounds_below_1": below_one,
        "moments": len(rows),
        "max_lambda_rel_err": max((r["lambda_rel_err"] for r in rows), default=None),
        "median_lambda_rel_err": statistics.median([r["lambda_rel_err"] for r in rows]) if rows else None,
        "all_lambda_inside": all(r["lambda_inside"] for r in rows),
        "lambda_outside": [f"{r['layer']} {r['moment']}" for r in rows if not r["lambda_inside"]],
        "max_interval_rel_width": max((r["interval_rel_width"] for r in rows), default=None),
        "all_fim_inside": all(r.get("fim_lambda_inside", True) for r in rows),
        "max_fim_rel_err": max((r.get("fim_lambda_rel_err", 0.0) for r in rows), default=None),
        "kappa_agreement": agreements,
    }


def gpt2_error(
    args: argparse.Namespace, model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device, probe: Probe
) -> dict[str, Any]:
    """One window seen by the default monitor and a dense reference at once."""
    messages: list[str] = []
    default = quiet_monitor(model, messages, every_n_steps=1, analysis="sync")
    plan = default.plan
    assert plan is not None
    sketched = sorted({m.layer for m in plan.moments if m.method == "sketch" and m.dim <= 4096})
    if args.quick:
        sketched = sketched[:4]
    if not sketched:
        default.close()
        return {"layers": [], "note": "the default plan sketched no moment of d ≤ 4096: nothing to compare"}
    # the reference keeps those layers' moments dense: a budget that holds all of them
    layers_needed = {m.layer: m for m in plan.moments if m.layer in sketched}
    dense_bytes = sum(12 * mm.dim**2 for mm in plan.moments if mm.layer in layers_needed and mm.method != "diagonal")
    reference = quiet_monitor(
        model,
        messages,
        every_n_steps=1,
        analysis="sync",
        include=sketched,
        memory_budget=int(dense_bytes * 1.05) + 64 * MIB,
    )
    assert reference.plan is not None
    ref_methods = {m.method for m in reference.plan.moments}
    monitors = (default, reference)
    micro = max(args.error_microbatches, 1)
    # moments too large for a dense reference (the 50,257-token head's Σ∇h): the output-gradient
    # rows themselves, caught by a hook of our own; a window's rows span the moment, so the
    # small Gram of the rows gives its exact nonzero spectrum. A dense moment of the default plan
    # is caught the same way, to check the row convention against the package's dense result.
    huge = sorted({m.layer for m in plan.moments if m.method == "sketch" and m.dim > 4096 and m.moment == "grad"})
    dense_grads = [m for m in plan.moments if m.method == "dense" and m.moment == "grad"]
    check = max(dense_grads, key=lambda m: m.dim).layer if dense_grads else None
    caught: dict[str, list[torch.Tensor]] = {name: [] for name in [*huge, *([check] if check else [])]}
    modules = dict(model.named_modules())
    handles = []
    for name in caught:

        def keep(module: Any, inputs: Any, output: torch.Tensor, name: str = name) -> None:
            if output.requires_grad:
                output.register_hook(
                    lambda grad: caught[name].append(grad.detach().reshape(-1, grad.shape[-1]).double().cpu())
                )

        handles.append(modules[name].register_forward_hook(keep))
    tokens = 0
    start = now()
    for index in range(micro):
        ids = batches[index % len(batches)]
        batch = {"input_ids": ids, "labels": ids}
        tokens += int(default.loss_tokens_for(batch) or ids.numel())
        with contextlib.ExitStack() as stack:
            for mon in monitors:
                stack.enter_context(mon.track(0, last_micro_batch=index == micro - 1))
                mon.set_loss_tokens(mon.loss_tokens_for(batch))
            model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
    window_s = now() - start
    for handle in handles:
        handle.remove()
    approx, exact = default.results, dict(reference.results)
    default.close()
    reference.close()
    from types import SimpleNamespace

    def rows_summary(name: str) -> tuple[Any, int]:
        """Σ∇h = mean over rows of (N g)(N g)ᵀ (the token-mean convention, one micro-batch)."""
        grads = torch.cat(caught[name]) * (tokens / micro)
        gram = grads @ grads.T / grads.shape[0]
        values = torch.linalg.eigvalsh((gram + gram.T) * 0.5).flip(0).clamp_min(0)
        nonzero = values[values > 1e-12 * float(values[0])]
        return SimpleNamespace(
            lambda_max=float(values[0]),
            solver="rows Gram (exact)",
            kappa={50: math.inf, 80: math.inf, 100: float(nonzero[0] / nonzero[-1])},
            kappa_status={50: "infinite", 80: "infinite", 100: "exact"},
        ), int(grads.shape[0])

    rows_check = None
    if check is not None and approx.get(check) is not None and approx[check].grad is not None:
        summary, count = rows_summary(check)
        rows_check = {
            "layer": check,
            "rows": count,
            "lambda_rows": summary.lambda_max,
            "lambda_package_dense": approx[check].grad.lambda_max,
            "rel_diff": abs(summary.lambda_max - approx[check].grad.lambda_max) / approx[check].grad.lambda_max,
        }
    for name in huge:
        summary, _ = rows_summary(name)
        exact[name] = SimpleNamespace(grad=summary, input=None, fim=None)
    rows = compare_moments(plan, approx, exact)
    return {
        "layers": sketched + huge,
        "microbatches": micro,
        "rows_per_window": micro * args.batch * args.length,
        "reference_plan": plan_digest(reference.plan),
        "reference_methods": sorted(ref_methods),
        "rows_reference": huge,
        "rows_reference_check": rows_check,
        "window_s": window_s,
        "summary": summarize_errors(rows),
        "moments": rows,
    }


# ----------------------------------------------------------------------------- Llama block
def range_spectrum(matrix: torch.Tensor, rank_cap: int, seed: int = 0) -> tuple[torch.Tensor, float]:
    """All nonzero eigenvalues of a PSD ``matrix`` whose rank is at most ``rank_cap``: a
    randomized range finder (``Q = orth(M Ω)``, ``Ω`` with ``rank_cap + 16`` Gaussian columns,
    twice for safety) and ``eigvalsh(Qᵀ M Q)``; exact in float64 when the rank is ≤ the columns
    (the trace check says so). Returns the eigenvalues (descending, CPU) and the relative gap
    between their sum and the trace."""
    generator = torch.Generator(device=matrix.device).manual_seed(seed)
    columns = min(rank_cap + 16, matrix.shape[0])
    omega = torch.randn(matrix.shape[0], columns, dtype=torch.float64, device=matrix.device, generator=generator)
    q, _ = torch.linalg.qr(matrix @ omega)
    q, _ = torch.linalg.qr(matrix @ q)  # one power step: the span is the range either way
    small = q.T @ matrix @ q
    values = torch.linalg.eigvalsh((small + small.T) * 0.5).flip(0).clamp_min(0).cpu()
    trace = float(matrix.diagonal().sum())
    return values, abs(float(values.sum()) - trace) / max(trace, 1e-300)


def dense_path_reference(
    monitor: ConditioningMonitor, layers: list[str], rows: int, device: torch.device
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The dense windows of ``layers`` (from a monitor planned all-dense), solved exactly by the
    range finder and summarised as the package summarises dense spectra (``analyse_layer``)."""
    capture = monitor.capture
    assert capture is not None
    results, checks = {}, []
    for name in layers:
        window = capture.windows[name]
        moments = window.moments()  # means, on the window's device
        solved = {}
        for label, matrix in (("input", moments.input_second_moment), ("grad", moments.grad_second_moment)):
            if matrix is None:
                continue
            if matrix.dim() == 1:
                solved[label] = SolvedSpectrum(torch.sort(matrix.double().cpu(), descending=True).values, "diagonal")
                continue
            values, gap = range_spectrum(matrix, rows)
            checks.append(
                {
                    "layer": name,
                    "moment": label,
                    "dim": int(matrix.shape[0]),
                    "above_1e-12_of_max": int((values > 1e-12 * float(values[0])).sum()),
                    "trace_rel_gap": gap,
                }
            )
            full = torch.cat([values, values.new_zeros(matrix.shape[0] - values.numel())])
            solved[label] = SolvedSpectrum(full, "dense (range finder, rank ≤ rows)")
        host = moments_to_cpu({name: moments})[name]
        results[name] = analyse_layer(name, 0, host, percents=PERCENTS, solved=solved)
        del moments, host
    return results, checks


def time_eigvalsh(dim: int, device: torch.device, rows: int) -> dict[str, Any]:
    """One float64 ``eigvalsh`` of a dim² PSD matrix of rank ``rows`` (a window's moment) on the
    CPU, as the package solves; on CUDA also on the device."""
    a = torch.randn(rows, dim, dtype=torch.float64)
    matrix = a.T @ a / rows
    start = now()
    values = torch.linalg.eigvalsh(matrix)
    cpu_s = now() - start
    out: dict[str, Any] = {"dim": dim, "cpu_s": cpu_s, "threads": torch.get_num_threads()}
    range_values, gap = range_spectrum(matrix, rows)
    top = values.flip(0)[: range_values.numel()]
    out["range_finder_vs_eigvalsh_max_rel_diff"] = float(((range_values - top).abs() / top[0]).max())
    out["range_finder_trace_gap"] = gap
    if device.type == "cuda":
        gpu = matrix.to(device)
        torch.linalg.eigvalsh(gpu)
        sync(device)
        start = now()
        torch.linalg.eigvalsh(gpu)
        sync(device)
        out["cuda_s"] = now() - start
    return out


def llama_section(args: argparse.Namespace, device: torch.device, probe: Probe) -> dict[str, Any]:
    out: dict[str, Any] = {}
    start = now()
    model = llama(device, args.quick)
    out["build_s"] = now() - start
    config = model.config
    out["shape"] = {
        "hidden": config.hidden_size,
        "intermediate": config.intermediate_size,
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
        "vocab": config.vocab_size,
    }
    optimizer = adamw(model)
    batch, length = args.llama_batch, args.llama_length
    rows = batch * length
    batches = token_batches(config.vocab_size, batch, length, 4, device, seed=3)
    lm_step(model, optimizer, batches[0], device)  # AdamW state
    out["training"] = training_bytes(model, optimizer)
    release_free_memory()
    reset_peak(device)
    base = peaks(device)
    plain = [lm_step(model, optimizer, batches[1 + i % 3], device) for i in range(args.llama_plain_steps)]
    after_plain = peaks(device)
    out["plain"] = {f: statistics.median(r[f] for r in plain) for f in ("total", "fb", "opt")}
    out["plain_peak_over_base"] = after_plain["rss_peak"] - base["rss_now"]
    if device.type == "cuda":
        out["plain_cuda_peak_over_base"] = after_plain["cuda_peak"] - base["cuda_now"]

    # the plan the default monitor makes (constructed, read, closed: no step taken)
    ids = batches[3]
    messages: list[str] = []
    first = quiet_monitor(model, messages, every_n_steps=1, analysis="sync")
    plan = first.plan
    assert plan is not None
    first.close()
    del first
    out["plan"] = plan_digest(plan)
    out["plan_moments"] = plan_rows(plan)
    out["window"] = window_bytes(plan)

    # the exact path: the window of ``ids`` with every moment dense (no optimizer step, so that
    # the default monitor below sees the same weights)
    release_free_memory()
    reset_peak(device)
    base = peaks(device)
    dense_plan_bytes = sum(12 * m.dim**2 if m.method != "diagonal" else 8 * m.dim for m in plan.moments)
    built = now()
    reference = quiet_monitor(
        model, messages, every_n_steps=1, analysis="sync", memory_budget=int(dense_plan_bytes * 1.05) + 64 * MIB
    )
    construct = now() - built
    assert reference.plan is not None
    out["dense_plan"] = plan_digest(reference.plan)
    batch_dict = {"input_ids": ids, "labels": ids}
    sync(device)
    start = now()
    reference.begin(0)
    reference.set_loss_tokens(reference.loss_tokens_for(batch_dict))
    with reference.capture_pass():
        model(**batch_dict).loss.backward()
    sync(device)
    dense_fb = now() - start
    reference.pause()
    model.zero_grad(set_to_none=True)
    sanity = next(m for m in plan.moments if m.method == "dense")
    compared = sorted({m.layer for m in plan.moments if m.method == "sketch"} | {sanity.layer})
    start = now()
    exact, checks = dense_path_reference(reference, compared, rows, device)
    reference_s = now() - start
    after = peaks(device)
    dense_peak = after["rss_peak"] - base["rss_now"]
    dense_cuda_peak = after["cuda_peak"] - base["cuda_now"] if device.type == "cuda" else None
    reference.discard()
    reference.close()
    del reference
    # the default monitor (analysis in the training thread, to time it) on the same window,
    # with its optimizer step (as the plain steps), after the exact path has seen the window
    release_free_memory()
    reset_peak(device)
    base = peaks(device)
    probe.clear()
    built = now()
    monitor = quiet_monitor(model, messages, every_n_steps=1, analysis="sync")
    out["construct_s"] = now() - built
    plan = monitor.plan
    assert plan is not None
    assert plan_digest(plan)["summary"] == out["plan"]["summary"]
    record = lm_step(model, optimizer, ids, device, monitor, 0)
    after = peaks(device)
    approx = monitor.results
    monitor.close()
    del monitor
    out["analysed"] = {
        "fb": record["fb"],
        "end": record["end"],
        "gather": sum(e["seconds"] for e in probe.of("gather")),
        "analyse": sum(e["seconds"] for e in probe.of("analyse")),
    }
    out["solves"] = probe.solve_breakdown()
    out["capture_s"] = record["fb"] - out["plain"]["fb"]
    out["analysed_peak_over_base"] = after["rss_peak"] - base["rss_now"]
    out["extra_rss_peak"] = out["analysed_peak_over_base"] - out["plain_peak_over_base"]
    if device.type == "cuda":
        out["analysed_cuda_peak_over_base"] = after["cuda_peak"] - base["cuda_now"]
        out["extra_cuda_peak"] = out["analysed_cuda_peak_over_base"] - out["plain_cuda_peak_over_base"]
    own = out["training"]["parameters_gradients_optimizer"]
    out["accounted_persistent"] = plan.nbytes
    out["accounted_peak"] = plan.nbytes + out["window"]["transient"]
    for key in ("extra_rss_peak", "accounted_persistent", "accounted_peak", "extra_cuda_peak"):
        if key in out:
            out[key + "_share"] = out[key] / own
    log(f"llama default: plan {plan.summary()}; analysed step fb {record['fb']:.1f} s, end {record['end']:.1f} s")

    gc.collect()
    dims = [m.dim for m in plan.moments if m.method != "diagonal"]
    eig = {d: time_eigvalsh(d, device, rows) for d in sorted({d for d in dims if d <= 4096})}
    largest = max(dims)
    base_dim = max(eig)
    solve_total = 0.0
    for d in dims:
        solve_total += eig[d]["cpu_s"] if d in eig else eig[base_dim]["cpu_s"] * (d / base_dim) ** 3
    out["dense_path"] = {
        "construct_s": construct,
        "fb": dense_fb,
        "capture_s": dense_fb - out["plain"]["fb"],
        "plan_nbytes": out["dense_plan"]["nbytes"],
        "peak_over_base": dense_peak,
        "eigvalsh": list(eig.values()),
        "largest_dim": largest,
        "largest_eigvalsh_extrapolated_s": eig[base_dim]["cpu_s"] * (largest / base_dim) ** 3,
        "all_solves_extrapolated_s": solve_total,
        "reference_solve_s": reference_s,
        "range_checks": checks,
    }
    if device.type == "cuda":
        out["dense_path"]["cuda_peak_over_base"] = dense_cuda_peak
    out["dense_path"]["plan_share"] = out["dense_path"]["plan_nbytes"] / own
    rows_cmp = compare_moments(plan, approx, exact)
    # a dense moment of the default plan, solved both ways (the default's eigvalsh vs the range finder)
    s_a, s_e = getattr(approx[sanity.layer], sanity.moment), getattr(exact[sanity.layer], sanity.moment)
    out["same_window_check"] = {
        "layer": sanity.layer,
        "moment": sanity.moment,
        "method": sanity.method,
        "lambda_default": s_a.lambda_max,
        "lambda_reference": s_e.lambda_max,
        "rel_diff": abs(s_a.lambda_max - s_e.lambda_max) / s_e.lambda_max,
    }
    out["error"] = {"summary": summarize_errors(rows_cmp), "moments": rows_cmp, "rows_per_window": rows}
    del model, optimizer
    gc.collect()
    return out


# ----------------------------------------------------------------------------- rendering
def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MIB:,.0f} MiB"


def secs(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f} s" if value >= 1 else f"{1e3 * value:.0f} ms"


def render(out: dict[str, Any]) -> str:
    parts: list[str] = []
    m = out.get("machine", {})
    parts.append(
        f"Device {out.get('device')}, {out.get('torch_threads')} torch threads, {m.get('cpu')}, "
        f"load average before {m.get('load_average_1_5_15')}; total {out.get('total_s', 0):.0f} s."
    )
    durations = out.get("durations_s", {})
    if durations:
        parts.append(
            table(
                ["section", "wall", "CPU share of other processes"],
                [[k, f"{v['seconds']:.0f} s", pct(v["foreign_cpu_share"])] for k, v in durations.items()],
            )
        )
    mem = out.get("gpt2_memory")
    if mem:
        t = mem["monitored"]["training"]
        rows = [
            ["parameters + gradients + AdamW state", mib(t["parameters_gradients_optimizer"]), "100%", ""],
            [
                "monitor: plan (sums held between analyses)",
                mib(mem["accounted_persistent"]),
                pct(mem["accounted_persistent_share"]),
                "tensor bytes",
            ],
            [
                "monitor: plan + solve workspace (the plan's peak)",
                mib(mem["accounted_peak"]),
                pct(mem["accounted_peak_share"]),
                "tensor bytes, analysis running",
            ],
            [
                "measured: extra peak RSS (VmHWM over the steps, largest monitored − smallest plain child)",
                mib(mem["extra_rss_peak"]),
                pct(mem["extra_rss_peak_share"]),
                "process",
            ],
            [
                "measured: extra ru_maxrss (largest monitored − smallest plain child)",
                mib(mem["extra_ru_maxrss"]),
                pct(mem["extra_ru_maxrss_share"]),
                "process",
            ],
        ]
        if "extra_cuda_peak" in mem:
            rows.append(
                [
                    "measured: extra CUDA max_memory_allocated",
                    mib(mem["extra_cuda_peak"]),
                    pct(mem["extra_cuda_peak_share"]),
                    "device",
                ]
            )
        parts.append(
            "GPT-2 small, extra memory at default settings (share of parameters + gradients + AdamW state):\n\n"
            + table(["quantity", "bytes", "share", "kind"], rows)
            + f"\n\nPlan: {mem['monitored']['plan']['summary']}; skipped: {mem['monitored']['plan']['skipped_layers']}."
            + (
                f" Measured extra peak as a share of parameters + AdamW state alone (no gradients): "
                f"{pct(mem['extra_rss_peak_share_of_parameters_optimizer'])}."
                if "extra_rss_peak_share_of_parameters_optimizer" in mem
                else ""
            )
            + (
                f" Peaks over the base of every child (MiB): plain {[round(v / 2**20) for v in mem['peaks_over_base']['plain']]}, "
                f"monitored {[round(v / 2**20) for v in mem['peaks_over_base']['monitored']]}."
                if "peaks_over_base" in mem
                else ""
            )
        )
    steps = out.get("gpt2_steps")
    if steps:
        p, a = steps["plain"], steps["analysed"]
        rows = [
            ["plain step", secs(steps["median_s"]["plain"]), "1.00×"],
            ["idle step (hooks, no capture)", secs(steps["median_s"]["idle"]), f"{steps['ratios']['idle/plain']:.2f}×"],
            [
                "analysed step, analysis in the training thread",
                secs(steps["median_s"]["analysed"]),
                f"{steps['ratios']['analysed/plain']:.2f}×",
            ],
            [
                "  forward+backward with capture (plain: " + secs(p["fb"]) + ")",
                secs(a["fb"]),
                f"{steps['ratios']['captured fb/plain fb']:.2f}× of plain fb",
            ],
            ["  capture extra", secs(steps["capture_s"]), f"{steps['capture_s'] / steps['median_s']['plain']:.2f}×"],
            [
                "  end(): gather (means, host copy)",
                secs(a["gather"]),
                f"{a['gather'] / steps['median_s']['plain']:.2f}×",
            ],
            ["  end(): solves", secs(steps["solve_s"]), f"{steps['solve_s'] / steps['median_s']['plain']:.2f}×"],
            [
                "  end(): summaries (κ, Kronecker, notes)",
                secs(steps["summaries_s"]),
                f"{steps['summaries_s'] / steps['median_s']['plain']:.2f}×",
            ],
            [
                "bare float64 Grams of the dense moments",
                secs(steps["median_s"]["bare_grams"]),
                f"{steps['ratios']['bare_grams/plain']:.2f}×",
            ],
            [
                "bare Frequent Directions updates of the sketched moments",
                secs(steps["median_s"]["bare_sketch"]),
                f"{steps['ratios']['bare_sketch/plain']:.2f}×",
            ],
            [
                "default schedule, steady state (1 in 100), analysis in the training thread "
                "(skipped steps at the plain step's cost; with the measured idle step: "
                f"{steps['ratios']['every 100, sync']:.3f}×)",
                "",
                f"{steps['ratios']['every 100, sync, hooks at plain cost']:.3f}×",
            ],
        ]
        parts.append(
            f"GPT-2 small, step-interleaved ({steps['rounds']} rounds, {steps['rows_per_window']} rows per window):\n\n"
            + table(["kind", "median", "vs plain step"], rows)
            + "\n\nSolves of one analysis:\n\n"
            + table(
                ["method", "d", "count", "seconds (all of them)"],
                [[r["method"], r["dim"], r["count"], secs(r["seconds"])] for r in steps["solves"]],
            )
        )
    run = out.get("gpt2_run")
    if run and run.get("method") == "segment-interleaved":
        rows = [
            [
                r["first"],
                r["steps"],
                secs(r["plain_s"]),
                secs(r["monitored_s"]),
                f"{r['monitored_s'] / r['plain_s']:.2f}×",
                secs(r["capture_extra_s"]),
                secs(r["end_s"]),
                f"{secs(r['other_steps_extra_s'])} ({r['in_flight_steps']:.0f} with an analysis in flight)",
                secs(r["wait_s"]),
                secs(r.get("active_extra_s")),
            ]
            for r in run["segments"]
        ]
        rows.append(
            [
                "all",
                run["steps"],
                secs(statistics.median(run["run_seconds"]["plain"])),
                secs(statistics.median(run["run_seconds"]["monitored"])),
                f"**{run['ratio_median']:.2f}×**",
                "",
                "",
                "",
                "",
                f"**{run['composed_ratio']:.2f}×**" if run.get("composed_ratio") else "",
            ]
        )
        background = run["background"][0]
        parts.append(
            f"GPT-2 small, a plain and a monitored run of {run['steps']} steps, interleaved by segment "
            f"({run['pairs']} repetition(s); analyses at {run['analysed_steps']}; plain step median "
            f"{secs(run['plain_step_median_s'])}):\n\n"
            + table(
                [
                    "segment from step",
                    "steps",
                    "plain",
                    "monitored",
                    "ratio",
                    "capture extra",
                    "end() of the analysed step",
                    "extra of the other steps",
                    "wait for the analysis at the segment's end",
                    "extra of the analysed and in-flight steps + wait (all: the ratio with idle steps at the plain median)",
                ],
                rows,
            )
            + "\n\nAnalyses (wall time; the thread they ran in): "
            + ", ".join(
                f"step {b['step']}: {secs(b['seconds'])} "
                f"({'worker' if str(b.get('thread', '')).startswith('lightning-conditioning') else 'training thread'})"
                for b in background
            )
            + (
                f".\n\nAn isolated analysis (segments from step ≥ 16) cost {secs(run['isolated_analysis_extra_s'])} "
                f"of extra wall time (median of its captured and in-flight steps and final wait, each step against the "
                f"plain median): one analysis per 100 steps, the default schedule after step 64, "
                f"would cost **{run['steady_state_ratio_estimate']:.3f}×** a plain run."
                if run.get("steady_state_ratio_estimate")
                else "."
            )
            + (
                f" The same analysis in the training thread (step-interleaved section) costs "
                f"{secs(out['gpt2_steps']['median_s']['analysed'] - out['gpt2_steps']['median_s']['plain'])} "
                f"over a plain step: the background thread hides "
                f"{100 * (1 - run['isolated_analysis_extra_s'] / (out['gpt2_steps']['median_s']['analysed'] - out['gpt2_steps']['median_s']['plain'])):.0f}% of it."
                if out.get("gpt2_steps") and run.get("isolated_analysis_extra_s")
                else ""
            )
        )
    run = out.get("gpt2_whole")
    if run:
        rows = [
            [i + 1, secs(p), secs(m_), f"{m_ / p:.2f}×"]
            for i, (p, m_) in enumerate(zip(run["run_seconds"]["plain"], run["run_seconds"]["monitored"]))
        ]
        b = run["breakdown"]
        parts.append(
            f"GPT-2 small, whole runs of {run['steps']} steps (analyses at {run['analysed_steps']}):\n\n"
            + table(["pair", "plain run", "monitored run", "ratio"], rows)
            + f"\n\nMedian ratio **{run['ratio_median']:.2f}×** (plain step median {secs(run['plain_step_median_s'])}). "
            + (
                f"An isolated analysis (steps ≥ 16) cost {secs(run['isolated_analysis_extra_s'])} of extra wall time "
                f"(median over runs and analyses): one analysis per 100 steps would cost "
                f"**{run['steady_state_ratio_estimate']:.3f}×**.\n\n"
                if run.get("isolated_analysis_extra_s") is not None
                else "\n\n"
            )
            + table(
                [
                    "analysed step",
                    *[f"run {i + 1}: extra until the next analysis" for i in range(len(run["episodes"]))],
                ],
                [
                    [e["step"], *[f"{secs(eps[k]['extra_s'])} over {eps[k]['steps']} steps" for eps in run["episodes"]]]
                    for k, e in enumerate(run["episodes"][0])
                ],
            )
            + "\n\n"
            + table(
                ["where the monitored run's extra time went (per run)", *[f"run {i + 1}" for i in range(len(b))]],
                [
                    ["capture (captured steps' fb − plain fb)", *[secs(x["capture_extra_s"]) for x in b]],
                    ["end(): gather, hand-off, waits for the previous analysis", *[secs(x["end_s"]) for x in b]],
                    [
                        "steps while an analysis ran in the background: extra",
                        *[f"{secs(x['in_flight_extra_s'])} over {x['in_flight_steps']} steps" for x in b],
                    ],
                    ["other steps: extra", *[f"{secs(x['idle_extra_s'])} over {x['idle_steps']} steps" for x in b]],
                    ["close(): wait for the last analysis", *[secs(x["close_s"]) for x in b]],
                    ["background analyses (their own wall time)", *[secs(x["background_analysis_s"]) for x in b]],
                ],
            )
        )
    err = out.get("gpt2_error")
    for title, e in (("GPT-2 small", err), ("Llama block", (out.get("llama") or {}).get("error"))):
        if not e:
            continue
        s = e["summary"]
        rows = [
            ["sketched moments compared", s["moments"]],
            [
                "max relative λmax error",
                f"{s['max_lambda_rel_err']:.2e}" if s["max_lambda_rel_err"] is not None else "n/a",
            ],
            [
                "median relative λmax error",
                f"{s['median_lambda_rel_err']:.2e}" if s["median_lambda_rel_err"] is not None else "n/a",
            ],
            ["every true λmax inside its certified interval", str(s["all_lambda_inside"])],
            [
                "widest interval (relative to λmax)",
                f"{s['max_interval_rel_width']:.2e}" if s["max_interval_rel_width"] is not None else "n/a",
            ],
            ["every true sub-FIM λmax inside its interval", str(s["all_fim_inside"])],
            *[[k, v] for k, v in sorted(s["kappa_agreement"].items())],
            [
                "κ_100 lower bound / dense κ_100, median (min)",
                "n/a"
                if s.get("kappa100_bound_over_true_median") is None
                else f"{s['kappa100_bound_over_true_median']:.3f} ({s['kappa100_bound_over_true_min']:.3f})",
            ],
            ["κ_p lower bounds reported below 1 (vacuous: κ ≥ 1)", s.get("kappa_lower_bounds_below_1", "n/a")],
        ]
        extra = ""
        if e.get("rows_reference"):
            c = e.get("rows_reference_check")
            checked = (
                f" (convention checked on {c['layer']}: λmax from rows vs the package's dense sum, relative "
                f"difference {c['rel_diff']:.1e})"
                if c
                else ""
            )
            extra = (
                f"\n\nReference for {', '.join(e['rows_reference'])} Σ∇h (too large for a dense sum): the small Gram of the "
                f"window's output-gradient rows{checked}. Per moment: "
                + "; ".join(
                    f"{r['layer']} {r['moment']} d={r['dim']} ℓ={r['rank']}: λmax error {r['lambda_rel_err']:.1e}, "
                    f"interval width {r['interval_rel_width']:.2f}, inside {r['lambda_inside']}"
                    for r in e["moments"]
                    if r.get("dim", 0) > 4096
                )
            )
        parts.append(
            f"{title}: error of the default plan's sketches against dense ({e['rows_per_window']} rows per window):\n\n"
            + table(["check", "value"], rows)
            + extra
        )
    ll = out.get("llama")
    if ll:
        t = ll["training"]
        dp = ll["dense_path"]
        rows = [
            ["parameters + gradients + AdamW state", mib(t["parameters_gradients_optimizer"]), "100%"],
            [
                "default plan (" + ll["plan"]["summary"] + ")",
                mib(ll["accounted_persistent"]),
                pct(ll["accounted_persistent_share"]),
            ],
            [
                "default plan + solve workspace (the plan's peak)",
                mib(ll["accounted_peak"]),
                pct(ll["accounted_peak_share"]),
            ],
            [
                "measured extra peak RSS of an analysed step (VmHWM)",
                mib(ll["extra_rss_peak"]),
                pct(ll["extra_rss_peak_share"]),
            ],
            ["all-dense plan (exact path)", mib(dp["plan_nbytes"]), pct(dp["plan_share"])],
        ]
        if "extra_cuda_peak" in ll:
            rows.append(
                [
                    "measured extra CUDA peak of an analysed step",
                    mib(ll["extra_cuda_peak"]),
                    pct(ll["extra_cuda_peak_share"]),
                ]
            )
        parts.append(f"Llama-7B-shaped block {ll['shape']}, memory:\n\n" + table(["quantity", "bytes", "share"], rows))
        eig_rows = [
            [f"eigvalsh {e['dim']}² float64, CPU ({e['threads']} threads)", secs(e["cpu_s"]), "measured"]
            for e in dp["eigvalsh"]
        ]
        for e in dp["eigvalsh"]:
            if "cuda_s" in e:
                eig_rows.append([f"eigvalsh {e['dim']}² float64, CUDA", secs(e["cuda_s"]), "measured"])
        rows = [
            ["plain step (fb + AdamW)", secs(ll["plain"]["total"]), "measured"],
            ["default: capture extra (fb with capture − plain fb)", secs(ll["capture_s"]), "measured"],
            ["default: analysis in the training thread (end())", secs(ll["analysed"]["end"]), "measured"],
            ["exact path: capture extra with every moment dense", secs(dp["capture_s"]), "measured"],
            *eig_rows,
            *(
                [
                    [
                        f"eigvalsh {dp['largest_dim']}² float64, CPU",
                        secs(dp["largest_eigvalsh_extrapolated_s"]),
                        "**extrapolated** (d³)",
                    ]
                ]
                if dp["largest_dim"] > max(e["dim"] for e in dp["eigvalsh"])
                else []
            ),
            [
                "exact path: all dense solves of one analysis",
                secs(dp["all_solves_extrapolated_s"]),
                "**extrapolated** (d³ from the measured ones)",
            ],
        ]
        parts.append("Llama-7B-shaped block, time:\n\n" + table(["quantity", "time", ""], rows))
    text = "\n\n".join(parts)
    if out.get("quick"):
        text = "(--quick: shrunken shapes, a smoke test; not the real sizes)\n\n" + text
    return text


# ----------------------------------------------------------------------------- main
def measure(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with ForeignLoad() as probe_load:
        time.sleep(2.0)
    if (probe_load.share or 0) > 0.1:
        log(
            f"warning: other processes use {100 * (probe_load.share or 0):.0f}% of the CPU before the start: "
            "ratios degrade (a quiet machine, or --threads 1)"
        )
    out: dict[str, Any] = {
        "machine": machine(),
        "quick": args.quick,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "foreign_before": probe_load.share,
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "from_json")},
        "durations_s": {},
    }
    durations = out["durations_s"]
    start = now()

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        log(f"{name} ...")
        t = now()
        with ForeignLoad() as foreign:
            result = fn()
        durations[name] = {"seconds": now() - t, "foreign_cpu_share": foreign.share}
        share = "n/a" if foreign.share is None else f"{100 * foreign.share:.0f}%"
        log(f"{name}: {durations[name]['seconds']:.0f} s, other processes used {share} of the CPU")
        return result

    probe = Probe().install()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            only = set(args.only)
            if "gpt2" in only:
                only |= {"gpt2_memory", "gpt2_steps", "gpt2_run", "gpt2_error"}
            if "gpt2_memory" in only:
                out["gpt2_memory"] = timed("gpt2_memory", lambda: gpt2_memory(args))
            if only & {"gpt2_steps", "gpt2_run", "gpt2_whole", "gpt2_error"}:
                model = gpt2(device, args.quick)
                batches = token_batches(model.config.vocab_size, args.batch, args.length, 16, device)
                lm_step(model, adamw(model), batches[0], device)  # warm-up
                for name, section in (
                    ("gpt2_steps", gpt2_steps),
                    ("gpt2_run", gpt2_segments),
                    ("gpt2_whole", gpt2_runs),
                    ("gpt2_error", gpt2_error),
                ):
                    if name in only:
                        out[name] = timed(name, lambda: section(args, model, batches, device, probe))
                del model, batches
                gc.collect()
            if "llama" in only:
                out["llama"] = timed("llama", lambda: llama_section(args, device, probe))
    finally:
        probe.remove()
    out["total_s"] = now() - start
    out["machine_after"] = {"load_average_1_5_15": os.getloadavg()}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run on shrunken shapes (GPT-2 with 2 blocks of "
        "width 512 and vocab 8192, a Llama block of width 1024), few rounds",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when present)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument(
        "--only",
        nargs="+",
        default=["gpt2", "llama"],
        choices=["gpt2", "gpt2_memory", "gpt2_steps", "gpt2_run", "gpt2_whole", "gpt2_error", "llama"],
        help="sections (gpt2 = gpt2_memory gpt2_steps gpt2_run gpt2_error; gpt2_whole: "
        "unsegmented whole runs, alternating, --pairs of them: drift-prone on a busy machine)",
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps of each whole run (default 65: analyses at 0, 1, 2, 4, …, 64; quick 6)",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=None,
        help="repetitions of the plain/monitored run pair "
        "(default 1: two 65-step GPT-2 runs take ~2-4 min on the 2-core CPU)",
    )
    parser.add_argument("--rounds", type=int, default=None, help="step-interleaved rounds (default 4; quick 1)")
    parser.add_argument(
        "--memory-steps", type=int, default=None, help="steps of each memory child (default 2: both analysed)"
    )
    parser.add_argument(
        "--memory-pairs",
        type=int,
        default=1,
        help="plain/monitored child pairs for peak memory (the worst pair is reported)",
    )
    parser.add_argument(
        "--error-microbatches",
        type=int,
        default=1,
        help="micro-batches in the error window (rows = this × batch × length)",
    )
    parser.add_argument("--llama-batch", type=int, default=1)
    parser.add_argument("--llama-length", type=int, default=128)
    parser.add_argument("--llama-plain-steps", type=int, default=None, help="default 2")
    parser.add_argument("--keep-steps", action="store_true", help="keep every step's timings in the JSON")
    parser.add_argument("--out", help="write the measurements as JSON here")
    parser.add_argument("--from-json", help="render the tables of an earlier run, measure nothing")
    parser.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--monitor", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    defaults = {
        "steps": (65, 6),
        "pairs": (1, 1),
        "rounds": (4, 1),
        "memory_steps": (2, 2),
        "llama_plain_steps": (2, 2),
    }
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    if args.child_memory:
        if args.threads:
            torch.set_num_threads(args.threads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = memory_child(args)
        print(json.dumps(result))
        return result
    if args.from_json:
        with open(args.from_json) as handle:
            out = json.load(handle)
        print(render(out))
        return out
    out = measure(args)
    write_results(out, render(out), args.out, log)
    return out


if __name__ == "__main__":
    main()

"""Shared inputs once (issue #21): a Llama-7B-shaped block, where q/k/v and gate/up read one
tensor each, analysed with the sharing and with it switched off, steps interleaved.

Usage (from the repository root)::

    python benchmarks/shared_inputs.py --out benchmarks/results/shared_inputs.json   # ~4 min here
    python benchmarks/shared_inputs.py --quick                                      # width 1024
    python benchmarks/shared_inputs.py --device cuda --out benchmarks/results/shared_inputs_cuda.json
    python benchmarks/shared_inputs.py --from-json benchmarks/results/shared_inputs.json

The block is ``real_sizes.llama`` (hidden 4096, intermediate 11008, 32 heads, one layer,
vocabulary 1024), AdamW, ``--batch × --length`` random tokens a step. Two monitors watch the
same model with default options except ``step_overhead=None`` (every layer in every analysed
step, so that the two see the same layers) and ``analysis="sync"``; the sharing of one of them
is switched off (every layer marked as never sharing). Rounds of three steps, plain, shared,
unshared, in a seeded random order per round: medians of the step time, of the analysed step's
extra over the plain step, and the moment bytes each monitor holds (every allocated sum and
sketch buffer, read after the analysis re-allocated them). The two monitors' results are
compared on one last step that both watch at once (the same rows): every layer's λmax(Σx) must
agree.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import warnings
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from harness import ForeignLoad, machine, table, write_results  # noqa: E402
from real_sizes import adamw, llama, lm_step, token_batches  # noqa: E402

from lightning_conditioning import ConditioningMonitor  # noqa: E402
from lightning_conditioning.maths.accumulate import SecondMomentSum  # noqa: E402
from lightning_conditioning.maths.sketch import SketchedMomentSum  # noqa: E402

# benchmarks/kernels.py would shadow the `kernels` package that transformers looks for
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != HERE]

MIB = 1 << 20


def log(message: str) -> None:
    print(f"[shared_inputs] {message}", file=sys.stderr, flush=True)


def held_bytes(monitor: ConditioningMonitor) -> int:
    """Bytes of every sum and sketch buffer the monitor's capture holds now."""
    assert monitor.capture is not None
    total = 0
    for window in monitor.capture.windows.values():
        for acc in (window.input, window.grad):
            if isinstance(acc, SecondMomentSum) and acc.allocated:
                total += acc.sum_outer.numel() * 8
            elif isinstance(acc, SketchedMomentSum) and acc.sketcher._buffer is not None:
                total += acc.sketcher.nbytes
    return total


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    model = llama(device, args.quick)
    optimizer = adamw(model)
    batches = token_batches(model.config.vocab_size, args.batch, args.length, 3, device)
    messages: list[str] = []
    monitors: dict[str, ConditioningMonitor] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind in ("shared", "unshared"):
            monitors[kind] = ConditioningMonitor(
                model,
                every_n_steps=1,
                step_overhead=None,
                analysis="sync",
                warn_diagnosis=False,
                info=messages.append,
                warn=messages.append,
            )
    capture = monitors["unshared"].capture
    assert capture is not None
    capture.sharing.unshared.update(capture.layers)
    lm_step(model, optimizer, batches[0], device)  # AdamW state allocated
    times: dict[str, list[dict[str, Any]]] = {"plain": [], "shared": [], "unshared": []}
    rng = random.Random(0)
    step = 0
    for round_index in range(args.rounds):
        kinds = ["plain", "shared", "unshared"]
        rng.shuffle(kinds)
        for kind in kinds:
            step += 1
            with ForeignLoad() as load:
                record = lm_step(model, optimizer, batches[step % 3], device, monitors.get(kind), step)
            record["foreign_cpu"] = load.share
            if kind != "plain":
                record["held_bytes"] = held_bytes(monitors[kind])
            times[kind].append(record)
            log(f"round {round_index} {kind}: {record['total']:.2f} s (fb {record['fb']:.2f}, end {record['end']:.2f})")
    plain = statistics.median(r["total"] for r in times["plain"])
    plain_fb = statistics.median(r["fb"] for r in times["plain"])
    out: dict[str, Any] = {
        "shape": {"hidden": model.config.hidden_size, "intermediate": model.config.intermediate_size},
        "tokens": args.batch * args.length,
        "plain_s": plain,
        "times": times,
        "plans": {k: m.plan.summary() if m.plan is not None else None for k, m in monitors.items()},
    }
    for kind in ("shared", "unshared"):
        runs = times[kind]
        out[kind] = {
            "total_s": statistics.median(r["total"] for r in runs),
            "capture_extra_s": statistics.median(r["fb"] for r in runs) - plain_fb,
            "analysis_s": statistics.median(r["end"] for r in runs),
            "held_mib": max(r["held_bytes"] for r in runs) / MIB,
        }
    # one last step seen by both monitors at once: the same rows, so the same numbers
    step += 1
    ids = batches[step % 3]
    with monitors["shared"].track(step), monitors["unshared"].track(step):
        model(input_ids=ids, labels=ids).loss.backward()
    optimizer.zero_grad(set_to_none=True)
    shared, unshared = monitors["shared"].results, monitors["unshared"].results
    out["followers"] = dict(sorted(monitors["shared"].capture.sharing.known.items()))  # type: ignore[union-attr]
    worst = 0.0
    for name, layer in shared.items():
        other = unshared[name]
        if layer.input is not None and other.input is not None and other.input.lambda_max:
            worst = max(worst, abs(layer.input.lambda_max / other.input.lambda_max - 1))
    out["worst_input_lambda_max_difference"] = worst
    out["shared_messages"] = [m for m in messages if "same input tensor" in m]
    for monitor in monitors.values():
        monitor.close()
    return out


def render(out: dict[str, Any]) -> str:
    m = out["measure"]
    rows = []
    for kind in ("shared", "unshared"):
        r = m[kind]
        rows.append(
            [
                kind,
                f"{r['total_s']:.2f} s",
                f"{r['total_s'] / m['plain_s']:.2f}×",
                f"{r['capture_extra_s']:.2f} s",
                f"{r['analysis_s']:.2f} s",
                f"{r['held_mib']:,.0f} MiB",
                m["plans"][kind],
            ]
        )
    lines = [
        f"Device {out['machine'].get('device', '?')}; Llama-7B-shaped block {m['shape']}, "
        f"{m['tokens']} tokens a step; plain step {m['plain_s']:.2f} s (median).",
        "",
        table(["Σx sharing", "analysed step", "× plain", "capture extra", "analysis", "moments held", "plan"], rows),
        "",
        "Followers (Σx from another layer): "
        + (", ".join(f"{k} → {v}" for k, v in m["followers"].items()) or "none")
        + ".",
        f"Largest relative difference of λmax(Σx) between the two monitors: {m['worst_input_lambda_max_difference']:.1e}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a block of width 1024")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out")
    parser.add_argument("--from-json")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as handle:
            print(render(json.load(handle)))
        return
    start = time.perf_counter()
    out = {"machine": {**machine(), "device": args.device}, "args": vars(args), "measure": measure(args)}
    out["total_s"] = time.perf_counter() - start
    write_results(out, render(out), args.out, log)


if __name__ == "__main__":
    main()

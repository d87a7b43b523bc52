"""The cost of the attention readings (issue #24, item 2) on GPT-2 small at 8 × 256 tokens.

Every step is analysed (``every_n_steps=1``, other options at their defaults); the time spent
in :func:`~lightning_conditioning.maths.attention.attention_reading` (the SDPA calls' readings:
float64 logits of 32 sampled query positions per head, their softmax entropy) is timed inside each step,
against the analysed step's own time and a plain step's.

Usage::

    python benchmarks/attention_cost.py --out benchmarks/results/attention_cost.json   # ~2 min here
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from harness import ForeignLoad, machine, table, write_results  # noqa: E402
from real_sizes import adamw, gpt2, token_batches  # noqa: E402

import lightning_conditioning.capture.attention as probe_module  # noqa: E402
from lightning_conditioning import ConditioningMonitor  # noqa: E402

sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != HERE]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    spent: list[float] = []
    original = probe_module.attention_reading

    def timed(*a: Any, **k: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            spent.append(time.perf_counter() - start)

    probe_module.attention_reading = timed  # type: ignore[assignment]
    model = gpt2(device, False)
    optimizer = adamw(model)
    batches = token_batches(model.config.vocab_size, args.batch, args.length, args.steps + 1, device)
    monitor = ConditioningMonitor(
        model, every_n_steps=1, info=lambda _: None, warn=lambda _: None, warn_diagnosis=False
    )
    rows = []
    with ForeignLoad() as foreign:
        for step in range(args.steps + 1):
            spent.clear()
            analysed = step < args.steps
            batch = {"input_ids": batches[step], "labels": batches[step]}
            start = time.perf_counter()
            if analysed:
                with monitor.track(step):
                    monitor.set_loss_tokens(monitor.loss_tokens_for(batch))
                    model(**batch).loss.backward()
            else:
                monitor.close()
                model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            rows.append(
                {
                    "step": step,
                    "analysed": analysed,
                    "seconds": time.perf_counter() - start,
                    "attention_s": sum(spent),
                    "calls": len(spent),
                }
            )
            print(f"[attention_cost] step {step}: {rows[-1]}", file=sys.stderr, flush=True)
    plain = rows[-1]["seconds"]
    analysed_rows = [r for r in rows if r["analysed"]]
    out = {
        "machine": machine(),
        "args": vars(args),
        "steps": rows,
        "plain_s": plain,
        "foreign": foreign.share,
        "attention_share_of_analysed": statistics.mean(r["attention_s"] / r["seconds"] for r in analysed_rows),
        "attention_share_of_plain": statistics.mean(r["attention_s"] for r in analysed_rows) / plain,
        "modules": len(monitor.attention.results),
    }
    markdown = (
        f"GPT-2 small, {args.batch} × {args.length} tokens, every step analysed: the attention "
        f"readings of {out['modules']} modules took {100 * out['attention_share_of_analysed']:.2f}% of an "
        f"analysed step ({100 * out['attention_share_of_plain']:.2f}% of a plain step of {plain:.1f} s).\n\n"
        + table(
            ["step", "analysed", "step s", "attention s", "SDPA calls read"],
            [[r["step"], r["analysed"], f"{r['seconds']:.1f}", f"{r['attention_s']:.3f}", r["calls"]] for r in rows],
        )
    )
    write_results(out, markdown, args.out, lambda m: print(m, file=sys.stderr))
    return out


if __name__ == "__main__":
    main()

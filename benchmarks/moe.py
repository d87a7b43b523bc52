"""Mixtures of experts (issue #25): what analysing every expert and router costs on a
Mixtral-shaped model, under the kernel ``transformers`` runs by default (``grouped_mm``) and the
per-expert loop, steps interleaved.

Usage (from the repository root)::

    python benchmarks/moe.py --out benchmarks/results/moe.json     # ~3 min here
    python benchmarks/moe.py --quick                                # hidden 256
    python benchmarks/moe.py --device cuda --out benchmarks/results/moe_cuda.json
    python benchmarks/moe.py --from-json benchmarks/results/moe.json

The model is a ``MixtralForCausalLM`` of ``--layers`` layers, hidden 512, intermediate 896
(Mixtral's 3.5 ratio), 8 experts, top-2, 8 heads (2 key/value), vocabulary 8192, AdamW,
``--batch × --length`` random tokens a step (8 × 256 by default: 4,096 routed (token, slot)
pairs per layer). For each kernel, monitors with ``every_n_steps=1`` and ``analysis="sync"``:
the default options (layers take turns within the per-step budget), every layer in every step
(``step_overhead=None``), and every layer but the experts (the difference of the last two is
the experts' capture: their rows and the backward recomputation); plus a plain step; rounds in
a seeded random order; medians of the step, of the forward+backward and of the monitor's
``end`` (the analysis). Every number is a ratio to the plain step of the same
round set; absolute times on a shared CPU are noise.
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
from real_sizes import adamw, lm_step, token_batches  # noqa: E402

from lightning_conditioning import ConditioningMonitor  # noqa: E402

# benchmarks/kernels.py would shadow the `kernels` package that transformers looks for
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != HERE]


def log(message: str) -> None:
    print(f"[moe] {message}", file=sys.stderr, flush=True)


def mixtral(device: torch.device, layers: int, quick: bool, implementation: str) -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    hidden = 256 if quick else 512
    config = MixtralConfig(
        vocab_size=8192,
        hidden_size=hidden,
        intermediate_size=hidden * 7 // 4,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
    )
    model = MixtralForCausalLM(config).to(device)
    model.config._experts_implementation = implementation
    return model


def measure(args: argparse.Namespace, implementation: str) -> dict[str, Any]:
    device = torch.device(args.device)
    model = mixtral(device, args.layers, args.quick, implementation)
    optimizer = adamw(model)
    batches = token_batches(model.config.vocab_size, args.batch, args.length, 3, device)
    messages: list[str] = []
    monitors: dict[str, ConditioningMonitor] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind, options in (
            ("default", {}),
            ("every layer", {"step_overhead": None}),
            ("every layer but the experts", {"step_overhead": None, "exclude": ["*experts*"]}),
        ):
            monitors[kind] = ConditioningMonitor(
                model,
                every_n_steps=1,
                analysis="sync",
                warn_diagnosis=False,
                info=messages.append,
                warn=messages.append,
                **options,
            )
    lm_step(model, optimizer, batches[0], device)  # AdamW state allocated
    times: dict[str, list[dict[str, Any]]] = {"plain": [], **{kind: [] for kind in monitors}}
    rng = random.Random(0)
    step = 0
    for round_index in range(args.rounds):
        kinds = list(times)
        rng.shuffle(kinds)
        for kind in kinds:
            step += 1
            with ForeignLoad() as load:
                record = lm_step(model, optimizer, batches[step % 3], device, monitors.get(kind), step)
            record["foreign_cpu"] = load.share
            times[kind].append(record)
            log(
                f"{implementation} round {round_index} {kind}: {record['total']:.2f} s "
                f"(fb {record['fb']:.2f}, end {record['end']:.2f})"
            )
    plain = statistics.median(r["total"] for r in times["plain"])
    plain_fb = statistics.median(r["fb"] for r in times["plain"])
    out: dict[str, Any] = {
        "plain_s": plain,
        "plain_fb_s": plain_fb,
        "times": times,
        "layers": {k: len(m.capture.layers) if m.capture else 0 for k, m in monitors.items()},
        "plans": {k: m.plan.summary() if m.plan is not None else None for k, m in monitors.items()},
    }
    for kind in monitors:
        runs = times[kind]
        out[kind] = {
            "total_s": statistics.median(r["total"] for r in runs),
            "fb_s": statistics.median(r["fb"] for r in runs),
            "analysis_s": statistics.median(r["end"] for r in runs),
        }
    results = monitors["every layer"].results
    out["experts_ok"] = sum(1 for n, r in results.items() if ".experts." in n and r.status == "ok")
    out["experts"] = sum(1 for n in results if ".experts." in n)
    out["experts_capture_s"] = out["every layer"]["fb_s"] - out["every layer but the experts"]["fb_s"]
    out["experts_capture_share"] = out["experts_capture_s"] / plain_fb
    for monitor in monitors.values():
        monitor.close()
    return out


def render(out: dict[str, Any]) -> str:
    lines = [
        f"Device {out['machine'].get('device', '?')}; Mixtral-shaped, {out['args']['layers']} layers, "
        f"8 experts top-2, {out['args']['batch']} × {out['args']['length']} tokens a step.",
        "",
    ]
    rows = []
    for implementation, m in out["measure"].items():
        rows.append([implementation, "plain", f"{m['plain_s']:.2f} s", "1.00×", "1.00×", "-"])
        for kind in ("default", "every layer", "every layer but the experts"):
            r = m[kind]
            rows.append(
                [
                    implementation,
                    f"{kind} ({m['layers'][kind]} layers)",
                    f"{r['total_s']:.2f} s",
                    f"{r['total_s'] / m['plain_s']:.2f}×",
                    f"{r['fb_s'] / m['plain_fb_s']:.2f}×",
                    f"{r['analysis_s']:.2f} s",
                ]
            )
    lines.append(table(["kernel", "analysed", "step", "step × plain", "fwd+bwd × plain", "analysis"], rows))
    for implementation, m in out["measure"].items():
        lines.append(
            f"\n{implementation}: the experts' capture (their rows, the backward recomputation) adds "
            f"{m['experts_capture_s']:.2f} s, {m['experts_capture_share']:.0%} of a plain forward+backward; "
            f"{m['experts_ok']} of {m['experts']} expert layers with numbers; plan (every layer): "
            f"{m['plans']['every layer']}."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="hidden 256")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kernels", default="grouped_mm,eager")
    parser.add_argument("--out")
    parser.add_argument("--from-json")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as handle:
            print(render(json.load(handle)))
        return
    start = time.perf_counter()
    out = {
        "machine": {**machine(), "device": args.device},
        "args": vars(args),
        "measure": {kernel: measure(args, kernel) for kernel in args.kernels.split(",")},
    }
    out["total_s"] = time.perf_counter() - start
    write_results(out, render(out), args.out, log)


if __name__ == "__main__":
    main()

"""Turns on real architectures at full width: each analysed step's time as a ratio to a plain
step, the layers each window took, and how many layers 4 analysed steps covered.

Models built from their libraries' configurations (random weights, no downloads): torchvision
ResNet-50 at 16 × 224² and ViT-B/16 at 8 × 224², and a Llama-7B-shaped block
(``real_sizes.llama``) at 1 × 512 tokens. AdamW, a plain loop, ``ConditioningMonitor`` with
``every_n_steps=2`` and every other option at its default: steps 0, 2, 4, 6 analysed, 1, 3, 5, 7
plain. ``--first-scale`` overrides ``capture.turns.FIRST_SCALE`` (the first window's scale).

    python benchmarks/turns_real.py                       # about 4 min here
    python benchmarks/turns_real.py --first-scale 1.5     # the scale before 2026-12-08
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from real_sizes import llama  # noqa: E402

# benchmarks/kernels.py would shadow the `kernels` package that transformers looks for
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != HERE]

import torchvision  # noqa: E402

from lightning_conditioning import ConditioningMonitor  # noqa: E402
from lightning_conditioning.capture import turns  # noqa: E402

Batch = Callable[[torch.Generator], tuple[torch.Tensor, ...]]


def models() -> Iterator[tuple[str, torch.nn.Module, Batch]]:
    torch.manual_seed(0)
    yield (
        "ResNet-50, 16 × 224²",
        torchvision.models.resnet50(),
        lambda g: (torch.randn(16, 3, 224, 224, generator=g), torch.randint(0, 1000, (16,), generator=g)),
    )
    yield (
        "ViT-B/16, 8 × 224²",
        torchvision.models.vit_b_16(),
        lambda g: (torch.randn(8, 3, 224, 224, generator=g), torch.randint(0, 1000, (8,), generator=g)),
    )
    yield (
        "Llama-7B-shaped block, 1 × 512",
        llama(torch.device("cpu"), False),
        lambda g: (torch.randint(0, 1024, (1, 512), generator=g),),
    )


def step(model: torch.nn.Module, optimizer: Any, batch: tuple[torch.Tensor, ...], monitor: Any, index: int) -> float:
    start = time.perf_counter()
    with monitor.track(index):
        if len(batch) == 1:  # tokens: a causal LM's own loss
            monitor.set_loss_tokens(monitor.loss_tokens_for({"input_ids": batch[0], "labels": batch[0]}))
            loss = model(input_ids=batch[0], labels=batch[0]).loss
        else:
            loss = torch.nn.functional.cross_entropy(model(batch[0]), batch[1])
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def run(steps: int) -> dict[str, Any]:
    out = {}
    for name, model, batches in models():
        optimizer = torch.optim.AdamW(model.parameters(), 1e-4)
        monitor = ConditioningMonitor(model, every_n_steps=2, info=lambda _: None, warn=lambda _: None)
        generator = torch.Generator().manual_seed(1)
        times, windows, covered = [], [], set()
        for index in range(steps):
            times.append(step(model, optimizer, batches(generator), monitor, index))
            if index % 2 == 0:
                windows.append(len(monitor.window_results))
                covered |= set(monitor.window_results)
        plain = statistics.median(times[1::2])
        out[name] = {
            "plain_s": plain,
            "ratios": [t / plain for t in times[0::2]],
            "windows": windows,
            "covered": len(covered),
            "layers": len(monitor.layer_names),
        }
        monitor.close()
        row = out[name]
        ratios = ", ".join(f"{r:.2f}×" for r in row["ratios"])
        print(f"| {name} | {plain:.1f} s | {ratios} | {windows} | {row['covered']} of {row['layers']} |", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first-scale", type=float, default=None)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.first_scale is not None:
        turns.FIRST_SCALE = args.first_scale
    print(f"FIRST_SCALE {turns.FIRST_SCALE}\n")
    print("| model | plain step | analysed steps | layers per window | covered |\n|---|---|---|---|---|")
    out = run(args.steps)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"first_scale": turns.FIRST_SCALE, "models": out}, handle, indent=1)


if __name__ == "__main__":
    main()

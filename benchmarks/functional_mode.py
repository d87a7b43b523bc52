"""What the functional path costs: a captured step with the host modules' forwards under the
package's ``TorchFunctionMode`` against the same capture with module hooks only.

    python benchmarks/functional_mode.py [--reps 15] [--threads 2]

Interleaved pairs, medians; ratios only (absolute times on a shared CPU are noise). The
functional path is active in captured steps only: other steps pay nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from lightning_conditioning.capture.hooks import LayerCapture, find_layers
from lightning_conditioning.models import cifar_resnet


def _step_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, functional: bool) -> float:
    capture = LayerCapture(find_layers(model), statistics_dtype=torch.float64, model=model if functional else None)
    capture.attach()
    capture.active = True
    started = time.perf_counter()
    nn.functional.cross_entropy(model(x), y).backward()
    seconds = time.perf_counter() - started
    capture.detach()
    model.zero_grad(set_to_none=True)
    return seconds


def _transformer() -> nn.Module:
    layer = nn.TransformerEncoderLayer(128, 4, 256, batch_first=True, dropout=0.0)
    return nn.Sequential(nn.TransformerEncoder(layer, 4), nn.Flatten(), nn.Linear(64 * 128, 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = {
        "ResNet-20, batch 64 (module hooks cover every layer)": (
            cifar_resnet(20),
            torch.randn(64, 3, 32, 32),
            torch.randint(0, 10, (64,)),
        ),
        "Transformer encoder, 4 layers, batch 16×64 (attention projections need the mode)": (
            _transformer(),
            torch.randn(16, 64, 128),
            torch.randint(0, 10, (16,)),
        ),
    }
    for name, (model, x, y) in cases.items():
        _step_seconds(model, x, y, True)  # warm-up
        pairs = [(_step_seconds(model, x, y, False), _step_seconds(model, x, y, True)) for _ in range(args.reps)]
        ratio = statistics.median(b / a for a, b in pairs)
        print(
            f"{name}: captured step with the functional path / without: {ratio:.3f}× "
            f"(median of {args.reps} interleaved pairs)"
        )


if __name__ == "__main__":
    main()

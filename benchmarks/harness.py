"""Shared machinery of the benchmark scripts: device, clocks, step-interleaved rounds, models.

Not a command of its own; imported by ``perf.py`` and its sections (run them from the
repository root, e.g. ``python benchmarks/perf.py``).

Method (``overhead.py``'s, refined): every *kind* of work is a zero-argument closure; a round
runs each kind once, in a fresh seeded random order, so that drift of a shared machine (other
processes, thermal state) and after-effects of one kind on the next hit every kind alike;
results are medians over rounds. Whole-run interleaving was ±10% noisy on the 2-core CPU; step-level
interleaving cancels most of that.

On CUDA every clock is bracketed by ``torch.cuda.synchronize`` so that asynchronous kernels
are charged to the kind that launched them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_conditioning.analysis.options import ConditioningOptions
from lightning_conditioning.analysis.window import analyse_capture
from lightning_conditioning.capture.hooks import LayerCapture
from lightning_conditioning.models import cifar_resnet

Kind = Callable[[], Any]
MLP_WIDTHS = (784, 256, 256, 256, 256, 10)
OPTIONS = ConditioningOptions(warn_diagnosis=False)
PERCENTS = OPTIONS.kappa_percents


def pick_device() -> torch.device:
    """CUDA when present (the benchmark then runs unchanged on the GPU), else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def sync(device: torch.device) -> None:
    """Wait for queued kernels (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(fn: Kind, device: torch.device) -> float:
    """Wall seconds of one call of ``fn``, synchronised on CUDA."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleave(
    kinds: dict[str, Kind], rounds: int, device: torch.device, warmup: int = 1, seed: int = 0
) -> dict[str, list[float]]:
    """Seconds per call of every kind over ``rounds`` rounds (after ``warmup`` rounds).

    Each round runs every kind once in a fresh random order (seeded): drift hits all kinds
    alike, and so does any after-effect of one kind on the next (a merely rotated fixed
    order would always put the same kind after the same predecessor).
    """
    names = list(kinds)
    order = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(warmup + rounds):
        order.shuffle(names)
        for name in names:
            elapsed = clock(kinds[name], device)
            if index >= warmup:
                times[name].append(elapsed)
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    """Median seconds of every kind."""
    return {name: statistics.median(values) for name, values in times.items()}


def mlp(widths: Sequence[int] = MLP_WIDTHS) -> nn.Sequential:
    """The MNIST-sized ReLU MLP (784-256-256-256-256-10, no BatchNorm)."""
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        if index:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers)


@dataclass
class Workload:
    """A model with its random batch, on a device."""

    name: str
    net: nn.Module
    x: Tensor
    y: Tensor


def workload(name: str, device: torch.device, seed: int = 0) -> Workload:
    """``"mlp"`` (batch 256, 784 features) or ``"resnet{depth}"`` (batch 128, 3×32×32)."""
    torch.manual_seed(seed)
    if name == "mlp":
        net: nn.Module = mlp()
        x = torch.randn(256, MLP_WIDTHS[0])
    elif name.startswith("resnet"):
        net = cifar_resnet(int(name[len("resnet") :]))
        x = torch.randn(128, 3, 32, 32)
    else:
        raise ValueError(f"unknown workload {name!r}")
    y = torch.randint(0, 10, (x.shape[0],))
    return Workload(name, net.to(device), x.to(device), y.to(device))


def train_step(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    before_step: Callable[[], None] | None = None,
) -> None:
    """One SGD step: ``zero_grad``, forward, mean cross-entropy, backward, ``step``."""
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(net(x), y).backward()
    if before_step is not None:
        before_step()
    optimizer.step()


def sgd(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)


def analyse(capture: LayerCapture) -> None:
    """The monitor's own analysis of a filled capture (``analyse_capture``: moments,
    eigenvalues, κ_p, Kronecker statistics), then every layer's metrics, without loggers.
    The windows are kept (the caller resets them)."""
    for result in analyse_capture(capture, 0, OPTIONS, reset=False).values():
        result.metrics()


def capture_steps(
    capture: LayerCapture, net: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor
) -> dict[str, Kind]:
    """The training-step kinds every section compares, on one model and batch:

    ``plain``     hooks removed;
    ``idle``      hooks registered, capture off (a step the schedule skips);
    ``gathered``  capture on, no analysis (a non-final step of a window: the sums grow);
    ``analysed``  a gathered step, then :func:`analyse` and the window's reset.
    """

    def plain() -> None:
        capture.detach()
        train_step(net, optimizer, x, y)

    def idle() -> None:
        capture.attach()
        train_step(net, optimizer, x, y)

    def gathered() -> None:
        capture.attach()
        capture.active = True
        train_step(net, optimizer, x, y)
        capture.active = False

    def analysed() -> None:
        gathered()
        analyse(capture)
        capture.reset()

    return {"plain": plain, "idle": idle, "gathered": gathered, "analysed": analysed}


class Classifier(pl.LightningModule):
    """A network trained with mean cross-entropy and :func:`sgd`, for ``Trainer.fit`` runs."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return sgd(self)


class StepTimer(pl.Callback):
    """Wall time of every training batch (``on_train_batch_start`` → ``_end``; put it last),
    synchronised on CUDA."""

    def __init__(self, device: torch.device = torch.device("cpu")) -> None:
        self.device = device
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        sync(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        sync(self.device)
        self.times.append(time.perf_counter() - self._start)


def section_main(
    doc: str, measure: Callable[[int, torch.device], Any], rounds: int, argv: list[str] | None = None
) -> Any:
    """``python benchmarks/<section>.py [--rounds N]``: run ``measure(rounds, device)`` and
    print its result as JSON."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=rounds)
    args = parser.parse_args(argv)
    result = measure(args.rounds, pick_device())
    print(json.dumps(result, indent=2))
    return result


def random_psd(dim: int, batch: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    """A random full-rank symmetric PSD matrix (Wishart, 2·dim samples) on the CPU."""
    shape = (batch, dim, 2 * dim) if batch else (dim, 2 * dim)
    a = torch.randn(*shape, dtype=dtype)
    return a @ a.transpose(-1, -2) / (2 * dim)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            found = re.search(r"model name\s*:\s*(.+)", handle.read())
        if found:
            cpu = found.group(1).strip()
    except OSError:
        pass
    device = pick_device()
    return {
        "date": time.strftime("%Y-%m-%d"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (no GPU)",
        "python": platform.python_version(),
        "load_average_1_5_15": os.getloadavg(),
    }


class ForeignLoad:
    """CPU time other processes used while a block ran, as a share of the machine (Linux).

    System-wide busy ticks from ``/proc/stat`` minus this process's own CPU time (children
    included) over the block's wall time × cores: 0 on a quiet machine, 0.5 when other
    processes kept one of two cores busy. ``None`` where ``/proc/stat`` is missing.
    """

    def __init__(self) -> None:
        self.share: float | None = None

    @staticmethod
    def _busy_seconds() -> float | None:
        try:
            with open("/proc/stat") as handle:
                fields = [int(v) for v in handle.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
        return busy / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_seconds() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __enter__(self) -> ForeignLoad:
        self._busy, self._own, self._wall = self._busy_seconds(), self._own_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, wall = self._busy_seconds(), time.perf_counter() - self._wall
        if busy is None or self._busy is None or wall <= 0:
            return
        foreign = (busy - self._busy) - (self._own_seconds() - self._own)
        self.share = max(0.0, foreign / (wall * (os.cpu_count() or 1)))


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table; floats are written with 2 decimals."""

    def cell(value: Any) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(value: float) -> str:
    """A time ratio as ``1.23×``."""
    return f"{value:.2f}×"


def ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f} ms" if seconds >= 1e-3 else f"{1e6 * seconds:.0f} µs"


def write_results(out: dict[str, Any], text: str, path: str | None, log: Callable[[str], None]) -> None:
    """Print the rendered tables, keep them in ``out["markdown"]`` and write ``out`` as JSON to
    ``path`` (when given)."""
    out["markdown"] = text
    print(text)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as handle:
            json.dump(out, handle, indent=1, default=str)
        log(f"wrote {path}")

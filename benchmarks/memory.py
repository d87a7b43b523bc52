"""Peak extra memory of an analysed step against the theoretical size of the statistics.

A section of ``python benchmarks/perf.py``; alone::

    python benchmarks/memory.py [--workloads mlp resnet20:channel resnet20:patch] [--repeats 3]

Two methods on the CPU (``tracemalloc`` cannot see torch's allocations):

``torch``  exact peak of torch's own allocations: the allocation/free events that
           ``torch.profiler.profile(profile_memory=True)`` records, summed in time order. On
           CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
``rss``    the process's peak resident set: write ``5`` to ``/proc/self/clear_refs`` (resets
           ``VmHWM`` to the current ``VmRSS``; works here, as root), run, read ``VmHWM`` from
           ``/proc/self/status``. Sees everything (MKL buffers, Python objects) but, with
           glibc's defaults, not memory that freed heap blocks make resident already. The
           section therefore runs in a child process with ``MALLOC_MMAP_THRESHOLD_=65536``
           and ``MALLOC_TRIM_THRESHOLD_=0`` (blocks ≥ 64 KiB are mapped and unmapped one by
           one); small reused blocks still escape it, so ``torch`` is the number to read.

Kinds, each the peak above the state before it (``torch``: one run, the events are
deterministic; ``rss``: median of ``repeats``):

``plain``     one training step, no hooks;
``captured``  a fresh ``LayerCapture`` attached (its float64 windows allocated) and one
              captured step;
``analysis``  moments, reset (the float32 pending sums released) and the package's analysis
              of every layer of a filled capture, in the callback's order;
``analysed``  ``captured`` then ``analysis`` (the capture freed afterwards).

Theory (the brief's): Σ_k (d_in² + d_out²) float64 values (the windows) + one captured
activation (a float32 copy of the largest layer input). While a window is open, layers whose
Grams are float32 also hold a float32 pending sum (``accumulate.SecondMomentSum``): up to
half the windows again, released when the window is read. The analysis copies the windows once
more into means (``LayerMoments``) and symmetrises each matrix before its solve, so about
twice the windows is expected at the analysis peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch
from harness import pick_device, sgd, sync, train_step, workload
from torch.profiler import ProfilerActivity, profile

from lightning_conditioning import analyse_layer
from lightning_conditioning.capture.adapters import ConvMode
from lightning_conditioning.capture.hooks import LayerCapture, find_layers

MIB = float(1 << 20)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        found = re.search(rf"{field}:\s+(\d+) kB", handle.read())
    if found is None:
        raise RuntimeError(f"no {field} in /proc/self/status")
    return int(found.group(1))


def rss_peak_supported() -> bool:
    """Whether ``VmHWM`` can be reset here (Linux, permission to write ``clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _status_kib("VmHWM") >= 0
    except OSError:
        return False


def torch_peak_bytes(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak of torch's own allocations above their level before ``fn()`` (exact, by event).

    CUDA: the caching allocator's peak statistics. CPU: the allocation and free events the
    profiler records with ``profile_memory=True``, summed in time order (frees of blocks
    allocated before the call carry no size and are left out: both kinds share that bias).
    """
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return float(peak)


def rss_peak_bytes(fn: Callable[[], Any]) -> float:
    """Peak resident set above ``VmRSS`` before ``fn()`` (``clear_refs`` 5, then ``VmHWM``)."""
    gc.collect()
    before_kib = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    fn()
    return 1024.0 * (_status_kib("VmHWM") - before_kib)


RSS_PEAK = rss_peak_supported()


def measure(name: str, conv_mode: ConvMode, repeats: int, device: torch.device) -> dict[str, Any]:
    """Peak extra MiB of a plain, a captured and an analysed step, and the theoretical sizes."""
    load = workload(name, device)
    net, x, y = load.net, load.x, load.y
    optimizer = sgd(net)
    layers = find_layers(net, conv_mode=conv_mode)
    inputs: list[int] = []
    held: list[LayerCapture] = []

    def plain() -> None:
        train_step(net, optimizer, x, y)

    def captured() -> None:  # a fresh capture (windows allocated) and one captured step
        capture = LayerCapture(layers)
        capture.attach()
        capture.active = True
        train_step(net, optimizer, x, y)
        capture.detach()
        held.append(capture)

    def analysis() -> None:  # as the callback finishes a window: moments, reset, analysis
        moments = held[-1].moments()
        held[-1].reset()  # releases the float32 pending sums
        for layer, window in moments.items():
            analyse_layer(layer, 0, window).metrics()

    def analysed() -> None:
        captured()
        analysis()
        held.clear()

    handles = [
        module.register_forward_pre_hook(lambda m, a: inputs.append(a[0].numel())) for module, _ in layers.values()
    ]
    plain()  # warm-up, and learn the input sizes
    for handle in handles:
        handle.remove()
    analysed()
    kinds: dict[str, Callable[[], None]] = {"plain": plain, "captured": captured, "analysis": analysis}
    kinds["analysed"] = analysed
    samples: dict[str, dict[str, list[float]]] = {"torch": {}, "rss": {}}
    captured()  # the analysis kind needs a filled capture
    for kind, fn in kinds.items():  # torch's allocation events are deterministic: once
        samples["torch"][kind] = [torch_peak_bytes(fn, device) / MIB]
    held.clear()
    for _ in range(repeats if device.type == "cpu" and RSS_PEAK else 0):
        captured()
        for kind, fn in kinds.items():
            samples["rss"].setdefault(kind, []).append(rss_peak_bytes(fn) / MIB)
        held.clear()
    med = {
        method: {kind: statistics.median(values) for kind, values in by_kind.items()}
        for method, by_kind in samples.items()
    }
    windows = 0
    for module, adapter in layers.values():
        d_in, d_out, _ = adapter.dims(module)
        windows += 8 * (d_in * d_in + d_out * d_out)
    activation = 4 * max(inputs)
    theory = (windows + activation) / MIB
    out: dict[str, Any] = {
        "workload": name,
        "conv_mode": conv_mode if name != "mlp" else "-",
        "windows_mib": windows / MIB,
        "largest_activation_mib": activation / MIB,
        "theory_mib": theory,
    }
    for method, values in med.items():
        if not values:
            continue
        extra = values["analysed"] - values["plain"]
        out[method] = {
            **{f"{kind}_mib": value for kind, value in values.items()},
            "extra_mib": extra,
            "step_extra_mib": values["captured"] - values["plain"],
            "extra / theory": extra / theory,
        }
    return out


def run_isolated(specs: list[str], repeats: int) -> list[dict[str, Any]]:
    """Run :func:`main` in a child process with the glibc settings of the module docstring."""
    env = {**os.environ, **MALLOC_ENV}
    command = [sys.executable, os.path.abspath(__file__), "--json", "--repeats", str(repeats)]
    done = subprocess.run(command + ["--workloads", *specs], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workloads", nargs="+", default=["mlp", "resnet20:channel", "resnet20:patch"], help="name[:conv_mode]"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="one line of JSON (for run_isolated)")
    args = parser.parse_args(argv)
    device = pick_device()
    if device.type == "cpu" and not args.json and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        results = run_isolated(args.workloads, args.repeats)
    else:
        results = []
        for spec in args.workloads:
            name, _, mode = spec.partition(":")
            results.append(measure(name, mode or "channel", args.repeats, device))
    print(json.dumps(results) if args.json else json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()

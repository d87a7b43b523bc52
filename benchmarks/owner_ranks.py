"""Moments sharded by owner, measured (issue #21): the moment bytes each rank holds for an
analysis, 1 process against ``--world`` processes (gloo on the CPU, NCCL on GPUs), and whether
the numbers are one process's.

Usage (from the repository root)::

    python benchmarks/owner_ranks.py                 # prints the JSON; ~1 min here
    python benchmarks/real_tokens.py --only ranks    # as a section of the issue's benchmark

The model is GPT-2 at full width (``n_embd`` 768, vocabulary 50,257) with ``--layers`` blocks,
random weights; ``--batch × --length`` tokens in all, split over the ranks. One analysed step,
every layer at once (``step_overhead=None``), default plan otherwise; the loss is scaled to a
sum over each process's tokens (``set_loss_tokens``), so the per-example gradients, and every
moment, are one process's. Each process reports ``ConditioningMonitor.moment_bytes`` (the
finished moments it held for the analysis) and its logged numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import socket
import sys
import time
import warnings
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

__all__ = ["section_ranks"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One process of a ``--world``-process run: its moment bytes and metrics."""
    import torch.distributed as dist
    import transformers

    from lightning_conditioning import ConditioningMonitor

    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    if args.world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
        if device.type == "cuda":
            torch.cuda.set_device(args.rank)
            device = torch.device("cuda", args.rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=args.rank, world_size=args.world)
    torch.manual_seed(0)
    # no dropout: its masks are drawn per process, so 1 and 2 processes would see other rows
    config = transformers.GPT2Config(n_layer=args.layers, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).to(device)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.length), generator=generator)
    share = args.batch // args.world
    ids = ids[args.rank * share : (args.rank + 1) * share].to(device)
    batch = {"input_ids": ids, "labels": ids}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monitor = ConditioningMonitor(
            model, every_n_steps=1, step_overhead=None, analysis="sync", warn_diagnosis=False, info=lambda message: None
        )
        started = time.perf_counter()
        with monitor.track(0):
            monitor.set_loss_tokens(monitor.loss_tokens_for(batch))
            model(**batch).loss.backward()
        seconds = time.perf_counter() - started
    metrics: dict[str, float] = {}
    for result in monitor.results.values():
        metrics.update(result.metrics())
    monitor.close()
    if args.world > 1:
        dist.destroy_process_group()
    return {
        "world": args.world,
        "rank": args.rank,
        "moment_bytes": monitor.moment_bytes,
        "seconds": seconds,
        "metrics": metrics,
    }


def _rank_entry(namespace: dict[str, Any], connection: Any) -> None:
    connection.send(child(argparse.Namespace(**namespace)))


def _launch(args: argparse.Namespace, world: int) -> list[dict[str, Any]]:
    """The ``world`` processes, forked from a server that imported torch and transformers once
    (``forkserver``, before any thread pool started: each saves the import)."""
    context = multiprocessing.get_context("forkserver")
    port = _free_port()
    started = []
    for rank in range(world):
        receive, send = context.Pipe(duplex=False)
        namespace = {
            "device": args.device,
            "layers": args.layers,
            "batch": args.batch,
            "length": args.length,
            "world": world,
            "rank": rank,
            "port": port,
        }
        process = context.Process(target=_rank_entry, args=(namespace, send))
        process.start()
        send.close()
        started.append((process, receive))
    out = []
    for process, receive in started:
        try:
            out.append(receive.recv())
        except EOFError as error:
            raise RuntimeError(f"rank process failed (exit code {process.exitcode})") from error
        finally:
            process.join()
    return out


def _relative(a: float, b: float) -> float:
    if a == b or (math.isnan(a) and math.isnan(b)):
        return 0.0
    return abs(a - b) / max(abs(a), abs(b))


def section_ranks(args: argparse.Namespace, device: torch.device | None = None) -> dict[str, Any]:
    """1 process, then ``args.world`` processes on the same tokens: bytes per rank, numbers."""
    single = _launch(args, 1)[0]
    ranks = _launch(args, args.world)
    reference = single["metrics"]
    # moments a rank reports as an interval (a sketch merged over ranks is no longer one exact
    # block) are compared by their interval instead
    intervals = {k.removesuffix("_high") for r in ranks for k in r["metrics"] if k.endswith("_lambda_max_high")}
    inside = all(
        r["metrics"][k + "_low"] * (1 - 1e-6) <= reference[k] <= r["metrics"][k + "_high"] * (1 + 1e-6)
        for r in ranks
        for k in intervals
        if k in reference
    )
    lambdas = [k for k in reference if k.endswith("_lambda_max") and k not in intervals]
    worst = max((_relative(r["metrics"].get(k, math.nan), reference[k]) for r in ranks for k in lambdas), default=0.0)
    kappas = [k for k in reference if "_kappa_50" in k and math.isfinite(reference[k])]
    worst_kappa = max(
        (_relative(r["metrics"].get(k, math.nan), reference[k]) for r in ranks for k in kappas), default=0.0
    )
    return {
        "layers": args.layers,
        "tokens": args.batch * args.length,
        "world": args.world,
        "single_bytes": single["moment_bytes"],
        "rank_bytes": [r["moment_bytes"] for r in ranks],
        "rank_share": [r["moment_bytes"] / single["moment_bytes"] for r in ranks],
        "intervals": sorted(intervals),
        "intervals_hold_reference": inside,
        "ranks_equal": all(r["metrics"] == ranks[0]["metrics"] for r in ranks),
        "lambda_max_rel_diff": worst,
        "kappa_50_rel_diff": worst_kappa,
        "compared": len(lambdas),
        "single_s": single["seconds"],
        "rank_s": [r["seconds"] for r in ranks],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args(argv)
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        ["torch", "transformers", "lightning_conditioning"]
    )
    result = child(args) if args.child else section_ranks(args)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    # benchmarks/kernels.py would shadow the `kernels` package that transformers looks for
    sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != HERE]
    if os.path.dirname(HERE) not in sys.path:
        sys.path.insert(0, os.path.dirname(HERE))
    main()

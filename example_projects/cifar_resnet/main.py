r"""Claim 5 and Tables 1-2 of the paper: the last linear layer of deep CIFAR ResNets.

    python -m example_projects.cifar_resnet.main                  # CPU scale (default): ResNet-110
                                                                  # vs ResNetLastBN-110, 100 steps,
                                                                  # offline MNIST sample
    python -m example_projects.cifar_resnet.main --smoke --threads 1   # CI: full-recipe path on FakeData
    python -m example_projects.cifar_resnet.main --data cifar10 --download \
        --archs resnet preresnet preresnetv1 lastbn --depths 56 110 230 1202 --seeds 5   # the paper
    python -m example_projects.cifar_resnet.tables runs/cifar_resnet   # Tables 1-2 from finished runs

Every (arch, depth, seed) run trains with the fb.resnet.torch recipe, analyses the last linear
layer with ConditioningCallback (λmax of Σx, Σ∇h and the sub-FIM) and WeightDominationCallback
(σmax(W), ‖W‖_F, σmax(∇W)/σmax(W)) every ``--every-n-steps`` steps, logs to TensorBoard under
``OUT/DATA/ARCH-DEPTH/seedS`` and writes ``run.json`` there. With ``--steps N`` a run stops
after N optimizer steps (the CPU-scale mode); otherwise it trains ``--epochs`` epochs and
evaluates the test set after every epoch. At the end: figures, ``summary.json``, ``results.md``
(verdicts on claim 5 when ResNet and ResNetLastBN ran at the same depth) and ``tables.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from example_projects.cifar_resnet import analysis, tables
from example_projects.cifar_resnet.data import DATASETS, CifarDataModule, num_classes
from example_projects.cifar_resnet.history import FiniteWeightDomination, LastLayerHistory
from example_projects.cifar_resnet.model import ARCHS, CifarResNetModule
from lightning_conditioning import ConditioningCallback


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The CLI; ``--smoke`` and the mode-dependent defaults are resolved here."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--data", choices=DATASETS, default="mnist", help="mnist: offline sample (default); fake: FakeData")
    add("--download", action="store_true", help="let torchvision download CIFAR into --root")
    add("--root", default="data", help="torchvision dataset folder")
    add("--archs", nargs="+", choices=ARCHS, default=["resnet", "lastbn"])
    add("--depths", nargs="+", type=int, default=[110])
    add("--seeds", type=int, default=1, help="number of seeds (0 .. seeds-1)")
    add("--first-seed", type=int, default=0)
    add("--steps", type=int, default=None, help="stop after this many steps (default: 100 for mnist, else epochs)")
    add("--epochs", type=int, default=164)
    add("--milestones", type=int, nargs="+", default=[81, 122], help="epochs where lr is divided by 10")
    add("--batch-size", type=int, default=None, help="per device (default: 64 for mnist, else 128)")
    add("--lr", type=float, default=0.1)
    add("--momentum", type=float, default=0.9)
    add("--weight-decay", type=float, default=1e-4)
    add("--no-nesterov", action="store_true", help="plain momentum (fb.resnet.torch uses Nesterov)")
    add("--augment", choices=["auto", "on", "off"], default="auto", help="auto: on except for mnist")
    add("--every-n-steps", type=int, default=None, help="analysis interval (default: 1 for --steps runs, else 50)")
    add("--limit", type=int, default=None, help="keep only this many training examples")
    add("--fake-size", type=int, nargs=2, default=[256, 64], help="FakeData train/test sizes (--data fake)")
    add("--limit-train-batches", type=float, default=1.0)
    add("--num-workers", type=int, default=0)
    add("--accelerator", default="auto")
    add("--devices", default="auto", help="Lightning devices, e.g. 1, 4 or auto")
    add("--strategy", default="auto", help="e.g. ddp (then run one arch/depth/seed per command)")
    add("--num-nodes", type=int, default=1)
    add("--precision", default="32-true")
    add("--no-test", action="store_true", help="skip the test-set evaluation at the end")
    add("--from-runs", default=None, help="train nothing: rebuild figures/results from run.json files here")
    add("--out", default="runs/cifar_resnet")
    add("--results", default=None, help="results.md path (default: OUT/results.md)")
    add("--figures", default=None, help="figure folder (default: OUT/figures)")
    add(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's; 1 is far faster on a small, shared CPU)",
    )
    add("--notes", default=None, help="a Markdown file appended to results.md as post-run notes")
    add("--progress", action="store_true", help="show Lightning's progress bar")
    add("--smoke", action="store_true", help="CI size: all four archs, depth 8, 2 seeds, 2 epochs on FakeData")
    args = parser.parse_args(argv)
    if args.data.startswith("cifar") and not (args.download or args.from_runs or Path(args.root).exists()):
        parser.error(f"--data {args.data} needs --download (or a torchvision copy under --root {args.root})")
    if args.smoke:
        args.data, args.archs, args.depths, args.seeds, args.epochs = "fake", list(ARCHS), [8], 2, 2
        args.milestones, args.batch_size, args.every_n_steps, args.steps = [1], 32, 2, None
        args.fake_size = [128, 64]
    step_mode = args.steps is not None or args.data == "mnist"
    if args.steps is None and args.data == "mnist":
        args.steps = 100
    args.batch_size = args.batch_size or (64 if args.data == "mnist" else 128)
    args.every_n_steps = args.every_n_steps or (1 if step_mode else 50)
    return args


def run_one(arch: str, depth: int, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one network, return (and write to its log dir) its ``run.json`` record."""
    pl.seed_everything(seed, verbose=False)
    module = CifarResNetModule(
        arch,
        depth,
        num_classes(args.data),
        lr=args.lr,
        momentum=args.momentum,
        nesterov=not args.no_nesterov,
        weight_decay=args.weight_decay,
        milestones=args.milestones,
    )
    augment = None if args.augment == "auto" else args.augment == "on"
    data = CifarDataModule(
        args.data,
        args.root,
        args.download,
        args.batch_size,
        augment,
        args.num_workers,
        fake_size=tuple(args.fake_size),
        limit=args.limit,
        seed=seed,
    )
    layer = module.last_linear
    conditioning = ConditioningCallback(every_n_steps=args.every_n_steps, include=[layer], log_figures=False)
    domination = FiniteWeightDomination(every_n_steps=args.every_n_steps, include=[layer], log_imbalance=False)
    history = LastLayerHistory(conditioning, domination, layer)
    logger = TensorBoardLogger(Path(args.out) / args.data, name=f"{arch}-{depth}", version=f"seed{seed}")
    step_mode = args.steps is not None
    trainer = pl.Trainer(
        max_steps=args.steps if step_mode else -1,
        max_epochs=-1 if step_mode else args.epochs,
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        num_nodes=args.num_nodes,
        precision=args.precision,
        callbacks=[conditioning, domination, history],
        logger=logger,
        log_every_n_steps=1 if step_mode else 20,
        enable_checkpointing=not step_mode and not args.smoke,
        enable_progress_bar=args.progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=10**6 if step_mode else 1,
        limit_train_batches=args.limit_train_batches,
    )
    start = time.time()
    trainer.fit(module, data)
    train_seconds = time.time() - start
    test_error = math.nan
    if not args.no_test:
        test_error = float(trainer.test(module, data, verbose=False)[0]["test_error"])
    val = history.val_error
    record = {
        "data": args.data,
        "arch": arch,
        "depth": depth,
        "seed": seed,
        "layer": layer,
        "mode": "steps" if step_mode else "epochs",
        "steps": trainer.global_step,
        "epochs": trainer.current_epoch,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "nesterov": not args.no_nesterov,
        "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / max(trainer.global_step, 1),
        "test_error": test_error,
        "best_val_error": min((e for _, e in val), default=math.nan),
        "params": sum(p.numel() for p in module.parameters()),
        **history.as_dict(),
    }
    if trainer.is_global_zero:
        Path(logger.log_dir).mkdir(parents=True, exist_ok=True)
        (Path(logger.log_dir) / "run.json").write_text(json.dumps(record))
    print(
        f"{arch}-{depth} seed {seed}: {trainer.global_step} steps in {train_seconds:.0f} s "
        f"({record['seconds_per_step']:.2f} s/step), test error {test_error:.4f}",
        flush=True,
    )
    return record


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every (arch, depth, seed), then write figures, summary.json, results.md, tables.md."""
    args = parse_args(argv)
    torch.set_flush_denormal(True)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    start = time.time()
    try:
        if args.from_runs:
            runs = sorted(
                tables.load_runs(Path(args.from_runs)), key=lambda r: (r["depth"], ARCHS.index(r["arch"]), r["seed"])
            )
        else:
            runs = [
                run_one(arch, depth, seed, args)
                for depth in args.depths
                for arch in args.archs
                for seed in range(args.first_seed, args.first_seed + args.seeds)
            ]
    finally:
        torch.set_num_threads(threads)
    seconds = sum(r["train_seconds"] for r in runs) if args.from_runs else time.time() - start
    if getattr(rank_zero_only, "rank", 0) != 0:  # DDP: only rank 0 writes the reports
        return {"runs": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figures = analysis.plot_all(runs, Path(args.figures or out / "figures"))
    summaries = [analysis.summarize_run(run) for run in runs]
    checks = analysis.verdicts(summaries)
    table_text = tables.render(tables.collect(runs), metric="final")
    (out / "tables.md").write_text(table_text)
    (out / "summary.json").write_text(json.dumps({"summaries": summaries, "verdicts": checks}, indent=1))
    command = "python -m example_projects.cifar_resnet.main " + " ".join(sys.argv[1:] if argv is None else argv)
    analysis.write_results(
        Path(args.results or out / "results.md"),
        summaries,
        checks,
        runs,
        figures,
        table_text,
        vars(args),
        command.strip(),
        seconds,
        Path(args.notes).read_text() if args.notes else None,
    )
    for name, (ok, evidence) in checks.items():
        print(f"{name}: {'reproduced' if ok else 'NOT reproduced'} — {evidence}")
    return {"runs": runs, "summaries": summaries, "checks": checks, "figures": figures, "tables": table_text}


if __name__ == "__main__":
    main()

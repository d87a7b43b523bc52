r"""Table A1 of the paper: torchvision ResNet-18/50 with and without LastBN on ImageNet.

    python -m example_projects.imagenet_resnet.main --smoke                 # CPU, FakeData, seconds
    python -m example_projects.imagenet_resnet.main --smoke --last-bn
    python -m example_projects.imagenet_resnet.main --data-dir /data/imagenet --arch resnet18 \
        --devices 1                                                         # paper: one GPU for -18
    python -m example_projects.imagenet_resnet.main --data-dir /data/imagenet --arch resnet50 --last-bn \
        --devices 4 --strategy ddp --precision 16-mixed                     # paper: four GPUs for -50

Recipe (He et al. 2015 via fb.resnet.torch, as the paper's App. D.1): SGD, Nesterov momentum 0.9,
weight decay 1e-4, lr 0.1 × global batch / 256, global batch 256, 100 epochs with the lr ÷10 at
epochs 30, 60 and 90 (the paper: "100 epochs with an extra lowered learning rate at the 90th
epoch"). ``--epochs 90 --milestones 30 60 80`` or ``--schedule cosine`` give the other usual
recipes. ConditioningCallback (channel mode, every layer) and WeightDominationCallback analyse
the network every ``--every-n-steps`` steps. Each run logs to TensorBoard under
``OUT/ARCH[-lastbn]/version_N``, writes ``run.json`` there, and the script rewrites
``OUT/results.md`` and ``OUT/figures/last_layer.png`` from every run under ``OUT``.
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
import numpy as np
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from example_projects.cifar_resnet.history import FiniteWeightDomination, LastLayerHistory
from example_projects.imagenet_resnet.data import ImageNetDataModule
from example_projects.imagenet_resnet.model import ARCHS, ImageNetResNet
from lightning_conditioning import ConditioningCallback

# Huang et al. (2020), Table A1: top-1 validation error (%), single model, single crop.
PAPER_TABLE_A1 = {
    "resnet18": {"ResNet": (29.78, 30.07, 30.62), "ResNetLastBN": (29.38, 28.96, 29.32)},
    "resnet50": {"ResNet": (23.97, 24.37, 23.81), "ResNetLastBN": (23.76, 23.49, 23.47)},
}
MAX_SAVED_LOSSES = 10_000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The CLI; ``--smoke`` resolves to FakeData, 64×64, 10 classes, a few steps on CPU."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--data-dir", default=None, help="ImageNet root with train/ and val/ class folders")
    add("--arch", choices=ARCHS, default="resnet18")
    add("--last-bn", action="store_true", help="ResNetLastBN: one BatchNorm1d before fc")
    add("--dropout", type=float, default=0.0, help="dropout before fc (Table A1 'DR=0.3')")
    add("--epochs", type=int, default=100)
    add("--schedule", choices=["step", "cosine"], default="step")
    add("--milestones", type=int, nargs="+", default=[30, 60, 90])
    add("--batch-size", type=int, default=256, help="global batch (split over devices × nodes)")
    add("--base-lr", type=float, default=0.1, help="lr for a global batch of 256 (scaled linearly)")
    add("--momentum", type=float, default=0.9)
    add("--weight-decay", type=float, default=1e-4, help="Table A1 'WD=0.0002': 2e-4")
    add("--no-nesterov", action="store_true")
    add("--image-size", type=int, default=224)
    add("--every-n-steps", type=int, default=None, help="analysis interval in optimizer steps (500; smoke: 5)")
    add("--conv-mode", choices=["channel", "patch"], default="channel")
    add("--max-steps", type=int, default=-1)
    add("--limit-val-batches", type=float, default=1.0)
    add("--num-workers", type=int, default=8)
    add("--accelerator", default="auto")
    add("--devices", type=int, default=1)
    add("--strategy", default="auto", help="e.g. ddp")
    add("--num-nodes", type=int, default=1)
    add("--precision", default="32-true", help="e.g. 16-mixed, bf16-mixed")
    add("--sync-batchnorm", action="store_true")
    add("--ckpt-path", default=None, help="resume, e.g. OUT/ARCH/version_0/checkpoints/last.ckpt")
    add("--seed", type=int, default=0)
    add("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add("--out", default="runs/imagenet_resnet")
    add("--progress", action="store_true")
    add("--fake-size", type=int, nargs=2, default=[48, 32], help="FakeData train/val sizes (smoke)")
    add("--smoke", action="store_true", help="FakeData 64×64, 10 classes, one 6-step epoch, CPU")
    args = parser.parse_args(argv)
    if args.smoke:
        args.data_dir, args.image_size, args.batch_size, args.epochs, args.max_steps = None, 64, 8, 1, -1
        args.every_n_steps, args.num_workers, args.accelerator = args.every_n_steps or 5, 0, "cpu"
        args.devices, args.strategy, args.num_nodes, args.milestones = 1, "auto", 1, [1]
    elif args.data_dir is None:
        parser.error("--data-dir is required (or --smoke for FakeData)")
    args.every_n_steps = args.every_n_steps or 500
    world = args.devices * args.num_nodes
    if args.batch_size % world:
        parser.error(f"--batch-size {args.batch_size} is not divisible by devices × nodes = {world}")
    args.lr = args.base_lr * args.batch_size / 256
    return args


def run(args: argparse.Namespace, command: str = "") -> dict[str, Any]:
    """Train and validate one network; return (and write to its log dir) its ``run.json``."""
    pl.seed_everything(args.seed, verbose=False)
    world = args.devices * args.num_nodes
    data = ImageNetDataModule(
        args.data_dir, args.batch_size // world, args.image_size, args.num_workers, tuple(args.fake_size)
    )
    module = ImageNetResNet(
        args.arch,
        data.num_classes,
        args.last_bn,
        args.dropout,
        args.lr,
        args.momentum,
        not args.no_nesterov,
        args.weight_decay,
        args.schedule,
        args.milestones,
        epochs=args.epochs,
    )
    layer = module.last_linear
    conditioning = ConditioningCallback(
        every_n_steps=args.every_n_steps, conv_mode=args.conv_mode, log_figures=not args.smoke
    )
    domination = FiniteWeightDomination(every_n_steps=args.every_n_steps)
    history = LastLayerHistory(conditioning, domination, layer)
    name = args.arch + ("-lastbn" if args.last_bn else "") + (f"-dr{args.dropout:g}" if args.dropout else "")
    logger = TensorBoardLogger(args.out, name=name)
    callbacks: list[pl.Callback] = [conditioning, domination, history, LearningRateMonitor("step")]
    if not args.smoke:
        callbacks.append(ModelCheckpoint(save_last=True))
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        num_nodes=args.num_nodes,
        precision=args.precision,
        sync_batchnorm=args.sync_batchnorm,
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=1 if args.smoke else 50,
        enable_checkpointing=not args.smoke,
        enable_progress_bar=args.progress,
        enable_model_summary=not args.smoke,
        num_sanity_val_steps=0,
        limit_val_batches=args.limit_val_batches,
    )
    start = time.time()
    trainer.fit(module, data, ckpt_path=args.ckpt_path)
    seconds = time.time() - start
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    loss = np.asarray(history.loss, dtype=float)
    stride = max(1, math.ceil(len(loss) / MAX_SAVED_LOSSES))
    record = {
        "command": command,
        "data": "fake" if args.data_dir is None else "imagenet",
        "arch": args.arch,
        "last_bn": args.last_bn,
        "dropout": args.dropout,
        "weight_decay": args.weight_decay,
        "lr": args.lr,
        "global_batch": args.batch_size,
        "image_size": args.image_size,
        "layer": layer,
        "steps": trainer.global_step,
        "epochs": trainer.current_epoch,
        "train_seconds": seconds,
        "seconds_per_step": seconds / max(trainer.global_step, 1),
        "val_top1_error": metrics.get("val_top1_error", math.nan),
        "val_top5_error": metrics.get("val_top5_error", math.nan),
        "analysed_layers": len(conditioning.results),
        "dominated_layers": domination.dominated,
        "loss_stride": stride,
        "loss": [float(v) for v in loss[::stride]],
        "analyses": history.as_dict()["analyses"],
    }
    if trainer.is_global_zero:
        (Path(logger.log_dir) / "run.json").write_text(json.dumps(record))
    print(
        f"{name}: {trainer.global_step} steps in {seconds:.1f} s, val top-1 error "
        f"{record['val_top1_error']:.4f}, {record['analysed_layers']} layers analysed",
        flush=True,
    )
    return record


def _last(run: dict[str, Any], key: str, which: int) -> float:
    steps = sorted(run["analyses"], key=int)
    return float(run["analyses"][steps[which]].get(key, math.nan)) if steps else math.nan


def plot(runs: list[dict[str, Any]], path: Path) -> Path:
    """λmax(Σx), σmax(W) and σmax(∇W)/σmax(W) of the last linear layer, every run under OUT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    keys = (
        ("input_lambda_max", "λmax(Σx) of the fc input"),
        ("weight_spectral_norm", "σmax(W) of fc"),
        ("grad_weight_ratio", "σmax(∇W) / σmax(W) of fc"),
    )
    for ax, (key, label) in zip(axes, keys):
        for run in runs:
            steps = sorted(run["analyses"], key=int)
            name = f"{run['arch']}{' + LastBN' if run['last_bn'] else ''} ({run['data']})"
            ax.plot([int(s) + 1 for s in steps], [run["analyses"][s][key] for s in steps], marker="o", ms=3, label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no crowded minor labels
        ax.set_xlabel("iteration + 1")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=8)
    data = sorted({r["data"] for r in runs})
    fig.suptitle(
        f"Last linear layer of torchvision ResNets, data: {', '.join(data)}"
        + (" (smoke: random images and labels, a code-path check)" if data == ["fake"] else "")
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_results(out: Path, figure: Path) -> str:
    """results.md from every ``run.json`` under ``out``, with the paper's Table A1 beside."""
    runs = [json.loads(p.read_text()) for p in sorted(out.rglob("run.json"))]
    commands = [f"- `{r.get('command', '?')}`: {r['train_seconds']:.1f} s of training + validation" for r in runs]
    lines = [
        "# imagenet_resnet: measured results",
        "",
        f"Runs under `{out}` (torch {torch.__version__}, {time.strftime('%Y-%m-%d')}), one per command:",
        "",
        *commands,
        "",
        "| run | data | image | global batch | steps | s/step (incl. val) | val top-1 err | val top-5 err | "
        "fc λmax(Σx) first → last | fc σmax(∇W)/σmax(W) first → last |",
        "|---" * 10 + "|",
    ]
    for r in runs:
        lines.append(
            f"| {r['arch']}{' + LastBN' if r['last_bn'] else ''} | {r['data']} | {r['image_size']} | "
            f"{r['global_batch']} | {r['steps']} | {r['seconds_per_step']:.2f} | {100 * r['val_top1_error']:.1f}% | "
            f"{100 * r['val_top5_error']:.1f}% | {_last(r, 'input_lambda_max', 0):.3g} → "
            f"{_last(r, 'input_lambda_max', -1):.3g} | {_last(r, 'grad_weight_ratio', 0):.3g} → "
            f"{_last(r, 'grad_weight_ratio', -1):.3g} |"
        )
    if runs and all(r["data"] == "fake" for r in runs):
        lines += [
            "",
            "Only smoke runs on FakeData (random 64×64 images, random labels, CPU) were executed: the "
            "numbers check the code path end to end (training, validation, both callbacks on every layer, "
            "LastBN surgery on a torchvision model); they say nothing about ImageNet. The paper's numbers "
            "below are for reference.",
        ]
    lines += [
        "",
        "Paper, Table A1 (top-1 validation error %, single crop; standard / WD=0.0002 / DR=0.3):",
        "",
        "| network | standard | WD=0.0002 | DR=0.3 |",
        "|---|---|---|---|",
    ]
    for arch, rows in PAPER_TABLE_A1.items():
        for variant, values in rows.items():
            lines.append(f"| {arch} {variant} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    lines += ["", f"Figure: `figures/{figure.name}`.", ""]
    text = "\n".join(lines)
    (out / "results.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one network, then refresh OUT/results.md and OUT/figures/last_layer.png."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python -m example_projects.imagenet_resnet.main " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        record = run(args, command.strip())
    finally:
        torch.set_num_threads(threads)
    out = Path(args.out)
    if getattr(rank_zero_only, "rank", 0) == 0:
        runs = [json.loads(p.read_text()) for p in sorted(out.rglob("run.json"))]
        figure = plot(runs, out / "figures" / "last_layer.png")
        write_results(out, figure)
    return record


if __name__ == "__main__":
    main()

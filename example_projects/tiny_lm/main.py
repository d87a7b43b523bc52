"""Layer-wise conditioning of a small transformer language model, across depth and over training.

    python -m example_projects.tiny_lm.main            # full size: ~3.5 min of CPU (1 thread)
    python -m example_projects.tiny_lm.main --smoke    # CI size: seconds
    python -m example_projects.tiny_lm.main --from-runs runs/tiny_lm   # re-read runs, no training

A 4-block, 64-wide pre-norm decoder (character level, vocabulary = the 103 characters of
Python's own help texts, ``pydoc_data.topics``: no download) trained with AdamW, with and
without a final LayerNorm before the head (the paper's ResNet vs ResNetLastBN question, asked
of a transformer), two seeds each. ``ConditioningCallback(loss_reduction="token_mean")``
analyses every ``--every-n-steps`` steps every weight layer: the token and position
embeddings, each block's q/k/v/out projections and MLP, and the head;
``WeightDominationCallback`` checks the weights on the same schedule.

Every run is read back from its TensorBoard log with the package's report reader
(:func:`lightning_conditioning.report.reader.load_run`, in :mod:`.analysis`), so the figures
(:mod:`.figures`) and ``results.md`` come from what was logged. Each run also records a float64 reference computed in this file on
the analysed batches (the characters' counts, the head's input and its per-token output
gradient), to check the package's numbers on this model. Writes TensorBoard logs,
``run.json`` per run, ``summary.json``, figures and ``results.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger

from example_projects.tiny_lm.analysis import VARIANTS, find_runs, summarize, write_results
from example_projects.tiny_lm.data import PydocDataModule
from example_projects.tiny_lm.figures import plot
from example_projects.tiny_lm.model import TinyLM
from lightning_conditioning import ConditioningCallback, WeightDominationCallback

#: prefixes of the package's own messages, kept in run.json
PACKAGE_WORDS = ("Conditioning", "WeightDomination")


class Reference(pl.Callback):
    """A float64 reference on every analysed batch, computed before the training step runs.

    Per analysed step: the characters' counts in the batch (the token embedding's Σx is
    ``diag(counts / tokens)``), and λmax of the head's Σx (its input, every token a row) and
    Σ∇h (the per-token gradient of the per-token loss, softmax − one-hot). Registered before
    ``ConditioningCallback`` so that its no-grad forward runs before the capture starts.
    """

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = every_n_steps
        self.steps: dict[str, dict[str, Any]] = {}

    @torch.no_grad()
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        assert isinstance(pl_module, TinyLM)
        ids, targets = batch
        captured: dict[str, torch.Tensor] = {}
        hook = pl_module.head.register_forward_hook(lambda m, i, o: captured.__setitem__("x", i[0]))
        try:
            logits = pl_module(ids)
        finally:
            hook.remove()
        vocab = logits.shape[-1]
        x = captured["x"].reshape(-1, captured["x"].shape[-1]).double()
        g = logits.reshape(-1, vocab).double().softmax(-1) - F.one_hot(targets.reshape(-1), vocab).double()
        counts = torch.bincount(ids.reshape(-1), minlength=vocab)
        self.steps[str(step)] = {
            "tokens": int(ids.numel()),
            "counts": counts.tolist(),
            "head_input_lambda_max": float(torch.linalg.eigvalsh(x.T @ x / len(x))[-1]),
            "head_grad_lambda_max": float(torch.linalg.eigvalsh(g.T @ g / len(g))[-1]),
        }


@contextmanager
def package_messages() -> Iterator[list[str]]:
    """The package's warnings and info lines issued inside the block (still shown)."""
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            if text.startswith(PACKAGE_WORDS):
                messages.append(text)

    handler = Keep(logging.INFO)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield messages
        finally:
            rank_zero.removeHandler(handler)
    for warning in caught:
        text = str(warning.message)
        if text.startswith(PACKAGE_WORDS):
            messages.append(text)
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def sample_text(model: TinyLM, data: PydocDataModule, prompt: str, length: int, seed: int) -> str:
    """``length`` characters sampled (temperature 0.8) after ``prompt``."""
    generator = torch.Generator().manual_seed(seed)
    ids = data.tokenizer.encode(prompt)[None]
    model.eval()
    with torch.no_grad():
        for _ in range(length):
            logits = model(ids[:, -model.context :])[0, -1] / 0.8
            ids = torch.cat([ids, torch.multinomial(logits.softmax(-1), 1, generator=generator)[None]], 1)
    return data.tokenizer.decode(ids[0].tolist())


def run_one(variant: str, seed: int, args: argparse.Namespace) -> Path:
    """Train one model; returns its log dir (holding the TensorBoard events, the spectra file
    and ``run.json``)."""
    pl.seed_everything(seed, verbose=False)
    data = PydocDataModule(context=args.context, batch_size=args.batch_size, limit_chars=args.limit_chars, seed=seed)
    model = TinyLM(
        data.tokenizer.vocab_size,
        context=args.context,
        width=args.width,
        layers=args.layers,
        heads=args.heads,
        final_norm=VARIANTS[variant],
        lr=args.lr,
        warmup=args.warmup,
        max_steps=args.steps,
    )
    reference = Reference(args.every_n_steps)
    conditioning = ConditioningCallback(
        every_n_steps=args.every_n_steps, loss_reduction="token_mean", log_figures=False
    )
    domination = WeightDominationCallback(every_n_steps=args.every_n_steps)
    logger = TensorBoardLogger(args.out, name=variant, version=f"seed{seed}")
    if Path(logger.log_dir).exists():  # a rerun replaces the run (its logs and spectra file append)
        shutil.rmtree(logger.log_dir)
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        callbacks=[reference, conditioning, domination],
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        val_check_interval=args.val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=args.val_batches,
    )
    start = time.time()
    with package_messages() as messages:
        trainer.fit(model, data)
    seconds = time.time() - start
    final_val = float(trainer.validate(model, data, verbose=False)[0]["val_loss"])
    record = {
        "variant": variant,
        "seed": seed,
        "steps": trainer.global_step,
        "context": args.context,
        "train_seconds": seconds,
        "final_val_loss": final_val,
        "layers": model.depth_order,
        "groups": model.layer_groups,
        "params": sum(p.numel() for p in model.parameters()),
        "vocab": data.tokenizer.vocab_size,
        "corpus_counts": torch.bincount(data.train_ids, minlength=data.tokenizer.vocab_size).tolist(),
        "chars": data.tokenizer.chars,
        "train_chars": len(data.train_ids),
        "val_chars": len(data.val_ids),
        "warned_layers": domination.warned_layers,
        "messages": messages,
        "reference": reference.steps,
        "sample": sample_text(model, data, "The ", args.sample_chars, seed),
    }
    log_dir = Path(logger.log_dir)
    (log_dir / "run.json").write_text(json.dumps(record))
    print(
        f"{variant} seed {seed}: {trainer.global_step} steps in {seconds:.0f} s, val loss {final_val:.3f} nats/char",
        flush=True,
    )
    return log_dir


# ---------------------------------------------------------------------------- command line
DEFAULTS = dict(
    steps=400,
    context=64,
    batch_size=32,
    width=64,
    layers=4,
    heads=4,
    lr=3e-3,
    warmup=30,
    every_n_steps=20,
    seeds=2,
    limit_chars=None,
)


def defaults_used(args: argparse.Namespace) -> bool:
    return all(getattr(args, k) == v for k, v in DEFAULTS.items())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--context", type=int, default=DEFAULTS["context"], help="characters per sequence")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--width", type=int, default=DEFAULTS["width"])
    parser.add_argument("--layers", type=int, default=DEFAULTS["layers"])
    parser.add_argument("--heads", type=int, default=DEFAULTS["heads"])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--warmup", type=int, default=DEFAULTS["warmup"])
    parser.add_argument("--every-n-steps", type=int, default=DEFAULTS["every_n_steps"])
    parser.add_argument("--seeds", type=int, default=DEFAULTS["seeds"], help="seeds 0 … SEEDS-1 per variant")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--limit-chars", type=int, default=DEFAULTS["limit_chars"])
    parser.add_argument("--val-every", type=int, default=100, help="validate every this many steps")
    parser.add_argument("--val-batches", type=int, default=8, help="validation batches of 256 windows (all: 0)")
    parser.add_argument("--sample-chars", type=int, default=200)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: these small matrices gain little from more, and one "
        "thread does not slow down under contention)",
    )
    parser.add_argument("--out", default="runs/tiny_lm")
    parser.add_argument("--results", default=None, help="where to write results.md (default: OUT/results.md)")
    parser.add_argument("--figures", default=None, help="folder for the figures (default: OUT/figures)")
    parser.add_argument("--smoke", action="store_true", help="tiny size for CI (seconds)")
    parser.add_argument(
        "--from-runs",
        default=None,
        help="re-read the runs under this folder (their run.json and logs) and rewrite "
        "summary.json, figures and results.md, without training",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.context, args.batch_size, args.width, args.layers, args.heads = 9, 16, 8, 16, 2, 2
        args.every_n_steps, args.seeds, args.limit_chars, args.warmup = 4, 1, 20_000, 2
        args.val_every, args.val_batches, args.sample_chars = 8, 1, 20
    if args.val_batches == 0:
        args.val_batches = 1.0
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_flush_denormal(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    start, cpu_start = time.time(), time.process_time()
    out = Path(args.out)
    command = (
        "python -m example_projects.tiny_lm.main " + " ".join(argv if argv is not None else sys.argv[1:])
    ).strip()
    try:
        if args.from_runs:
            saved = json.loads((Path(args.from_runs) / "summary.json").read_text())
            stored = argparse.Namespace(**saved["args"])
            stored.from_runs, stored.results, stored.figures = args.from_runs, args.results, args.figures
            args, command, out = stored, saved["command"], Path(args.from_runs)
        else:
            for variant in args.variants:
                for seed in range(args.seeds):
                    run_one(variant, seed, args)
        runs = find_runs(out)
        summary = summarize(runs)
    finally:
        torch.set_num_threads(threads)
    seconds = saved["seconds"] if args.from_runs else time.time() - start
    cpu_seconds = saved.get("cpu_seconds", math.nan) if args.from_runs else time.process_time() - cpu_start
    args.cpu_seconds = cpu_seconds
    figures = plot(runs, summary, Path(args.figures or out / "figures"))
    (out / "summary.json").write_text(
        json.dumps(
            {
                "summary": summary,
                "args": vars(args),
                "command": command,
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
            },
            indent=1,
        )
    )
    write_results(
        summary,
        runs,
        args,
        seconds,
        Path(args.results or out / "results.md"),
        command,
        figures,
        discussion=not args.smoke and defaults_used(args),
    )
    for name, (ok, evidence) in summary["checks"].items():
        print(f"{name}: {'holds' if ok else 'FAILS'} — {evidence}")
    return {"summary": summary, "runs": runs, "figures": figures}


if __name__ == "__main__":
    main()

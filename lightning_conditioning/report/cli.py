"""``python -m lightning_conditioning report RUN_DIR``: table, figures and diagnosis of a run.

Exit status: 0 on success, 1 when the run cannot be reported on (one ``error:`` line on
stderr, never a traceback), 2 for bad command-line usage.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_conditioning.__about__ import __version__

if TYPE_CHECKING:
    from lightning_conditioning.report.reader import RunData

__all__ = ["FIGURE_FILES", "build_parser", "main"]

PROG = "lightning-conditioning"
#: the PNG files ``report`` writes (weight_domination.png only when the run has those scalars)
FIGURE_FILES = (
    "conditioning_depth_profile.png",
    "conditioning_training.png",
    "conditioning_units.png",
    "weight_domination.png",
)


class _Failure(Exception):
    """A user-facing failure of the report command (message: one line)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lightning-conditioning`` command.

    Example:
        >>> build_parser().parse_args(["report", "runs/version_0", "--step", "10"]).step
        10
    """
    parser = argparse.ArgumentParser(
        prog=PROG, description="Layer-wise conditioning analysis (Huang et al., ECCV 2020)."
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    report = commands.add_parser(
        "report",
        help="tabulate, plot and diagnose a TensorBoard or CSV run",
        description="Read what ConditioningCallback / WeightDominationCallback logged to a "
        "TensorBoardLogger or CSVLogger run; print a per-layer table and the "
        "diagnosis; write PNG figures.",
    )
    report.add_argument("run_dir", type=Path, help="the logger's log_dir (or a folder holding one run)")
    report.add_argument("--step", type=int, default=None, help="analysed step to report (default: the latest)")
    report.add_argument("--out", type=Path, default=None, help="folder for the PNG figures (default: RUN_DIR)")
    report.add_argument("--no-figures", action="store_true", help="do not write figures")
    report.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    return parser


def _progress(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(f"» {message}", flush=True)


def _write_figures(args: argparse.Namespace, run: RunData, step: int) -> list[Path]:
    from lightning_conditioning.views import figures

    if not figures.matplotlib_available():
        _progress(args, "matplotlib is not installed: no figures (pip install matplotlib)")
        return []
    out = args.out or run.path
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _Failure(f"cannot create the figure folder {out}: {error.strerror}") from None
    _progress(args, f"writing figures to {out}")
    table = run.conditioning(step)
    built = {
        FIGURE_FILES[0]: lambda: figures.depth_profile_figure(table, step=step),
        FIGURE_FILES[1]: lambda: figures.training_figure(run.history()),
        FIGURE_FILES[2]: lambda: figures.units_figure(table, step=step),
    }
    domination, _ = run.domination(step)
    if domination:
        built[FIGURE_FILES[3]] = lambda: figures.domination_figure(domination, run.domination_history(), step=step)
    written = []
    for name, make in built.items():
        try:
            written.append(figures.save_png(make(), out / name))
        except OSError as error:
            raise _Failure(f"cannot write {out / name}: {error.strerror}") from None
    return written


def _report(args: argparse.Namespace) -> int:
    from lightning_conditioning.report.reader import RunError, load_run
    from lightning_conditioning.report.tables import format_layer_table
    from lightning_conditioning.views.diagnosis import diagnose, format_findings

    started = time.perf_counter()
    _progress(args, f"reading {args.run_dir}")
    try:
        run = load_run(args.run_dir)
    except RunError as error:
        raise _Failure(str(error)) from None
    steps = run.conditioning_steps()
    _progress(
        args,
        (
            f"{run.kind} run {run.path}: {len(steps)} analysed step(s) "
            f"{steps[0]}…{steps[-1]}"
            + (", spectra file" if run.spectra else "")
            + f" ({time.perf_counter() - started:.1f} s)"
        ),
    )
    step = steps[-1] if args.step is None else args.step
    if step not in steps:
        raise _Failure(
            f"step {step} was not analysed in {run.path}; analysed steps: "
            + (
                ", ".join(map(str, steps))
                if len(steps) <= 12
                else f"{steps[0]}, {steps[1]}, …, {steps[-1]} ({len(steps)} in all)"
            )
        )
    table = run.conditioning(step)
    domination, dominated_layers = run.domination(step)
    print(f"\nStep {step}: {len(table)} layers (module order)\n")
    print(format_layer_table(table, domination))
    if not args.no_figures:
        for path in _write_figures(args, run, step):
            print(f"figure: {path}")
    print(f"\nDiagnosis (step {step}):")
    print(format_findings(diagnose(table, domination, dominated_layers=dominated_layers)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (argparse exits 2 on bad usage).

    Example::

        raise SystemExit(main(["report", "lightning_logs/version_0", "--out", "figures"]))
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _report(args)
    except _Failure as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `... | head`: stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # never a traceback for the user: one line, then exit 1
        print(f"{PROG}: error: unexpected {type(error).__name__}: {error}", file=sys.stderr)
        return 1

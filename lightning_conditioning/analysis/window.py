"""The analysis of a finished window: reduce over processes, eigen-solve, summarise; in the
training thread, or in a background thread so that training goes on meanwhile.

:func:`analyse_capture` is the one implementation (the monitor's, and the benchmarks'); it is
:func:`gather_moments` (the collectives, in the training thread) followed by
:func:`analyse_moments` (pure computation on host copies, safe in another thread).
:class:`BackgroundAnalysis` runs the latter in one worker thread that uses a single intra-op
thread of its own (``torch.set_num_threads`` is per thread: the user's setting for the
training thread is untouched), so an eigen-solve neither blocks the training step nor fights it
for cores with spinning OpenMP teams.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait

import torch

from lightning_conditioning.analysis.assignment import analyse_layers, estimated_seconds
from lightning_conditioning.analysis.margin import ADAM_FLOPS, Margins
from lightning_conditioning.analysis.options import ConditioningOptions
from lightning_conditioning.analysis.results import LayerConditioning, analyse_layer
from lightning_conditioning.capture.hooks import LayerCapture
from lightning_conditioning.distributed.collectives import Collectives
from lightning_conditioning.maths.moments import LayerMoments
from lightning_conditioning.maths.solvers import SolverPlan, limited_threads, plan_solver, shareable
from lightning_conditioning.notify import announce

__all__ = [
    "analyse_capture",
    "gather_moments",
    "analyse_moments",
    "analyse_releasing",
    "BackgroundAnalysis",
    "BACKGROUND_SECONDS",
    "background_helps",
    "sampling_note",
]

Notify = Callable[[str], None]
#: analyses estimated to take longer than this go to the background with ``analysis="auto"``
BACKGROUND_SECONDS = 0.5


def gather_moments(
    capture: LayerCapture,
    collectives: Collectives | None = None,
    *,
    reset: bool = True,
    solver: SolverPlan | None = None,
) -> dict[str, LayerMoments]:
    """A filled capture's window summed over processes, as host copies (float64); the capture
    is reset (unless ``reset=False``). Every rank must call it (collectives).

    Where the collectives can reduce to one process (:attr:`Collectives.shards_by_owner`),
    each layer's dense moments are summed to its owner only
    (:mod:`~lightning_conditioning.distributed.owners`), unless ``solver`` picks for them a
    solver whose result cannot travel back (an approximate spectrum: solved on every rank).
    """
    group = collectives or Collectives.local()
    if group.distributed:
        capture.all_reduce(
            group.all_reduce,
            group.world_size,
            group.rank,
            reduce_to=group.reduce_to if group.shards_by_owner else None,
            shardable=lambda layer, dim: shareable(plan_solver(solver, layer, dim)),
        )
    if reset:  # the sums themselves become the means: no d² copy while they are analysed
        moments = capture.moments(take=True)
        capture.reset()
        return moments
    return capture.moments()


def analyse_moments(
    moments: Mapping[str, LayerMoments],
    step: int,
    options: ConditioningOptions,
    collectives: Collectives | None = None,
    *,
    info: Notify = announce,
    who: str = "ConditioningMonitor",
) -> dict[str, LayerConditioning]:
    """Eigen-solve (shared out over ``collectives``) and summarise finished moments. Analyses
    expected to take over a second are announced through ``info`` (start and duration)."""
    group = collectives or Collectives.local()
    estimate = estimated_seconds(moments, group.world_size)
    if estimate > 1.0:  # never block without telling
        largest = max(
            (m.input_second_moment.shape[0] for m in moments.values() if m.input_second_moment is not None), default=0
        )
        info(
            f"{who}: step {step}: eigen-analysis of {len(moments)} layers "
            f"(largest Σx {largest}×{largest}), about {estimate:.0f} s per process..."
        )
    started = time.perf_counter()
    with limited_threads(1):  # see limited_threads: small solves stall on spinning teams
        results = _analyse_layers(moments, step, options, group)
    if estimate > 1.0:
        info(f"{who}: step {step}: analysis done in {time.perf_counter() - started:.1f} s.")
    return results


def analyse_releasing(
    moments: dict[str, LayerMoments],
    step: int,
    options: ConditioningOptions,
    collectives: Collectives | None = None,
    *,
    margins: Margins | None = None,
    noted: set[str] | None = None,
    info: Notify = announce,
    who: str = "ConditioningMonitor",
) -> dict[str, LayerConditioning]:
    """:func:`analyse_moments`, then the stability margins (:class:`Margins`: the Adam margin
    needs the moments), then the means released (the dict emptied: every holder of it lets go)
    before the results are handed on. Adam layers left without a margin are named once (in
    ``noted``)."""
    try:
        results = analyse_moments(moments, step, options, collectives, info=info, who=who)
        if margins is None:
            return results
        results, unresolved = margins.apply(results, moments, collectives)
        if unresolved and noted is not None and "adam-margin" not in noted:
            noted.add("adam-margin")
            info(
                f"{who}: no Adam stability margin for {len(unresolved)} layer(s) ("
                f"{', '.join(unresolved[:4])}{' …' if len(unresolved) > 4 else ''}): their Lanczos "
                f"run does not fit its budget (ADAM_FLOPS = {ADAM_FLOPS:g} flops an analysis on a CPU, "
                "about 256-wide layers; 1000× on an accelerator), their Σx or Σ∇h is not a dense "
                "matrix here (sketched, diagonal), or it did not converge. Said once."
            )
        return results
    finally:
        moments.clear()


def _analyse_layers(
    moments: Mapping[str, LayerMoments], step: int, options: ConditioningOptions, group: Collectives
) -> dict[str, LayerConditioning]:
    return analyse_layers(
        moments,
        lambda name, window, solved: analyse_layer(
            name,
            step,
            window,
            percents=options.kappa_percents,
            rank_rtol=options.rank_rtol,
            kappa_definition=options.kappa_definition,
            solved=solved,
        ),
        solver=options.solver,
        collectives=group,
    )


def analyse_capture(
    capture: LayerCapture,
    step: int,
    options: ConditioningOptions,
    collectives: Collectives | None = None,
    *,
    info: Notify = announce,
    who: str = "ConditioningMonitor",
    reset: bool = True,
) -> dict[str, LayerConditioning]:
    """A filled capture's window, finished: summed over processes, eigen-solved (shared out),
    summarised; the capture is reset (unless ``reset=False``). Analyses expected to take over a second are announced
    through ``info`` (start and duration). The one implementation of the analysis, for the
    monitor and for the benchmarks.
    """
    moments = gather_moments(capture, collectives, reset=reset)
    return analyse_moments(moments, step, options, collectives, info=info, who=who)


def background_helps(device: torch.device) -> bool:
    """Whether an analysis in a worker thread can run beside training rather than against it:
    the model trains on an accelerator (the host's cores are mostly idle), or the CPU has cores
    that the training thread's intra-op threads leave free. On a CPU whose every core trains,
    the worker only competes for them (measured on 2 cores, GPT-2 small: a background analysis
    cost 12% more wall time than the same analysis in the training thread).

    Example:
        >>> background_helps(torch.device("meta"))
        True
    """
    if device.type != "cpu":
        return True
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return cores > torch.get_num_threads()


def _glibc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _glibc_trim() if sys.platform.startswith("linux") else None


def release_heap() -> None:
    """Hand the worker's freed heap memory back to the OS (glibc ``malloc_trim``; a no-op
    elsewhere). A worker thread allocates in a malloc arena of its own, whose freed pages the
    training thread never reuses: without this, every background analysis left its solves'
    copies resident (measured +160 MiB of peak RSS on GPT-2 small, in half the runs)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class BackgroundAnalysis:
    """At most one analysis in flight, in a worker thread with one intra-op thread.

    Example:
        >>> background = BackgroundAnalysis()
        >>> background.submit(7, lambda: {"fc": None})
        >>> background.wait()
        (7, {'fc': None})
        >>> background.close()
    """

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads
        self._executor: ThreadPoolExecutor | None = None
        self._future: Future[dict[str, LayerConditioning]] | None = None
        self._step: int | None = None

    @property
    def pending(self) -> bool:
        """Whether an analysis was submitted and not collected yet."""
        return self._future is not None

    def _run(self, work: Callable[[], dict[str, LayerConditioning]]) -> dict[str, LayerConditioning]:
        torch.set_num_threads(self.threads)  # this worker thread's own setting only
        try:
            return work()
        finally:
            release_heap()

    def submit(self, step: int, work: Callable[[], dict[str, LayerConditioning]]) -> None:
        """Run ``work()`` (the analysis of ``step``) in the worker; call only when nothing is
        pending (:meth:`wait` first)."""
        if self._future is not None:
            raise RuntimeError("an analysis is already in flight: wait() for it first")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="lightning-conditioning")
        self._future, self._step = self._executor.submit(self._run, work), step

    @property
    def step(self) -> int | None:
        """The step of the analysis in flight (None when none is)."""
        return self._step

    def done(self) -> bool:
        """Whether the analysis in flight has finished (False when none is)."""
        return self._future is not None and self._future.done()

    def join(self) -> None:
        """Block until the analysis in flight (if any) has finished, without collecting it
        (:meth:`wait` or a later :meth:`done` check does)."""
        if self._future is not None:
            futures_wait([self._future])

    def wait(self) -> tuple[int, dict[str, LayerConditioning]] | None:
        """``(step, results)`` of the analysis in flight, once finished (None when none is);
        an exception of the analysis is raised here."""
        if self._future is None:
            return None
        future, step = self._future, self._step
        self._future = self._step = None
        assert step is not None
        return step, future.result()

    def close(self) -> None:
        """Stop the worker (after the analysis in flight, if any)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


def sampling_note(moments: Mapping[str, LayerMoments], limit: int | None) -> str | None:
    """What row sampling did in a finished window, in words (None: every row entered).

    Example:
        >>> from lightning_conditioning.maths.sampling import SampleTally
        >>> found = LayerMoments(None, None, 8192, 8192, torch.zeros(1), torch.zeros(1),
        ...                      grad_sampling=SampleTally(16384, 2048, 8192, 1e-6, 0.01))
        >>> print(sampling_note({"fc": found}, 2048))  # doctest: +NORMALIZE_WHITESPACE
        passes of up to 16384 rows in a window: 1 moment of 1 layer kept a uniform sample of
        max_rows=2048 rows per step, weighted to stand for the rows of its passes (the passes
        past that budget, 8192 rows, left out); the relative standard error of λmax from the
        sampling is 10.0% at most (median 10.0%), logged as `…_sampling_error`; max_rows=None
        keeps every row
    """
    tallies = [
        tally
        for found in moments.values()
        for tally in (found.input_sampling, found.grad_sampling)
        if tally is not None
    ]
    if not tallies:
        return None
    errors = sorted(tally.relative_error() for tally in tallies)
    count, skipped = len(tallies), max(t.rows - t.counted for t in tallies)
    return (
        f"passes of up to {max(t.rows for t in tallies)} rows in a window: {count} moment"
        f"{'s' * (count != 1)} of {len(moments)} layer{'s' * (len(moments) != 1)} kept a uniform "
        f"sample of max_rows={limit} rows per step, weighted to stand for the rows of its passes"
        + (f" (the passes past that budget, {skipped} rows, left out)" if skipped else "")
        + f"; the relative standard error of λmax from the sampling is {errors[-1]:.1%} at most "
        f"(median {errors[len(errors) // 2]:.1%}), logged as `…_sampling_error`; max_rows=None "
        "keeps every row"
    )

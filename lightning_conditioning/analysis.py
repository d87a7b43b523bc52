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

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from lightning_conditioning.accumulate import LayerMoments
from lightning_conditioning.capture import LayerCapture
from lightning_conditioning.collectives import Collectives
from lightning_conditioning.distributed import analyse_layers, estimated_seconds
from lightning_conditioning.options import ConditioningOptions
from lightning_conditioning.results import LayerConditioning, analyse_layer

__all__ = ["analyse_capture", "gather_moments", "analyse_moments", "BackgroundAnalysis",
           "BACKGROUND_SECONDS"]

_LOG = logging.getLogger("lightning_conditioning")
Notify = Callable[[str], None]
#: analyses estimated to take longer than this go to the background with ``analysis="auto"``
BACKGROUND_SECONDS = 0.5


def gather_moments(capture: LayerCapture, collectives: Collectives | None = None, *,
                   reset: bool = True) -> dict[str, LayerMoments]:
    """A filled capture's window summed over processes, as host copies (float64); the capture
    is reset (unless ``reset=False``). Every rank must call it (collectives)."""
    group = collectives or Collectives.local()
    if group.distributed:
        capture.all_reduce(group.all_reduce, group.world_size, group.rank)
    moments = capture.moments()
    if reset:
        capture.reset()
    return moments


def analyse_moments(
    moments: Mapping[str, LayerMoments],
    step: int,
    options: ConditioningOptions,
    collectives: Collectives | None = None,
    *,
    info: Notify = _LOG.info,
    who: str = "ConditioningMonitor",
) -> dict[str, LayerConditioning]:
    """Eigen-solve (shared out over ``collectives``) and summarise finished moments. Analyses
    expected to take over a second are announced through ``info`` (start and duration)."""
    group = collectives or Collectives.local()
    estimate = estimated_seconds(moments, group.world_size)
    if estimate > 1.0:  # never block without telling
        largest = max((m.input_second_moment.shape[0] for m in moments.values()
                       if m.input_second_moment is not None), default=0)
        info(f"{who}: step {step}: eigen-analysis of {len(moments)} layers "
             f"(largest Σx {largest}×{largest}), about {estimate:.0f} s per process...")
    started = time.perf_counter()
    results = analyse_layers(
        moments,
        lambda name, window, solved: analyse_layer(
            name, step, window, percents=options.kappa_percents, rank_rtol=options.rank_rtol,
            kappa_definition=options.kappa_definition, solved=solved),
        solver=options.solver,
        collectives=group,
    )
    if estimate > 1.0:
        info(f"{who}: step {step}: analysis done in {time.perf_counter() - started:.1f} s.")
    return results


def analyse_capture(
    capture: LayerCapture,
    step: int,
    options: ConditioningOptions,
    collectives: Collectives | None = None,
    *,
    info: Notify = _LOG.info,
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
        return work()

    def submit(self, step: int, work: Callable[[], dict[str, LayerConditioning]]) -> None:
        """Run ``work()`` (the analysis of ``step``) in the worker; call only when nothing is
        pending (:meth:`wait` first)."""
        if self._future is not None:
            raise RuntimeError("an analysis is already in flight: wait() for it first")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="lightning-conditioning")
        self._future, self._step = self._executor.submit(self._run, work), step

    def done(self) -> bool:
        """Whether the analysis in flight has finished (False when none is)."""
        return self._future is not None and self._future.done()

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

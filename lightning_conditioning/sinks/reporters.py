"""The Hugging Face Trainer's reporting integrations (``report_to``) as a sink: scalars through
each integration's own ``on_log`` at the step they belong to, and, through every TensorBoard
integration's writer, what :meth:`~lightning_conditioning.views.publication.Publication.write_to`
writes (histograms named as the Trainer names the scalars beside them, the spectra file).
``transformers`` is imported only when there is something to write.

Example:
    >>> class Reporter:
    ...     def on_log(self, args, state, control, logs, **kwargs): print(state.global_step, logs)
    >>> from types import SimpleNamespace
    >>> report_scalars([Reporter()], None, SimpleNamespace(global_step=9), None, 4, {"c/fc/input_rank": 2.0}, {})
    4 {'c/fc/input_rank': 2.0}
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from lightning_conditioning.views.publication import Publication

__all__ = ["reporting_integrations", "report_scalars", "tensorboard_writers", "write_to_tensorboard"]


def reporting_integrations(callbacks: Iterable[Any]) -> list[Any]:
    """The Trainer's reporting integrations (``report_to``) among its ``callbacks``, in order."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK

    kinds = tuple(INTEGRATION_TO_CALLBACK.values())
    return [callback for callback in callbacks if isinstance(callback, kinds)]


def report_scalars(
    reporters: Iterable[Any],
    args: Any,
    state: Any,
    control: Any,
    step: int,
    scalars: Mapping[str, float],
    hook_kwargs: Mapping[str, Any],
) -> None:
    """``scalars`` to every reporter's ``on_log`` at ``step`` (a copy of the Trainer's state
    carries it: its own state and ``log_history`` are left alone)."""
    if not scalars:
        return
    at = copy.copy(state)
    at.global_step = int(step)
    passed = {k: v for k, v in hook_kwargs.items() if k != "logs"}
    for reporter in reporters:
        reporter.on_log(args, at, control, logs=dict(scalars), **passed)


def tensorboard_writers(reporters: Iterable[Any]) -> Iterator[Any]:
    """The ``SummaryWriter`` of every TensorBoard integration among ``reporters``."""
    for reporter in reporters:
        writer = getattr(reporter, "tb_writer", None)
        if type(reporter).__name__ == "TensorBoardCallback" and writer is not None:
            yield writer


def write_to_tensorboard(reporters: Iterable[Any], publication: Publication) -> None:
    """The publication's histograms, spectra file and figures to every TensorBoard integration."""
    writers = list(tensorboard_writers(reporters))
    if not writers:
        return
    from transformers.integrations.integration_utils import rewrite_logs

    for writer in writers:
        publication.write_to(
            writer,
            getattr(writer, "log_dir", None) or getattr(writer, "logdir", None),
            tag=lambda key: next(iter(rewrite_logs({key: 0.0}))),
        )
        writer.flush()

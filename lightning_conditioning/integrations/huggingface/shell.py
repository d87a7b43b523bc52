"""What both Hugging Face callbacks share: the Trainer driving them, its reporting
integrations, the state that rides in the Trainer's checkpoints (the trainer-free rest is
:class:`~lightning_conditioning.monitors.shell.MonitorShell`)."""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator, Mapping
from types import FrameType
from typing import Any

from lightning_conditioning.analysis.options import check_one_per_prefix
from lightning_conditioning.monitors.shell import MonitorShell

try:
    from transformers.trainer_callback import TrainerCallback

    _MISSING: str | None = None
except ImportError as _error:  # the module stays importable (docs, doctest collection)
    TrainerCallback = object
    _MISSING = str(_error)


def _require_transformers(who: str) -> None:
    if _MISSING is not None:
        raise ImportError(f"{who} needs the Hugging Face `transformers` package (and `accelerate` for "
                          f'its Trainer): pip install "lightning-conditioning[hf]" ({_MISSING})')


def _calling_trainer(callback: object, depth: int = 32) -> Any:
    """The Trainer whose callback handler is calling ``callback`` now, found on the call stack
    (``Trainer`` → ``CallbackHandler.call_event`` → the hook); None when there is none.

    Example:
        >>> _calling_trainer(object()) is None
        True
    """
    for frame in _callers(depth):
        candidate = frame.f_locals.get("self")
        handler = getattr(candidate, "callback_handler", None)
        if handler is not None and any(cb is callback for cb in getattr(handler, "callbacks", ())):
            return candidate
    return None


def _callers(depth: int) -> Iterator[FrameType]:
    """The frames of the call stack above the caller's caller, nearest first, at most ``depth``."""
    frame: FrameType | None = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return
        yield frame
        frame = frame.f_back


def _is_tensorboard(reporter: object) -> bool:
    return type(reporter).__name__ == "TensorBoardCallback"


class _TrainerShell(MonitorShell, TrainerCallback):
    """What both callbacks share beyond :class:`MonitorShell`: the Trainer driving them, its
    reporting integrations, the state in its checkpoints."""

    def __init__(self) -> None:
        _require_transformers(type(self).__name__)
        super().__init__()
        self._trainer: Any = None

    def set_trainer(self, trainer: Any) -> None:
        """The ``transformers.Trainer`` whose reporting integrations get the scalars. Needed
        only when the hooks are called by something else than a Trainer's callback handler:
        at every ``on_train_begin`` the Trainer calling the callback is found on the call
        stack (and replaces the one set)."""
        self._trainer = trainer

    # ------------------------------------------------------------------ state in checkpoints
    @property
    def checkpoint_key(self) -> str:
        """The callback's entry in the Trainer's ``state.stateful_callbacks``, which the
        Trainer writes into every checkpoint's ``trainer_state.json`` and reads back when it
        resumes (one per class and prefix)."""
        return f"lightning_conditioning:{type(self).__name__}:{self.prefix}"

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # before the Trainer saves a checkpoint (it does so right after this hook): the state
        # rides in trainer_state.json; a small dict, no I/O
        self._store(state)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._store(state)

    def _store(self, state: Any) -> None:
        stored = getattr(state, "stateful_callbacks", None)
        if isinstance(stored, dict):
            stored[self.checkpoint_key] = self.state_dict()

    def _restore(self, state: Any) -> None:
        """At train begin: the state the resumed checkpoint holds, if any."""
        stored = getattr(state, "stateful_callbacks", None)
        if isinstance(stored, dict) and isinstance(stored.get(self.checkpoint_key), dict):
            self.load_state_dict(stored[self.checkpoint_key])

    def _bind(self, state: Any) -> None:
        """At train begin: who speaks, and the Trainer (the caller's, else the one set); two
        callbacks of one kind and prefix fail here, naming ``prefix=``."""
        self._zero = bool(getattr(state, "is_world_process_zero", True))
        self._trainer = _calling_trainer(self) or self._trainer
        check_one_per_prefix(self, self._callbacks(), type(self))
        if self._trainer is None:
            self._warn_once("no-trainer", f"{type(self).__name__}: no Hugging Face Trainer calls this "
                            "callback, so its scalars reach no reporting integration (they are in "
                            "`results`); call `callback.set_trainer(trainer)` before training.")
        elif not self._reporters():
            self._warn_once("no-reporter", f"{type(self).__name__}: the Trainer has no reporting "
                            "integration (`report_to`), so nothing is logged; the latest numbers "
                            "are in `results`.")

    def _callbacks(self) -> list[Any]:
        handler = getattr(self._trainer, "callback_handler", None)
        return list(getattr(handler, "callbacks", []))

    def _reporters(self) -> list[Any]:
        """The Trainer's reporting integrations (``report_to``), in its order."""
        from transformers.integrations import INTEGRATION_TO_CALLBACK

        kinds = tuple(INTEGRATION_TO_CALLBACK.values())
        return [cb for cb in self._callbacks() if isinstance(cb, kinds)]

    def _report(self, args: Any, state: Any, control: Any, step: int, scalars: Mapping[str, float],
                hook_kwargs: Mapping[str, Any]) -> None:
        """``scalars`` to every reporting integration's ``on_log``, at ``step`` (a copy of the
        state carries it; the Trainer's own state and ``log_history`` are left alone)."""
        if not scalars or not self._zero:  # the integrations report from process zero only
            return
        at = copy.copy(state)
        at.global_step = int(step)
        passed = {k: v for k, v in hook_kwargs.items() if k != "logs"}
        for reporter in self._reporters():
            reporter.on_log(args, at, control, logs=dict(scalars), **passed)

    def _tensorboard_writers(self) -> Iterator[Any]:
        """The ``SummaryWriter`` of every TensorBoard integration (process zero only)."""
        for reporter in self._reporters():
            writer = getattr(reporter, "tb_writer", None)
            if _is_tensorboard(reporter) and writer is not None:
                yield writer


def resumed_checkpoint(trainer: Any, depth: int = 48) -> str | None:
    """The checkpoint folder ``trainer.train(resume_from_checkpoint=...)`` resumes from, read
    off the call stack (the Trainer keeps it in no attribute); None when it is not resuming.

    Example:
        >>> resumed_checkpoint(object()) is None
        True
    """
    for frame in _callers(depth):
        if frame.f_locals.get("self") is trainer:
            found = frame.f_locals.get("resume_from_checkpoint")
            if isinstance(found, str) and found:
                return found
    return None

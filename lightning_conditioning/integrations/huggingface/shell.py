"""What both Hugging Face callbacks share: the Trainer driving them, its reporting
integrations, the model's loss and its gradient, the rank-zero notes, the state that rides in
the Trainer's checkpoints."""

from __future__ import annotations

import copy
import functools
import math
import sys
from collections.abc import Callable, Iterator, Mapping
from types import FrameType
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_conditioning.analysis.options import check_one_per_prefix
from lightning_conditioning.notify import announce
from lightning_conditioning.notify import warn as warn_at_user

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


def _unwrapped(optimizer: Any) -> Any:
    """The torch optimizer inside ``accelerate``'s ``AcceleratedOptimizer`` (or ``optimizer``)."""
    while optimizer is not None and getattr(optimizer, "optimizer", None) not in (None, optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _loss_scale(optimizer: Any) -> float:
    """The fp16 ``GradScaler``'s scale of ``accelerate``'s optimizer (1 without one)."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return 1.0
    return float(scaler.get_scale())


def _unscale(optimizer: Any) -> None:
    """Unscale fp16 gradients before they are read, as the Trainer's own clipping does (the
    optimizer step then skips its unscaling: training is unchanged). A no-op without a scaler
    or when they are unscaled already."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return
    try:
        scaler.unscale_(_unwrapped(optimizer))
    except RuntimeError as error:  # the Trainer's clipping unscaled them already
        if "already been called" not in str(error):
            raise


def _count(value: Any) -> int | None:
    """``num_items_in_batch`` (an int or a one-element tensor) as an int; None otherwise."""
    if isinstance(value, Tensor):
        return int(round(float(value))) if value.numel() == 1 else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return int(round(value))
    return None


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


class _LossWatch:
    """Two hooks on the Trainer's model, for the micro-batches of a captured step only.

    Before each forward, ``before(kwargs)`` sees the keyword arguments the Trainer calls the
    model with (``labels``, ``num_items_in_batch``). After it, a tensor hook on the model's own
    ``loss`` hands ``loss_grad(loss, grad)`` the loss and the gradient that reaches it in the
    backward: what the Trainer multiplied the model's loss by before ``backward`` (``1/K`` for
    an unnormalised loss with ``K`` accumulated micro-batches, ``num_processes`` when tokens
    are averaged across devices, the fp16 loss scale). That hook runs before any layer's
    output-gradient hook (the loss is the root of the model's part of the graph).
    """

    def __init__(self, active: Callable[[], bool], before: Callable[[Mapping[str, Any]], None],
                 loss_grad: Callable[[Tensor, Tensor], None]) -> None:
        self._active, self._before, self._loss_grad = active, before, loss_grad
        self._handles: list[RemovableHandle] = []

    def attach(self, model: nn.Module) -> None:
        self.detach()
        self._handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                         model.register_forward_hook(self._post)]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._active():
            self._before(kwargs)

    def _post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not self._active():
            return
        if isinstance(output, Mapping):  # ModelOutput, dict
            loss = output.get("loss")
        elif isinstance(output, (tuple, list)) and output:  # return_dict=False: the loss first
            loss = output[0]
        else:
            loss = getattr(output, "loss", None)
        if isinstance(loss, Tensor) and loss.requires_grad and loss.ndim == 0:
            loss.register_hook(functools.partial(self._on_grad, loss.detach()))

    def _on_grad(self, loss: Tensor, grad: Tensor) -> None:
        self._loss_grad(loss, grad)


class _TrainerShell(TrainerCallback):
    """What both callbacks share: the Trainer driving them, its reporting integrations, the
    rank-zero notes."""

    def __init__(self) -> None:
        _require_transformers(type(self).__name__)
        self._trainer: Any = None
        self._zero = True  # this process is the world's process zero (it speaks)
        self._said: set[str] = set()

    def set_trainer(self, trainer: Any) -> None:
        """The ``transformers.Trainer`` whose reporting integrations get the scalars. Needed
        only when the hooks are called by something else than a Trainer's callback handler:
        at every ``on_train_begin`` the Trainer calling the callback is found on the call
        stack (and replaces the one set)."""
        self._trainer = trainer

    # ------------------------------------------------------------------ state in checkpoints
    prefix: str
    monitor: Any  # the core monitor the callback drives (None before training)
    _restored: dict[str, Any]  # its state while there is no monitor

    def state_dict(self) -> dict[str, Any]:
        """What the callback has learned (the notes and warnings given, the layers' turn,
        every layer's ratio history): plain JSON values."""
        return self.monitor.state_dict() if self.monitor is not None else dict(self._restored)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (before training or at its start)."""
        self._restored = dict(state)
        if self.monitor is not None:
            self.monitor.load_state_dict(self._restored)

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

    def _info(self, message: str) -> None:
        if self._zero:
            announce(message)

    def _warn(self, message: str) -> None:
        if self._zero:
            warn_at_user(message)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self._warn(message)


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

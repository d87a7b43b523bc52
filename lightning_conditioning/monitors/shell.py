"""What every trainer shell around a monitor shares, framework-free: options checked by name,
notes and warnings from the world's process zero (said once where asked), the monitor's state
through checkpoints (also inside a trainer's dict of callback states), and the float16 loss
scaler of a (wrapped) optimizer. A shell for a new trainer subclasses :class:`MonitorShell` and
maps the trainer's hooks onto the monitor.

Example:
    >>> from lightning_conditioning.analysis.options import ConditioningOptions
    >>> check_options({"kappa_percents": (50,)}, ConditioningOptions.names())
    >>> check_options({"kapa": 1}, ConditioningOptions.names())
    Traceback (most recent call last):
    ...
    TypeError: unknown option(s) ['kapa']; options: [...]
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from types import FrameType
from typing import Any

from lightning_conditioning.notify import announce
from lightning_conditioning.notify import warn as warn_at_user

__all__ = [
    "MonitorShell",
    "check_options",
    "unwrap_optimizer",
    "grad_scale",
    "unscale_gradients",
    "found_on_stack",
    "domination_source",
]


def check_options(options: Mapping[str, Any], names: Iterable[str]) -> None:
    """A ``TypeError`` naming the unknown keys of ``options`` and the known ones (the shell's
    own ``every_n_steps`` aside)."""
    known = list(names)
    unknown = set(options) - set(known)
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; options: {[n for n in known if n != 'every_n_steps']}")


def found_on_stack(match: Callable[[dict[str, Any]], Any], depth: int = 48) -> Any:
    """The first non-None ``match(frame locals)`` over the callers of the caller, nearest first
    (at most ``depth`` frames): how a shell finds what a trainer keeps in no attribute (the
    trainer calling it, the checkpoint it resumes from). None when no frame matches.

    Example:
        >>> found_on_stack(lambda names: names.get("no such local")) is None
        True
    """
    frame: FrameType | None = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return None
        found = match(frame.f_locals)
        if found is not None:
            return found
        frame = frame.f_back
    return None


def domination_source(callbacks: Iterable[Any]) -> Any:
    """The ``domination_table`` of whichever of a trainer's ``callbacks`` has one (a
    weight-domination callback), for a conditioning monitor's ``domination_source``; None."""
    tables = [getattr(callback, "domination_table", None) for callback in callbacks]
    return next((table for table in reversed(tables) if callable(table)), None)


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside wrappers that keep it as ``.optimizer`` (``accelerate``'s
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``), or ``optimizer``."""
    while optimizer is not None and getattr(optimizer, "optimizer", None) not in (None, optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _scaler(optimizer: Any) -> Any:
    scaler = getattr(optimizer, "scaler", None)
    return scaler if scaler is not None and getattr(scaler, "is_enabled", lambda: True)() else None


def grad_scale(optimizer: Any) -> float:
    """The float16 ``GradScaler``'s scale of a wrapped optimizer that holds one as ``.scaler``
    (1 without one).

    Example:
        >>> grad_scale(object())
        1.0
    """
    scaler = _scaler(optimizer)
    return float(scaler.get_scale()) if scaler is not None else 1.0


def unscale_gradients(optimizer: Any) -> None:
    """Unscale float16 gradients before they are read, as a trainer's own clipping does (the
    optimizer step then skips its unscaling: training is unchanged). A no-op without a scaler
    or when they are unscaled already."""
    scaler = _scaler(optimizer)
    if scaler is None:
        return
    try:
        scaler.unscale_(unwrap_optimizer(optimizer))
    except RuntimeError as error:  # the trainer's clipping unscaled them already
        if "already been called" not in str(error):
            raise


class MonitorShell:
    """The trainer-independent part of a callback that drives a monitor: :attr:`monitor`
    (None before training), its state while there is none, and the notes.

    Example:
        >>> shell = MonitorShell()
        >>> shell.load_state_dict({"said": ["x"]}); shell.state_dict()
        {'said': ['x']}
    """

    #: first part of every logged key
    prefix: str = ""

    def __init__(self) -> None:
        self.monitor: Any = None
        self._restored: dict[str, Any] = {}
        self._zero = True  # this process is the world's process zero (it speaks)
        self._said: set[str] = set()

    def state_dict(self) -> dict[str, Any]:
        """What the monitor has learned (the notes and warnings given, the layers' turn, every
        layer's ratio history): plain JSON values."""
        return self.monitor.state_dict() if self.monitor is not None else dict(self._restored)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (before training or at its start)."""
        self._restored = dict(state)
        if self.monitor is not None:
            self.monitor.load_state_dict(self._restored)

    @property
    def checkpoint_key(self) -> str:
        """The shell's entry in a trainer's dict of callback states (one per class and prefix)."""
        return f"lightning_conditioning:{type(self).__name__}:{self.prefix}"

    def store_in(self, states: Any) -> None:
        """Put :meth:`state_dict` into ``states`` (a trainer's dict that its checkpoints carry,
        e.g. Hugging Face's ``state.stateful_callbacks``) under :attr:`checkpoint_key`."""
        if isinstance(states, dict):
            states[self.checkpoint_key] = self.state_dict()

    def restore_from(self, states: Any) -> None:
        """What :meth:`store_in` put into ``states``, if anything (a resumed run)."""
        if isinstance(states, dict) and isinstance(states.get(self.checkpoint_key), dict):
            self.load_state_dict(states[self.checkpoint_key])

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

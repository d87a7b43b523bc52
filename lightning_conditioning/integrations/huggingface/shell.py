"""What both Hugging Face callbacks share: the Trainer driving them, its reporting
integrations, the state that rides in the Trainer's checkpoints (the trainer-free rest is
:class:`~lightning_conditioning.monitors.shell.MonitorShell`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from lightning_conditioning.analysis.options import check_one_per_prefix
from lightning_conditioning.capture.loss_watch import LossWatch
from lightning_conditioning.monitors.shell import MonitorShell, found_on_stack
from lightning_conditioning.sinks.reporters import report_scalars, reporting_integrations

try:
    from transformers.trainer_callback import TrainerCallback

    _MISSING: str | None = None
except ImportError as _error:  # the module stays importable (docs, doctest collection)
    TrainerCallback = object
    _MISSING = str(_error)

#: a Trainer hook's arguments: ``(args, state, control, kwargs)``
Hook = tuple[Any, Any, Any, Mapping[str, Any]]


def _calling_trainer(callback: object) -> Any:
    """The Trainer whose callback handler is calling ``callback`` now (``Trainer`` →
    ``CallbackHandler.call_event`` → the hook), or None."""

    def holds(names: dict[str, Any]) -> Any:
        handler = getattr(names.get("self"), "callback_handler", None)
        return names["self"] if any(cb is callback for cb in getattr(handler, "callbacks", ())) else None

    return found_on_stack(holds)


def resumed_checkpoint(trainer: Any) -> str | None:
    """The checkpoint folder ``trainer.train(resume_from_checkpoint=...)`` resumes from; None
    when it is not resuming."""

    def folder(names: dict[str, Any]) -> Any:
        found = names.get("resume_from_checkpoint") if names.get("self") is trainer else None
        return found if isinstance(found, str) and found else None

    return found_on_stack(folder)


class _TrainerShell(MonitorShell, TrainerCallback):
    """What both callbacks share beyond :class:`MonitorShell`: the Trainer driving them, its
    reporting integrations, the state in its checkpoints."""

    def __init__(self) -> None:
        if _MISSING is not None:
            raise ImportError(
                f"{type(self).__name__} needs the Hugging Face `transformers` package (and "
                f'`accelerate` for its Trainer): pip install "lightning-conditioning[hf]" ({_MISSING})'
            )
        super().__init__()
        self._trainer: Any = None
        self._watch: LossWatch  # (each callback's own)
        self.options: Any  # (each callback's own: ConditioningOptions, DominationOptions)

    def set_trainer(self, trainer: Any) -> None:
        """The ``transformers.Trainer`` whose reporting integrations get the scalars. Needed
        only when the hooks are called by something else than a Trainer's callback handler:
        at every ``on_train_begin`` the Trainer calling the callback is found on the call
        stack (and replaces the one set)."""
        self._trainer = trainer

    # the state rides in trainer_state.json (state.stateful_callbacks), saved right after these
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.store_in(getattr(state, "stateful_callbacks", None))

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.store_in(getattr(state, "stateful_callbacks", None))

    def _bind(self, state: Any, kwargs: Mapping[str, Any]) -> nn.Module:
        """At train begin: who speaks, the Trainer (the caller's, else the one set), the state a
        resumed checkpoint holds; returns the model. Two callbacks of one kind and prefix fail
        here, naming ``prefix=``."""
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            raise RuntimeError(f"{type(self).__name__}: the Trainer passed no model to on_train_begin")
        if self.monitor is not None:  # a second train(): keep what the first one said
            self._restored = self.monitor.state_dict()
        self.restore_from(getattr(state, "stateful_callbacks", None))
        self._zero = bool(getattr(state, "is_world_process_zero", True))
        self._trainer = _calling_trainer(self) or self._trainer
        check_one_per_prefix(self, self._callbacks(), type(self))
        if self._trainer is None:
            self._warn_once(
                "no-trainer",
                f"{type(self).__name__}: no Hugging Face Trainer calls this "
                "callback, so its scalars reach no reporting integration (they are in "
                "`results`); call `callback.set_trainer(trainer)` before training.",
            )
        elif not self._reporters():
            self._warn_once(
                "no-reporter",
                f"{type(self).__name__}: the Trainer has no reporting "
                "integration (`report_to`), so nothing is logged; the latest numbers "
                "are in `results`.",
            )
        self._watch.attach(model)  # the model's own loss, as the Trainer applies it
        return model

    def _callbacks(self) -> list[Any]:
        handler = getattr(self._trainer, "callback_handler", None)
        return list(getattr(handler, "callbacks", []))

    def _reporters(self) -> list[Any]:
        return reporting_integrations(self._callbacks())

    def _new_monitor(self, kind: type, model: nn.Module, **shell: Any) -> Any:
        """A ``kind`` monitor of ``model`` with the callback's options, speaking through it."""
        return kind(model, info=self._info, warn=self._warn, **self.options.as_kwargs(), **shell)

    def _report(self, hook: Hook, step: int, scalars: Mapping[str, float]) -> None:
        """``scalars`` to every reporting integration at ``step`` (process zero only); ``hook``:
        the Trainer hook's ``(args, state, control, kwargs)``."""
        if self._zero:
            report_scalars(self._reporters(), *hook[:3], step, scalars, hook[3])

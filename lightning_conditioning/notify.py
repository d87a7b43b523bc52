"""Where the package's own messages go: warnings at the user's line, announcements seen.

Two defaults, used wherever no framework takes a message (plain loops, Fabric, the Hugging
Face Trainer, and the Lightning callbacks for their warnings):

* :func:`warn` issues a :class:`UserWarning` attributed to the first frame of the call stack
  outside this package and the frameworks that call it (torch, Lightning, transformers,
  accelerate, ``contextlib``): the user's ``trainer.fit(...)``, ``trainer.train()`` or
  ``with monitor.track(step):`` line, not ``monitors/conditioning.py``.
* :func:`announce` sends the start lines (which layers are analysed, the memory plan) to the
  ``lightning_conditioning`` logger when logging is configured (the logger has a level, or
  the root logger has handlers), and to stderr otherwise, so that a user who configured
  nothing sees them, as Lightning's own start lines are seen. Silence them with
  ``logging.getLogger("lightning_conditioning").setLevel(logging.WARNING)``.

Example:
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warn("something to say")
    >>> caught[0].filename.endswith("notify.py")  # here, the doctest's line (not inside warn)
    False
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from types import FrameType

__all__ = ["warn", "announce", "user_stacklevel"]

LOGGER = logging.getLogger("lightning_conditioning")


def _folder(module_name: str) -> str | None:
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    return os.path.dirname(os.path.abspath(path)) + os.sep if path else None


def _internal_prefixes() -> tuple[str, ...]:
    """Folders (and files) whose frames are not the user's: this package, the frameworks it
    runs inside (those imported), ``contextlib`` (a ``with`` block's exit)."""
    names = (
        "lightning_conditioning",
        "torch",
        "lightning",
        "lightning_fabric",
        "lightning_utilities",
        "pytorch_lightning",
        "transformers",
        "accelerate",
    )
    folders = [folder for folder in map(_folder, names) if folder]
    return (*folders, os.path.abspath(contextlib.__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes :func:`warnings.warn`, called by this function's caller,
    point at the first frame outside the package and its frameworks (the caller itself when
    the whole stack is internal)."""
    prefixes = _internal_prefixes()
    frame: FrameType | None = sys._getframe(1)  # the caller of user_stacklevel: level 1
    level = 1
    while frame is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not filename.startswith(prefixes) and not filename.startswith("<frozen "):
            return level
        frame, level = frame.f_back, level + 1
    return 1


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """:func:`warnings.warn` at the user's line (see the module's docstring)."""
    warnings.warn(message, category, stacklevel=user_stacklevel())


def announce(message: str) -> None:
    """A start line (INFO): the logger when logging is configured, else stderr."""
    if LOGGER.level != logging.NOTSET or logging.getLogger().hasHandlers():
        LOGGER.info(message)
    else:
        print(message, file=sys.stderr)

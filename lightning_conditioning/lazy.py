"""Names imported on first use: the package's and ``integrations``' top-level ``__getattr__``.

``import lightning_conditioning`` loads neither torch nor Lightning; each public name is
imported from its module when first read, then kept in the package's namespace.

Example:
    >>> namespace: dict = {}
    >>> getter = lazy_names("demo", {"sqrt": "math"}, namespace)
    >>> getter("sqrt")(4.0), "sqrt" in namespace
    (2.0, True)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_names"]


def lazy_names(package: str, modules: Mapping[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``name`` from ``modules[name]``, kept in
    ``namespace`` (the package's ``globals()``) once imported."""

    def __getattr__(name: str) -> Any:
        module = modules.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    return __getattr__

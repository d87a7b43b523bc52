"""Layer-wise conditioning analysis (Huang et al., ECCV 2020) for PyTorch, Lightning and Fabric.

The core (:class:`ConditioningMonitor`, :class:`WeightDominationMonitor`, the maths) imports
neither Lightning nor TensorBoard; every public name is imported on first use.

Example::

    from lightning.pytorch import Trainer
    from lightning_conditioning import ConditioningCallback

    trainer = Trainer(callbacks=[ConditioningCallback(every_n_steps=50)])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_conditioning.__about__ import __version__

if TYPE_CHECKING:
    from lightning_conditioning.accumulate import LayerMoments
    from lightning_conditioning.adapters import LayerAdapter
    from lightning_conditioning.callbacks import ConditioningCallback, WeightDominationCallback
    from lightning_conditioning.collectives import Collectives
    from lightning_conditioning.domination import WeightStatistics, weight_statistics
    from lightning_conditioning.domination_monitor import WeightDominationMonitor
    from lightning_conditioning.integrations.huggingface import (
        ConditioningTrainerCallback,
        WeightDominationTrainerCallback,
    )
    from lightning_conditioning.models import LastBN, add_last_bn
    from lightning_conditioning.monitor import ConditioningMonitor
    from lightning_conditioning.registry import register_adapter
    from lightning_conditioning.results import LayerConditioning, analyse_layer
    from lightning_conditioning.solvers import DenseSolver, SolvedSpectrum, SpectrumSolver
    from lightning_conditioning.spectra import (
        KroneckerSummary,
        SpectrumSummary,
        summarize_kronecker,
        summarize_spectrum,
        symmetric_eigenvalues,
    )

#: every public name is imported on first use, so that ``import lightning_conditioning`` (and
#: ``python -m lightning_conditioning --version``) loads neither torch nor Lightning
_LAZY = {
    "LayerMoments": "lightning_conditioning.accumulate",
    "LayerAdapter": "lightning_conditioning.adapters",
    "register_adapter": "lightning_conditioning.registry",
    "ConditioningCallback": "lightning_conditioning.callbacks",
    "WeightDominationCallback": "lightning_conditioning.callbacks",
    "ConditioningTrainerCallback": "lightning_conditioning.integrations.huggingface",
    "WeightDominationTrainerCallback": "lightning_conditioning.integrations.huggingface",
    "Collectives": "lightning_conditioning.collectives",
    "WeightStatistics": "lightning_conditioning.domination",
    "weight_statistics": "lightning_conditioning.domination",
    "WeightDominationMonitor": "lightning_conditioning.domination_monitor",
    "LastBN": "lightning_conditioning.models",
    "add_last_bn": "lightning_conditioning.models",
    "ConditioningMonitor": "lightning_conditioning.monitor",
    "LayerConditioning": "lightning_conditioning.results",
    "analyse_layer": "lightning_conditioning.results",
    "DenseSolver": "lightning_conditioning.solvers",
    "SolvedSpectrum": "lightning_conditioning.solvers",
    "SpectrumSolver": "lightning_conditioning.solvers",
    "KroneckerSummary": "lightning_conditioning.spectra",
    "SpectrumSummary": "lightning_conditioning.spectra",
    "summarize_kronecker": "lightning_conditioning.spectra",
    "summarize_spectrum": "lightning_conditioning.spectra",
    "symmetric_eigenvalues": "lightning_conditioning.spectra",
}

__all__ = [
    "__version__",
    "Collectives",
    "ConditioningCallback",
    "ConditioningMonitor",
    "DenseSolver",
    "KroneckerSummary",
    "LastBN",
    "LayerAdapter",
    "LayerConditioning",
    "LayerMoments",
    "SolvedSpectrum",
    "SpectrumSolver",
    "SpectrumSummary",
    "WeightDominationCallback",
    "WeightDominationMonitor",
    "WeightStatistics",
    "add_last_bn",
    "analyse_layer",
    "register_adapter",
    "summarize_kronecker",
    "summarize_spectrum",
    "symmetric_eigenvalues",
    "weight_statistics",
    "ConditioningTrainerCallback",
    "WeightDominationTrainerCallback",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_conditioning' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

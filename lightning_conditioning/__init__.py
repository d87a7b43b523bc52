"""Layer-wise conditioning analysis (Huang et al., ECCV 2020) for PyTorch, Lightning and Fabric.

The core (:class:`ConditioningMonitor`, :class:`WeightDominationMonitor`, the maths) imports
neither Lightning nor TensorBoard; every public name is imported on first use.

Example::

    from lightning.pytorch import Trainer
    from lightning_conditioning import ConditioningCallback

    trainer = Trainer(callbacks=[ConditioningCallback(every_n_steps=50)])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_conditioning.__about__ import __version__
from lightning_conditioning.lazy import lazy_names

if TYPE_CHECKING:
    from lightning_conditioning.analysis.results import LayerConditioning, analyse_layer
    from lightning_conditioning.callbacks import ConditioningCallback, WeightDominationCallback
    from lightning_conditioning.capture.adapters import LayerAdapter
    from lightning_conditioning.capture.registry import register_adapter
    from lightning_conditioning.distributed.collectives import Collectives
    from lightning_conditioning.integrations.huggingface import (
        ConditioningTrainerCallback,
        WeightDominationTrainerCallback,
    )
    from lightning_conditioning.maths.domination import WeightStatistics, weight_statistics
    from lightning_conditioning.maths.moments import LayerMoments
    from lightning_conditioning.maths.solvers import DenseSolver, SolvedSpectrum, SpectrumSolver
    from lightning_conditioning.maths.spectra import (
        KroneckerSummary,
        SpectrumSummary,
        summarize_kronecker,
        summarize_spectrum,
        symmetric_eigenvalues,
    )
    from lightning_conditioning.models import LastBN, add_last_bn
    from lightning_conditioning.monitors.conditioning import ConditioningMonitor
    from lightning_conditioning.monitors.domination import WeightDominationMonitor

#: every public name is imported on first use, so that ``import lightning_conditioning`` (and
#: ``python -m lightning_conditioning --version``) loads neither torch nor Lightning
_LAZY = {
    "LayerMoments": "lightning_conditioning.maths.moments",
    "LayerAdapter": "lightning_conditioning.capture.adapters",
    "register_adapter": "lightning_conditioning.capture.registry",
    "ConditioningCallback": "lightning_conditioning.callbacks",
    "WeightDominationCallback": "lightning_conditioning.callbacks",
    "ConditioningTrainerCallback": "lightning_conditioning.integrations.huggingface",
    "WeightDominationTrainerCallback": "lightning_conditioning.integrations.huggingface",
    "Collectives": "lightning_conditioning.distributed.collectives",
    "WeightStatistics": "lightning_conditioning.maths.domination",
    "weight_statistics": "lightning_conditioning.maths.domination",
    "WeightDominationMonitor": "lightning_conditioning.monitors.domination",
    "LastBN": "lightning_conditioning.models",
    "add_last_bn": "lightning_conditioning.models",
    "ConditioningMonitor": "lightning_conditioning.monitors.conditioning",
    "LayerConditioning": "lightning_conditioning.analysis.results",
    "analyse_layer": "lightning_conditioning.analysis.results",
    "DenseSolver": "lightning_conditioning.maths.solvers",
    "SolvedSpectrum": "lightning_conditioning.maths.solvers",
    "SpectrumSolver": "lightning_conditioning.maths.solvers",
    "KroneckerSummary": "lightning_conditioning.maths.spectra",
    "SpectrumSummary": "lightning_conditioning.maths.spectra",
    "summarize_kronecker": "lightning_conditioning.maths.spectra",
    "summarize_spectrum": "lightning_conditioning.maths.spectra",
    "symmetric_eigenvalues": "lightning_conditioning.maths.spectra",
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


__getattr__ = lazy_names(__name__, _LAZY, globals())

"""Layer-wise conditioning analysis (Huang et al., ECCV 2020) for PyTorch Lightning.

Example::

    from lightning.pytorch import Trainer
    from lightning_conditioning import ConditioningCallback

    trainer = Trainer(callbacks=[ConditioningCallback(every_n_steps=50)])
"""

from lightning_conditioning.__about__ import __version__
from lightning_conditioning.accumulate import LayerMoments
from lightning_conditioning.callbacks import ConditioningCallback, WeightDominationCallback
from lightning_conditioning.adapters import LayerAdapter, register_adapter
from lightning_conditioning.domination import WeightStatistics, weight_statistics
from lightning_conditioning.results import LayerConditioning, analyse_layer
from lightning_conditioning.spectra import (
    KroneckerSummary,
    SpectrumSummary,
    summarize_kronecker,
    summarize_spectrum,
    symmetric_eigenvalues,
)

__all__ = [
    "__version__",
    "ConditioningCallback",
    "KroneckerSummary",
    "LayerAdapter",
    "LayerConditioning",
    "LayerMoments",
    "SpectrumSummary",
    "WeightDominationCallback",
    "WeightStatistics",
    "analyse_layer",
    "register_adapter",
    "summarize_kronecker",
    "summarize_spectrum",
    "symmetric_eigenvalues",
    "weight_statistics",
]

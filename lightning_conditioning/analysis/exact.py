"""Exact Fisher spectra of small models: validate the Kronecker approximation on yours.

The callbacks approximate each layer's block of the Fisher information matrix by
``Σx ⊗ Σ∇h``. For a model small enough that per-example Jacobians fit in memory, this module
computes the *exact* spectra, as the paper does in its Figs. 1-2 and Appendix B:

* the full FIM over the weights of all chosen layers, and
* each layer's exact sub-FIM (its diagonal block),

both for the true Fisher ``F = 1/N Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i`` (labels from the
model, for softmax classifiers) and for the empirical one ``M = 1/N Σ_i g_i g_iᵀ`` (``g_i``
the gradient of example i's cross-entropy with its own label). Weights only: ``h = W x`` as in
the paper (biases are left out, like the callbacks' default).

Both matrices are ``HᵀH / N`` for a tall matrix ``H`` of per-example rows (``N·C`` rows for F,
``N`` for M), so their nonzero eigenvalues are those of whichever of ``HᵀH`` and ``HHᵀ`` is
smaller: a 7,700-parameter MLP at 256 examples needs a 2,560² solve, not a 7,700² one.
BatchNorm layers in train mode are handled: the Jacobians include the batch coupling, and the
running statistics are left untouched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_conditioning.capture.selection import select_layers
from lightning_conditioning.maths.solvers import DenseSolver
from lightning_conditioning.maths.spectra import SpectrumSummary, smaller_gram, summarize_spectrum

__all__ = ["ExactFisherSpectra", "exact_fisher_spectra", "fisher_rows"]

#: the smaller Gram of the rows is solved whole (no zero-diagonal shortcut: rows are dense)
_GRAM_SOLVER = DenseSolver(drop_zero_diagonal=False)

FisherKind = Literal["true", "empirical"]


@dataclass(frozen=True)
class ExactFisherSpectra:
    """Exact spectra of a model's FIM and of each layer's block.

    Attributes:
        kind: ``"true"`` (F) or ``"empirical"`` (M).
        full: the FIM over the weights of all chosen layers.
        layers: ``{layer name: its exact sub-FIM}`` in module order.
    """

    kind: FisherKind
    full: SpectrumSummary
    layers: dict[str, SpectrumSummary]


@contextmanager
def _batch_statistics_without_updates(model: nn.Module) -> Iterator[None]:
    """BatchNorm in train mode uses batch statistics but leaves its running ones alone."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.track_running_stats for m in norms]
    try:
        for m in norms:
            if m.training:
                m.track_running_stats = False
        yield
    finally:
        for m, flag in zip(norms, saved):
            m.track_running_stats = flag


def fisher_rows(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None = None,
    *,
    kind: FisherKind = "true",
    layers: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    """Per layer, the float64 rows ``H_k`` with ``FIM block = H_kᵀ H_k / N``.

    ``kind="true"``: ``N·C`` rows ``B_i J_i`` with ``B_i = diag(√p_i)(I − 1 p_iᵀ)``, so that
    ``B_iᵀB_i = diag p_i − p_i p_iᵀ`` (no sampling). ``kind="empirical"``: ``N`` rows, the
    per-example gradients of the cross-entropy against ``targets``. Columns are the layer's
    flattened weight (``out × rest``).

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> rows = fisher_rows(model, torch.randn(5, 3))
        >>> {name: tuple(h.shape) for name, h in rows.items()}
        {'0': (10, 12), '2': (10, 8)}
    """
    chosen = select_layers(model)
    names = list(chosen) if layers is None else list(layers)
    weights: dict[str, Tensor] = {}
    for name in names:
        weight = getattr(chosen[name], "weight")  # noqa: B009
        assert isinstance(weight, Tensor)
        weights[f"{name}.weight"] = weight
    fixed: dict[str, Tensor] = {k: v for k, v in model.named_parameters() if k not in weights}
    fixed.update(dict(model.named_buffers()))

    def logits(params: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(model, {**fixed, **params}, (inputs,))

    params = {k: v.detach() for k, v in weights.items()}
    with _batch_statistics_without_updates(model), torch.no_grad():
        if kind == "true":
            jacobians = torch.func.jacrev(logits)(params)  # (N, C, *weight shape)
            p = torch.softmax(logits(params).double(), dim=1)  # (N, C)
            n, c = p.shape
            # B_i = diag(√p_i)(I − 1 p_iᵀ)
            b = torch.sqrt(p)[:, :, None] * (torch.eye(c, dtype=p.dtype) - p[:, None, :])
            return {
                name: torch.einsum("nab,nbp->nap", b, jacobians[f"{name}.weight"].double().reshape(n, c, -1)).reshape(
                    n * c, -1
                )
                for name in names
            }
        if targets is None:
            raise ValueError("the empirical Fisher needs targets")

        def losses(params: dict[str, Tensor]) -> Tensor:
            return F.cross_entropy(logits(params), targets, reduction="none")

        jacobians = torch.func.jacrev(losses)(params)  # (N, *weight shape)
        n = inputs.shape[0]
        return {name: jacobians[f"{name}.weight"].double().reshape(n, -1) for name in names}


def _gram_eigenvalues(rows: Tensor, count: int) -> Tensor:
    """Descending eigenvalues of ``rowsᵀ rows / count`` via the smaller Gram."""
    eigenvalues = _GRAM_SOLVER(smaller_gram(rows) / count).eigenvalues
    return eigenvalues.clamp_min(0.0)


def exact_fisher_spectra(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor | None = None,
    *,
    kind: FisherKind = "true",
    layers: Sequence[str] | None = None,
    percents: Sequence[float] = (50, 80, 100),
    rank_rtol: float = 1e-10,
) -> ExactFisherSpectra:
    """Exact spectra (λmax, κ_p, rank) of the full FIM and of every layer's sub-FIM.

    Args:
        model: a softmax classifier (outputs are logits); BatchNorm may be in train mode.
        inputs: one batch, ``N`` examples (the expectation is over this batch).
        targets: labels, needed for ``kind="empirical"``.
        kind: ``"true"`` for F, ``"empirical"`` for M.
        layers: qualified names of Linear/Conv layers (default: all of them).
        percents: the ``p`` of ``κ_p``.
        rank_rtol: eigenvalues below ``rank_rtol·λmax`` count as zero (float64 throughout).

    Example:
        >>> torch.manual_seed(0) is not None
        True
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> spectra = exact_fisher_spectra(model, torch.randn(64, 3))
        >>> # 20 weights, less the 4 directions 1 ⊗ h of the last layer that softmax ignores
        >>> spectra.full.rank, spectra.layers["2"].rank
        (16, 4)
    """
    rows = fisher_rows(model, inputs, targets, kind=kind, layers=layers)
    count = inputs.shape[0]

    def summary(h: Tensor) -> SpectrumSummary:
        return summarize_spectrum(_gram_eigenvalues(h, count), percents, rtol=rank_rtol)

    return ExactFisherSpectra(
        kind=kind,
        full=summary(torch.cat(list(rows.values()), dim=1)),
        layers={name: summary(h) for name, h in rows.items()},
    )

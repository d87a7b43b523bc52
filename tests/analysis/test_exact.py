"""Exact FIM spectra against explicit per-example autograd loops (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lightning_conditioning.analysis.exact import exact_fisher_spectra


def _model(batch_norm: bool) -> nn.Sequential:
    torch.manual_seed(0)
    middle = [nn.BatchNorm1d(5)] if batch_norm else []
    return nn.Sequential(nn.Linear(4, 5, bias=False), *middle, nn.Tanh(), nn.Linear(5, 3)).double()


def _explicit(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, kind: str) -> dict[str, np.ndarray]:
    """FIM blocks by explicit loops: one backward per (example[, class])."""
    weights = {"0": model[0].weight, "last": model[-1].weight}
    n = x.shape[0]
    rows: list[np.ndarray] = []
    for i in range(n):
        terms = []
        if kind == "empirical":
            terms.append((1.0, lambda logits, i=i: nn.functional.cross_entropy(logits[i : i + 1], y[i : i + 1])))
        else:
            with torch.no_grad():
                p = torch.softmax(model(x), dim=1)[i]
            for c in range(p.shape[0]):
                terms.append((float(p[c]), lambda logits, c=c, i=i: torch.log_softmax(logits, dim=1)[i, c]))
        for weight, loss in terms:
            grads = torch.autograd.grad(loss(model(x)), list(weights.values()))
            rows.append(np.sqrt(weight) * np.concatenate([g.reshape(-1).numpy() for g in grads]))
    h = np.stack(rows)
    full = h.T @ h / n
    split = weights["0"].numel()
    return {"full": full, "0": full[:split, :split], "last": full[split:, split:]}


@pytest.mark.parametrize("batch_norm", [False, True], ids=["plain", "batchnorm"])
@pytest.mark.parametrize("kind", ["true", "empirical"])
def test_exact_spectra_match_explicit_loops(kind: str, batch_norm: bool) -> None:
    model = _model(batch_norm)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(12, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=generator)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spectra = exact_fisher_spectra(model, x, y, kind=kind, percents=(50, 100))
    # nothing about the model changed (BatchNorm running statistics included)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    expected = _explicit(model, x, y, kind)
    last = str(len(model) - 1)
    for key, summary in (("full", spectra.full), ("0", spectra.layers["0"]), ("last", spectra.layers[last])):
        values = np.sort(np.linalg.eigvalsh(expected[key]))[::-1]
        assert summary.lambda_max == pytest.approx(values[0], rel=1e-9), key
        top = values[: summary.rank]
        np.testing.assert_allclose(summary.nonzero_eigenvalues.numpy(), top, rtol=1e-7, atol=1e-12 * values[0])


def test_empirical_needs_targets() -> None:
    with pytest.raises(ValueError, match="targets"):
        exact_fisher_spectra(_model(False), torch.randn(4, 4, dtype=torch.float64), kind="empirical")

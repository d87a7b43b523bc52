"""The pure maths against numpy/float64 and explicitly formed Kronecker products."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import kappa_reference, kronecker_kappa_reference, paper_kappa_reference

from lightning_conditioning.maths.spectra import (
    kronecker_kth_largest,
    percentile_index,
    summarize_kronecker,
    summarize_spectrum,
    symmetric_eigenvalues,
)


def random_psd(dim: int, rank: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(dim, rank, generator=generator, dtype=torch.float64)
    return factor @ factor.T / rank


def test_percentile_index_is_ceil_of_p_times_count() -> None:
    assert [percentile_index(p, 10) for p in (1, 10, 50, 80, 100)] == [0, 0, 4, 7, 9]
    assert percentile_index(80, 5) == 3  # ⌈4.0⌉ = 4, not 5 from float noise
    assert percentile_index(50, 1) == 0
    with pytest.raises(ValueError):
        percentile_index(50, 0)


def test_eigenvalues_match_numpy_descending() -> None:
    matrix = random_psd(20, 20, 0)
    values = symmetric_eigenvalues(matrix.float())  # float32 input, float64 solve
    assert values.dtype == torch.float64
    expected = np.sort(np.linalg.eigvalsh(matrix.float().double().numpy()))[::-1]
    np.testing.assert_allclose(values.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_zero_diagonal_features_are_exact_zeros() -> None:
    matrix = torch.zeros(5, 5, dtype=torch.float64)
    matrix[:3, :3] = random_psd(3, 3, 1)
    values = symmetric_eigenvalues(matrix)
    assert values[3:].tolist() == [0.0, 0.0]
    assert summarize_spectrum(values).rank == 3


def test_summary_matches_reference_kappa() -> None:
    matrix = random_psd(30, 12, 2)  # rank 12 of 30
    values = symmetric_eigenvalues(matrix)
    rtol = 1e-9
    summary = summarize_spectrum(values, (10, 50, 80, 100), rtol=rtol)
    nonzero = summarize_spectrum(values, (10, 50, 80, 100), rtol=rtol, definition="nonzero")
    assert summary.rank == nonzero.rank == 12
    numpy_values = np.linalg.eigvalsh(matrix.numpy())
    assert summary.lambda_max == pytest.approx(numpy_values.max(), rel=1e-12)
    for p in (10, 50, 80, 100):
        assert nonzero.kappa[p] == pytest.approx(kappa_reference(numpy_values, p), rel=1e-9)
        assert nonzero.kappa_status[p] == "exact"
        value, status = paper_kappa_reference(numpy_values, p, rtol)
        assert summary.kappa_status[p] == status
        assert summary.kappa[p] == pytest.approx(value, rel=1e-9)
    # 12 of 30 nonzero: the paper's λ_50 (15th of 30) and λ_80 are (unresolved) zeros
    assert summary.kappa_status == {10: "exact", 50: "lower_bound", 80: "lower_bound", 100: "exact"}
    assert summary.kappa[50] == pytest.approx(1 / rtol)


def test_rank_bounded_by_rows_and_tolerance() -> None:
    values = torch.tensor([1.0, 1e-3, 1e-9, 0.0], dtype=torch.float64)
    assert summarize_spectrum(values, rtol=1e-7).rank == 2
    assert summarize_spectrum(values, rtol=1e-12).rank == 3
    assert summarize_spectrum(values, rtol=1e-12, max_rank=1).rank == 1
    bounded = summarize_spectrum(values, (50, 75, 100), rtol=1e-7)
    # λ_75 = 1e-9 is under the floor but not provably zero; λ_100 of the paper is the
    # smallest resolved one; the exact 0.0 is a structural zero
    assert bounded.kappa == {50: pytest.approx(1e3), 75: pytest.approx(1e7), 100: pytest.approx(1e3)}
    assert bounded.kappa_status == {50: "exact", 75: "lower_bound", 100: "exact"}
    assert bounded.structural_rank == 3 and bounded.unresolved == 1
    rows_bound = summarize_spectrum(values, (75,), rtol=1e-7, max_rank=2)
    assert rows_bound.kappa_status[75] == "infinite" and math.isinf(rows_bound.kappa[75])
    zero = summarize_spectrum(torch.zeros(3, dtype=torch.float64))
    assert zero.rank == 0 and math.isnan(zero.kappa[100])
    assert zero.kappa_status[100] == "undefined"


@pytest.mark.slow
def test_kth_largest_product_is_exact_including_ties() -> None:
    generator = torch.Generator().manual_seed(3)
    for trial in range(20):  # half with many ties
        m, n = (int(v) for v in torch.randint(1, 25, (2,), generator=generator))
        a = torch.exp(3 * torch.randn(m, generator=generator, dtype=torch.float64))
        b = torch.exp(3 * torch.randn(n, generator=generator, dtype=torch.float64))
        if trial % 2:
            a, b = torch.round(a) + 1, torch.round(b) + 1  # many ties
        products = torch.sort((a[:, None] * b[None, :]).flatten(), descending=True).values.tolist()
        for max_direct in (0, 1 << 16):  # the bisection and the direct path, every k
            found = [kronecker_kth_largest(a, b, k, max_direct=max_direct) for k in range(1, m * n + 1)]
            assert found == pytest.approx(products, rel=1e-12), (trial, max_direct)
    with pytest.raises(ValueError):
        kronecker_kth_largest(a, b, 0)


@pytest.mark.parametrize("ranks", [(8, 5), (6, 3), (1, 4)])
def test_kronecker_summary_equals_explicit_kron(ranks: tuple[int, int]) -> None:
    first_matrix, second_matrix = random_psd(8, ranks[0], 4), random_psd(5, ranks[1], 5)
    percents = (25, 50, 80, 100)
    rtol = 1e-9
    for definition in ("paper", "nonzero"):
        first = summarize_spectrum(symmetric_eigenvalues(first_matrix), percents, rtol=rtol, definition=definition)
        second = summarize_spectrum(symmetric_eigenvalues(second_matrix), percents, rtol=rtol, definition=definition)
        kron = summarize_kronecker(first, second, percents)
        explicit = np.linalg.eigvalsh(np.kron(first_matrix.numpy(), second_matrix.numpy()))
        assert kron.rank == ranks[0] * ranks[1]
        assert kron.lambda_max == pytest.approx(explicit.max(), rel=1e-10)
        for p in percents:
            if definition == "nonzero":
                assert kron.kappa[p] == pytest.approx(kappa_reference(explicit, p), rel=1e-8)
                continue
            value, status = kronecker_kappa_reference(
                np.linalg.eigvalsh(first_matrix.numpy()), rtol, np.linalg.eigvalsh(second_matrix.numpy()), rtol, p
            )
            assert kron.kappa_status[p] == status, (ranks, p)
            assert kron.kappa[p] == pytest.approx(value, rel=1e-8)
    # Proposition 1 of the paper
    assert kron.kappa[100] == pytest.approx(first.kappa[100] * second.kappa[100], rel=1e-10)


def test_kronecker_of_large_spectra_without_forming_it() -> None:
    # 3000 × 4000 = 1.2e7 products: fine to check here, but never formed by the package
    a = torch.linspace(1e-3, 1.0, 3000, dtype=torch.float64)
    b = torch.logspace(-6, 0, 4000, dtype=torch.float64)
    products = torch.sort((a[:, None] * b[None, :]).flatten(), descending=True).values
    for k in (1, 6_000_000, 9_600_000, 12_000_000):
        assert kronecker_kth_largest(a, b, k) == float(products[k - 1])

"""Window sums: the float32 pending buffer and its float64 fold against float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_conditioning.maths.accumulate import PENDING_ADDS, SecondMomentSum

CPU = torch.device("cpu")


def _batches(count: int, rows: int, dim: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # ReLU-like, correlated and of unequal scale: a spread spectrum, as real layer inputs have
    mixing = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    scales = torch.logspace(0, -3, dim, dtype=torch.float64)
    return [
        torch.relu(torch.randn(rows, dim, generator=generator, dtype=torch.float64) @ mixing * scales)
        for _ in range(count)
    ]


def _reference(batches: list[torch.Tensor], weights: list[float]) -> np.ndarray:
    total = sum(w * (b.numpy().T @ b.numpy()) for b, w in zip(batches, weights))
    return total / sum(b.shape[0] for b in batches)


@pytest.mark.parametrize("count", [1, PENDING_ADDS - 1, PENDING_ADDS, 3 * PENDING_ADDS + 5])
def test_float32_window_matches_float64_reference(count: int) -> None:
    batches = _batches(count, rows=64, dim=48)
    weights = [float(1 + i % 3) for i in range(count)]
    acc = SecondMomentSum(48, CPU)
    for i, (rows, weight) in enumerate(zip(batches, weights)):
        if i % 2:
            acc.add_rows(rows.float(), weight)
        else:
            acc.add(rows.float().T @ rows.float(), rows.shape[0], weight=weight)
    mean = acc.mean().numpy()
    expected = _reference(batches, weights)
    assert acc.rows == sum(b.shape[0] for b in batches)
    # the float32 GEMM's own rounding: a few ulps of the largest entries
    assert np.abs(mean - expected).max() <= 1e-6 * np.abs(expected).max()
    eigen, reference = np.linalg.eigvalsh(mean), np.linalg.eigvalsh(expected)
    assert np.abs(eigen - reference).max() <= 1e-6 * reference.max()
    # the window is read through mean(): nothing may stay pending
    assert acc._pending is None or not acc._pending.any()


def test_pending_sum_folds_every_pending_adds() -> None:
    acc = SecondMomentSum(3, CPU)
    rows = torch.ones(2, 3)
    for _ in range(PENDING_ADDS - 1):
        acc.add_rows(rows)
    assert not acc.sum_outer.any()  # all still pending
    acc.add_rows(rows)
    torch.testing.assert_close(acc.sum_outer, torch.full((3, 3), 2.0 * PENDING_ADDS, dtype=torch.float64))
    assert acc._pending is not None and not acc._pending.any()


def test_buffers_fold_pending_before_a_reduction() -> None:
    acc = SecondMomentSum(2, CPU, track_row_sum=True)
    acc.add_rows(torch.tensor([[1.0, 2.0]]))
    outer, row_sum = acc.buffers()  # what the DDP all-reduce sums
    torch.testing.assert_close(outer, torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.float64))
    torch.testing.assert_close(row_sum, torch.tensor([1.0, 2.0], dtype=torch.float64))


def test_reset_drops_pending_sums() -> None:
    acc = SecondMomentSum(2, CPU)
    acc.add_rows(torch.ones(3, 2))
    acc.reset()
    assert acc._pending is None  # no memory held between windows
    acc.add_rows(torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(acc.mean(), torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64))
    assert acc.rows == 1


def test_float64_rows_skip_the_pending_buffer() -> None:
    acc = SecondMomentSum(2, CPU)
    rows = torch.tensor([[1.0, 1e-9]], dtype=torch.float64)
    acc.add_rows(rows, weight=3.0)
    acc.add(rows.T @ rows, 1)
    assert acc._pending is None
    # 1e-18 survives: float32 would have flushed nothing but rounded the product
    assert acc.mean()[1, 1].item() == pytest.approx(2e-18, rel=1e-12)


def test_homogeneous_mean_from_rows() -> None:
    acc = SecondMomentSum(2, CPU, track_row_sum=True)
    rows = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    acc.add_rows(rows)
    padded = torch.cat([rows, torch.ones(2, 1)], 1).double()
    torch.testing.assert_close(acc.mean(homogeneous=True), padded.T @ padded / 2)


def test_moments_to_cpu_one_copy_keeps_every_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_conditioning.maths.accumulate as accumulate
    import lightning_conditioning.maths.moments as moments

    windows = {}
    for name, (input_dim, grad_dim) in {"a": (3, 2), "b": (4, 1), "silent": (2, 2)}.items():
        window = accumulate.LayerWindow(input_dim, grad_dim, input_dim, CPU, homogeneous=name == "b")
        if name != "silent":
            rows = torch.randn(5, input_dim)
            window.input.add_rows(rows)
            window.grad.add_rows(torch.randn(5, grad_dim), weight=2.0)
            window.add_units(rows.amax(0), rows.amin(0))
        windows[name] = window
    direct = {name: w.moments() for name, w in windows.items()}
    copies: list[torch.Tensor] = []
    real_cat = torch.cat
    # CPU tensors stand in for device tensors: the gather/split path runs for real
    monkeypatch.setattr(moments, "_on_host", lambda tensor: False)
    monkeypatch.setattr(moments.torch, "cat", lambda *a, **k: copies.append(real_cat(*a, **k)) or copies[-1])
    moved = moments.moments_to_cpu(direct)
    assert len(copies) == 1  # one transfer for all layers
    for name, layer in direct.items():
        for field in ("input_second_moment", "grad_second_moment", "unit_max", "unit_min"):
            expected, got = getattr(layer, field), getattr(moved[name], field)
            if expected is None:
                assert got is None
            else:
                assert got.shape == expected.shape
                torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert moved[name].input_rows == layer.input_rows

"""Logged λmax and κ_p equal independent float64 references (torch.func per-example
gradients, explicit im2col loops, explicit Kronecker products) to 1e-4 relative."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import (
    SequentialClassifier,
    assert_close_metrics,
    channel_rows,
    explicit_patch_rows_nd,
    fit,
    grouped_channel_rows,
    layer_reference,
    loader,
    per_example_output_grads,
    rows_second_moment,
    seeded,
)
from torch import nn

from lightning_conditioning import ConditioningCallback
from lightning_conditioning.maths.accumulate import SecondMomentSum

PERCENTS = (50, 80, 100)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5))


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 4),
    )


def _data(shape: tuple[int, ...], classes: int, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(n, *shape, generator=generator), torch.randint(0, classes, (n,), generator=generator)


@pytest.mark.parametrize("statistics_dtype", ["float32", "float64"])
def test_mlp_matches_float64_reference(statistics_dtype: str) -> None:
    x, y = _data((12,), 5)
    net = seeded(mlp)
    initial = copy.deepcopy(net)
    callback = ConditioningCallback(every_n_steps=1, statistics_dtype=statistics_dtype)
    _, logger = fit(SequentialClassifier(net), loader(x, y, 64), [callback])
    logged = logger.history[0]
    for index in (0, 2, 4):
        layer_input, grads = per_example_output_grads(copy.deepcopy(initial), index, x, y)
        expected = layer_reference(layer_input.numpy(), grads.numpy(), PERCENTS, statistics_dtype)
        assert_close_metrics(logged, f"conditioning/net.{index}", expected, rtol=1e-4)
    # the logits' gradient moment is rank-deficient: softmax gradients sum to zero
    logits = callback.results["net.4"]
    assert logits.grad is not None and logits.grad.rank == 4
    assert logits.fim is not None and logits.input is not None
    assert logits.fim.rank == logits.input.rank * 4
    # float64 Grams resolve all 16 input eigenvalues; float32 ones (floor ~5e-4·λmax) may not
    assert logits.input.rank == 16 if statistics_dtype == "float64" else logits.input.rank >= 14


@pytest.mark.parametrize("conv_mode", ["channel", "patch"])
def test_cnn_matches_float64_reference(conv_mode: str) -> None:
    x, y = _data((3, 6, 6), 4)
    net = seeded(cnn)
    initial = copy.deepcopy(net)
    callback = ConditioningCallback(every_n_steps=1, conv_mode=conv_mode)
    _, logger = fit(SequentialClassifier(net), loader(x, y, 64), [callback])
    logged = logger.history[0]
    for index in (0, 2, 5):
        layer_input, grads = per_example_output_grads(copy.deepcopy(initial), index, x, y)
        layer = initial[index]
        if isinstance(layer, nn.Linear):
            input_rows, grad_rows = layer_input.numpy(), grads.numpy()
        elif conv_mode == "channel":
            input_rows, grad_rows = channel_rows(layer_input), channel_rows(grads)
        else:
            input_rows = explicit_patch_rows_nd(layer, layer_input)
            grad_rows = grouped_channel_rows(grads, layer.groups)
        expected = layer_reference(input_rows, grad_rows, PERCENTS)
        assert_close_metrics(logged, f"conditioning/net.{index}", expected, rtol=1e-4)
        result = callback.results[f"net.{index}"]
        assert result.input is not None
        np.testing.assert_allclose(
            result.input.eigenvalues.numpy(),
            np.sort(np.linalg.eigvalsh(rows_second_moment(input_rows)))[::-1],
            rtol=1e-4,
            atol=1e-6,
        )


def test_patch_mode_dimensions() -> None:
    x, y = _data((3, 6, 6), 4, n=8)
    callback = ConditioningCallback(every_n_steps=1, conv_mode="patch")
    fit(SequentialClassifier(seeded(cnn)), loader(x, y, 8), [callback])
    first, grouped = callback.results["net.0"], callback.results["net.2"]
    assert first.input is not None and first.input.dim == 3 * 9
    assert grouped.input is not None and grouped.input.dim == 2 * 9  # C_in / groups · k·k
    assert grouped.grad is not None and grouped.grad.dim == 3  # C_out / groups
    assert grouped.input_units == 4


def test_sum_reduction_scales_gradients_by_batch() -> None:
    x, y = _data((12,), 5)
    mean_cb = ConditioningCallback(every_n_steps=1)
    sum_cb = ConditioningCallback(every_n_steps=1, loss_reduction="sum")
    fit(SequentialClassifier(seeded(mlp)), loader(x, y, 64), [mean_cb])
    fit(SequentialClassifier(seeded(mlp), loss="sum"), loader(x, y, 64), [sum_cb])
    for name in ("net.0", "net.4"):
        a, b = mean_cb.results[name].grad, sum_cb.results[name].grad
        assert a is not None and b is not None
        assert a.lambda_max == pytest.approx(b.lambda_max, rel=1e-5)


def test_gradient_accumulation_equals_one_large_batch() -> None:
    x, y = _data((12,), 5)
    whole = ConditioningCallback(every_n_steps=1, statistics_dtype="float64")
    accumulated = ConditioningCallback(every_n_steps=1, statistics_dtype="float64")
    _, log_whole = fit(SequentialClassifier(seeded(mlp)), loader(x, y, 64), [whole])
    _, log_acc = fit(SequentialClassifier(seeded(mlp)), loader(x, y, 16), [accumulated], accumulate_grad_batches=4)
    assert set(log_acc.history) == {0}
    for key, value in log_whole.history[0].items():
        assert log_acc.history[0][key] == pytest.approx(value, rel=1e-6), key
    assert accumulated.results["net.0"].input_rows == 64


def test_include_bias_adds_homogeneous_coordinate() -> None:
    x, y = _data((12,), 5)
    callback = ConditioningCallback(every_n_steps=1, include_bias=True)
    net = seeded(mlp)
    initial = copy.deepcopy(net)
    fit(SequentialClassifier(net), loader(x, y, 64), [callback])
    result = callback.results["net.0"]
    assert result.input is not None and result.input.dim == 13
    rows = np.concatenate([x.double().numpy(), np.ones((64, 1))], axis=1)
    expected = np.sort(np.linalg.eigvalsh(rows_second_moment(rows)))[::-1]
    np.testing.assert_allclose(result.input.eigenvalues.numpy(), expected, rtol=1e-5)
    del initial


@pytest.mark.parametrize(
    "conv, shape",
    [
        (nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=2), (3, 11)),
        (nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", groups=2), (4, 5, 6)),
        (nn.Conv2d(3, 4, (3, 2), padding="same", padding_mode="circular"), (3, 5, 5)),
        (nn.Conv2d(2, 3, 2, stride=2, padding="valid", padding_mode="replicate"), (2, 6, 5)),
        (nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=1), (2, 4, 5, 3)),
    ],
    ids=["conv1d_dilated", "conv2d_reflect_groups", "conv2d_same_circular", "conv2d_valid", "conv3d"],
)
def test_patch_gram_matches_explicit_loops(conv: nn.modules.conv._ConvNd, shape) -> None:
    from lightning_conditioning.capture.adapters import ConvPatchAdapter

    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    adapter = ConvPatchAdapter()
    into = SecondMomentSum(adapter.dims(conv)[0], torch.device("cpu"), track_row_sum=True)
    adapter.accumulate_input(conv, x, into)
    rows = into.rows
    expected_rows = explicit_patch_rows_nd(conv, x)
    assert rows == expected_rows.shape[0]
    np.testing.assert_allclose((into.mean() * rows).numpy(), expected_rows.T @ expected_rows, rtol=1e-5, atol=1e-4)
    assert into.sum_rows is not None
    np.testing.assert_allclose(into.sum_rows.numpy(), expected_rows.sum(0), rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        out = conv(x)
    # one row per output position and group, as many as the conv computes
    assert rows == out[:, 0].numel() * conv.groups

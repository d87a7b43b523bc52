"""WeightDominationCallback: norms against matrix_norm references, warnings, imbalance."""

from __future__ import annotations

import copy
import math
import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from helpers import Blocked, SequentialClassifier, fit, loader, seeded
from torch import nn

from lightning_conditioning import ConditioningCallback, WeightDominationCallback
from lightning_conditioning.maths.domination import imbalance, spectral_norm, weight_statistics


def _data(n: int = 128, shape: tuple[int, ...] = (20,), classes: int = 4, seed: int = 5):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=generator)
    y = torch.randint(0, classes, (n,), generator=generator)
    return x, y


def bn_mlp(width: int = 32) -> nn.Sequential:
    layers: list[nn.Module] = []
    features = 20
    for _ in range(4):
        layers += [nn.Linear(features, width), nn.BatchNorm1d(width), nn.ReLU()]
        features = width
    layers.append(nn.Linear(features, 4))
    return nn.Sequential(*layers)  # weight layers: net.0, net.3, net.6, net.9, net.12


def test_norms_match_matrix_norm_reference() -> None:
    x, y = _data(shape=(3, 6, 6))
    net = seeded(lambda: nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 4)))
    reference = copy.deepcopy(net)
    callback = WeightDominationCallback(every_n_steps=1)
    _, logger = fit(SequentialClassifier(net), loader(x, y, 128), [callback])
    nn.functional.cross_entropy(reference(x), y).backward()
    logged = logger.history[0]
    for name, layer in (("net.0", reference[0]), ("net.3", reference[3])):
        w = layer.weight.detach().double().reshape(layer.weight.shape[0], -1)
        g = layer.weight.grad.double().reshape(layer.weight.shape[0], -1)
        w2, g2 = torch.linalg.matrix_norm(w, ord=2), torch.linalg.matrix_norm(g, ord=2)
        expected = {
            "weight_spectral_norm": w2,
            "grad_spectral_norm": g2,
            "grad_weight_ratio": g2 / w2,
            "grad_weight_ratio_fro": torch.linalg.norm(g) / torch.linalg.norm(w),
        }
        for key, value in expected.items():
            assert logged[f"weight_domination/{name}/{key}"] == pytest.approx(float(value), rel=1e-4)
    # the update actually applied by plain SGD(momentum) at step 0 is lr · grad
    assert logged["weight_domination/net.3/update_weight_ratio"] == pytest.approx(
        0.05 * logged["weight_domination/net.3/grad_weight_ratio"], rel=1e-4
    )
    assert logged["weight_domination/dominated_layers"] == 0


def test_warning_fires_for_blocked_layer_not_for_healthy_ones() -> None:
    x, y = _data()
    callback = WeightDominationCallback(every_n_steps=2, patience=3)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(Blocked(seeded(bn_mlp), ("net.3",)), loader(x, y, 32), [callback], max_steps=12)
    messages = [str(w.message) for w in record if "weight domination" in str(w.message)]
    assert len(messages) == 1, messages
    assert "'net.3'" in messages[0] and "left out of the optimizer" in messages[0]
    assert callback.dominated == ["net.3"]
    assert callback.results["net.3"].update_weight_ratio == 0.0
    assert all(callback.results[n].update_weight_ratio > 0 for n in ("net.0", "net.6", "net.12"))


def test_final_layer_warning_names_add_last_bn() -> None:
    x, y = _data()
    callback = WeightDominationCallback(every_n_steps=1, patience=2)
    with pytest.warns(UserWarning, match="add_last_bn"):
        fit(Blocked(seeded(bn_mlp), ("net.12",)), loader(x, y, 32), [callback], max_steps=3)


class GrowAt(SequentialClassifier):
    """Multiplies ``net[layer].weight`` by ``factor`` before optimizer step ``at``."""

    def __init__(self, net: nn.Module, layer: int, at: int, factor: float = 1e3) -> None:
        super().__init__(net)
        self.layer, self.at, self.factor = layer, at, factor

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self.trainer.global_step == self.at:
            with torch.no_grad():
                self.net[self.layer].weight.mul_(self.factor)


def test_weight_grown_during_training_before_batchnorm_is_dominated_by_gradient_ratio() -> None:
    # BN makes the layer scale-invariant: ∇W shrinks as W grows, the ratio by scale² (1e6×)
    x, y = _data()
    callback = WeightDominationCallback(every_n_steps=1, patience=2, threshold=1e-4)
    with pytest.warns(UserWarning, match=r"'net.3'.*σmax\(∇W\)/σmax\(W\)"):
        fit(GrowAt(seeded(bn_mlp), layer=3, at=2), loader(x, y, 32), [callback], max_steps=5)
    assert callback.dominated == ["net.3"]
    assert callback.reasons["net.3"] == ("fallen", "below_threshold")
    assert callback.history["net.3"].peak_step < 2


def test_weight_large_from_the_first_check_is_not_domination() -> None:
    # the same layer grown before the first check: feeble from the start, not fallen into
    # domination (as the Linear before a LayerScale at 1e-6); the absolute threshold alone
    # would have flagged it
    x, y = _data()
    net = seeded(bn_mlp)
    with torch.no_grad():
        net[3].weight.mul_(1e3)
    callback = WeightDominationCallback(every_n_steps=1, patience=1, threshold=1e-4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(SequentialClassifier(net), loader(x, y, 32), [callback], max_steps=3)
    assert not [w for w in record if "weight domination" in str(w.message)]
    assert callback.dominated == [] and callback.is_dominated(callback.results["net.3"])


def test_frozen_layers_are_skipped() -> None:
    x, y = _data()
    net = seeded(bn_mlp)
    net[0].weight.requires_grad_(False)
    callback = WeightDominationCallback(every_n_steps=1)
    _, logger = fit(SequentialClassifier(net), loader(x, y, 32), [callback], max_steps=2)
    assert "net.0" not in callback.results
    assert not any(k.startswith("weight_domination/net.0/grad") for k in logger.history[1])
    assert "weight_domination/net.3/grad_weight_ratio" in logger.history[1]


def _linear_chain() -> nn.Sequential:
    return nn.Sequential(*[nn.Linear(6, 6, bias=False) for _ in range(4)])


class Regression(pl.LightningModule):
    def __init__(self, net: nn.Module, lr: float, weight_decay: float) -> None:
        super().__init__()
        self.net, self.lr, self.weight_decay = net, lr, weight_decay

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_imbalance_conserved_by_small_step_gd_and_decayed_by_weight_decay(weight_decay) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=generator)
    y = x @ torch.randn(6, 6, generator=generator)
    net = seeded(_linear_chain)
    with torch.no_grad():
        net[1].weight.mul_(2.0)  # an imbalanced start
    callback = WeightDominationCallback(every_n_steps=10)
    _, logger = fit(Regression(net, lr=0.01, weight_decay=weight_decay), loader(x, y, 64), [callback], max_steps=101)
    series = [logger.history[s]["weight_domination/net.1/imbalance"] for s in (0, 50, 100)]
    loss_moved = logger.history[100]["weight_domination/net.1/grad_weight_ratio"]
    assert loss_moved > 0
    if weight_decay == 0:
        assert series[-1] == pytest.approx(series[0], rel=2e-2)  # conserved up to O(lr²)
    else:
        # decays like exp(-2·lr·wd·t) = exp(-0.1) over 100 steps
        assert series[2] < series[1] < series[0]
        assert series[2] / series[0] == pytest.approx(math.exp(-2 * 0.01 * 0.05 * 100), rel=2e-2)


def test_training_bit_identical_with_both_callbacks() -> None:
    x, y = _data(shape=(20,))

    def train(callbacks):
        pl.seed_everything(7, verbose=False)
        module = SequentialClassifier(bn_mlp())
        fit(module, loader(x, y, 32), callbacks, max_steps=6)
        return module.state_dict()

    plain = train([])
    watched = train([WeightDominationCallback(every_n_steps=1), ConditioningCallback(every_n_steps=1)])
    for key in plain:
        assert torch.equal(plain[key], watched[key]), key


def test_pure_helpers() -> None:
    assert spectral_norm(torch.zeros(0, 3)) == 0.0
    assert imbalance(0.0, 0.0) == (0.0, 0.0)
    stats = weight_statistics(torch.zeros(2, 2), torch.ones(2, 2))
    assert stats.grad_weight_ratio == math.inf and stats.status == "zero_weight"
    assert weight_statistics(torch.ones(2, 2), torch.zeros(2, 2)).status == "zero_gradient"
    assert weight_statistics(torch.ones(2, 2), torch.full((2, 2), math.nan)).status == "nonfinite"


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(every_n_steps=0),
        dict(threshold=0),
        dict(threshold=float("nan")),
        dict(patience=0),
        dict(update_threshold=-1.0),
        dict(fall_factor=1.0),
        dict(fall_factor=float("inf")),
    ],
)
def test_bad_arguments(kwargs) -> None:
    with pytest.raises(ValueError):
        WeightDominationCallback(**kwargs)


def test_state_dict_roundtrip() -> None:
    state = {
        "below": {"fc": 2},
        "warned": ["fc"],
        "last_checked_step": 40,
        "history": {"fc": {"peak_ratio": 2.5, "peak_step": 3, "peak_loss": 2.3, "checks": 7}},
        "zero_named": ["net.1"],
    }
    callback = WeightDominationCallback()
    callback.load_state_dict(state)
    other = WeightDominationCallback()
    other.load_state_dict(callback.state_dict())
    assert other.state_dict() == state
    # the monitor built at fit start (after configure_model) starts from the restored state
    strategy = SimpleNamespace(
        reduce=lambda t, reduce_op: t, world_size=1, global_rank=0, root_device=torch.device("cpu")
    )
    other.setup(None, SequentialClassifier(nn.Sequential(nn.Linear(3, 2))), "fit")  # type: ignore[arg-type]
    other.on_fit_start(
        SimpleNamespace(strategy=strategy, optimizers=[]),  # type: ignore[arg-type]
        SequentialClassifier(nn.Sequential(nn.Linear(3, 2))),
    )
    assert other.warned_layers == ["fc"] and other.state_dict() == state


def test_nonfinite_gradients_do_not_crash_training() -> None:
    class Diverges(SequentialClassifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("inf") if batch_idx == 1 else loss

    x, y = _data()
    callback = WeightDominationCallback(every_n_steps=1, patience=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, logger = fit(Diverges(seeded(bn_mlp)), loader(x, y, 32), [callback], max_steps=3)
    assert math.isnan(callback.results["net.0"].grad_weight_ratio) or 1 not in logger.history
    for metrics in logger.history.values():
        assert all(math.isfinite(v) for v in metrics.values())
    assert "net.0" not in callback.warned_layers


@pytest.mark.parametrize("shape", [(2000, 300), (300, 2000), (64, 16, 3, 3)])
def test_spectral_norms_of_large_matrices_are_within_1e4_of_float64_with_a_bound(shape) -> None:
    """Issue 21: Lanczos in the tensor's own dtype (float32) against a float64 SVD, on a
    Gaussian matrix (flat spectral edge: the hard case) and on a low-rank gradient."""
    from lightning_conditioning.maths.solvers import largest_singular_value

    g = torch.Generator().manual_seed(0)
    gaussian = torch.randn(*shape, generator=g)
    flat = gaussian.reshape(shape[0], -1)
    low_rank = torch.randn(flat.shape[0], 3, generator=g) @ torch.randn(
        3, flat.shape[1], generator=g
    ) + 1e-3 * torch.randn(*flat.shape, generator=g)
    for matrix in (gaussian, low_rank):
        truth = float(torch.linalg.matrix_norm(matrix.reshape(shape[0], -1).double(), ord=2))
        found = largest_singular_value(matrix)
        assert abs(spectral_norm(matrix) - truth) <= 1e-4 * truth
        assert found.lower <= truth * (1 + 1e-9) and truth <= found.upper * (1 + 1e-9)
        assert found.relative_width <= 1e-4
        assert found.method == ("exact" if min(flat.shape) <= 256 else "lanczos")


def test_tied_weights_are_copied_once_and_copies_take_turns_within_the_budget() -> None:
    """ΔW needs a copy of each weight from before the step: a tied weight is copied once (its
    layers share it), and a budget that holds only some copies makes the layers take turns."""
    from lightning_conditioning import WeightDominationMonitor

    torch.manual_seed(0)
    embedding, head = nn.Embedding(50, 16), nn.Linear(16, 50, bias=False)
    head.weight = embedding.weight  # tied, as GPT-2's wte / lm_head
    model = nn.Sequential(embedding, nn.Linear(16, 16), nn.ReLU(), head)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)

    def step(monitor: WeightDominationMonitor, index: int) -> dict[str, float]:
        model(torch.randint(0, 50, (8,))).logsumexp(-1).mean().backward()
        monitor.before_optimizer_step(index)
        held = {name: copy.data_ptr() for name, copy in monitor._snapshot.items()}
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        optimizer.step()
        metrics = monitor.after_optimizer_step()
        optimizer.zero_grad()
        step.held = held  # type: ignore[attr-defined]
        step.before = before  # type: ignore[attr-defined]
        return metrics

    monitor = WeightDominationMonitor(model, every_n_steps=1)
    metrics = step(monitor, 0)
    held = step.held  # type: ignore[attr-defined]
    assert held["0"] == held["3"] and len(set(held.values())) == 2  # the tied weight once
    update = model[0].weight.detach() - step.before["0.weight"]  # type: ignore[attr-defined]
    truth = float(torch.linalg.matrix_norm(update.double(), ord=2))
    assert math.isclose(monitor.results["0"].update_spectral_norm, truth, rel_tol=1e-4)
    assert math.isclose(monitor.results["3"].update_spectral_norm, truth, rel_tol=1e-4)
    assert all(f"weight_domination/{n}/update_weight_ratio" in metrics for n in ("0", "1", "3"))

    # room for one copy: the layers take turns (the tied pair shares its one copy)
    one = 50 * 16 * 4
    monitor = WeightDominationMonitor(model, every_n_steps=1, memory_budget=one)
    measured = []
    for index in range(1, 4):
        step(monitor, index)
        measured.append(sorted(n for n, r in monitor.results.items() if r.update_spectral_norm is not None))
    assert measured == [["0"], ["1"], ["0", "3"]]  # in turn, the tied pair together


def test_a_gapless_spectrum_edge_is_certified_by_lanczos_not_the_exact_solve() -> None:
    """Singular values evenly from 1 down to 0.5 (an edge without a gap, like random weights
    at init: Llama-7B's MLP weights need 66 steps): Lanczos certifies σmax = 1 to 1e-4 in
    more than 64 steps, where the exact float64 solve used to take over (20 s a 4096 × 11008
    weight on one thread)."""
    from lightning_conditioning.maths.solvers import largest_singular_value

    generator = torch.Generator().manual_seed(0)
    n = 600  # with this seed: 68 steps
    values = torch.linspace(1.0, 0.5, n, dtype=torch.float64)
    left, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    matrix = ((left * values) @ right.T).float()
    found = largest_singular_value(matrix)
    assert found.method == "lanczos" and found.steps > 64
    assert found.lower <= 1.0 + 1e-6 and found.upper >= 1.0 - 1e-6 and found.relative_width <= 1e-4

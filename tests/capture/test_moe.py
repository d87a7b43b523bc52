"""Mixture-of-experts models: every expert of a fused expert module, and the router.

The per-expert moments are checked against a hand-written float64 reference built from what the
expert module receives (its hidden states, the router's choices and weights) and the gradient at
its output, with the routing mask applied by hand and each expert's forward written out again
with autograd; under each of the kernels ``transformers`` runs experts with.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from lightning_conditioning import ConditioningMonitor, WeightDominationMonitor
from lightning_conditioning.analysis.results import DEAD_EXPERT_NOTE
from lightning_conditioning.analysis.routing import routing_readings
from lightning_conditioning.capture.conventions import loss_tokens
from lightning_conditioning.capture.expert_adapters import FusedExperts, Router, expert_layout
from lightning_conditioning.capture.hooks import LayerCapture, find_layers

transformers = pytest.importorskip("transformers")

EXPERTS, VOCAB = 4, 64


def mixtral(top_k: int = 2, implementation: str = "eager", dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=EXPERTS,
        num_experts_per_tok=top_k,
        max_position_embeddings=32,
    )
    model = transformers.MixtralForCausalLM(config).to(dtype)
    model.config._experts_implementation = implementation
    return model


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


class ExpertCalls:
    """What each expert module receives and the gradient at its output: the reference's input."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: dict[str, dict[str, torch.Tensor]] = {}
        self.choices: dict[str, list[torch.Tensor]] = {}  # the routing of every call
        self.handles = [
            module.register_forward_hook(self._hook(name))
            for name, module in model.named_modules()
            if expert_layout(module) is not None
        ]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            hidden, index, weights = args
            self.calls[name] = {"hidden": hidden.detach(), "index": index, "weights": weights.detach()}
            self.choices.setdefault(name, []).append(index.reshape(-1))
            output.register_hook(lambda grad: self.calls[name].__setitem__("grad", grad.detach()))

        return hook


def reference(module: nn.Module, call: dict[str, torch.Tensor], scale: float) -> dict[str, tuple[torch.Tensor, ...]]:
    """``{"<projection>.<e>": (Σx, Σ∇h, rows)}`` in float64 from the routing mask, by hand."""
    hidden, index, weights, grad = (
        call[k].double() if call[k].is_floating_point() else call[k] for k in ("hidden", "index", "weights", "grad")
    )
    gate_up, down = module.gate_up_proj.detach().double(), module.down_proj.detach().double()
    out: dict[str, tuple[torch.Tensor, ...]] = {}
    for e in range(EXPERTS):
        mask = index == e  # (tokens, slots): where the router chose e
        tokens, slots = mask.nonzero(as_tuple=True)
        x = hidden[tokens]
        pre = (x @ gate_up[e].T).requires_grad_()
        gate, up = pre.chunk(2, dim=-1)
        inner = torch.nn.functional.silu(gate) * up
        inner.retain_grad()
        contribution = (inner @ down[e].T) * weights[tokens, slots, None]
        (contribution * grad[tokens]).sum().backward()  # ⟨∂L/∂y, y⟩: the true gradients of the pieces
        g_down = grad[tokens] * weights[tokens, slots, None]
        n = len(tokens)
        out[f"gate_up_proj.{e}"] = (x.T @ x / n, scale**2 * pre.grad.T @ pre.grad / n, n)
        out[f"down_proj.{e}"] = (inner.T @ inner / n, scale**2 * g_down.T @ g_down / n, n)
    return out


@pytest.mark.parametrize(
    "implementation,top_k,dtype,tolerance",
    [
        ("eager", 1, torch.float64, 1e-9),
        ("eager", 2, torch.float64, 1e-9),
        ("batched_mm", 2, torch.float64, 1e-9),
        ("grouped_mm", 2, torch.float32, 1e-5),  # (no float64 grouped GEMM on CPU)
    ],
)
def test_per_expert_moments_equal_the_hand_written_reference(
    implementation: str, top_k: int, dtype: torch.dtype, tolerance: float
) -> None:
    model = mixtral(top_k, implementation, dtype)
    data = batch()
    capture = LayerCapture(find_layers(model), model=model, statistics_dtype=torch.float64, loss_reduction="token_mean")
    capture.loss_tokens = loss_tokens(data, model)
    calls = ExpertCalls(model)
    capture.attach()
    capture.active = True
    model(**data).loss.backward()
    moments = capture.moments()
    capture.detach()
    routed = 0
    for name, call in calls.calls.items():
        for part, (input_moment, grad_moment, rows) in reference(
            model.get_submodule(name), call, capture.loss_tokens
        ).items():
            found = moments[f"{name}.{part}"]
            assert found.input_rows == found.grad_rows == rows
            assert found.expert == (name, int(part.rsplit(".", 1)[1]), EXPERTS)
            for got, want in ((found.input_second_moment, input_moment), (found.grad_second_moment, grad_moment)):
                assert (got - want.detach()).abs().max() <= tolerance * want.abs().max(), part
            routed += rows if part.startswith("gate_up") else 0
    assert routed == 2 * 30 * top_k  # every (token, slot) pair of both layers, once


def test_the_router_is_a_linear_layer_over_every_token() -> None:
    model = mixtral()
    data = batch()
    capture = LayerCapture(find_layers(model), model=model, statistics_dtype=torch.float64, loss_reduction="token_mean")
    capture.loss_tokens = loss_tokens(data, model)
    hidden: list[torch.Tensor] = []
    gate = model.model.layers[0].mlp.gate
    gate.register_forward_hook(lambda module, args, output: hidden.append(args[0].detach()))
    capture.attach()
    capture.active = True
    model(**data).loss.backward()
    moments = capture.moments()
    x = hidden[0].reshape(-1, 16)
    found = moments["model.layers.0.mlp.gate"]
    assert isinstance(gate, Router) and found.input_rows == 30
    assert torch.allclose(found.input_second_moment, x.T @ x / 30, rtol=1e-12)
    assert found.grad_second_moment is not None and torch.isfinite(found.grad_second_moment).all()


def never_choose(expert: int) -> Any:
    """A router hook that takes ``expert`` out of the top-k (a planted dead expert)."""

    def hook(module: nn.Module, args: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> Any:
        logits = output[0].clone()
        logits[:, expert] = -math.inf
        top, index = torch.topk(torch.softmax(logits.float(), -1), module.top_k, dim=-1)
        return logits, (top / top.sum(-1, keepdim=True)).to(output[1].dtype), index

    return hook


@pytest.mark.parametrize("max_rows", [2048, 5])  # the default, and sampling every expert's rows
def test_a_dead_expert_is_named_as_such_and_the_load_shares_sum_to_one(max_rows: int) -> None:
    model = mixtral(top_k=2)
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(never_choose(3))
    said: list[str] = []
    warned: list[str] = []
    monitor = ConditioningMonitor(model, every_n_steps=1, info=said.append, warn=warned.append, max_rows=max_rows)
    domination = WeightDominationMonitor(model, every_n_steps=1, info=said.append, warn=warned.append)
    choices = ExpertCalls(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with monitor.track(0):  # two micro-batches: the second past the row budget when sampled
        model(**batch(1)).loss.backward()
        model(**batch(2)).loss.backward()
    domination.before_optimizer_step(0)
    optimizer.step()
    domination.after_optimizer_step()
    results = monitor.results
    dead = [name for name, r in results.items() if name.endswith(".3") and "experts" in name]
    assert len(dead) == 4  # two projections of expert 3 in two layers
    assert all(results[n].status == "no_data" and results[n].note == DEAD_EXPERT_NOTE for n in dead)
    assert any(DEAD_EXPERT_NOTE in m for m in said) and not any("dead expert" in m for m in warned)
    readings = routing_readings(results)
    for name, chosen in choices.choices.items():
        counts = torch.bincount(torch.cat(chosen), minlength=EXPERTS).double()
        shares = [readings[name][f"load_share_e{e}"] for e in range(EXPERTS)]
        assert sum(shares) == pytest.approx(1.0, abs=1e-12)
        assert shares == pytest.approx((counts / counts.sum()).tolist(), abs=1e-12)
        assert readings[name]["dead_experts"] == 1.0 and shares[3] == 0.0
        assert readings[name]["load_imbalance"] == pytest.approx(max(shares) * EXPERTS)
        entropy = -sum(p * math.log(p) for p in shares if p > 0) / math.log(EXPERTS)
        assert readings[name]["load_entropy"] == pytest.approx(entropy, abs=1e-12) and 0 < entropy < 1
    # the dead expert has an exactly zero gradient: named, not flagged as dominated
    zero = domination.zero_layers
    assert {n for n in dead} <= set(zero) and not set(dead) & set(domination.dominated)
    assert all(math.isfinite(v) for r in results.values() for v in r.metrics().values())


def test_routing_metrics_are_published_with_the_layers() -> None:
    from lightning_conditioning.views.publication import Publication

    model = mixtral()
    monitor = ConditioningMonitor(model, every_n_steps=1, info=lambda m: None, warn=lambda m: None)
    with monitor.track(0):
        model(**batch()).loss.backward()
    publication = Publication(monitor.results, 0)
    metrics = publication.metrics
    assert sorted(publication.tagged_figures) == [
        "conditioning/depth_profile",
        "conditioning/model.layers.0.mlp.experts/experts",
        "conditioning/model.layers.1.mlp.experts/experts",
    ]
    for layer in (0, 1):
        module = f"conditioning/model.layers.{layer}.mlp.experts"
        assert sum(metrics[f"{module}/load_share_e{e}"] for e in range(EXPERTS)) == pytest.approx(1.0)
        assert f"{module}.down_proj.2/grad_lambda_max" in metrics
        assert f"{module}/load_imbalance" in metrics


def test_experts_in_a_module_list_are_linear_layers_already() -> None:
    """Older models keep experts as ``nn.ModuleList`` of MLPs: each expert's Linear layers see
    only the tokens routed to it, through their own hooks."""

    class ListExperts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.router = nn.Linear(8, 3, bias=False)
            self.experts = nn.ModuleList(nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 8)) for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            choice = self.router(x).argmax(-1)
            out = torch.zeros_like(x)
            for e, expert in enumerate(self.experts):
                chosen = choice == e
                out[chosen] = expert(x[chosen])
            return out

    model = ListExperts().double()
    x = torch.randn(40, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    monitor = ConditioningMonitor(model, every_n_steps=1, info=lambda m: None, warn=lambda m: None)
    with monitor.track(0):
        model(x).pow(2).sum().backward()
    choice = model.router(x).argmax(-1)
    for e in range(3):
        chosen = x[choice == e]
        found = monitor.results[f"experts.{e}.0"]
        assert found.input_rows == len(chosen)
        assert found.input.lambda_max == pytest.approx(
            float(torch.linalg.eigvalsh(chosen.T @ chosen / len(chosen))[-1]), rel=1e-10
        )


def test_the_structural_kinds_select_experts_and_routers_of_any_family() -> None:
    model = mixtral()
    assert isinstance(model.model.layers[0].mlp.experts, FusedExperts)
    assert not isinstance(model.model.layers[0].mlp.gate, FusedExperts)
    only = find_layers(model, layer_types=[FusedExperts, Router])
    assert len(only) == 2 * (2 * EXPERTS + 1)
    assert not isinstance(nn.Linear(2, 2), (FusedExperts, Router))


def test_a_batch_mean_loss_scales_routed_rows_by_the_examples_not_the_tokens() -> None:
    """With ``loss_reduction="mean"`` the per-example factor is the model's batch (3), though
    experts and routers see the tokens flattened (30 rows)."""
    model = mixtral()
    data = batch()
    seen: dict[str, LayerCapture] = {}
    for reduction in ("mean", "sum"):
        capture = seen[reduction] = LayerCapture(
            find_layers(model), model=model, statistics_dtype=torch.float64, loss_reduction=reduction
        )
        capture.attach()
        capture.active = True
        model.zero_grad()
        model(**data).loss.backward()
        capture.detach()
    mean, total = seen["mean"].moments(), seen["sum"].moments()
    for name in (
        "model.layers.0.mlp.gate",
        "model.layers.0.mlp.experts.down_proj.1",
        "model.layers.0.mlp.experts.gate_up_proj.1",
    ):
        assert torch.allclose(mean[name].grad_second_moment, 9 * total[name].grad_second_moment, rtol=1e-12)

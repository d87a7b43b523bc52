"""Tests for the CIFAR (Pre)ResNets and the ``add_last_bn`` model surgery."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torchvision
from helpers import SequentialClassifier, fit, loader
from torch import nn

from lightning_conditioning import ConditioningCallback, SpectrumSummary
from lightning_conditioning.models import (
    LastBN,
    PreBNPool,
    ShortcutA,
    add_last_bn,
    cifar_preresnet,
    cifar_resnet,
    find_last_linear,
    remap_state_dict_for_last_bn,
)

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
EPS = 1e-5


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _BN_TYPES)]


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 16), nn.ReLU(), nn.Linear(16, 10))


# ----------------------------------------------------------------------------- CIFAR ResNets


@pytest.mark.parametrize(
    ("depth", "exact", "published"),
    [(20, 269_722, 0.27e6), (56, 853_018, 0.85e6), (110, 1_727_962, 1.7e6), (1202, 19_421_274, 19.4e6)],
)
def test_cifar_resnet_parameter_count(depth: int, exact: int, published: float) -> None:
    count = _num_params(cifar_resnet(depth))
    assert count == exact
    assert abs(count - published) / published < 0.02


@pytest.mark.parametrize("depth", [0, 2, 19, 21, 100, -4, 20.0, True])
@pytest.mark.parametrize("factory", [cifar_resnet, cifar_preresnet])
def test_invalid_depth_raises(factory: Callable[[int], nn.Module], depth: int) -> None:
    with pytest.raises(ValueError, match="6n \\+ 2"):
        factory(depth)


@pytest.mark.parametrize("factory", [cifar_resnet, cifar_preresnet])
def test_fb_resnet_initialisation(factory: Callable[[int], nn.Module]) -> None:
    torch.manual_seed(0)
    model = factory(56)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(conv.bias is None for conv in convs)
    big = [c for c in convs if c.weight.numel() >= 64 * 64 * 9]
    assert len(big) >= 10
    for conv in big:
        expected = math.sqrt(2.0 / (9 * conv.out_channels))
        assert conv.weight.std().item() == pytest.approx(expected, rel=0.1)
        assert abs(conv.weight.mean().item()) < 0.1 * expected
    for bn in _batchnorms(model):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight))
        assert torch.equal(bn.bias, torch.zeros_like(bn.bias))
    assert torch.equal(model.fc.bias, torch.zeros_like(model.fc.bias))
    assert model.fc.weight.abs().max() > 0


def test_option_a_shortcut_is_parameter_free() -> None:
    model = cifar_resnet(20)
    kernels = {m.kernel_size for m in model.modules() if isinstance(m, nn.Conv2d)}
    assert kernels == {(3, 3)}  # no 1x1 projection convs
    shortcuts = [m for m in model.modules() if isinstance(m, ShortcutA)]
    assert len(shortcuts) == 2 and all(_num_params(s) == 0 for s in shortcuts)
    # 6n + 1 weight layers with parameters: 19 convs + fc for ResNet-20
    assert sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules()) == 20
    x = torch.randn(2, 16, 8, 8)
    out = ShortcutA(16, 32)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, :16], x[:, :, ::2, ::2])
    assert torch.count_nonzero(out[:, 16:]) == 0


@pytest.mark.parametrize("train", [True, False])
def test_preresnet_final_bn(train: bool) -> None:
    with_bn, without_bn = cifar_preresnet(20, num_classes=7), cifar_preresnet(20, num_classes=7, final_bn=False)
    x = torch.randn(2, 3, 32, 32)
    for model in (with_bn, without_bn):
        assert model.train(train)(x).shape == (2, 7)
    count = lambda m: sum(isinstance(b, nn.BatchNorm2d) for b in m.modules())  # noqa: E731
    assert count(with_bn) == count(without_bn) + 1 == 2 * 9 + 1  # 2 per block, 9 blocks, + bn_final
    assert isinstance(with_bn.bn_final, nn.BatchNorm2d)
    assert _num_params(with_bn) - _num_params(without_bn) == 2 * 64


# ----------------------------------------------------------------------------- add_last_bn

_TV = torchvision.models
MODEL_FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: _TV.resnet18(weights=None, num_classes=10),
    "resnet50": lambda: _TV.resnet50(weights=None, num_classes=10),
    "vgg11_bn": lambda: _TV.vgg11_bn(weights=None, num_classes=10),
    "densenet121": lambda: _TV.densenet121(weights=None, num_classes=10),
    "mobilenet_v3_small": lambda: _TV.mobilenet_v3_small(weights=None, num_classes=10),
    "efficientnet_b0": lambda: _TV.efficientnet_b0(weights=None, num_classes=10),
    "cifar_resnet20": lambda: cifar_resnet(20),
    "cifar_resnet110": lambda: cifar_resnet(110),
    "cifar_preresnet20": lambda: cifar_preresnet(20, final_bn=False),
    "mlp": _mlp,
}


def _input_for(name: str) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32) if name.startswith(("cifar", "mlp")) else torch.randn(2, 3, 64, 64)


@pytest.mark.parametrize("name", list(MODEL_FACTORIES))
def test_add_last_bn_wraps_final_linear(name: str) -> None:
    torch.manual_seed(0)
    model = MODEL_FACTORIES[name]().eval()
    x = _input_for(name)
    linear_name, linear = find_last_linear(model)
    bns_before = {id(m) for m in _batchnorms(model)}
    with torch.no_grad():
        expected = model(x)

    assert add_last_bn(model) is model
    wrapper = model.get_submodule(linear_name)
    assert isinstance(wrapper, LastBN) and wrapper.linear is linear
    assert find_last_linear(model) == (f"{linear_name}.linear", linear)
    new_bns = [m for m in _batchnorms(model) if id(m) not in bns_before]
    assert new_bns == [wrapper.bn] and len(_batchnorms(model)) == len(bns_before) + 1
    assert isinstance(wrapper.bn, nn.BatchNorm1d) and wrapper.bn.num_features == linear.in_features
    assert not wrapper.bn.training  # follows the model's eval mode

    with torch.no_grad():  # a fresh BN in eval mode is x / sqrt(1 + eps): outputs barely move
        out = model(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=10 * EPS, atol=10 * EPS * expected.abs().max().item())
    assert model.train()(x).shape == expected.shape  # batch statistics with N = 2

    modules, keys = list(model.modules()), list(model.state_dict())
    assert add_last_bn(model) is model
    assert list(model.modules()) == modules and list(model.state_dict()) == keys


def test_add_last_bn_keeps_dtype_and_device() -> None:
    model = add_last_bn(cifar_resnet(20).double())
    assert model.fc.bn.weight.dtype == model.fc.bn.running_mean.dtype == torch.float64
    assert model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64
    with torch.device("meta"):
        meta_model = _mlp()
    add_last_bn(meta_model)
    assert {t.device.type for t in meta_model.state_dict().values()} == {"meta"}


def test_add_last_bn_errors() -> None:
    with pytest.raises(ValueError, match="no nn.Linear"):
        add_last_bn(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(ValueError, match="position must be one of"):
        add_last_bn(_mlp(), position="after_linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="is itself an nn.Linear"):
        add_last_bn(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="already has a last BN"):
        add_last_bn(add_last_bn(cifar_resnet(20)), position="before_pool")


def test_last_bn_rejects_non_pooled_input_at_call_time() -> None:
    model = nn.Sequential(nn.Linear(4, 5))
    assert model(torch.randn(2, 7, 4)).shape == (2, 7, 5)  # a plain Linear accepts 3-D input
    add_last_bn(model)
    assert model(torch.randn(2, 4)).shape == (2, 5)
    with pytest.raises(ValueError, match=r"\(N, features\).*before_pool.*sequence model.*pool the tokens"):
        model(torch.randn(2, 7, 4))


@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet18"])
def test_add_last_bn_before_pool(name: str) -> None:
    torch.manual_seed(0)
    model = MODEL_FACTORIES[name]().eval()
    x = _input_for(name)
    pool, n_bns = model.avgpool, len(_batchnorms(model))
    with torch.no_grad():
        expected = model(x)
    assert add_last_bn(model, position="before_pool") is model
    assert isinstance(model.avgpool, PreBNPool) and model.avgpool.pool is pool
    assert isinstance(model.avgpool.bn, nn.BatchNorm2d) and model.avgpool.bn.num_features == model.fc.in_features
    assert isinstance(model.fc, nn.Linear) and len(_batchnorms(model)) == n_bns + 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=10 * EPS, atol=10 * EPS * expected.abs().max().item())
    assert model.train()(x).shape == expected.shape
    keys = list(model.state_dict())
    add_last_bn(model, position="before_pool")
    assert list(model.state_dict()) == keys


def test_add_last_bn_before_pool_rejects_models_without_global_pool() -> None:
    with pytest.raises(ValueError, match="avgpool"):
        add_last_bn(_mlp(), position="before_pool")
    with pytest.raises(ValueError, match="avgpool"):  # avgpool exists but feeds a hidden Linear
        add_last_bn(_TV.mobilenet_v3_small(weights=None, num_classes=10), position="before_pool")


@pytest.mark.parametrize("position", ["before_linear", "before_pool"])
def test_remap_state_dict_loads_original_checkpoint(position: str) -> None:
    torch.manual_seed(0)
    original = cifar_resnet(20)
    nn.init.normal_(original.fc.bias)  # make the bias matter
    with torch.no_grad():  # move running statistics away from their initial values
        original.train()(torch.randn(8, 3, 32, 32))
    checkpoint = {k: v.clone() for k, v in original.state_dict().items()}

    torch.manual_seed(1)
    model = add_last_bn(cifar_resnet(20), position=position)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):
        model.load_state_dict(checkpoint)  # the new BN's keys are missing
    remapped = remap_state_dict_for_last_bn(checkpoint, model)
    assert set(checkpoint) == set(original.state_dict())  # input untouched
    assert remap_state_dict_for_last_bn(remapped, model) == remapped  # idempotent
    model.load_state_dict(remapped, strict=True)
    if position == "before_linear":
        assert torch.equal(model.fc.linear.weight, original.fc.weight)

    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected, out = original.eval()(x), model.eval()(x)
    scale = expected.abs().max().item()
    assert (out - expected).abs().max().item() <= 2 * EPS * scale + 1e-5


# ----------------------------------------------------------------------------- conditioning


def _final_linear_input(model: nn.Module) -> SpectrumSummary:
    """Σx of the final Linear's input, by ConditioningCallback, at initialisation (step 0)
    on a fixed CIFAR-shaped batch in train mode."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    name = "net." + find_last_linear(model)[0]  # SequentialClassifier keeps it as .net
    callback = ConditioningCallback(every_n_steps=1, include=[name])
    fit(SequentialClassifier(model), loader(x, y, 64), [callback])
    summary = callback.results[name].input
    assert summary is not None
    return summary


def test_last_bn_conditions_final_linear_input() -> None:
    plain: dict[int, float] = {}
    with_bn: dict[int, SpectrumSummary] = {}
    for depth in (20, 56, 110):
        torch.manual_seed(depth)
        plain[depth] = _final_linear_input(cifar_resnet(depth)).lambda_max
        torch.manual_seed(depth)
        with_bn[depth] = _final_linear_input(add_last_bn(cifar_resnet(depth)))
    assert plain[20] < plain[56] < plain[110]
    for depth, summary in with_bn.items():
        trace = float(summary.eigenvalues.sum())
        print(
            f"ResNet-{depth}: lambda_max(Σx) plain={plain[depth]:.2f}, "
            f"with LastBN={summary.lambda_max:.2f} (trace={trace:.3f})"
        )
        assert trace / 64 == pytest.approx(1.0, abs=1e-2)  # unit mean square per feature
        assert summary.lambda_max <= trace <= 64.0
        assert summary.lambda_max < plain[110] / 2

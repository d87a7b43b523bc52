"""Kronecker factors per step: BackPACK's KFAC / KFLR beside ours, in one plain torch loop.

A section of ``python benchmarks/perf.py``; alone::

    python benchmarks/peers.py [--rounds 15]

Needs the benchmark extra (``pip install -e ".[bench]"``: ``backpack-for-pytorch``).

Workload: the 784-256-256-256-256-10 ReLU MLP (no BatchNorm), batch 256, random data, SGD
with momentum, no Lightning (framework overhead equal for everybody). Each peer is timed
against its own plain step, step-interleaved (see ``harness.py``):

``plain``             our model, no hooks;
``ours gathered``     ``LayerCapture`` on: Σx and Σ∇h Grams of every layer summed in float64
                      (a non-final step of ``window_steps``);
``ours analysed``     ``ours gathered`` + the package's analysis (float64 eigenvalues, κ_p,
                      Kronecker statistics) of every layer: eigenvalues every step;
``naive``             the obvious implementation: float64 copies of every activation and
                      output gradient, float64 Grams, float64 ``eigvalsh`` every step;
``backpack plain``    the ``extend``-ed model and loss, outside any ``backpack`` context;
``backpack KFAC``     ``with backpack(KFAC()):`` (Monte-Carlo, 1 sample: one extra backward
                      of a sampled loss Hessian square root);
``backpack KFLR``     ``with backpack(KFLR()):`` (exact: backpropagates all 10 columns).

Ours with ``every_n_steps=16, window_steps=16`` (Grams every step, eigenvalues at the
window's end) costs ``(15·gathered + analysed) / (16·plain)`` per step. BackPACK's factors
carry no eigenvalues; ours do.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from harness import Kind, capture_steps, interleave, medians, section_main, sgd, train_step, workload
from torch import Tensor, nn

from lightning_conditioning.capture.hooks import LayerCapture, find_layers

WINDOW = 16


def naive_kind(net: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Kind:
    """A training step that keeps float64 copies of every layer input and output gradient
    and takes float64 Grams and eigenvalues of all of them (the baseline the package beats)."""
    layers = [m for m in net.modules() if isinstance(m, nn.Linear)]
    inputs: dict[nn.Module, Tensor] = {}
    grads: dict[nn.Module, Tensor] = {}

    def forward_hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        inputs[module] = args[0].detach().to(torch.float64)
        output.register_hook(lambda g: grads.__setitem__(module, g.detach().to(torch.float64)))

    def step() -> None:
        handles = [layer.register_forward_hook(forward_hook) for layer in layers]
        train_step(net, optimizer, x, y)
        for handle in handles:
            handle.remove()
        for layer in layers:
            for rows in (inputs[layer], grads[layer] * rows_of(grads[layer])):
                gram = (rows.T @ rows / rows.shape[0]).cpu()
                torch.linalg.eigvalsh(gram)
        inputs.clear()
        grads.clear()

    return step


def rows_of(tensor: Tensor) -> int:
    return int(tensor.shape[0])


def backpack_kinds(net: nn.Module, x: Tensor, y: Tensor) -> dict[str, Kind]:
    """BackPACK's plain / KFAC / KFLR steps on an ``extend``-ed copy of ``net``."""
    from backpack import backpack, extend
    from backpack.extensions import KFAC, KFLR

    model = extend(copy.deepcopy(net))
    loss_fn = extend(nn.CrossEntropyLoss())
    optimizer = sgd(model)

    def step(extension: Any | None) -> Kind:
        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            if extension is None:
                loss.backward()
            else:
                with backpack(extension):
                    loss.backward()
            optimizer.step()

        return run

    return {"backpack plain": step(None), "backpack KFAC": step(KFAC()), "backpack KFLR": step(KFLR())}


def measure(rounds: int, device: torch.device) -> dict[str, Any]:
    """Medians (ms) and per-step ratios of every peer against its own plain step."""
    load = workload("mlp", device)
    net, x, y = load.net, load.x, load.y
    optimizer = sgd(net)
    capture = LayerCapture(find_layers(net))
    steps = capture_steps(capture, net, optimizer, x, y)
    naive_net = copy.deepcopy(net)
    kinds: dict[str, Kind] = {
        "plain": steps["plain"],
        "ours gathered": steps["gathered"],
        "ours analysed": steps["analysed"],
        "naive": naive_kind(naive_net, sgd(naive_net), x, y),
    }
    error = ""
    try:
        kinds.update(backpack_kinds(net, x, y))
    except Exception as exc:  # noqa: BLE001 - report and measure what we can
        error = f"{type(exc).__name__}: {exc}"
    med = medians(interleave(kinds, rounds, device, warmup=2))
    capture.detach()
    plain_s = med["plain"]
    ratios = {
        f"ours, Grams every step, eigenvalues every {WINDOW} (window_steps={WINDOW})": (
            (WINDOW - 1) * med["ours gathered"] + med["ours analysed"]
        )
        / (WINDOW * plain_s),
        "ours, Grams and eigenvalues every step": med["ours analysed"] / plain_s,
        "ours, Grams only (gathered step)": med["ours gathered"] / plain_s,
        "naive float64, eigenvalues every step": med["naive"] / plain_s,
    }
    if "backpack plain" in med:
        ratios["BackPACK KFAC"] = med["backpack KFAC"] / med["backpack plain"]
        ratios["BackPACK KFLR"] = med["backpack KFLR"] / med["backpack plain"]
        ratios["BackPACK plain / our plain"] = med["backpack plain"] / plain_s
    try:
        from importlib.metadata import version

        backpack_version = version("backpack-for-pytorch")
    except Exception:  # noqa: BLE001
        backpack_version = "not installed"
    return {
        "rounds": rounds,
        "backpack": backpack_version,
        "backpack_error": error,
        "median_ms": {k: 1e3 * v for k, v in med.items()},
        "ratios": ratios,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return section_main(__doc__, measure, 15, argv)


if __name__ == "__main__":
    main()

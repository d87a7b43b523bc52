"""Shared test helpers: an in-memory logger, tiny LightningModules and float64 references."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

#: the tests' root folder (support modules, ``scripts/``); the tests sit in folders that mirror the package
TESTS = Path(__file__).resolve().parent
#: scripts the tests run as subprocesses
SCRIPTS = TESTS / "scripts"
#: the repository's root
REPOSITORY = TESTS.parent


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call: ``history[step] = {key: value}``."""

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[int, dict[str, float]] = {}

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.history.setdefault(int(step or 0), {}).update(metrics)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


class SequentialClassifier(pl.LightningModule):
    """A LightningModule around an ``nn.Sequential`` trained with mean cross-entropy + SGD."""

    def __init__(self, net: nn.Module, lr: float = 0.05, loss: str = "ce") -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.loss_kind = loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        if self.loss_kind == "ce":
            return nn.functional.cross_entropy(out, y)
        return nn.functional.cross_entropy(out, y, reduction="sum")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class Blocked(SequentialClassifier):
    """Leaves the weights of ``blocked`` layers out of the optimizer (the paper's Fig. 4)."""

    def __init__(self, net: nn.Module, blocked: tuple[str, ...], lr: float = 0.1) -> None:
        super().__init__(net, lr=lr)
        self.blocked = blocked

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for n, p in self.named_parameters() if not any(n.startswith(f"{b}.") for b in self.blocked)]
        return torch.optim.SGD(params, lr=self.lr, momentum=0.9)


def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def fit(
    module: pl.LightningModule,
    data: DataLoader,
    callbacks: Sequence[pl.Callback] = (),
    max_steps: int = 1,
    **trainer_kwargs: Any,
) -> tuple[pl.Trainer, RecordingLogger]:
    logger = RecordingLogger()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        callbacks=list(callbacks),
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        deterministic=True,
        **trainer_kwargs,
    )
    trainer.fit(module, data)
    return trainer, logger


# ---------------------------------------------------------------- independent references
def kappa_reference(eigenvalues: np.ndarray, percent: float, rtol: float = 1e-7) -> float:
    """κ_p over the nonzero eigenvalues (``kappa_definition="nonzero"``), written independently
    of the package."""
    values = np.sort(np.asarray(eigenvalues, dtype=np.float64))[::-1]
    nonzero = values[values > rtol * values[0]]
    index = int(math.ceil(percent * len(nonzero) / 100.0 - 1e-9)) - 1
    return float(nonzero[0] / nonzero[index])


def documented_floor_rtol(rows: int, dim: int, gram: str = "float64", row_eps: float = 0.0) -> float:
    """The resolution floor of docs/numerics.md, written out again (not imported)."""
    unit = {"float64": 2.0**-53, "float32": 2.0**-24}[gram]
    rtol = 1e3 * (unit * math.sqrt(rows) + 2.0**-53 * dim)
    if row_eps > 2.0**-23:
        rtol = max(rtol, row_eps)
    return min(rtol, 1.0)


def paper_kappa_reference(
    eigenvalues: np.ndarray, percent: float, rtol: float, structural: int | None = None
) -> tuple[float, str]:
    """``(κ_p, status)`` of the paper's definition (footnote 2) with a resolution floor.

    ``λ_p`` is the ``⌈p·d/100⌉``-th largest of all ``d`` eigenvalues; κ_100 uses the smallest
    eigenvalue above the floor. ``structural`` eigenvalues at most can be nonzero (default d).
    """
    values = np.sort(np.asarray(eigenvalues, dtype=np.float64))[::-1]
    d = len(values)
    structural = d if structural is None else structural
    floor = rtol * values[0]
    resolved = int(min((values > floor).sum(), structural))
    if percent == 100:
        return float(values[0] / values[resolved - 1]), "exact"
    position = int(math.ceil(round(percent * d / 100.0, 9)))
    if position <= resolved:
        return float(values[0] / values[position - 1]), "exact"
    if position <= structural:
        return float(values[0] / floor), "lower_bound"
    return math.inf, "infinite"


def kronecker_kappa_reference(
    first: np.ndarray, first_rtol: float, second: np.ndarray, second_rtol: float, percent: float
) -> tuple[float, str]:
    """``(κ_p, status)`` of ``A ⊗ B`` from explicitly formed products of eigenvalue intervals:
    a resolved eigenvalue is itself, an unresolved one lies in ``[0, floor]``."""

    def intervals(values: np.ndarray, rtol: float) -> tuple[np.ndarray, np.ndarray]:
        values = np.sort(values)[::-1]
        floor = rtol * values[0]
        resolved = values > floor
        return np.where(resolved, values, 0.0), np.where(resolved, values, floor)

    (low_a, high_a), (low_b, high_b) = intervals(first, first_rtol), intervals(second, second_rtol)
    low = np.sort(np.outer(low_a, low_b).ravel())[::-1]
    high = np.sort(np.outer(high_a, high_b).ravel())[::-1]
    lambda_max = low[0]
    if percent == 100:
        return float(lambda_max / low[low > 0][-1]), "exact"
    k = int(math.ceil(round(percent * len(low) / 100.0, 9)))
    if low[k - 1] > 0 and math.isclose(low[k - 1], high[k - 1], rel_tol=1e-12):
        return float(lambda_max / low[k - 1]), "exact"
    return float(lambda_max / high[k - 1]), "lower_bound"


def rows_second_moment(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    return rows.T @ rows / rows.shape[0]


def per_example_output_grads(
    net: nn.Sequential, index: int, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer input, per-example ∂ℓ_i/∂h_i) of ``net[index]``, float64, via torch.func.

    ℓ_i is the cross-entropy of example i alone, so no batch-size convention is involved.
    """
    net = net.double()
    x = x.double()
    before, layer, after = net[:index], net[index], net[index + 1 :]
    with torch.no_grad():
        layer_input = before(x)
        layer_output = layer(layer_input)

    def example_loss(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(after(h.unsqueeze(0)), target.unsqueeze(0))

    grads = torch.func.vmap(torch.func.grad(example_loss))(layer_output, y)
    return layer_input.detach(), grads.detach()


def channel_rows(t: torch.Tensor) -> np.ndarray:
    """(N, C, *spatial) -> (N·positions, C) rows."""
    t = t.detach().double()
    return t.movedim(1, -1).reshape(-1, t.shape[1]).numpy()


def grouped_channel_rows(grad: torch.Tensor, groups: int) -> np.ndarray:
    """Output-gradient rows with each group's slice a separate row (patch mode, groups > 1)."""
    n, c = grad.shape[:2]
    per_group = c // groups
    parts = [channel_rows(grad[:, g * per_group : (g + 1) * per_group]) for g in range(groups)]
    # order does not matter for a second moment
    return np.concatenate(parts)


def layer_reference(
    input_rows: np.ndarray, grad_rows: np.ndarray, percents: Sequence[float], gram: str = "float64"
) -> dict[str, float]:
    """Expected logged values of one layer (paper definition, documented floors): spectra
    from numpy's float64 eigvalsh, the sub-FIM's κ_100 and λmax from an explicit np.kron."""
    from lightning_conditioning.schema import kappa_quantity

    out: dict[str, float] = {}
    spectra = {}
    for label, rows in (("input", input_rows), ("grad", grad_rows)):
        matrix = rows_second_moment(rows)
        values = np.linalg.eigvalsh(matrix)
        rtol = documented_floor_rtol(len(rows), matrix.shape[0], gram)
        # dead units (all-zero columns) and missing rows are structural zeros
        structural = min(int((np.abs(rows).sum(0) > 0).sum()), len(rows))
        spectra[label] = (values, rtol)
        out[f"{label}_lambda_max"] = float(values.max())
        for p in percents:
            value, status = paper_kappa_reference(values, p, rtol, structural)
            out[kappa_quantity(label, p, status)] = 1.0 if status == "infinite" else value
    explicit = np.linalg.eigvalsh(np.kron(rows_second_moment(input_rows), rows_second_moment(grad_rows)))
    out["fim_lambda_max"] = float(explicit.max())
    for p in percents:
        value, status = kronecker_kappa_reference(*spectra["input"], *spectra["grad"], p)
        out[kappa_quantity("fim", p, status)] = value
    return out


def assert_close_metrics(logged: dict[str, float], prefix: str, expected: dict[str, float], rtol: float) -> None:
    """Every expected value logged within ``rtol``, and the logged κ keys of the layer (plain
    or marked as lower bound / infinite) exactly the expected ones."""
    for key, value in expected.items():
        got = logged[f"{prefix}/{key}"]
        assert math.isclose(got, value, rel_tol=rtol), (prefix, key, got, value)
    logged_kappas = {k.removeprefix(f"{prefix}/") for k in logged if k.startswith(f"{prefix}/") and "_kappa_" in k}
    assert logged_kappas == {k for k in expected if "_kappa_" in k}, prefix


def seeded(factory: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return factory()


def explicit_patch_rows_nd(conv: nn.modules.conv._ConvNd, x: torch.Tensor) -> np.ndarray:
    """im2col by explicit loops for any N-d conv and padding mode (numpy padding)."""
    import itertools

    x = x.detach().double().numpy()
    spatial = len(conv.kernel_size)
    if isinstance(conv.padding, str):
        pairs = list(zip(conv._reversed_padding_repeated_twice[::2], conv._reversed_padding_repeated_twice[1::2]))[::-1]
        pads = [(left, right) for left, right in pairs]
    else:
        pads = [(p, p) for p in conv.padding]
    mode = {"zeros": "constant", "reflect": "reflect", "circular": "wrap", "replicate": "edge"}[conv.padding_mode]
    padded = np.pad(x, [(0, 0), (0, 0), *pads], mode=mode)
    kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
    out = [(padded.shape[2 + i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(spatial)]
    per_group = x.shape[1] // conv.groups
    rows = []
    for n in range(x.shape[0]):
        for g in range(conv.groups):
            for position in itertools.product(*(range(o) for o in out)):
                window = tuple(
                    slice(
                        position[i] * stride[i],
                        position[i] * stride[i] + dilation[i] * (kernel[i] - 1) + 1,
                        dilation[i],
                    )
                    for i in range(spatial)
                )
                patch = padded[(n, slice(g * per_group, (g + 1) * per_group), *window)]
                rows.append(patch.reshape(-1))
    return np.stack(rows)

"""Layer adapters: how one layer kind's input and output gradient become Gram matrices.

An adapter is stateless: given a module and a detached tensor it adds the sum of row outer
products to a :class:`~lightning_conditioning.maths.accumulate.SecondMomentSum` and returns per-unit
extremes. :func:`~lightning_conditioning.capture.registry.adapter_for` picks one by ``isinstance``
from a small registry that :func:`~lightning_conditioning.capture.registry.register_adapter` extends. The hooks that
call adapters live in
:mod:`lightning_conditioning.capture.hooks`.
"""

from __future__ import annotations

import itertools
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_conditioning.maths.accumulate import MomentSum, SecondMomentSum

__all__ = ["ConvMode", "LayerAdapter", "LinearAdapter", "ConvChannelAdapter", "ConvPatchAdapter"]

ConvMode = Literal["channel", "patch"]
UnitExtremes = tuple[Tensor, Tensor]
_PATCH_CHUNK_BYTES = 1 << 25  # bound the im2col buffer of one chunk to 32 MiB


class LayerAdapter:
    """Turns one layer kind's tensors into Gram matrices. Subclass to support a new layer.

    An adapter is stateless; the capture calls it with the module, detached tensors and the
    :class:`~lightning_conditioning.maths.accumulate.SecondMomentSum` to add to. Add a ``(n, d)``
    matrix of rows with ``into.add_rows(rows, weight)`` (one fused GEMM, counts and row sums
    included) or a ready Gram with ``into.add(gram, n, row_sum, weight)``.

    Example:
        >>> class BilinearInputAdapter(LinearAdapter):  # treat x1 of nn.Bilinear as the input
        ...     def dims(self, module):
        ...         return module.in1_features, module.out_features, module.in1_features
        >>> from lightning_conditioning.capture.registry import _REGISTRY, adapter_for, register_adapter
        >>> register_adapter(nn.Bilinear, lambda module, mode: BilinearInputAdapter())
        >>> type(adapter_for(nn.Bilinear(3, 4, 2))).__name__
        'BilinearInputAdapter'
        >>> _ = _REGISTRY.pop()  # (undo, for this example only)
    """

    #: whether row sampling (``max_rows``, :mod:`~lightning_conditioning.maths.sampling`) may
    #: thin this layer's passes: rows that scale with the tokens of a step. Conv layers keep
    #: every row (their Grams of ``C`` channels are cheap next to the convolution itself, and
    #: channel-mode Σx arrives as a ready Gram, which cannot be sampled)
    samples_rows: bool = True

    #: whether the input rows are the input tensor's last dimension and nothing else, so that
    #: two such layers reading one tensor have one Σx (:mod:`~lightning_conditioning.capture.shared_inputs`)
    rows_are_last_dimension: bool = False

    def dims(self, module: nn.Module) -> tuple[int, int, int]:
        """``(input_dim, grad_dim, units)``: sizes of Σx, Σ∇h and of the unit counts."""
        raise NotImplementedError

    def accumulate_input(self, module: nn.Module, x: Tensor, into: MomentSum) -> UnitExtremes:
        """Add the rows of one input tensor to ``into``; return ``(unit_max, unit_min)``.

        ``unit_max`` / ``unit_min`` are the per-unit extremes over the rows (dead / full
        units). ``Σ rows`` is needed only when ``into.sum_rows`` is not None (the homogeneous
        coordinate); ``add_rows`` adds it by itself.
        """
        raise NotImplementedError

    def accumulate_grad(self, module: nn.Module, grad: Tensor, into: MomentSum, weight: float) -> None:
        """Add ``weight`` × the outer products of one output-gradient tensor's rows to ``into``."""
        raise NotImplementedError

    def batch_size(self, module: nn.Module, output: Tensor) -> int:
        """Number of examples the output holds (the ``B`` of a batch-mean loss)."""
        return int(output.shape[0]) if output.dim() > 1 else 1

    def token_count(self, module: nn.Module, output: Tensor) -> int:
        """Number of rows (tokens, positions) the output holds: the divisor of a loss that
        averages over every row (``loss_reduction="token_mean"`` without an exact count)."""
        return max(1, output.numel() // max(1, int(output.shape[-1]))) if output.dim() else 1

    #: the layer's Σx is diagonal (one-hot rows): kept as a vector (:class:`SecondMomentSum`)
    diagonal_input: bool = False
    #: rows come from the module's own forward (a forward hook); ``False``: only from
    #: functional calls with its weight (e.g. the projections inside ``nn.MultiheadAttention``)
    module_hook: bool = True

    def has_bias(self, module: nn.Module) -> bool:
        """Whether the layer adds a bias (the homogeneous coordinate of ``include_bias``)."""
        return getattr(module, "bias", None) is not None

    def sketchable(self, module: nn.Module, moment: str) -> bool:
        """Whether ``moment`` (``"input"`` / ``"grad"``) arrives as rows (``add_rows`` only),
        so that a Frequent Directions sketch can keep it (:mod:`lightning_conditioning.capture.plan`)."""
        return False

    def sublayers(self, module: nn.Module) -> dict[str, LayerAdapter] | None:
        """Several analysable layers in one module (``{suffix: adapter}``, named
        ``<module>.<suffix>``), or None when the module is one layer."""
        return None

    def weight_of(self, module: nn.Module) -> tuple[Tensor, slice] | None:
        """The layer's weight as ``(parameter, output rows)``: the rows of the parameter that
        are this layer's (an attention projection owns a third of ``in_proj_weight``), for
        the weight-domination check. None when the layer has no weight parameter."""
        weight = getattr(module, "weight", None)
        return (weight, slice(0, weight.shape[0])) if isinstance(weight, nn.Parameter) else None

    def functional_weight(self, module: nn.Module) -> tuple[Tensor, slice] | None:
        """The parameter whose functional use (``F.linear``/``F.conv*``/``F.embedding`` with it,
        or with a row slice of it) feeds this layer, and the rows (output units) that are this
        layer's; None when the layer is only ever seen through its module."""
        weight = getattr(module, "weight", None)
        return (weight, slice(0, weight.shape[0])) if isinstance(weight, Tensor) else None


class LinearAdapter(LayerAdapter):
    """``nn.Linear`` (and subclasses): every leading index of an N-D input is a row.

    Example:
        >>> into = SecondMomentSum(2, torch.device("cpu"))
        >>> unit_max, _ = LinearAdapter().accumulate_input(
        ...     nn.Linear(2, 1), torch.tensor([[1.0, -1.0], [2.0, 0.0]]), into)
        >>> (into.mean() * into.rows).tolist(), into.rows, unit_max.tolist()
        ([[5.0, -1.0], [-1.0, 1.0]], 2, [2.0, 0.0])
    """

    rows_are_last_dimension = True

    def dims(self, module: nn.Module) -> tuple[int, int, int]:
        assert isinstance(module, nn.Linear)
        return module.in_features, module.out_features, module.in_features

    def sketchable(self, module: nn.Module, moment: str) -> bool:
        return True

    def accumulate_input(self, module: nn.Module, x: Tensor, into: MomentSum) -> UnitExtremes:
        rows = x.reshape(-1, x.shape[-1])
        into.add_rows(rows)
        return rows.amax(0), rows.amin(0)

    def accumulate_grad(self, module: nn.Module, grad: Tensor, into: MomentSum, weight: float) -> None:
        into.add_rows(grad.reshape(-1, grad.shape[-1]), weight)


def _batched(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """Add the batch dimension to an unbatched conv input or output."""
    return x.unsqueeze(0) if x.dim() == len(module.kernel_size) + 1 else x


def _channel_rows(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """A conv input or output as ``(N, C, positions)``."""
    x = _batched(module, x)
    return x.reshape(x.shape[0], x.shape[1], -1)


def _add_positions(flat: Tensor, into: MomentSum, weight: float = 1.0, total: Tensor | None = None) -> None:
    """Add the positions of ``(N, C, L)`` as rows of ``C`` values: one ready Gram for a dense
    sum, the rows themselves (``(N·L, C)``) for a sketch, which cannot take a Gram."""
    if isinstance(into, SecondMomentSum):
        into.add(_channel_gram(flat), flat.shape[0] * flat.shape[2], total, weight=weight)
    else:
        into.add_rows(flat.transpose(1, 2).reshape(-1, flat.shape[1]), weight)


def _channel_gram(x: Tensor) -> Tensor:
    """Gram over channels of ``(N, C, L)``, rows = the N·L positions.

    A batched GEMM and a sum over N: measured fastest on CPU for ResNet shapes (no copy of
    ``x``; ``einsum`` was 5-12× slower, a transpose-copy + one GEMM 10-60% slower).
    """
    return torch.bmm(x, x.transpose(1, 2)).sum(0)


class ConvChannelAdapter(LayerAdapter):
    """ConvNd, the paper's mode: each spatial position is a row; Σx is C_in×C_in.

    Example:
        >>> conv = nn.Conv2d(3, 4, 3)
        >>> ConvChannelAdapter().dims(conv)
        (3, 4, 3)
    """

    samples_rows = False

    def dims(self, module: nn.Module) -> tuple[int, int, int]:
        assert isinstance(module, nn.modules.conv._ConvNd)
        return module.in_channels, module.out_channels, module.in_channels

    def token_count(self, module: nn.Module, output: Tensor) -> int:
        out = _batched(module, output)  # type: ignore[arg-type]
        return max(1, out.numel() // max(1, int(out.shape[1])))

    def sketchable(self, module: nn.Module, moment: str) -> bool:
        return True  # positions become rows for a sketch (dense sums take one Gram)

    def accumulate_input(self, module: nn.Module, x: Tensor, into: MomentSum) -> UnitExtremes:
        assert isinstance(module, nn.modules.conv._ConvNd)
        flat = _channel_rows(module, x)
        total = flat.sum((0, 2)) if into.sum_rows is not None else None
        _add_positions(flat, into, total=total)
        return flat.amax((0, 2)), flat.amin((0, 2))

    def accumulate_grad(self, module: nn.Module, grad: Tensor, into: MomentSum, weight: float) -> None:
        assert isinstance(module, nn.modules.conv._ConvNd)
        _add_positions(_channel_rows(module, grad), into, weight)

    def batch_size(self, module: nn.Module, output: Tensor) -> int:
        assert isinstance(module, nn.modules.conv._ConvNd)
        return int(_batched(module, output).shape[0])


class ConvPatchAdapter(ConvChannelAdapter):
    """ConvNd, K-FAC's mode: rows are im2col patches (C_in/groups·∏k), per output position.

    Stride, padding (including string and non-zero padding modes), dilation and groups are
    honoured. With ``groups > 1`` each group's patch (and each group's slice of the output
    gradient) is one more row: the statistics describe the group-shared block shape
    ``(C_in/groups·∏k) × (C_out/groups)`` of the weight. Dead/full units are counted on the
    raw input channels, as in channel mode. The batch is processed in chunks so that the
    column buffer stays below 32 MiB.

    Example:
        >>> ConvPatchAdapter().dims(nn.Conv2d(3, 4, 3))
        (27, 4, 3)
    """

    def dims(self, module: nn.Module) -> tuple[int, int, int]:
        assert isinstance(module, nn.modules.conv._ConvNd)
        kernel = 1
        for size in module.kernel_size:
            kernel *= size
        groups = module.groups
        return module.in_channels // groups * kernel, module.out_channels // groups, module.in_channels

    @staticmethod
    def columns(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
        """im2col of a batched input as a ``(C_in·∏k, N·L)`` matrix, channel-major like the
        weight (row ``c·∏k + tap``), one column per example and output position.

        Built from ∏k strided slice copies written straight into that layout, so the Gram is
        one plain GEMM: measured 2-30× faster here than ``F.unfold`` followed by a batched
        GEMM, and the same code serves Conv1d, Conv2d and Conv3d.
        """
        padding: Any = module.padding
        if module.padding_mode != "zeros" or isinstance(padding, str):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
        elif any(padding):
            x = F.pad(x, [p for size in reversed(padding) for p in (size, size)])
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
        sizes = x.shape[2:]
        out = [(size - d * (k - 1) - 1) // s + 1 for size, k, s, d in zip(sizes, kernel, stride, dilation)]
        channels, batch = x.shape[1], x.shape[0]
        buffer = x.new_empty(channels, *kernel, batch, *out)
        for taps in itertools.product(*(range(k) for k in kernel)):
            window: tuple[Any, ...] = tuple(
                slice(t * d, t * d + s * (o - 1) + 1, s) for t, d, s, o in zip(taps, dilation, stride, out)
            )
            target: tuple[Any, ...] = (slice(None), *taps)
            buffer[target] = x[(slice(None), slice(None), *window)].transpose(0, 1)
        return buffer.reshape(buffer.shape[: 1 + len(kernel)].numel(), -1)

    def accumulate_input(self, module: nn.Module, x: Tensor, into: MomentSum) -> UnitExtremes:
        assert isinstance(module, nn.modules.conv._ConvNd)
        x = _batched(module, x)
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        dim, groups = self.dims(module)[0], module.groups
        # an example's columns hold about (C_in·∏k)·L values (L = its input positions)
        patch_bytes = dim * groups * flat.shape[2] * x.element_size()
        chunk = max(1, _PATCH_CHUNK_BYTES // max(patch_bytes, 1))
        for part in x.split(chunk):
            cols = self.columns(module, part).view(groups, dim, -1)  # a group's patch: a row
            if groups == 1:
                into.add_rows(cols[0].T)
            else:
                total = cols.sum((0, 2)) if into.sum_rows is not None else None
                _add_positions(cols, into, total=total)
        return flat.amax((0, 2)), flat.amin((0, 2))

    def accumulate_grad(self, module: nn.Module, grad: Tensor, into: MomentSum, weight: float) -> None:
        assert isinstance(module, nn.modules.conv._ConvNd)
        grad = _batched(module, grad)
        dim = self.dims(module)[1]
        flat = grad.reshape(-1, dim, grad[0, 0].numel())  # (N·groups, C_out/groups, L)
        _add_positions(flat, into, weight)

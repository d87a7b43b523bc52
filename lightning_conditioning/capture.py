"""Capture of layer inputs and output gradients: the one place that touches hooks.

A :class:`LayerAdapter` turns one layer kind's input ``x`` and output gradient ``∂L/∂h`` into
Gram matrices (sums of row outer products) and unit activity counts. :class:`LayerCapture`
registers a forward hook per layer that, while capture is active, reduces the input to a
``d × d`` Gram at once (no activation is kept alive) and registers a tensor hook on the layer
output, which receives exactly ``∂L/∂h`` in the backward pass (safe with in-place ReLU, unlike
``register_full_backward_hook``).

Per-example gradient convention: for a batch-mean loss over ``B`` examples autograd hands each
example ``g/B``, so rows of the output gradient are multiplied by ``B`` (``loss_reduction=
"mean"``, ``B`` = the leading dimension of the layer output) times ``grad_multiplier`` (set by
the callback, e.g. the number of accumulated micro-batches). For conv layers every spatial
position is a row, as in the paper; both second moments are means over their rows.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_conditioning.accumulate import LayerMoments, LayerWindow

__all__ = [
    "ConvMode",
    "LayerAdapter",
    "LinearAdapter",
    "ConvChannelAdapter",
    "ConvPatchAdapter",
    "register_adapter",
    "adapter_for",
    "select_layers",
    "find_layers",
    "LayerCapture",
]

ConvMode = Literal["channel", "patch"]
InputStatistics = tuple[Tensor, int, Tensor | None, Tensor, Tensor]
_PATCH_CHUNK_BYTES = 1 << 25  # bound the im2col buffer of one chunk to 32 MiB


class LayerAdapter:
    """Turns one layer kind's tensors into Gram matrices. Subclass to support a new layer.

    An adapter is stateless; the capture calls it with the module and detached tensors.
    """

    def dims(self, module: nn.Module) -> tuple[int, int, int]:
        """``(input_dim, grad_dim, units)``: sizes of Σx, Σ∇h and of the unit counts."""
        raise NotImplementedError

    def input_statistics(self, module: nn.Module, x: Tensor, row_sum: bool) -> InputStatistics:
        """``(gram, rows, row_sum or None, unit_max, unit_min)`` of one input tensor.

        ``unit_max`` / ``unit_min`` are the per-unit extremes over the rows (dead / full
        units); ``row_sum`` (``Σ rows``) is only needed for the homogeneous coordinate.
        """
        raise NotImplementedError

    def grad_statistics(self, module: nn.Module, grad: Tensor) -> tuple[Tensor, int]:
        """``(gram, rows)`` of one output-gradient tensor (not yet rescaled)."""
        raise NotImplementedError

    def batch_size(self, module: nn.Module, output: Tensor) -> int:
        """Number of examples the output holds (the ``B`` of a batch-mean loss)."""
        return int(output.shape[0]) if output.dim() > 1 else 1


def _gram(rows: Tensor) -> Tensor:
    return rows.T @ rows


class LinearAdapter(LayerAdapter):
    """``nn.Linear`` (and subclasses): every leading index of an N-D input is a row.

    Example:
        >>> gram, rows, _, unit_max, _ = LinearAdapter().input_statistics(
        ...     nn.Linear(2, 1), torch.tensor([[1.0, -1.0], [2.0, 0.0]]), row_sum=False)
        >>> gram.tolist(), rows, unit_max.tolist()
        ([[5.0, -1.0], [-1.0, 1.0]], 2, [2.0, 0.0])
    """

    def dims(self, module: nn.Module) -> tuple[int, int, int]:
        assert isinstance(module, nn.Linear)
        return module.in_features, module.out_features, module.in_features

    def input_statistics(self, module: nn.Module, x: Tensor, row_sum: bool) -> InputStatistics:
        rows = x.reshape(-1, x.shape[-1])
        total = rows.sum(0) if row_sum else None
        return _gram(rows), rows.shape[0], total, rows.amax(0), rows.amin(0)

    def grad_statistics(self, module: nn.Module, grad: Tensor) -> tuple[Tensor, int]:
        rows = grad.reshape(-1, grad.shape[-1])
        return _gram(rows), rows.shape[0]


def _batched(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """Add the batch dimension to an unbatched conv input or output."""
    return x.unsqueeze(0) if x.dim() == len(module.kernel_size) + 1 else x


def _channel_rows(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """A conv input or output as ``(N, C, positions)``."""
    x = _batched(module, x)
    return x.reshape(x.shape[0], x.shape[1], -1)


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

    def dims(self, module: nn.Module) -> tuple[int, int, int]:
        assert isinstance(module, nn.modules.conv._ConvNd)
        return module.in_channels, module.out_channels, module.in_channels

    def input_statistics(self, module: nn.Module, x: Tensor, row_sum: bool) -> InputStatistics:
        assert isinstance(module, nn.modules.conv._ConvNd)
        flat = _channel_rows(module, x)
        total = flat.sum((0, 2)) if row_sum else None
        rows = flat.shape[0] * flat.shape[2]
        return _channel_gram(flat), rows, total, flat.amax((0, 2)), flat.amin((0, 2))

    def grad_statistics(self, module: nn.Module, grad: Tensor) -> tuple[Tensor, int]:
        assert isinstance(module, nn.modules.conv._ConvNd)
        flat = _channel_rows(module, grad)
        return _channel_gram(flat), flat.shape[0] * flat.shape[2]

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
    im2col buffer stays below 32 MiB.

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
    def patches(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
        """im2col of a batched input: ``(N, C_in·∏k, L)``, channel-major like the weight."""
        padding: Any = module.padding
        if module.padding_mode != "zeros" or isinstance(padding, str):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
            padding = (0,) * len(module.kernel_size)
        spatial = len(module.kernel_size)
        if spatial == 2:
            return F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
        if spatial == 1:
            return F.unfold(
                x.unsqueeze(-2),
                (1, module.kernel_size[0]),
                (1, module.dilation[0]),
                (0, padding[0]),
                (1, module.stride[0]),
            )
        # any other N-d: im2col as a grouped convolution with one-hot kernels
        channels, kernel = x.shape[1], module.kernel_size
        taps = 1
        for size in kernel:
            taps *= size
        eye = torch.eye(taps, dtype=x.dtype, device=x.device).reshape(taps, 1, *kernel)
        weight = eye.repeat(channels, 1, *([1] * spatial))
        conv = getattr(F, f"conv{spatial}d")
        out = conv(x, weight, None, module.stride, padding, module.dilation, channels)
        return out.reshape(out.shape[0], out.shape[1], -1)

    def input_statistics(self, module: nn.Module, x: Tensor, row_sum: bool) -> InputStatistics:
        assert isinstance(module, nn.modules.conv._ConvNd)
        x = _batched(module, x)
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        dim = self.dims(module)[0]
        gram = x.new_zeros(dim, dim)
        total = x.new_zeros(dim) if row_sum else None
        rows = 0
        # an example's im2col holds about (C_in·∏k)·L values (L = its input positions)
        patch_bytes = dim * module.groups * flat.shape[2] * x.element_size()
        chunk = max(1, _PATCH_CHUNK_BYTES // max(patch_bytes, 1))
        for part in x.split(chunk):
            cols = self.patches(module, part)
            cols = cols.reshape(-1, dim, cols.shape[-1])  # (N·groups, dim, L)
            gram += _channel_gram(cols)
            if total is not None:
                total += cols.sum((0, 2))
            rows += cols.shape[0] * cols.shape[2]
        return gram, rows, total, flat.amax((0, 2)), flat.amin((0, 2))

    def grad_statistics(self, module: nn.Module, grad: Tensor) -> tuple[Tensor, int]:
        assert isinstance(module, nn.modules.conv._ConvNd)
        grad = _batched(module, grad)
        dim = self.dims(module)[1]
        flat = grad.reshape(-1, dim, grad[0, 0].numel())  # (N·groups, C_out/groups, L)
        return _channel_gram(flat), flat.shape[0] * flat.shape[2]


AdapterFactory = Callable[[nn.Module, ConvMode], LayerAdapter]
_REGISTRY: list[tuple[type[nn.Module], AdapterFactory]] = [
    (nn.Linear, lambda module, mode: LinearAdapter()),
    (
        nn.modules.conv._ConvNd,
        lambda module, mode: ConvPatchAdapter() if mode == "patch" else ConvChannelAdapter(),
    ),
]


def register_adapter(module_type: type[nn.Module], factory: AdapterFactory) -> None:
    """Teach the capture a new layer kind; later registrations win over earlier ones.

    Example:
        >>> class MyLinear(nn.Linear): ...
        >>> register_adapter(MyLinear, lambda module, mode: LinearAdapter())
    """
    _REGISTRY.append((module_type, factory))


def adapter_for(module: nn.Module, conv_mode: ConvMode = "channel") -> LayerAdapter | None:
    """The adapter for a module (``isinstance`` match, latest registration first), or None."""
    for module_type, factory in reversed(_REGISTRY):
        if isinstance(module, module_type):
            return factory(module, conv_mode)
    return None


def select_layers(
    model: nn.Module,
    layer_types: Sequence[type[nn.Module]] = (nn.Linear, nn.modules.conv._ConvNd),
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> dict[str, nn.Module]:
    """Submodules that are instances of ``layer_types`` whose qualified name matches one of
    the ``include`` glob patterns (all when None) and none of ``exclude``, in module order.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> list(select_layers(model, exclude=["2"]))
        ['0']
    """
    layers: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name or not isinstance(module, tuple(layer_types)):
            continue
        if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if exclude is not None and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        layers[name] = module
    return layers


def find_layers(
    model: nn.Module,
    layer_types: Sequence[type[nn.Module]] = (nn.Linear, nn.modules.conv._ConvNd),
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    conv_mode: ConvMode = "channel",
) -> dict[str, tuple[nn.Module, LayerAdapter]]:
    """:func:`select_layers` that have an adapter, paired with it.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> list(find_layers(model, include=["2"]))
        ['2']
    """
    layers: dict[str, tuple[nn.Module, LayerAdapter]] = {}
    for name, module in select_layers(model, layer_types, include, exclude).items():
        adapter = adapter_for(module, conv_mode)
        if adapter is not None:
            layers[name] = (module, adapter)
    return layers


def _module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


class LayerCapture:
    """Hooks that fill one :class:`LayerWindow` per layer while ``active`` is True.

    Args:
        layers: ``{name: (module, adapter)}``, e.g. from :func:`find_layers`.
        statistics_dtype: dtype of the Gram GEMMs (float32 default; inputs in lower precision
            are upcast). Sums are always accumulated in float64.
        loss_reduction: ``"mean"`` multiplies output gradients by the batch size, ``"sum"``
            leaves them.
        include_bias: add the homogeneous coordinate (a trailing 1) to the inputs of layers
            that have a bias.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 2))
        >>> capture = LayerCapture(find_layers(model))
        >>> capture.attach()
        >>> capture.active = True
        >>> model(torch.randn(5, 3)).mean().backward()
        >>> capture.windows["0"].input.rows, capture.windows["0"].grad.rows
        (5, 5)
        >>> capture.detach()
    """

    def __init__(
        self,
        layers: dict[str, tuple[nn.Module, LayerAdapter]],
        *,
        statistics_dtype: torch.dtype = torch.float32,
        loss_reduction: Literal["mean", "sum"] = "mean",
        include_bias: bool = False,
    ) -> None:
        self.layers = layers
        self.statistics_dtype = statistics_dtype
        self.loss_reduction = loss_reduction
        self.include_bias = include_bias
        self.active = False
        #: extra factor on every output-gradient row (e.g. accumulation steps / loss scale)
        self.grad_multiplier: float = 1.0
        self.windows: dict[str, LayerWindow] = {}
        self._handles: list[RemovableHandle] = []

    @property
    def attached(self) -> bool:
        """Whether hooks are registered."""
        return bool(self._handles)

    def attach(self) -> None:
        """Allocate the windows on each layer's device and register the forward hooks."""
        if self.attached:
            return
        for name, (module, adapter) in self.layers.items():
            if name not in self.windows:
                input_dim, grad_dim, units = adapter.dims(module)
                homogeneous = self.include_bias and getattr(module, "bias", None) is not None
                self.windows[name] = LayerWindow(
                    input_dim, grad_dim, units, _module_device(module), homogeneous=homogeneous
                )
            hook = torch.compiler.disable(functools.partial(self._forward_hook, name, module))
            self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def detach(self) -> None:
        """Remove every hook (idempotent). The windows are kept."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.active = False

    def reset(self) -> None:
        """Empty every window."""
        for window in self.windows.values():
            window.reset()

    def moments(self) -> dict[str, LayerMoments]:
        """The finished window of every layer (CPU, float64)."""
        return {name: window.moments() for name, window in self.windows.items()}

    def _forward_hook(
        self,
        name: str,
        expected: nn.Module,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Any,
    ) -> None:
        # a deep copy of the model carries this hook too: only our own module counts, and
        # activation checkpointing re-runs forwards inside backward: those are no new rows
        if not self.active or module is not expected:
            return
        if torch._C._current_graph_task_id() != -1:
            return
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, Tensor) or not isinstance(output, Tensor):
            return
        window = self.windows[name]
        adapter = self.layers[name][1]
        with torch.no_grad():
            gram, rows, row_sum, unit_max, unit_min = adapter.input_statistics(
                module, x.detach().to(self.statistics_dtype), window.homogeneous
            )
            window.input.add(gram, rows, row_sum)
            window.add_units(unit_max, unit_min)
        if output.requires_grad:
            scale = adapter.batch_size(module, output) if self.loss_reduction == "mean" else 1
            output.register_hook(functools.partial(self._grad_hook, name, module, scale))

    def _grad_hook(self, name: str, module: nn.Module, scale: int, grad: Tensor) -> None:
        adapter = self.layers[name][1]
        with torch.no_grad():
            gram, rows = adapter.grad_statistics(module, grad.detach().to(self.statistics_dtype))
            factor = scale * self.grad_multiplier
            self.windows[name].grad.add(gram, rows, weight=factor * factor)

    def all_reduce(self, reduce: Callable[[Tensor, str], Tensor]) -> None:
        """Combine every window over processes: two collectives on flat float64 buffers.

        ``reduce(tensor, op)`` takes a 1-D tensor and ``"sum"`` or ``"max"`` (e.g.
        ``strategy.reduce``). Sums and row counts travel together, so uneven per-rank batches
        weigh correctly; per-unit extremes are combined with a maximum (minima negated).
        """
        windows = list(self.windows.values())
        if not windows:
            return
        sums = [buffer for window in windows for buffer in window.sum_buffers()]
        device = sums[0].device
        counts = torch.tensor(
            [count for window in windows for count in window.counts()],
            dtype=torch.float64,
            device=device,
        )
        flat = reduce(torch.cat([b.reshape(-1) for b in sums] + [counts]), "sum")
        offset = _unpack(flat, sums)
        totals = [int(round(v)) for v in flat[offset:].tolist()]
        for index, window in enumerate(windows):
            window.set_counts(totals[2 * index : 2 * index + 2])
        maxima = [window.unit_max for window in windows]
        minima = [window.unit_min for window in windows]
        flat = reduce(torch.cat([*maxima, *[-m for m in minima]]), "max")
        _unpack(flat, maxima)
        _unpack(-flat[sum(m.numel() for m in maxima) :], minima)


def _unpack(flat: Tensor, buffers: list[Tensor]) -> int:
    """Copy consecutive slices of ``flat`` into ``buffers``; returns the offset reached."""
    offset = 0
    for buffer in buffers:
        buffer.copy_(flat[offset : offset + buffer.numel()].view_as(buffer))
        offset += buffer.numel()
    return offset

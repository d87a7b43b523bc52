"""Finished windows: one layer's moments as the analysis takes them, and what they hold.

:class:`LayerMoments` is what :meth:`~lightning_conditioning.maths.accumulate.LayerWindow.moments`
hands over (the sums become the means); :func:`moments_to_cpu` brings a window's to the host in
one copy per device; :func:`held_bytes` counts what a process holds of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from lightning_conditioning.maths.remote import RemoteMoment
from lightning_conditioning.maths.sampling import SampleTally, kept_of
from lightning_conditioning.maths.sketch import SketchedMoment

__all__ = ["LayerMoments", "moments_to_cpu", "held_bytes", "kept_rows"]


@dataclass
class LayerMoments:
    """A finished window of one layer, as plain tensors on the CPU (float64).

    Attributes:
        input_second_moment: ``Σx`` (mean over input rows), or ``None`` without input rows;
            a 1-D tensor stands for a diagonal matrix (an embedding's token frequencies).
        grad_second_moment: ``Σ∇h`` (mean over output-gradient rows), or ``None``.
        input_rows / grad_rows: how many rows each mean was taken over.
        unit_max / unit_min: per input unit (feature, or channel for conv layers), the largest
            and smallest value seen in the window (``-inf`` / ``+inf`` before any row).
        input_resolution / grad_resolution: machine epsilon of the least precise tensor
            captured (e.g. 2⁻⁷ for bfloat16 activations): eigenvalues below it relative to
            λmax are rounding noise.
        input_gram_roundoff / grad_gram_roundoff: unit roundoff of the least precise dtype
            the Gram sums were formed in (2⁻²⁴ float32, 2⁻⁵³ float64; 0 when unknown: taken
            as float64). With the row counts they set the resolution floor
            (:func:`lightning_conditioning.maths.resolution.floor_rtol`).
        shared_lookup: an embedding looked up once for the whole batch (indices of leading
            dimension 1, e.g. GPT-2's ``position_ids``, its output broadcast over the
            examples): the gradient at its output is a sum over the examples, not per-example,
            so its Σ∇h is left out (``grad_second_moment`` None).
        shared_input: the layer whose input tensor this one read, so that its Σx is that
            layer's (the same tensor object: :mod:`~lightning_conditioning.capture.shared_inputs`).
        shared_input_lost: the sharing with ``shared_input`` broke within the window after
            that layer took rows this one never saw: its Σx cannot be told apart, and is None.
        input_homogeneous: Σx carries the homogeneous coordinate (a trailing constant 1 of the
            rows, ``include_bias``) as its last row and column.
        owner: under data parallelism, the process that holds this layer's dense moments and
            solves them (:mod:`~lightning_conditioning.distributed.owners`); elsewhere they are
            :class:`~lightning_conditioning.maths.remote.RemoteMoment`. ``None``: every
            process holds them (one process, or an all-reduce).
        expert: for one expert of a fused expert module, ``(module, expert, experts)``: its
            rows are the tokens routed to it (:mod:`~lightning_conditioning.capture.experts`).
        input_sampling / grad_sampling: what row sampling left out of each moment and the
            relative standard error of its λmax (:mod:`~lightning_conditioning.maths.sampling`);
            ``None`` when every row entered.

    Example:
        >>> moments = LayerMoments(torch.eye(2), None, 4, 0, torch.tensor([1.0, -1.0]),
        ...                        torch.tensor([0.5, -2.0]))
        >>> moments.dead_units, moments.full_units
        (1, 1)
    """

    input_second_moment: Tensor | SketchedMoment | RemoteMoment | None
    grad_second_moment: Tensor | SketchedMoment | RemoteMoment | None
    input_rows: int
    grad_rows: int
    unit_max: Tensor
    unit_min: Tensor
    input_resolution: float = 0.0
    grad_resolution: float = 0.0
    input_gram_roundoff: float = 0.0
    grad_gram_roundoff: float = 0.0
    shared_lookup: bool = False
    shared_input: str | None = None
    shared_input_lost: bool = False
    input_homogeneous: bool = False
    owner: int | None = None
    input_sampling: SampleTally | None = None
    grad_sampling: SampleTally | None = None
    expert: tuple[str, int, int] | None = None

    @property
    def lookup_table(self) -> bool:
        """Whether the layer is a lookup table (an embedding: one-hot input rows, a diagonal
        Σx). Its "units" are the table's rows; one never > 0 was not looked up in the window."""
        return isinstance(self.input_second_moment, Tensor) and self.input_second_moment.dim() == 1

    @property
    def dead_units(self) -> int:
        """Units never > 0 in the window."""
        return int((self.unit_max <= 0).sum())

    @property
    def full_units(self) -> int:
        """Units > 0 on every row of the window."""
        return int((self.unit_min > 0).sum())


def held_bytes(moments: Mapping[str, LayerMoments]) -> int:
    """Bytes of the finished moments this process holds: dense matrices and diagonals whole,
    a sketch's rows, a remote moment's diagonal; a matrix several layers share counted once.

    Example:
        >>> eye = torch.eye(2, dtype=torch.float64)
        >>> held_bytes({"a": LayerMoments(eye, 2 * eye, 1, 1, torch.ones(2), torch.ones(2)),
        ...             "b": LayerMoments(eye, None, 1, 0, torch.ones(2), torch.ones(2))})  # Σx shared
        64
    """
    sizes: dict[int, int] = {}
    for layer in moments.values():
        for moment in (layer.input_second_moment, layer.grad_second_moment):
            if isinstance(moment, Tensor):
                sizes[id(moment)] = moment.numel() * moment.element_size()
            elif isinstance(moment, RemoteMoment):
                sizes[id(moment)] = moment.nbytes
            elif isinstance(moment, SketchedMoment):
                sizes[id(moment)] = moment.sketch.numel() * moment.sketch.element_size()
    return sum(sizes.values())


_TENSOR_FIELDS = ("input_second_moment", "grad_second_moment", "unit_max", "unit_min")


def _on_host(tensor: Tensor) -> bool:
    return tensor.device.type == "cpu"


def moments_to_cpu(moments: dict[str, LayerMoments]) -> dict[str, LayerMoments]:
    """The same moments on the CPU, with one device-to-host copy per device (one sync).

    Moving each layer's tensors separately would wait on the device four times per layer.

    Example:
        >>> from lightning_conditioning.maths.accumulate import LayerWindow
        >>> window = LayerWindow(2, 1, 2, torch.device("cpu"))
        >>> window.input.add_rows(torch.tensor([[1.0, 2.0]]))
        >>> moments_to_cpu({"fc": window.moments()})["fc"].input_second_moment
        tensor([[1., 2.],
                [2., 4.]], dtype=torch.float64)
    """
    by_device: dict[torch.device, list[tuple[str, str, Tensor]]] = {}
    for name, layer in moments.items():
        for field_name in _TENSOR_FIELDS:
            tensor = getattr(layer, field_name)
            if isinstance(tensor, (SketchedMoment, RemoteMoment)):  # small: a copy of its own
                layer = replace(layer, **{field_name: tensor.cpu()})  # type: ignore[arg-type]
                moments = {**moments, name: layer}
                continue
            if tensor is not None and not _on_host(tensor):
                by_device.setdefault(tensor.device, []).append((name, field_name, tensor))
    updates: dict[str, dict[str, Any]] = {name: {} for name in moments}
    for entries in by_device.values():
        flat = torch.cat([tensor.reshape(-1) for _, _, tensor in entries]).cpu()
        for (name, field_name, tensor), part in zip(entries, flat.split([tensor.numel() for _, _, tensor in entries])):
            updates[name][field_name] = part.view(tensor.shape)
    return {name: replace(layer, **updates[name]) for name, layer in moments.items()}


def kept_rows(moments: LayerMoments) -> int:
    """The rows that entered a layer's moments (row sampling leaves some out): the larger
    count of its two moments.

    Example:
        >>> from lightning_conditioning.maths.sampling import SampleTally
        >>> found = LayerMoments(None, None, 8192, 8192, torch.zeros(1), torch.zeros(1),
        ...                      grad_sampling=SampleTally(rows=8192, kept=2048, counted=8192))
        >>> kept_rows(found)
        8192
        >>> kept_rows(replace(found, input_sampling=SampleTally(rows=8192, kept=2048, counted=8192)))
        2048
    """
    return max(kept_of(moments.input_rows, moments.input_sampling), kept_of(moments.grad_rows, moments.grad_sampling))

"""Spread the eigen-analysis of layers over processes, through :class:`Collectives`.

The second moments are summed over ranks first (see
:meth:`~lightning_conditioning.capture.hooks.LayerCapture.all_reduce`): each layer's dense
moments to its owner only where the collectives can (:mod:`~lightning_conditioning.distributed.owners`;
the other ranks hold a :class:`~lightning_conditioning.maths.remote.RemoteMoment`), else to
every rank. Each rank then solves only its share of the layers: those it owns, and a share of
the rest balanced by the O(d³) cost of the two eigen-solves. The eigenvalues travel back in one
flat float64 sum (each rank fills its own slots, zeros elsewhere: ``x + 0 = x`` exactly), and
every rank builds all summaries from them (cheap), so a 4-process job holds and solves about a
quarter of the dense moments per process and every rank ends with all results. One ``reduce``
(and, for owners, one ``reduce_to``) is all it needs: Lightning strategies, Fabric and
``torch.distributed`` plug in alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from lightning_conditioning.analysis.results import (
    LayerConditioning,
    layer_status,
    moment_is_finite,
    solve_layer,
    solver_for,
)
from lightning_conditioning.distributed.collectives import Collectives
from lightning_conditioning.distributed.owners import assign_layers
from lightning_conditioning.maths.moments import LayerMoments
from lightning_conditioning.maths.remote import RemoteMoment
from lightning_conditioning.maths.solvers import SKETCH, SolvedSpectrum, SolverPlan, shareable

__all__ = ["assign_layers", "analyse_layers", "estimated_seconds"]

#: float64 ``eigvalsh`` of a 2304² matrix took ~0.75 s on the 2-core CPU this was developed on
_SECONDS_PER_CUBE = 0.75 / 2304.0**3


def _cost(moments: LayerMoments) -> float:
    total = 0.0
    for matrix in (moments.input_second_moment, moments.grad_second_moment):
        if matrix is moments.input_second_moment and moments.shared_input is not None:
            continue  # another layer's Σx, solved with it
        if isinstance(matrix, RemoteMoment):  # solved by its owner
            total += float(matrix.size) ** 3
        elif isinstance(matrix, Tensor):  # a diagonal moment (1-D) costs a sort; a sketch little
            total += float(matrix.shape[0]) ** (3 if matrix.dim() == 2 else 1)
    return total + 1.0


def estimated_seconds(moments: Mapping[str, LayerMoments], world_size: int = 1) -> float:
    """A rough wall-time estimate of the eigen-analysis per rank (O(d³) per moment).

    Example:
        >>> import torch
        >>> m = LayerMoments(torch.eye(2304), torch.eye(2304), 1, 1, torch.zeros(1), torch.zeros(1))
        >>> round(estimated_seconds({"fc": m}), 2)
        1.5
    """
    return sum(_cost(m) for m in moments.values()) * _SECONDS_PER_CUBE / max(world_size, 1)


def solve_layers(
    moments: Mapping[str, LayerMoments], solver: SolverPlan | None = None, collectives: Collectives | None = None
) -> dict[str, dict[str, SolvedSpectrum]]:
    """:func:`~lightning_conditioning.analysis.results.solve_layer` for every layer, the work shared
    over ``collectives`` (every rank must call it with the same moments).

    Example:
        >>> solve_layers({})
        {}
    """
    collectives = collectives or Collectives.local()
    once: dict[int, SolvedSpectrum] = {}  # a matrix several layers share is solved once
    if not collectives.distributed:
        return {name: solve_layer(name, m, solver, once) for name, m in moments.items()}
    # a layer and those that share its Σx are solved on one rank (the matrix once): the owner
    # of their dense moments (distributed.owners), or a share of the others by cost
    groups: dict[str, list[str]] = {}
    for name, m in moments.items():
        shared = m.shared_input is not None and m.shared_input in moments and m.input_second_moment is not None
        groups.setdefault(m.shared_input if shared and m.shared_input else name, []).append(name)
    unowned = {
        head: sum(_cost(moments[n]) for n in members) for head, members in groups.items() if moments[head].owner is None
    }
    heads = [
        *assign_layers(unowned, collectives.world_size)[collectives.rank],
        *(head for head in groups if moments[head].owner == collectives.rank),
    ]
    mine = {name: solve_layer(name, moments[name], solver, once) for head in heads for name in groups[head]}
    # one slot per exactly solved moment, and per sketch that has an owner: [count, exact,
    # relative_error, zeros, nonfinite, Δ, eigenvalues…], laid out alike on every rank (from
    # shapes only: a remote moment's finiteness is its owner's word); other approximate
    # spectra are solved on every rank instead
    header = 6
    slots: list[tuple[str, str, int]] = []
    local: dict[str, dict[str, SolvedSpectrum]] = {name: {} for name in moments}
    copies: dict[int, tuple[str, str]] = {}  # a shared matrix: its one slot
    repeats: list[tuple[str, str, str, str]] = []
    for name, m in moments.items():
        if m.input_second_moment is None:  # no_data: solved nowhere
            continue
        for label, matrix in (("input", m.input_second_moment), ("grad", m.grad_second_moment)):
            if matrix is None:
                continue
            if id(matrix) in copies:
                repeats.append((name, label, *copies[id(matrix)]))
                continue
            copies[id(matrix)] = (name, label)
            chosen = solver_for(solver, name, matrix)
            if shareable(chosen) or (chosen is SKETCH and m.owner is not None):
                slots.append((name, label, int(matrix.shape[0])))
            elif layer_status(m) != "nonfinite":
                local[name][label] = chosen(matrix)
    flat = torch.zeros(sum(d + header for _, _, d in slots), dtype=torch.float64)
    offset = 0
    for name, label, dim in slots:
        spectrum = mine.get(name, {}).get(label)
        if spectrum is not None:
            count = spectrum.eigenvalues.numel()
            flat[offset : offset + header] = torch.tensor(
                [
                    count,
                    float(spectrum.exact),
                    spectrum.relative_error,
                    spectrum.structural_zeros,
                    0.0,
                    spectrum.tail_upper or 0.0,
                ],
                dtype=torch.float64,
            )
            flat[offset + header : offset + header + count] = spectrum.eigenvalues
        elif name in mine and not moment_is_finite(getattr(moments[name], f"{label}_second_moment")):
            flat[offset + 4] = 1.0  # the owner's word for those that hold no matrix
        offset += dim + header
    flat = collectives.all_reduce(flat, "sum").to("cpu", torch.float64)
    out = local
    offset = 0
    for name, label, dim in slots:
        found, exact, error, zeros, nonfinite, delta = (float(v) for v in flat[offset : offset + header])
        matrix = getattr(moments[name], f"{label}_second_moment")
        if found:  # solved somewhere (no_data / nonfinite windows are solved nowhere)
            values = flat[offset + header : offset + header + int(found)].clone()
            chosen = solver_for(solver, name, matrix)
            out[name][label] = (
                SKETCH.spectrum(values, delta, dim)
                if chosen is SKETCH and delta > 0
                else SolvedSpectrum(values, chosen.name, bool(exact), error, int(zeros))
            )
            if isinstance(matrix, RemoteMoment):
                matrix.nonzero = bool(values.any())
        if isinstance(matrix, RemoteMoment):  # the owner's word on what this rank cannot see
            matrix.finite = not nonfinite
        offset += dim + header
    for name, label, first, first_label in repeats:
        if first_label in out[first]:
            out[name][label] = out[first][first_label]
    return out


def analyse_layers(
    moments: Mapping[str, LayerMoments],
    analyse: Callable[[str, LayerMoments, Mapping[str, SolvedSpectrum]], LayerConditioning],
    *,
    solver: SolverPlan | None = None,
    collectives: Collectives | None = None,
) -> dict[str, LayerConditioning]:
    """``{name: analyse(name, moments, solved)}`` in input order, the eigen-solves shared
    over ``collectives`` (:func:`solve_layers`).

    Example:
        >>> analyse_layers({}, lambda name, m, solved: None)
        {}
    """
    solved = solve_layers(moments, solver, collectives)
    return {name: analyse(name, m, solved[name]) for name, m in moments.items()}

"""Adapters for the layers of sequence models: embeddings, attention, Hugging Face ``Conv1D``.

- :class:`EmbeddingAdapter` (``nn.Embedding``): the input is a one-hot token, so Σx is the
  diagonal of token frequencies, kept as a vector (never ``V × V``); Σ∇h is the Gram of the
  output gradient over every looked-up position.
- :class:`AttentionAdapter` (``nn.MultiheadAttention``): the module is split into its query,
  key and value projections (``<name>.q_proj``, ``.k_proj``, ``.v_proj``) from the packed
  ``in_proj_weight`` or the separate ``q/k/v_proj_weight``; its ``out_proj`` is an ``nn.Linear``
  analysed as one. ``nn.MultiheadAttention`` calls all four functionally, so their rows come
  from the capture's functional path (:mod:`lightning_conditioning.capture.functional`).
- :class:`Conv1DAdapter` (``transformers.pytorch_utils.Conv1D``, GPT-2 and its family): a
  Linear with the weight stored transposed (``nx × nf``); registered by name, so that
  ``transformers`` is never imported by this package.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_conditioning.capture.adapters import LayerAdapter, LinearAdapter, UnitExtremes
from lightning_conditioning.maths.accumulate import MomentSum, SecondMomentSum  # noqa: F401  (the examples)

__all__ = ["EmbeddingAdapter", "Conv1DAdapter", "AttentionAdapter", "ProjectionAdapter"]


class EmbeddingAdapter(LinearAdapter):
    """``nn.Embedding``: Σx = diag(token frequencies), Σ∇h over the looked-up positions.

    A token's input row is one-hot, so ``Σx = diag(f)`` with ``f_v`` the share of positions
    that hold token ``v``: its eigenvalues are the frequencies themselves (exact, no solve),
    λmax is the most frequent token's share, a token never seen is a structural zero (an
    unused table row, ``unused_rows``; never a dead unit), and ``κ_p`` compares frequencies. The sub-FIM
    block of token ``v`` is
    ``f_v · Σ∇h`` restricted to its positions; the Kronecker approximation ``Σx ⊗ Σ∇h`` pairs
    every frequency with the spectrum of the gradient over all positions (docs: README
    "Embeddings").

    Example:
        >>> layer = nn.Embedding(4, 2)
        >>> into = SecondMomentSum(4, torch.device("cpu"), diagonal=True)
        >>> seen, every_row = EmbeddingAdapter().accumulate_input(layer, torch.tensor([[0, 2, 2]]), into)
        >>> into.mean().tolist(), seen.tolist()
        ([0.3333333333333333, 0.0, 0.6666666666666666, 0.0], [1.0, 0.0, 1.0, 0.0])
    """

    diagonal_input = True
    rows_are_last_dimension = False  # one-hot rows of the indices

    def dims(self, module: nn.Module) -> tuple[int, int, int]:
        assert isinstance(module, nn.Embedding)
        return module.num_embeddings, module.embedding_dim, module.num_embeddings

    def has_bias(self, module: nn.Module) -> bool:
        return False

    def accumulate_input(self, module: nn.Module, x: Tensor, into: MomentSum) -> UnitExtremes:
        vocabulary = self.dims(module)[0]
        tokens = x.reshape(-1).long()
        counts = torch.bincount(tokens, minlength=vocabulary).to(torch.float64)
        into.add_diagonal(counts, tokens.numel())
        # per token: its largest / smallest one-hot value over the rows (1 when seen / always)
        return (counts > 0).double(), (counts == tokens.numel()).double()

    def accumulate_grad(self, module: nn.Module, grad: Tensor, into: MomentSum, weight: float) -> None:
        into.add_rows(grad.reshape(-1, grad.shape[-1]), weight)


class Conv1DAdapter(LinearAdapter):
    """Hugging Face ``Conv1D`` (GPT-2, GPT-J's family): ``y = x W + b`` with ``W`` of shape
    ``nx × nf``; rows as for ``nn.Linear``.

    Example:
        >>> class Conv1D(nn.Module):  # the shape of transformers.pytorch_utils.Conv1D
        ...     def __init__(self, nf, nx):
        ...         super().__init__(); self.nf, self.nx = nf, nx
        ...         self.weight = nn.Parameter(torch.zeros(nx, nf)); self.bias = nn.Parameter(torch.zeros(nf))
        >>> Conv1DAdapter().dims(Conv1D(nf=6, nx=4))
        (4, 6, 4)
    """

    def dims(self, module: nn.Module) -> tuple[int, int, int]:
        nx, nf = int(module.nx), int(module.nf)  # type: ignore[arg-type]
        return nx, nf, nx

    def functional_weight(self, module: nn.Module) -> tuple[Tensor, slice] | None:
        return None  # called through torch.addmm with the weight transposed: module hooks only


def _query_dim(module: nn.MultiheadAttention) -> int:
    return int(module.embed_dim)


class ProjectionAdapter(LinearAdapter):
    """One of the query/key/value projections of an ``nn.MultiheadAttention``: output rows
    ``rows`` of ``parameter`` (the packed ``in_proj_weight``, or its own weight).

    Its rows only come from the functional path (``F.linear`` inside the attention's forward).

    Args:
        parameter: the attribute holding the weight (``"in_proj_weight"``, ``"q_proj_weight"``…).
        rows: this projection's output rows in that weight.
    """

    module_hook = False

    def __init__(self, parameter: str, rows: slice) -> None:
        self.parameter, self.rows = parameter, rows

    def weight(self, module: nn.Module) -> Tensor:
        """The projection's weight (a view of the packed weight)."""
        weight = getattr(module, self.parameter)
        assert isinstance(weight, Tensor)
        return weight[self.rows]

    def dims(self, module: nn.Module) -> tuple[int, int, int]:
        out_dim, in_dim = self.weight(module).shape
        return int(in_dim), int(out_dim), int(in_dim)

    def has_bias(self, module: nn.Module) -> bool:
        return getattr(module, "in_proj_bias", None) is not None

    def functional_weight(self, module: nn.Module) -> tuple[Tensor, slice] | None:
        weight = getattr(module, self.parameter)
        assert isinstance(weight, Tensor)
        return weight, self.rows

    def weight_of(self, module: nn.Module) -> tuple[Tensor, slice] | None:
        return self.functional_weight(module)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.parameter!r}, rows={self.rows.start}:{self.rows.stop})"


class AttentionAdapter(LayerAdapter):
    """``nn.MultiheadAttention`` as three analysable projections (``q_proj``, ``k_proj``,
    ``v_proj``), packed or separate weights; its ``out_proj`` (an ``nn.Linear``) is analysed as
    a layer of its own. The attention module itself is no layer.

    Example:
        >>> attention = nn.MultiheadAttention(8, 2)
        >>> {suffix: adapter.dims(attention) for suffix, adapter in AttentionAdapter().sublayers(attention).items()}
        {'q_proj': (8, 8, 8), 'k_proj': (8, 8, 8), 'v_proj': (8, 8, 8)}
        >>> separate = nn.MultiheadAttention(8, 2, kdim=3, vdim=5)
        >>> [adapter.dims(separate)[0] for adapter in AttentionAdapter().sublayers(separate).values()]
        [8, 3, 5]
    """

    module_hook = False

    def sublayers(self, module: nn.Module) -> dict[str, LayerAdapter] | None:
        assert isinstance(module, nn.MultiheadAttention)
        size = _query_dim(module)
        if module.in_proj_weight is not None:
            return {
                f"{letter}_proj": ProjectionAdapter("in_proj_weight", slice(i * size, (i + 1) * size))
                for i, letter in enumerate("qkv")
            }
        return {f"{letter}_proj": ProjectionAdapter(f"{letter}_proj_weight", slice(0, size)) for letter in "qkv"}

    def dims(self, module: nn.Module) -> tuple[int, int, int]:
        raise TypeError("nn.MultiheadAttention is analysed through its projections (sublayers)")

    def functional_weight(self, module: nn.Module) -> tuple[Tensor, slice] | None:
        return None

    def weight_of(self, module: nn.Module) -> tuple[Tensor, slice] | None:
        return None

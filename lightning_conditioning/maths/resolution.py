"""The resolution floor of a computed second moment: below it, an eigenvalue is not a number.

Pure arithmetic, no torch tensors: from how a moment was computed (the dtype of its Gram GEMMs,
the dtype of the captured rows, the number of rows summed and the dimension) it gives the level
``floor = rtol · λmax`` under which computed eigenvalues cannot be told from rounding.
Derivation and measurements: ``docs/numerics.md``.

* **Gram rounding.** ``G = Σ_rows r rᵀ`` summed in a dtype of unit roundoff ``u_g`` carries an
  error of at most ``~u_g·√n·λmax`` in each eigenvalue for ``n`` rows (random-walk rounding,
  ``|r_i|·|r_j| ≤ √(G_ii G_jj) ≤ λmax``). BLAS blocks its sums, so in practice the error is
  smaller (measured: 0.03-0.6 of the bound for float32 Grams).
* **Eigen-solve.** ``eigvalsh`` in float64 is backward stable: ``~u_64·d·λmax``.
* **Accuracy, not just rank.** The floor is :data:`ACCURACY_FACTOR` (1000) times that rounding
  bound, so every eigenvalue above it carries a relative error under ``1e-3`` and every κ_p
  built from such eigenvalues is accurate to ``~1e-3`` (tested against float64 SVD references).
* **Low-precision rows.** bfloat16/float16 activations and gradients are computed by the model
  in that precision: exact-arithmetic zeros of the moment (e.g. the softmax null direction of
  the logits' gradient) come out near ``eps·λmax`` (measured 1e-3·λmax with bfloat16), so such
  moments never resolve below ``eps`` of their dtype (2⁻⁷ bfloat16, 2⁻¹⁰ float16). float32 and
  float64 rows are taken as exact data.

Example:
    >>> f"{floor_rtol(gram_roundoff=unit_roundoff('float32'), rows=512, dim=5):.1e}"
    '1.3e-03'
    >>> f"{floor_rtol(gram_roundoff=unit_roundoff('float64'), rows=512, dim=5):.1e}"
    '3.1e-12'
    >>> floor_rtol(rows=512, dim=5, row_eps=2.0 ** -7)
    0.0078125
"""

from __future__ import annotations

import math

__all__ = ["ACCURACY_FACTOR", "UNIT_ROUNDOFF", "EPSILON", "unit_roundoff", "floor_rtol"]

#: how far above the rounding bound an eigenvalue must sit to be reported (1/accuracy)
ACCURACY_FACTOR = 1e3

#: unit roundoff ``u = eps / 2`` of the floating dtypes, by name
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
#: machine epsilon of the floating dtypes, by name
EPSILON = {name: 2.0 * u for name, u in UNIT_ROUNDOFF.items()}


def unit_roundoff(dtype: object) -> float:
    """Unit roundoff of a dtype given as a name (``"float32"``) or a ``torch.dtype``.

    Example:
        >>> unit_roundoff("float32") == 2.0 ** -24
        True
    """
    name = str(dtype).removeprefix("torch.")
    try:
        return UNIT_ROUNDOFF[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype!r}: expected one of {sorted(UNIT_ROUNDOFF)}") from None


def floor_rtol(
    *, gram_roundoff: float = UNIT_ROUNDOFF["float64"], rows: int = 0, dim: int = 1, row_eps: float = 0.0
) -> float:
    """The resolution floor of a moment, relative to its λmax (a number in ``(0, 1]``).

    Args:
        gram_roundoff: unit roundoff of the dtype the Gram GEMMs were summed in (the least
            precise one of the window; :func:`unit_roundoff`).
        rows: rows summed into the moment (``0`` when unknown, e.g. a matrix given directly).
        dim: size of the moment.
        row_eps: machine epsilon of the least precise captured rows; only half precision
            (``> 2⁻²³``) raises the floor, see the module docstring.

    Example:
        >>> floor_rtol(rows=0, dim=100) == 1e3 * 2.0 ** -53 * 100
        True
    """
    if rows < 0 or dim < 1:
        raise ValueError(f"rows must be >= 0 and dim >= 1, got rows={rows}, dim={dim}")
    rounding = max(gram_roundoff, UNIT_ROUNDOFF["float64"]) * math.sqrt(rows) + UNIT_ROUNDOFF["float64"] * dim
    rtol = ACCURACY_FACTOR * rounding
    if row_eps > EPSILON["float32"]:
        rtol = max(rtol, row_eps)
    return min(rtol, 1.0)

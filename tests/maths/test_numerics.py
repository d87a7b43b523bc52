"""The numerics test matrix (issue #12): the package's real accumulation path against float64
references computed with numpy on the explicit rows.

For each case, rows with a designed spectrum (``√n · U diag(√λ) Vᵀ``: λ geometric from 1 to
1/κ, so the true κ_100 is known) or softmax logit gradients are cast to the input dtype, fed to
:class:`~lightning_conditioning.maths.accumulate.LayerWindow` in mini-batches of 256 rows (upcast to
the Gram dtype the package would use, ``note_precision`` with the input dtype) and analysed by
:func:`~lightning_conditioning.analysis.results.analyse_layer`. The reference takes the very same rows
(upcast to float64): eigenvalues ``σ²/n`` from an SVD (accurate down to ``u·σmax``, unlike a
Gram), the documented resolution floor (``helpers.documented_floor_rtol``, not imported from the
package) and structural zeros (all-zero columns, and ``d − rows`` when ``rows < d``).

Every logged λmax, rank and κ_p of Σx, Σ∇h and the sub-FIM must then agree with the reference:
``exact`` within 1e-3, ``lower_bound`` exactly when the reference's λ_p is under the floor (value
``λmax / floor``), ``infinite`` exactly when it is a structural zero. No reference eigenvalue may
sit within :data:`GAP` of the floor (asserted), where rounding would make the status a coin toss.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from helpers import documented_floor_rtol, paper_kappa_reference

from lightning_conditioning.analysis.results import LayerConditioning, analyse_layer
from lightning_conditioning.maths import resolution
from lightning_conditioning.maths.accumulate import LayerWindow
from lightning_conditioning.maths.precision import gram_dtype_for
from lightning_conditioning.schema import kappa_quantity, parse_quantity

#: the κ_p checked (paper definition): a spread that meets exact, lower-bound and infinite λ_p
PERCENTS = (25, 50, 80, 95, 100)
#: rows per ``add_rows`` call (a mini-batch)
BATCH = 256
#: agreement required of every measured value
RTOL = 1e-3
#: no reference eigenvalue may lie in ``[floor / GAP, GAP · floor]`` (the status would be
#: decided by rounding). 2.5, not 3: with 65536 rows and d = 64, float64 Grams resolve down to
#: 3.55e-11·λmax, and κ = 1e10 sits 2.8× above that.
GAP = 2.5
#: designed eigenvalues (other than λmax and λmin) are moved out of ``[floor/HOLE, HOLE·floor]``
HOLE = 4.0
#: the output gradient arrives scaled by 1/16 (mean reduction) and is weighted back by 16²
GRAD_SCALE, GRAD_WEIGHT = 1.0 / 16.0, 256.0
#: a reference eigenvalue under this times λmax is an exact zero (deficiency, not data)
EXACT_ZERO = 1e-14
#: computed eigenvalues at exact zeros must sit this far under the floor
NOISE_MARGIN = 3.0

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Side:
    """How the rows of one moment are built.

    ``kind``: ``"full"`` (rank d), ``"few_rows"`` (rows < d), ``"dead"`` (d/8 all-zero columns),
    ``"duplicated"`` (d/8 columns copies of others), ``"softmax"`` (``softmax(z) − onehot(y)``
    over ``dim`` classes: rank d − 1). ``kappa``: designed κ_100 (not for softmax).
    """

    kind: str
    dim: int
    kappa: float = 1.0


@dataclass(frozen=True)
class Case:
    name: str
    rows: int
    input: Side
    grad: Side
    dtype: str  # the rows' dtype (what the model computed in)
    statistics: str  # statistics_dtype: the Gram dtype is promote(dtype, statistics)
    seed: int = 0

    @property
    def gram(self) -> torch.dtype:
        return torch.promote_types(DTYPES[self.dtype], DTYPES[self.statistics])

    @property
    def gram_name(self) -> str:
        return str(self.gram).removeprefix("torch.")

    def floor_rtol(self, dim: int) -> float:
        """The documented floor of a moment of this case (helpers' independent formula)."""
        eps = torch.finfo(DTYPES[self.dtype]).eps
        return documented_floor_rtol(self.rows, dim, self.gram_name, eps)

    def __str__(self) -> str:
        return self.name


F, S = Side, functools.partial(Side, "softmax")
CASES = [
    # the issue's example: 5 classes, 512 rows; float32 Grams used to report grad κ_100 = 3.8e6
    Case("issue-softmax5-512-f64gram", 512, F("full", 64, 1e6), S(5), "float32", "float64"),
    Case("issue-softmax5-512-f32gram", 512, F("full", 64, 1e6), S(5), "float32", "float32"),
    # conv positions: many rows
    Case("conv65536-k1e10-f64", 65536, F("full", 64, 1e10), S(10), "float64", "float64"),
    Case("conv65536-f32gram", 65536, F("full", 64, 1e3), F("full", 16, 1e6), "float32", "float32"),
    Case("conv65536-dead-bf16-f32gram", 65536, F("dead", 32, 1e6), S(10), "bfloat16", "float32"),
    # wide layers, fewer rows than dims
    Case("wide2048-few512-k1e12", 512, F("few_rows", 2048, 1e12), S(10), "float64", "float64"),
    Case("few64x512-f32gram", 64, F("few_rows", 512, 1e6), F("full", 5, 1.0), "float32", "float32"),
    Case("few64x512-f64gram", 64, F("few_rows", 512, 1e3), S(5), "float32", "float64"),
    Case("tiny64x5-k1", 64, F("full", 5, 1.0), S(5), "float64", "float64"),
    # dead units
    Case("dead4096x512-bf16", 4096, F("dead", 512, 1e3), S(10), "bfloat16", "float64"),
    Case("dead4096x64-f32gram", 4096, F("dead", 64, 1e6), S(10), "float32", "float32"),
    Case("dead4096x64-f64gram", 4096, F("dead", 64, 1e6), S(10), "float32", "float64"),
    # duplicated features
    Case("dup512x64-f16", 512, F("duplicated", 64, 1e6), S(10), "float16", "float64"),
    Case("dup4096x512-k1e10-f32gram", 4096, F("duplicated", 512, 1e10), S(5), "float32", "float32"),
    Case("dup512x64-f64gram", 512, F("duplicated", 64, 1e3), S(5), "float32", "float64"),
    # extreme κ; half precision with float32 Grams
    Case("full4096x512-k1e12", 4096, F("full", 512, 1e12), S(10), "float64", "float64"),
    Case("full512x512-k1e10-f16-f32gram", 512, F("full", 512, 1e10), F("full", 64, 1e12), "float16", "float32"),
]

# ----------------------------------------------------------------------------- row builders


def orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A ``rows × cols`` matrix with orthonormal columns, from a Gaussian: Householder QR when
    nearly square, two Cholesky-QR passes (BLAS-3, orthonormal to ~1e-15) when tall."""
    gaussian = torch.from_numpy(rng.standard_normal((rows, cols)))
    if rows < 2 * cols:
        return torch.linalg.qr(gaussian).Q.numpy()
    for _ in range(2):
        factor = torch.linalg.cholesky(gaussian.T @ gaussian)
        gaussian = torch.linalg.solve_triangular(factor, gaussian.T, upper=False).T
    return gaussian.numpy()


def designed_eigenvalues(count: int, kappa: float, floor_rtol: float) -> np.ndarray:
    """``count`` values geometric from 1 to 1/κ; the inner ones are moved out of the band
    ``[floor/HOLE, HOLE·floor]`` (to its nearer edge) so that none is ambiguous."""
    if kappa == 1.0:
        return np.ones(count)
    values = np.geomspace(1.0, 1.0 / kappa, count)
    low, high = floor_rtol / HOLE, floor_rtol * HOLE
    inner = values[1:-1]
    inside = (inner > low) & (inner < high)
    nearer_low = np.log(inner / low) < np.log(high / inner)
    inner[inside & nearer_low] = low
    inner[inside & ~nearer_low] = high
    return np.sort(values)[::-1]


def designed_rows(rng: np.random.Generator, rows: int, side: Side, floor_rtol: float, scale: float) -> np.ndarray:
    """float64 rows whose second moment ``rowsᵀrows / n`` has the designed spectrum."""
    dim = side.dim
    removed = max(1, dim // 8) if side.kind in ("dead", "duplicated") else 0
    distinct = dim - removed  # distinct nonzero columns
    rank = min(rows, distinct)
    if side.kind == "few_rows":
        assert rows < dim
    else:
        assert rows >= distinct, "only few_rows cases may have fewer rows than columns"
    values = scale * designed_eigenvalues(rank, side.kappa, floor_rtol)
    left = orthonormal(rng, rows, rank)
    right = orthonormal(rng, distinct, rank)
    base = math.sqrt(rows) * (left * np.sqrt(values)) @ right.T  # rows × distinct
    if side.kind == "dead":
        out = np.zeros((rows, dim))
        live = np.sort(rng.choice(dim, distinct, replace=False))
        out[:, live] = base
        return out
    if side.kind == "duplicated":
        # copy `removed` of the columns; a column present twice is scaled by 1/√2 so that the
        # spectrum stays the designed one (W = D C^{-1/2} Q with D the duplication matrix)
        copies = rng.choice(distinct, removed, replace=False)
        counts = np.ones(distinct)
        counts[copies] = 2.0
        base = base / np.sqrt(counts)
        source = rng.permutation(np.concatenate([np.arange(distinct), copies]))
        return base[:, source]  # exact copies: the same values indexed twice
    return base


def softmax_gradient_rows(rng: np.random.Generator, rows: int, classes: int) -> np.ndarray:
    """``softmax(z) − onehot(y)``: the logits' per-example gradient of cross-entropy."""
    logits = 0.8 * rng.standard_normal((rows, classes))
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    probabilities[np.arange(rows), rng.integers(0, classes, rows)] -= 1.0
    return probabilities


def build_rows(case: Case, side: Side, rng: np.random.Generator, scale: float, factor: float = 1.0) -> torch.Tensor:
    """The rows as the model hands them over: built in float64, times ``factor``, cast to the
    input dtype (``scale``: λmax of a designed spectrum)."""
    if side.kind == "softmax":
        rows = softmax_gradient_rows(rng, case.rows, side.dim)
    else:
        rows = designed_rows(rng, case.rows, side, case.floor_rtol(side.dim), scale)
    return torch.from_numpy(rows * factor).to(DTYPES[case.dtype])


# -------------------------------------------------------------------------------- reference


@dataclass(frozen=True)
class Reference:
    """float64 reference of one moment, from the explicit rows."""

    eigenvalues: np.ndarray  # descending, all d (structural zeros appended)
    structural: int  # eigenvalues that can be nonzero at all
    rtol: float  # the documented floor relative to λmax
    dead: int  # all-zero columns
    mean_squares: np.ndarray  # the diagonal, weight·Σ_rows r_i² / n (outlier features)

    @property
    def lambda_max(self) -> float:
        return float(self.eigenvalues[0])

    @property
    def floor(self) -> float:
        return self.rtol * self.lambda_max

    @property
    def rank(self) -> int:
        return int(min((self.eigenvalues > self.floor).sum(), self.structural))

    @property
    def unresolved(self) -> int:
        return self.structural - self.rank

    def kappa(self, percent: float) -> tuple[float, str]:
        return paper_kappa_reference(self.eigenvalues, percent, self.rtol, self.structural)


def reference(rows: torch.Tensor, weight: float, rtol: float) -> Reference:
    """Eigenvalues ``weight·σ²/n`` of the rows upcast to float64: singular values of the
    triangular factor of a Householder QR (backward stable: accurate to ``u·σmax``), never
    of a Gram."""
    data = rows.to(torch.float64).numpy()
    count, dim = data.shape
    live = np.flatnonzero(np.any(data != 0, axis=0))
    sub = data[:, live]
    tall = sub if sub.shape[0] >= sub.shape[1] else sub.T
    triangular = torch.linalg.qr(torch.from_numpy(np.ascontiguousarray(tall)), mode="r").R.numpy()
    singular = np.linalg.svd(triangular, compute_uv=False)
    values = np.zeros(dim)
    values[: singular.size] = np.sort(weight * singular**2 / count)[::-1]
    return Reference(values, int(singular.size), rtol, dim - live.size, weight * (data**2).mean(0))


def kronecker_reference(a: Reference, b: Reference, percent: float) -> tuple[float, str]:
    """``(κ_p, status)`` of ``A ⊗ B`` from all explicitly formed products: a resolved eigenvalue
    is itself, an unresolved one anywhere in ``[0, floor]``, a structural zero 0."""

    def bounds(ref: Reference) -> tuple[np.ndarray, np.ndarray]:
        low = np.zeros(ref.eigenvalues.size)
        low[: ref.rank] = ref.eigenvalues[: ref.rank]
        high = low.copy()
        high[ref.rank : ref.structural] = ref.floor
        return low, high

    (low_a, high_a), (low_b, high_b) = bounds(a), bounds(b)
    low = np.sort(np.outer(low_a, low_b).ravel())[::-1]
    high = np.sort(np.outer(high_a, high_b).ravel())[::-1]
    lambda_max = a.lambda_max * b.lambda_max
    if percent == 100:
        return lambda_max / low[a.rank * b.rank - 1], "exact"
    k = math.ceil(round(percent * low.size / 100.0, 9))
    if low[k - 1] > 0 and math.isclose(low[k - 1], high[k - 1], rel_tol=1e-12):
        return lambda_max / low[k - 1], "exact"
    if high[k - 1] > 0:
        return lambda_max / high[k - 1], "lower_bound"
    return math.inf, "infinite"


def ambiguities(label: str, ref: Reference) -> list[str]:
    """Reference eigenvalues (that can be nonzero) within GAP of the floor."""
    values = ref.eigenvalues[: ref.structural] / ref.floor
    close = values[(values > 1 / GAP) & (values < GAP)]
    return [f"{label}: eigenvalue at {v:.3g}× the floor (rtol {ref.rtol:.3g})" for v in close]


def kronecker_ambiguities(a: Reference, b: Reference, percents: tuple[float, ...]) -> list[str]:
    """Sub-FIM λ_p (a resolved product) within GAP of the largest product that involves an
    unresolved eigenvalue: whether κ_p is exact would be decided by rounding."""
    envelope = max(a.floor * b.lambda_max if a.unresolved else 0.0, b.floor * a.lambda_max if b.unresolved else 0.0)
    if envelope == 0:
        return []
    products = np.sort(np.outer(a.eigenvalues[: a.rank], b.eigenvalues[: b.rank]).ravel())[::-1]
    out = []
    for percent in percents:
        k = math.ceil(round(percent * a.eigenvalues.size * b.eigenvalues.size / 100.0, 9))
        if percent < 100 and k <= products.size and 1 / GAP < products[k - 1] / envelope < GAP:
            out.append(f"fim: λ_{percent} at {products[k - 1] / envelope:.3g}× the envelope")
    return out


# ---------------------------------------------------------------------------- package path


def run_package(
    case: Case,
    inputs: torch.Tensor,
    grads: torch.Tensor,
    *,
    gram: torch.dtype,
    percents: tuple[float, ...] | None = PERCENTS,
) -> LayerConditioning:
    """The callback's accumulation, batch by batch, then the analysis."""
    window = LayerWindow(inputs.shape[1], grads.shape[1], inputs.shape[1], torch.device("cpu"))
    for start in range(0, inputs.shape[0], BATCH):
        x, g = inputs[start : start + BATCH], grads[start : start + BATCH]
        window.input.add_rows(x.to(gram))
        window.input.note_precision(x.dtype)
        window.add_units(x.amax(0).to(torch.float64), x.amin(0).to(torch.float64))
        window.grad.add_rows(g.to(gram), weight=GRAD_WEIGHT)
        window.grad.note_precision(g.dtype)
    kwargs = {} if percents is None else {"percents": percents}
    return analyse_layer("layer", 0, window.moments(), **kwargs)


@dataclass(frozen=True)
class Outcome:
    case: Case
    input: Reference
    grad: Reference
    result: LayerConditioning


def evaluate(case: Case) -> Outcome:
    rng = np.random.default_rng(case.seed)
    inputs = build_rows(case, case.input, rng, scale=2.7)
    grads = build_rows(case, case.grad, rng, scale=0.3, factor=GRAD_SCALE)
    result = run_package(case, inputs, grads, gram=case.gram)
    ref_input = reference(inputs, 1.0, case.floor_rtol(case.input.dim))
    ref_grad = reference(grads, GRAD_WEIGHT, case.floor_rtol(case.grad.dim))
    return Outcome(case, ref_input, ref_grad, result)


@functools.cache
def evaluated(case: Case) -> Outcome:
    return evaluate(case)


# ------------------------------------------------------------------------------ comparison


def expected_metrics(
    moment: str, lambda_max: float, rank: int, kappas: dict[float, tuple[float, str]]
) -> dict[str, float]:
    out = {f"{moment}_lambda_max": lambda_max, f"{moment}_rank": float(rank)}
    for percent, (value, status) in kappas.items():
        out[kappa_quantity(moment, percent, status)] = 1.0 if status == "infinite" else value
    return out


def compare(outcome: Outcome, percents: tuple[float, ...] = PERCENTS) -> list[str]:
    """Every disagreement between the package's logged values and the reference."""
    result, a, b = outcome.result, outcome.input, outcome.grad
    problems: list[str] = []
    logged: dict[str, float] = {}
    for key, value in result.metrics("c").items():
        quantity = key.split("/")[-1]
        parsed = parse_quantity(quantity)
        if parsed is not None and parsed.moment is not None:
            logged[quantity] = value
    fim_kappas = {p: kronecker_reference(a, b, p) for p in percents}
    expected = {
        **expected_metrics("input", a.lambda_max, a.rank, {p: a.kappa(p) for p in percents}),
        **expected_metrics("grad", b.lambda_max, b.rank, {p: b.kappa(p) for p in percents}),
        **expected_metrics("fim", a.lambda_max * b.lambda_max, a.rank * b.rank, fim_kappas),
    }
    median = float(np.sort(a.mean_squares)[(a.mean_squares.size - 1) // 2])  # the lower middle value
    if median > 0:  # outlier features: max / median of Σx's diagonal, and which feature
        expected["input_outlier_ratio"] = float(a.mean_squares.max()) / median
        expected["input_outlier_feature"] = float(np.argmax(a.mean_squares))
    if set(logged) != set(expected):
        problems.append(
            f"logged keys differ: only logged {sorted(set(logged) - set(expected))}, "
            f"only expected {sorted(set(expected) - set(logged))}"
        )
    for quantity, want in expected.items():
        if quantity not in logged:
            continue
        got = logged[quantity]
        parsed = parse_quantity(quantity)
        assert parsed is not None
        if parsed.kind == "rank" or parsed.status == "infinite" or quantity == "input_outlier_feature":
            ok = got == want
        elif parsed.status == "lower_bound" and parsed.moment != "fim":
            ok = math.isclose(got, want, rel_tol=1e-6)  # λmax / floor = 1 / rtol
        else:
            ok = math.isclose(got, want, rel_tol=RTOL)
        if not ok:
            problems.append(f"{quantity}: got {got!r}, reference {want!r}")
    for label, summary, ref in (("input", result.input, a), ("grad", result.grad, b)):
        assert summary is not None
        if not math.isclose(summary.rtol, ref.rtol, rel_tol=1e-9):
            problems.append(f"{label} rtol: got {summary.rtol:.6g}, documented {ref.rtol:.6g}")
        if summary.structural_rank != ref.structural:
            problems.append(f"{label} structural rank: got {summary.structural_rank}, reference {ref.structural}")
    if result.dead_input_units != a.dead:
        problems.append(f"dead units: got {result.dead_input_units}, zero columns {a.dead}")
    return problems


def check(outcome: Outcome, percents: tuple[float, ...] = PERCENTS) -> None:
    a, b = outcome.input, outcome.grad
    ambiguous = [*ambiguities("input", a), *ambiguities("grad", b), *kronecker_ambiguities(a, b, percents)]
    assert not ambiguous, f"{outcome.case}: the case is ambiguous at the floor: {ambiguous}"
    problems = compare(outcome, percents)
    assert not problems, f"{outcome.case}: " + "; ".join(problems)


# ----------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", CASES, ids=str)
def test_logged_values_match_float64_reference(case: Case) -> None:
    check(evaluated(case))


def test_issue_softmax_example_reports_rank_four() -> None:
    """5 classes, 512 rows: the gradient moment has rank 4 and κ_100 ≈ the truth (~1.3) with
    float64 (the default) and float32 Grams alike."""
    for case in CASES[:2]:
        outcome = evaluated(case)
        grad = outcome.result.grad
        assert grad is not None
        truth, status = outcome.grad.kappa(100)
        assert (grad.rank, outcome.grad.rank) == (4, 4), case
        assert status == grad.kappa_status[100] == "exact"
        assert 1.0 < truth < 2.0, truth
        assert grad.kappa[100] == pytest.approx(truth, rel=RTOL), case


def test_default_settings_resolve_kappa_1e10_with_65536_rows() -> None:
    """float32 model, d = 64, 65536 conv positions, default statistics dtype (float64 Grams on
    the CPU) and default percents: κ_50, κ_80 and κ_100 = 1e10 are all measurements."""
    case = Case("default-conv65536-k1e10", 65536, F("full", 64, 1e10), S(10), "float32", "float64")
    gram = gram_dtype_for("auto", [torch.device("cpu")])
    assert gram == torch.float64
    rng = np.random.default_rng(1)
    inputs = build_rows(case, case.input, rng, scale=1.0)
    grads = build_rows(case, case.grad, rng, scale=1.0, factor=GRAD_SCALE)
    result = run_package(case, inputs, grads, gram=gram, percents=None)
    outcome = Outcome(
        case, reference(inputs, 1.0, case.floor_rtol(64)), reference(grads, GRAD_WEIGHT, case.floor_rtol(10)), result
    )
    check(outcome, (50, 80, 100))
    assert result.input is not None
    assert result.input.kappa_status == {50: "exact", 80: "exact", 100: "exact"}
    assert result.input.rank == 64
    assert result.input.kappa[100] == pytest.approx(1e10, rel=1e-2)


DEFICIENT = [
    c
    for c in CASES
    if "softmax" in (c.input.kind, c.grad.kind) or {"dead", "few_rows", "duplicated"} & {c.input.kind, c.grad.kind}
]


def test_floor_sits_above_the_rounding_noise_of_exact_zeros() -> None:
    """Where the reference has exact zeros (|λ| < 1e-14·λmax: softmax null direction, dead
    units, missing rows, duplicated features), the computed eigenvalues stay ≥ 3× under the
    floor, for float32 and float64 Grams."""
    margins: dict[str, float] = {}
    zeros_seen: dict[str, int] = {"float32": 0, "float64": 0}
    for case in DEFICIENT:
        outcome = evaluated(case)
        for label, ref, summary in (
            ("input", outcome.input, outcome.result.input),
            ("grad", outcome.grad, outcome.result.grad),
        ):
            assert summary is not None
            zeros = np.abs(ref.eigenvalues) < EXACT_ZERO * ref.lambda_max
            if not zeros.any():
                continue
            zeros_seen[case.gram_name] += int(zeros.sum())
            noise = float(np.abs(summary.eigenvalues.numpy()[zeros]).max())
            margins[f"{case}/{label}"] = summary.floor / noise if noise > 0 else math.inf
    assert all(zeros_seen.values()), zeros_seen  # both Gram dtypes are exercised
    worst = min(margins, key=margins.__getitem__)
    report = f"worst noise margin {margins[worst]:.3g}× under the floor ({worst}); " + ", ".join(
        f"{k}: {v:.3g}" for k, v in sorted(margins.items(), key=lambda kv: kv[1])
    )
    assert margins[worst] >= NOISE_MARGIN, report


def test_matrix_covers_every_axis_and_status() -> None:
    """The matrix is not vacuous: every value of every axis and every κ status occurs."""
    assert {c.rows for c in CASES} == {64, 512, 4096, 65536}
    assert {c.input.dim for c in CASES} | {c.grad.dim for c in CASES} >= {5, 64, 512, 2048}
    assert {c.input.kappa for c in CASES} >= {1.0, 1e3, 1e6, 1e10, 1e12}
    assert {c.input.kind for c in CASES} | {c.grad.kind for c in CASES} == {
        "full",
        "few_rows",
        "dead",
        "duplicated",
        "softmax",
    }
    assert {c.dtype for c in CASES} == set(DTYPES)
    assert {c.gram_name for c in CASES} == {"float32", "float64"}
    statuses: dict[str, set[str]] = {"input": set(), "grad": set(), "fim": set()}
    for case in CASES:
        result = evaluated(case).result
        for label, summary in (("input", result.input), ("grad", result.grad), ("fim", result.fim)):
            assert summary is not None
            statuses[label] |= set(summary.kappa_status.values())
    assert statuses["input"] == {"exact", "lower_bound", "infinite"}, statuses
    assert statuses["fim"] == {"exact", "lower_bound", "infinite"}, statuses
    assert {"exact", "lower_bound"} <= statuses["grad"], statuses


@pytest.mark.parametrize("factor", [1.0, 1e5])
def test_a_wrong_floor_is_caught(monkeypatch: pytest.MonkeyPatch, factor: float) -> None:
    """The comparison can fail: with the package's accuracy factor changed (floor 1000× lower
    or 100× higher), the logged values no longer match the documented reference."""
    case = CASES[1]  # float32 Grams, 512 rows: float32 rounding sits 1e3 under the floor
    check(evaluated(case))
    monkeypatch.setattr(resolution, "ACCURACY_FACTOR", factor)
    problems = compare(evaluate(case))
    # caught by the logged values themselves (ranks, statuses, bounds), not only by the rtol
    assert any(not p.startswith(("input rtol", "grad rtol")) for p in problems), problems
    with pytest.raises(AssertionError):
        check(evaluate(case))

"""Matplotlib figures from layer tables (the paper's Figs. 3, 5, 6, 7): used by sinks and report.

Pure plotting on plain ``{layer: {quantity: value}}`` tables (see
:mod:`lightning_conditioning.views.tables`). A κ_p that is not a measurement is never drawn
as an ordinary point: a lower bound (λ_p under the resolution floor) is an open upward
triangle at the bound, an infinite one (λ_p a structural zero) an ∞ on the top edge of the
axes; the legend says so. Figures are built with
``matplotlib.figure.Figure`` directly (no pyplot, no GUI backend, nothing global to close).
matplotlib is optional: check :func:`matplotlib_available` first.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_conditioning import schema
from lightning_conditioning.views.tables import LayerTable, kappa_percents, percent_text

if TYPE_CHECKING:
    from matplotlib.artist import Artist
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "plot_kappa",
    "kappa_marker_legend",
    "matplotlib_available",
    "depth_profile_figure",
    "training_figure",
    "units_figure",
    "domination_figure",
    "experts_figure",
    "save_png",
]

_MATRICES = (
    ("input", r"$\Sigma_x$ (layer input)"),
    ("grad", r"$\Sigma_{\nabla h}$ (output gradient)"),
    ("fim", r"sub-FIM $\Sigma_x \otimes \Sigma_{\nabla h}$"),
)
_MAX_NAMED_TICKS = 16


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (it is an optional dependency).

    Example:
        >>> isinstance(matplotlib_available(), bool)
        True
    """
    return importlib.util.find_spec("matplotlib") is not None


def _new_figure(rows: int, cols: int, size: tuple[float, float]) -> tuple[Figure, Any]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=100, layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False)
    return figure, axes


def _value(row: Mapping[str, float] | None, key: str) -> float:
    """A positive finite value or NaN (log axes cannot show the rest)."""
    value = (row or {}).get(key, math.nan)
    return value if math.isfinite(value) and value > 0 else math.nan


#: where the ∞ markers sit, as a fraction of the axes height (staggered down by _STAGGER per
#: series, so coinciding ones stay visible), and the top share of the height kept free for them
_TOP_EDGE = 0.965
_STAGGER = 0.035
_HEADROOM = 0.14


@dataclass
class _KappaSeries:
    """κ_p over a sequence of rows, split by what each reading is (NaN where it is not)."""

    exact: list[float]
    lower: list[float]
    infinite: list[bool]

    @property
    def has_data(self) -> bool:
        return any(not math.isnan(v) for v in self.exact + self.lower) or any(self.infinite)


def _kappa_series(rows: Sequence[Mapping[str, float] | None], moment: str, percent: str) -> _KappaSeries:
    """Split the κ_p readings of ``rows`` into exact values, lower bounds and infinities.

    Example:
        >>> rows = [{"grad_kappa_50": 3.0}, {"grad_kappa_50_lower_bound": 1e9},
        ...         {"grad_kappa_50_infinite": 1.0}, None]
        >>> s = _kappa_series(rows, "grad", "50")
        >>> s.exact[0], s.lower[1], s.infinite
        (3.0, 1000000000.0, [False, False, True, False])
    """
    series = _KappaSeries([], [], [])
    for row in rows:
        reading = schema.kappa_reading(row or {}, moment, percent)
        value, status = reading if reading is not None else (math.nan, "")
        positive = value if math.isfinite(value) and value > 0 else math.nan
        series.exact.append(positive if status in schema.KAPPA_VALUES else math.nan)
        series.lower.append(positive if status == "lower_bound" else math.nan)
        series.infinite.append(status == "infinite")
    return series


def _draw_kappa(
    ax: Axes,
    x: Sequence[float],
    series: _KappaSeries,
    colour: Any,
    style: str,
    label: str | None,
    ms: float = 3,
    index: int = 0,
) -> set[str]:
    """Exact κ_p as a line, lower bounds as open ▵ at the bound, ∞ on the top edge (the
    ``index``-th series a little lower); returns the kinds of non-measurement drawn (for
    :func:`_marker_legend` and :func:`_finish_kappa_axis`)."""
    from matplotlib.transforms import blended_transform_factory

    ax.plot(x, series.exact, style, ms=ms, color=colour, label=label)
    drawn: set[str] = set()
    lower = [(xi, v) for xi, v in zip(x, series.lower) if not math.isnan(v)]
    if lower:
        ax.plot(*zip(*lower), "^", ls="none", ms=ms + 4, mfc="none", mec=colour, mew=1.3, zorder=4)
        drawn.add("lower_bound")
    top = [xi for xi, flag in zip(x, series.infinite) if flag]
    if top:
        transform = blended_transform_factory(ax.transData, ax.transAxes)
        ax.plot(
            top,
            [_TOP_EDGE - _STAGGER * (index % 3)] * len(top),
            ls="none",
            marker=r"$\infty$",
            ms=ms + 7,
            color=colour,
            transform=transform,
            clip_on=False,
            zorder=5,
        )
        drawn.add("infinite")
    return drawn


def plot_kappa(
    ax: Axes,
    x: Sequence[float],
    rows: Sequence[Mapping[str, float] | None],
    moment: str,
    percent: str,
    *,
    colour: Any = None,
    label: str | None = None,
    index: int = 0,
) -> set[str]:
    """κ_p of ``moment`` from layer-table rows, drawn the package's way on a log axis: exact
    values as a line, lower bounds as open ▵ at the bound, ∞ on the top edge. Returns the kinds
    of non-measurement drawn; pass their union to :func:`kappa_marker_legend`.

    Example:
        >>> import matplotlib; matplotlib.use("Agg")
        >>> import matplotlib.pyplot as plt
        >>> figure, ax = plt.subplots()
        >>> sorted(plot_kappa(ax, [1, 2], [{"input_kappa_80": 5.0},
        ...                                {"input_kappa_80_infinite": 1.0}], "input", "80"))
        ['infinite']
        >>> plt.close(figure)
    """
    return _draw_kappa(ax, x, _kappa_series(rows, moment, percent), colour, "-o", label, index=index)


def kappa_marker_legend(ax: Axes, drawn: set[str], **legend: Any) -> None:
    """The axis legend with entries for the non-measurement markers that were drawn, and the
    top of the axis raised above the ∞ row."""
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=[*handles, *_marker_legend(drawn)], **legend)
    _finish_kappa_axis(ax, drawn)


def _finish_kappa_axis(ax: Axes, drawn: set[str]) -> None:
    """Log scale; with ∞ markers, raise the top so the data stays under their row."""
    _log_axis(ax, ax.get_ylabel())
    if "infinite" not in drawn:
        return
    ax.autoscale_view()
    low, high = ax.get_ylim()
    if 0 < low < high:
        ax.set_ylim(low, low * (high / low) ** (1 / (1 - _HEADROOM)))


def _marker_legend(drawn: set[str]) -> list[Artist]:
    """Grey proxy handles explaining the non-measurement markers that were drawn."""
    from matplotlib.lines import Line2D

    handles: list[Artist] = []
    if "lower_bound" in drawn:
        handles.append(
            Line2D(
                [],
                [],
                ls="none",
                marker="^",
                ms=7,
                mfc="none",
                mec="0.3",
                label=r"$\geq$ bound ($\lambda_p$ under the floor)",
            )
        )
    if "infinite" in drawn:
        handles.append(
            Line2D(
                [],
                [],
                ls="none",
                marker=r"$\infty$",
                ms=10,
                color="0.3",
                label=r"$\infty$ ($\lambda_p$ = 0, structural)",
            )
        )
    return handles


def _layer_axis(ax: Axes, names: Sequence[str]) -> None:
    positions = range(1, len(names) + 1)
    if len(names) <= _MAX_NAMED_TICKS:
        ax.set_xticks(list(positions), list(names), rotation=45, ha="right", fontsize=7)
    else:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (module order, index from 1)")
    ax.set_xlim(0.5, len(names) + 0.5)


def _log_axis(ax: Axes, ylabel: str) -> None:
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)


def depth_profile_figure(table: LayerTable, *, step: int | None = None) -> Figure:
    """λmax and κ_p of Σx, Σ∇h and the sub-FIM against layer index, log y (Figs. 3, 5).

    Example:
        >>> table = {f"net.{i}": {"input_lambda_max": 10.0 ** -i, "input_kappa_100": 5.0}
        ...          for i in range(4)}
        >>> figure = depth_profile_figure(table, step=0)
        >>> [ax.get_yscale() for ax in figure.axes][:2]
        ['log', 'log']
    """
    names = list(table)
    figure, axes = _new_figure(2, 3, (12.0, 6.5))
    x = list(range(1, len(names) + 1))
    percents = kappa_percents(table)
    for col, (label, title) in enumerate(_MATRICES):
        top, bottom = axes[0][col], axes[1][col]
        top.plot(x, [_value(table[n], schema.lambda_max_quantity(label)) for n in names], "o-", ms=4)
        top.set_title(title, fontsize=10)
        _log_axis(top, r"$\lambda_{max}$")
        drawn: set[str] = set()
        for index, percent in enumerate(percents):
            series = _kappa_series([table[n] for n in names], label, percent)
            if series.has_data:
                drawn |= _draw_kappa(
                    bottom, x, series, f"C{index}", "o-", rf"$\kappa_{{{percent_text(percent)}\%}}$", index=index
                )
        bottom.set_ylabel(r"$\kappa_p = \lambda_{max} / \lambda_p$")
        _finish_kappa_axis(bottom, drawn)
        if bottom.get_lines():
            handles, labels = bottom.get_legend_handles_labels()
            extra = _marker_legend(drawn)
            bottom.legend(handles + extra, labels + [str(h.get_label()) for h in extra], fontsize=7, loc="best")
        for ax in (top, bottom):
            _layer_axis(ax, names)
        top.set_xlabel("")
    figure.suptitle("Conditioning across depth" + (f" (step {step})" if step is not None else ""))
    return figure


def _pick_layers(names: Sequence[str], limit: int) -> list[str]:
    """At most ``limit`` layers spread evenly over depth, first and last included."""
    if len(names) <= limit:
        return list(names)
    picks = {round(i * (len(names) - 1) / (limit - 1)) for i in range(limit)}
    return [names[i] for i in sorted(picks)]


def _layer_colour(name: str, all_names: Sequence[str]) -> Any:
    """Shallow layers dark, deep ones yellow (viridis)."""
    from matplotlib import colormaps

    return colormaps["viridis"](0.9 * all_names.index(name) / max(len(all_names) - 1, 1))


def _history_lines(
    ax: Axes, history: Mapping[int, LayerTable], names: Sequence[str], key: str, all_names: Sequence[str]
) -> None:
    steps = sorted(history)
    for name in names:
        ys = [_value(history[s].get(name), key) for s in steps]
        ax.plot(
            [s + 1 for s in steps],
            ys,
            "-" if len(steps) > 1 else "o",
            color=_layer_colour(name, all_names),
            label=name,
            lw=1.2,
            ms=4,
        )
    _log_steps_axis(ax, [s + 1 for s in steps])


def _history_kappa(
    ax: Axes,
    history: Mapping[int, LayerTable],
    names: Sequence[str],
    moment: str,
    percent: str,
    all_names: Sequence[str],
) -> set[str]:
    """κ_p of each layer over training, non-measurements marked (see :func:`_draw_kappa`)."""
    steps = sorted(history)
    xs = [s + 1 for s in steps]
    drawn: set[str] = set()
    for index, name in enumerate(names):
        series = _kappa_series([history[s].get(name) for s in steps], moment, percent)
        drawn |= _draw_kappa(
            ax, xs, series, _layer_colour(name, all_names), "-" if len(steps) > 1 else "o", name, ms=4, index=index
        )
    _log_steps_axis(ax, xs)
    return drawn


def _log_steps_axis(ax: Axes, xs: Sequence[int]) -> None:
    """Log x axis of steps with plain-number labels (1, 2, 5, 10, … on short ranges)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    if xs and max(xs) / max(min(xs), 1) < 100:
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("optimizer step + 1")


def training_figure(history: Mapping[int, LayerTable], *, max_layers: int = 8) -> Figure:
    """λmax and the largest-p κ of Σx, Σ∇h and the sub-FIM over training, log-log (Figs. 6, 7).

    ``history`` maps step → layer table. At most ``max_layers`` layers are drawn, spread over
    depth (colour: shallow = dark, deep = yellow).

    Example:
        >>> history = {s: {"fc": {"input_lambda_max": 1.0 + s}} for s in (0, 9, 99)}
        >>> training_figure(history).axes[0].get_xscale()
        'log'
    """
    all_names = list(dict.fromkeys(n for s in sorted(history) for n in history[s]))
    names = _pick_layers(all_names, max_layers)
    percents = kappa_percents({f"{s}/{n}": row for s, table in history.items() for n, row in table.items()})
    kappa_symbol = rf"$\kappa_{{{percent_text(percents[-1])}\%}}$" if percents else r"$\kappa_{p}$"
    figure, axes = _new_figure(2, 3, (12.0, 6.5))
    for col, (label, title) in enumerate(_MATRICES):
        _history_lines(axes[0][col], history, names, schema.lambda_max_quantity(label), all_names)
        axes[0][col].set_title(title, fontsize=10)
        _log_axis(axes[0][col], r"$\lambda_{max}$")
        drawn = _history_kappa(axes[1][col], history, names, label, percents[-1], all_names) if percents else set()
        axes[1][col].set_ylabel(kappa_symbol)
        _finish_kappa_axis(axes[1][col], drawn)
        if drawn:
            axes[1][col].legend(handles=_marker_legend(drawn), fontsize=7, loc="best")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="outside right center", fontsize=8, title="layer")
    figure.suptitle("Conditioning over training")
    return figure


def units_figure(table: LayerTable, *, step: int | None = None) -> Figure:
    """Dead and full (always active) input units per layer, as fractions when sizes are known;
    an embedding's unused table rows (tokens, positions) in grey.

    Example:
        >>> figure = units_figure({"a": {"dead_input_units": 1.0, "full_input_units": 2.0,
        ...                              "input_units": 4.0}})
        >>> figure.axes[0].get_ylabel()
        'fraction of input units'
    """
    names = list(table)
    fractions = all(table[n].get("input_units", 0) > 0 for n in names)
    figure, axes = _new_figure(1, 1, (max(6.0, 0.35 * len(names) + 3), 4.0))
    ax = axes[0][0]
    x = list(range(1, len(names) + 1))
    series = [
        (-0.2, "dead_input_units", "tab:red", "dead (never > 0)"),
        (0.2, "full_input_units", "tab:blue", "full (always > 0)"),
    ]
    if any("unused_rows" in table[n] for n in names):  # embeddings: rows the batches did not use
        series.append((0.0, "unused_rows", "tab:gray", "unused table rows (embeddings)"))
    for offset, key, colour, label in series:
        values = [table[n].get(key, math.nan) for n in names]
        if fractions:
            values = [v / table[n]["input_units"] for v, n in zip(values, names)]
        ax.bar([i + offset for i in x], values, width=0.4, color=colour, label=label)
    ax.set_ylabel("fraction of input units" if fractions else "input units")
    if fractions:
        ax.set_ylim(0, 1.05)
    _layer_axis(ax, names)
    ax.legend(fontsize=8)
    ax.set_title("Dead and full input units" + (f" (step {step})" if step is not None else ""))
    return figure


def _mark_zeros(ax: Axes, x: Sequence[int], values: Sequence[float], colour: str) -> None:
    from matplotlib.transforms import blended_transform_factory

    zeros = [xi for xi, v in zip(x, values) if v == 0]
    if zeros:
        transform = blended_transform_factory(ax.transData, ax.transAxes)
        ax.scatter(
            zeros,
            [0.03] * len(zeros),
            marker="v",
            s=40,
            color=colour,
            transform=transform,
            label="update ratio = 0 (not updated)",
            zorder=5,
        )


def domination_figure(
    table: LayerTable,
    history: Mapping[int, LayerTable] | None = None,
    *,
    step: int | None = None,
    threshold: float = 1e-4,
    max_layers: int = 8,
) -> Figure:
    """Weight-domination ratios per layer (left) and σmax(∇W)/σmax(W) over training (right).

    Example:
        >>> table = {"fc": {"grad_weight_ratio": 1e-2, "update_weight_ratio": 0.0}}
        >>> domination_figure(table, {0: table}).axes[0].get_yscale()
        'log'
    """
    names = list(table)
    figure, axes = _new_figure(1, 2, (12.0, 4.5))
    left, right = axes[0]
    x = list(range(1, len(names) + 1))
    for key, colour, label in (
        ("grad_weight_ratio", "tab:blue", r"$\sigma_{max}(\nabla W) / \sigma_{max}(W)$"),
        ("grad_weight_ratio_fro", "tab:green", r"$\|\nabla W\|_F / \|W\|_F$"),
        ("update_weight_ratio", "tab:orange", r"$\sigma_{max}(\Delta W) / \sigma_{max}(W)$"),
    ):
        raw = [table[n].get(key, math.nan) for n in names]
        left.plot(x, [_value(table[n], key) for n in names], "o-", ms=4, color=colour, label=label)
        if key == "update_weight_ratio":
            _mark_zeros(left, x, raw, colour)
    left.axhline(threshold, color="tab:red", ls="--", lw=1, label=f"threshold {threshold:g}")
    _log_axis(left, "ratio")
    _layer_axis(left, names)
    left.legend(fontsize=8, loc="best")
    left.set_title("Weight domination" + (f" (step {step})" if step is not None else ""))
    if history:
        all_names = list(dict.fromkeys(n for s in sorted(history) for n in history[s]))
        _history_lines(right, history, _pick_layers(all_names, max_layers), "grad_weight_ratio", all_names)
        right.axhline(threshold, color="tab:red", ls="--", lw=1)
        right.legend(fontsize=7, title="layer", loc="best")
    _log_axis(right, r"$\sigma_{max}(\nabla W) / \sigma_{max}(W)$")
    right.set_title("Over training")
    return figure


def experts_figure(table: LayerTable, readings: Mapping[str, float], module: str, *, step: int | None = None) -> Figure:
    """The spread over one mixture-of-experts module's experts: λmax of Σx, Σ∇h and the
    sub-FIM of each expert's projections (log y), and each expert's share of the routed tokens
    (a dead expert, which has no numbers, is marked × at 0).

    Example:
        >>> table = {f"moe.experts.{p}.{e}": {"input_lambda_max": 1.0 + e, "grad_lambda_max": 0.1}
        ...          for e in range(3) for p in ("gate_up_proj", "down_proj")}
        >>> shares = {"load_share_e0": 0.5, "load_share_e1": 0.5, "load_share_e2": 0.0}
        >>> [ax.get_yscale() for ax in experts_figure(table, shares, "moe.experts").axes]
        ['log', 'log', 'log', 'linear']
    """
    shares = {int(q.rsplit("_e", 1)[1]): v for q, v in readings.items() if q.startswith("load_share_e")}
    experts = list(range(max(shares, default=-1) + 1))
    projections = sorted(
        {
            name[len(module) + 1 :].rsplit(".", 1)[0]
            for name in table
            if name.startswith(module + ".") and name.rsplit(".", 1)[1].isdigit()
        },
        key=lambda p: (p != "gate_up_proj" and p != "up_proj", p),
    )
    figure, axes = _new_figure(1, 4, (15.0, 3.6))
    for col, (label, title) in enumerate(_MATRICES):
        ax = axes[0][col]
        for index, projection in enumerate(projections):
            rows = [table.get(f"{module}.{projection}.{e}") for e in experts]
            ax.plot(
                experts,
                [_value(r, schema.lambda_max_quantity(label)) for r in rows],
                "o-" if index == 0 else "s--",
                ms=4,
                label=projection,
            )
        ax.set_title(title, fontsize=10)
        _log_axis(ax, r"$\lambda_{max}$")
        if ax.get_lines():
            ax.legend(fontsize=7, loc="best")
    share = axes[0][3]
    values = [shares.get(e, 0.0) for e in experts]
    share.bar(experts, values, color="C2")
    if experts:
        share.axhline(1.0 / len(experts), color="0.4", lw=0.8, ls=":", label="balanced")
        dead = [e for e in experts if values[e] == 0.0]
        share.plot(dead, [0.0] * len(dead), "x", color="C3", ms=8, label="dead expert")
        share.legend(fontsize=7, loc="best")
    share.set_title("routed tokens (share)", fontsize=10)
    share.set_ylim(0.0, 1.35 * max(values, default=1.0) or 1.0)  # room for the legend above the bars
    for ax in axes[0]:  # every expert at its own integer tick, a dead one too
        ax.set_xticks(experts)
        ax.set_xlim(-0.5, len(experts) - 0.5)
        ax.set_xlabel("expert")
    figure.suptitle(f"{module}: {len(experts)} experts" + (f" (step {step})" if step is not None else ""))
    return figure


def save_png(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG (Agg canvas; no pyplot state) and return the path.

    Example::

        save_png(depth_profile_figure(table), "depth_profile.png")
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png")
    return path

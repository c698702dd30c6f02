"""The report's plotly figures: trade-off curves, per-layer scores, exit distributions, comparisons.

Every function returns a ``plotly.graph_objects.Figure``; :mod:`layerexit.report.page` embeds them.
Hovering a point shows its setting (``customdata[0]``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from layerexit.report.inputs import Shown

CURVE_FAMILIES = ("entropy", "maxprob", "patience", "voting", "hybrid")
COLORS = {
    "entropy": "#1f77b4",
    "maxprob": "#ff7f0e",
    "patience": "#2ca02c",
    "voting": "#d62728",
    "hybrid": "#9467bd",
    "static": "#555555",
    "oracle": "#17becf",
    "calibrated": "#e377c2",
    "full": "#000000",
}
METHOD_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf"]
HOVER = "<b>%{customdata[0]}</b><br>speed-up %{x:.2f}x<br>%{meta} %{y:.4f}<br>mean exit layer %{customdata[1]}"


def _go() -> Any:
    import plotly.graph_objects as go

    return go


def pareto_front(rows: Sequence[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Rows not beaten on both speed-up and metric, sorted by speed-up."""
    front: list[dict[str, Any]] = []
    for row in sorted(rows, key=lambda r: (-r["speedup"], -r[metric])):
        if not front or row[metric] > front[-1][metric]:
            front.append(row)
    return sorted(front, key=lambda r: r["speedup"])


def _custom(rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
    return [[r["setting"], f"{r['mean_exit_layer']:.2f}" if r.get("mean_exit_layer") else "–"] for r in rows]


def _scatter(rows: Sequence[dict[str, Any]], metric: str, **kwargs: Any) -> Any:
    return _go().Scatter(
        x=[r["speedup"] for r in rows],
        y=[r[metric] for r in rows],
        customdata=_custom(rows),
        meta=metric,
        hovertemplate=HOVER,
        **kwargs,
    )


def _layout(fig: Any, height: int, **kwargs: Any) -> Any:
    fig.update_layout(
        height=height,
        margin={"l": 60, "r": 20, "t": 50, "b": 50},
        template="plotly_white",
        showlegend=True,  # also for a figure with one trace (a comparison of one method)
        legend={"font": {"size": 11}},
        hoverlabel={"align": "left"},
        **kwargs,
    )
    return fig


def tradeoff(
    points: list[dict[str, Any]],
    report: dict[str, Any],
    splits: Sequence[str],
    calibrated: dict[str, Any] | None = None,
) -> Any:
    """Metric against speed-up of every setting of every strategy, one panel per split.

    Per split: each family's settings as faint dots and its Pareto front as a line, the static
    models, the oracle, the full model, the settings selected on the selection split, and the
    calibrated default when there is one.
    """
    from plotly.subplots import make_subplots

    go = _go()
    metric = report["metric"]
    fig = make_subplots(rows=1, cols=len(splits), shared_yaxes=True, subplot_titles=[f"{s} split" for s in splits])
    selected = {f: e["setting"] for f, e in report["selected"].items() if e is not None}
    for col, split in enumerate(splits, start=1):
        rows = [p for p in points if p["split"] == split and p.get(metric) is not None]
        first = col == 1
        for family in CURVE_FAMILIES:
            mine = [r for r in rows if r["strategy"] == family]
            if not mine:
                continue
            color = COLORS[family]
            fig.add_trace(
                _scatter(
                    mine,
                    metric,
                    mode="markers",
                    name=f"{family} (every setting)",
                    legendgroup=family,
                    showlegend=False,
                    marker={"color": color, "size": 4, "opacity": 0.25},
                ),
                row=1,
                col=col,
            )
            fig.add_trace(
                _scatter(
                    pareto_front(mine, metric),
                    metric,
                    mode="lines+markers",
                    name=family,
                    legendgroup=family,
                    showlegend=first,
                    line={"color": color, "width": 2},
                    marker={"size": 5},
                ),
                row=1,
                col=col,
            )
        for family, label, symbol, size in (
            ("static", "static (cut at layer n)", "square", 8),
            ("oracle", "oracle (upper bound)", "diamond", 11),
        ):
            marks = sorted((r for r in rows if r["strategy"] == family), key=lambda r: r["speedup"])
            if marks:
                fig.add_trace(
                    _scatter(
                        marks,
                        metric,
                        mode="markers",
                        name=label,
                        legendgroup=family,
                        showlegend=first,
                        marker={"color": COLORS[family], "symbol": symbol, "size": size},
                    ),
                    row=1,
                    col=col,
                )
        chosen = [r for r in rows if r["setting"] == selected.get(r["strategy"])]
        if chosen:
            fig.add_trace(
                _scatter(
                    chosen,
                    metric,
                    mode="markers",
                    name=f"selected on {report['select_split']}",
                    legendgroup="selected",
                    showlegend=first,
                    marker={"color": "rgba(0,0,0,0)", "size": 15, "line": {"color": "black", "width": 2}},
                ),
                row=1,
                col=col,
            )
        if calibrated is not None:
            mine = [r for r in rows if r["setting"] == calibrated.get("default")]
            if mine:
                fig.add_trace(
                    _scatter(
                        mine,
                        metric,
                        mode="markers",
                        name="calibrated default",
                        legendgroup="calibrated",
                        showlegend=first,
                        marker={"color": COLORS["calibrated"], "symbol": "star", "size": 16},
                    ),
                    row=1,
                    col=col,
                )
        full = report["splits"].get(split, {}).get("full_model", {}).get(metric)
        if full is not None:
            top = max([r["speedup"] for r in rows] + [2.0])
            fig.add_trace(
                go.Scatter(
                    x=[1.0, top],
                    y=[full, full],
                    mode="lines",
                    name="full model",
                    legendgroup="full",
                    showlegend=first,
                    line={"color": "black", "dash": "dash", "width": 1},
                    hovertemplate=f"full model (all layers)<br>{metric} {full:.4f}<extra></extra>",
                ),
                row=1,
                col=col,
            )
        fig.update_xaxes(title_text="speed-up (L / mean exit layer)", row=1, col=col)
        lo, hi = report.get("band", [None, None])
        if lo is not None:
            fig.add_vrect(x0=lo, x1=hi, fillcolor="#eeeeee", opacity=0.6, line_width=0, layer="below", row=1, col=col)
    fig.update_yaxes(title_text=metric, row=1, col=1)
    fig.update_yaxes(range=_metric_range(points, report, metric))
    return _layout(fig, 470, hovermode="closest")


def _metric_range(points: list[dict[str, Any]], report: dict[str, Any], metric: str) -> list[float]:
    """Zoomed in on the interesting part: down to 0.15 below the full model at most."""
    values = [p[metric] for p in points if p.get(metric) is not None]
    fulls = [s["full_model"][metric] for s in report["splits"].values() if metric in s.get("full_model", {})]
    low = max(min(values), min(fulls) - 0.15) if fulls else min(values)
    return [max(0.0, low - 0.01), min(1.0, max(values) + 0.01) if max(values) <= 1 else max(values) * 1.01]


def per_layer(report: dict[str, Any]) -> Any:
    """Each exit's metric alone, per split, with the oracle as a dotted line."""
    go = _go()
    metric = report["metric"]
    fig = go.Figure()
    dash = {0: "solid", 1: "dot"}
    for i, (split, data) in enumerate(report["splits"].items()):
        scores = data["per_layer"][metric]
        layers = list(range(1, len(scores) + 1))
        color = METHOD_COLORS[i % len(METHOD_COLORS)]
        fig.add_trace(
            go.Scatter(
                x=layers,
                y=scores,
                mode="lines+markers",
                name=f"exit alone ({split})",
                line={"color": color},
                hovertemplate=f"layer %{{x}} ({split})<br>{metric} %{{y:.4f}}<extra></extra>",
            )
        )
        oracle = data["oracle"]
        fig.add_trace(
            go.Scatter(
                x=[1, len(scores)],
                y=[oracle[metric]] * 2,
                mode="lines",
                name=f"oracle ({split})",
                line={"color": color, "dash": dash.get(i, "dash")},
                hovertemplate=f"oracle ({split}): {metric} {oracle[metric]:.4f} at {oracle['speedup']:.2f}x"
                "<extra></extra>",
            )
        )
    fig.update_xaxes(title_text="layer", dtick=1)
    fig.update_yaxes(title_text=metric)
    return _layout(fig, 360)


def exit_distribution(exits: dict[str, tuple[list[int], list[int]]], shown: list[Shown], num_layers: int) -> Any:
    """Figure 8 of the paper: inputs leaving at each layer under each strategy, right and wrong stacked.

    ``exits``: strategy name -> (right counts per layer, wrong counts per layer)."""
    from plotly.subplots import make_subplots

    go = _go()
    names = [s for s in shown if s.name in exits]
    cols = min(4, len(names))
    nrows = math.ceil(len(names) / cols)
    titles = [f"{s.name}: {s.strategy}" for s in names]
    fig = make_subplots(rows=nrows, cols=cols, subplot_titles=titles, shared_yaxes=True, vertical_spacing=0.2)
    layers = list(range(1, num_layers + 1))
    for i, item in enumerate(names):
        right, wrong = exits[item.name]
        row, col = i // cols + 1, i % cols + 1
        for values, kind, color in ((right, "right", "#2ca02c"), (wrong, "wrong", "#d62728")):
            fig.add_trace(
                go.Bar(
                    x=layers,
                    y=values,
                    name=kind,
                    legendgroup=kind,
                    showlegend=i == 0,
                    marker_color=color,
                    hovertemplate=f"{item.name}<br>layer %{{x}}: %{{y}} inputs {kind}<extra></extra>",
                ),
                row=row,
                col=col,
            )
        fig.update_xaxes(dtick=1, row=row, col=col)
    fig.update_layout(barmode="stack")
    fig.update_annotations(font_size=11)
    return _layout(fig, 300 * nrows + 40)


def compare_overlay(sources: Any) -> Any:
    """Every method's own strategy on the report split, first seed: one curve per method."""
    from layerexit.methods import METHODS, parse_method

    go = _go()
    summary = sources.summary
    metric, split = summary["metric"], summary["report_split"]
    fig = go.Figure()
    colors = iter(METHOD_COLORS * 3)
    for spec in summary["methods"]:
        name = parse_method(spec)[0]
        if spec not in sources.points:
            continue
        rows = [p for p in sources.points[spec] if p["split"] == split and p.get(metric) is not None]
        method = METHODS[name]
        label = method.label or spec
        if not method.trains_internal_exits:
            full = sources.reports[spec]["splits"][split]["full_model"][metric]
            fig.add_trace(
                go.Scatter(
                    x=[1.0, 3.0],
                    y=[full, full],
                    mode="lines",
                    name=f"{label} {full:.4f}",
                    line={"color": "black", "dash": "dash", "width": 1},
                    hovertemplate=f"{label}: {metric} {full:.4f}<extra></extra>",
                )
            )
            continue
        if method.takes_layers:
            layers = parse_method(spec)[1]
            mine = [r for r in rows if r["strategy"] == "static" and r["setting"] == f"static(layer={layers})"]
            fig.add_trace(
                _scatter(
                    mine,
                    metric,
                    mode="markers",
                    name=f"{spec} (first {layers} layers)",
                    marker={"color": "#555555", "symbol": "square", "size": 9},
                )
            )
            continue
        family = method.native_strategy or "entropy"
        mine = [r for r in rows if r["strategy"] == family]
        fig.add_trace(
            _scatter(
                pareto_front(mine, metric),
                metric,
                mode="lines+markers",
                name=f"{label} + {family}",
                line={"color": next(colors), "width": 2},
                marker={"size": 5},
            )
        )
    lo, hi = summary["band"]
    fig.add_vrect(x0=lo, x1=hi, fillcolor="#eeeeee", opacity=0.6, line_width=0, layer="below")
    fig.update_xaxes(title_text="speed-up (L / mean exit layer)")
    fig.update_yaxes(title_text=f"{metric} ({split})")
    return _layout(fig, 470, hovermode="closest")


def compare_grid(sources: Any) -> Any:
    """Side by side: one panel per method with an early-exit curve, every strategy's front in it."""
    from plotly.subplots import make_subplots

    from layerexit.methods import METHODS, parse_method

    summary = sources.summary
    metric, split = summary["metric"], summary["report_split"]
    curves = [s for s in summary["methods"] if s in sources.points]
    specs = [s for s in curves if (m := METHODS[parse_method(s)[0]]).trains_internal_exits and not m.takes_layers]
    cols = min(3, max(1, len(specs)))
    nrows = max(1, math.ceil(len(specs) / cols))
    titles = [METHODS[parse_method(s)[0]].label or s for s in specs]
    fig = make_subplots(rows=nrows, cols=cols, subplot_titles=titles, shared_yaxes=True, shared_xaxes=True)
    for i, spec in enumerate(specs):
        row, col = i // cols + 1, i % cols + 1
        rows = [p for p in sources.points[spec] if p["split"] == split and p.get(metric) is not None]
        for family in CURVE_FAMILIES:
            mine = [r for r in rows if r["strategy"] == family]
            if mine:
                fig.add_trace(
                    _scatter(
                        pareto_front(mine, metric),
                        metric,
                        mode="lines+markers",
                        name=family,
                        legendgroup=family,
                        showlegend=i == 0,
                        line={"color": COLORS[family], "width": 1.6},
                        marker={"size": 4},
                    ),
                    row=row,
                    col=col,
                )
    fig.update_yaxes(title_text=metric, col=1)
    return _layout(fig, 320 * nrows + 60, hovermode="closest")


def compare_per_layer(sources: Any) -> Any:
    """Each exit's metric alone on the report split, one line per method (first seed)."""
    from layerexit.methods import METHODS, parse_method

    go = _go()
    summary = sources.summary
    metric, split = summary["metric"], summary["report_split"]
    fig = go.Figure()
    for spec, report in sources.reports.items():
        scores = report["splits"][split]["per_layer"][metric]
        label = METHODS[parse_method(spec)[0]].label or spec
        fig.add_trace(
            go.Scatter(
                x=list(range(1, len(scores) + 1)),
                y=scores,
                mode="lines+markers",
                name=label,
                hovertemplate=f"{label}<br>layer %{{x}}: {metric} %{{y:.4f}}<extra></extra>",
            )
        )
    fig.update_xaxes(title_text="layer", dtick=1)
    fig.update_yaxes(title_text=f"{metric} ({split}), each exit alone")
    return _layout(fig, 380)

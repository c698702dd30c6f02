"""Assemble the report page: one self-contained HTML file (plotly's script embedded, no network)."""

from __future__ import annotations

import json
from html import escape
from typing import Any

import torch

from layerexit.methods import METHODS
from layerexit.report import figures, tables
from layerexit.report.inputs import payload, shown_strategies
from layerexit.report.script import CSS, EXPLORER_JS
from layerexit.report.sources import CompareSources, RunSources
from layerexit.run_folder import RunFolder

PLOT_CONFIG = {"displaylogo": False, "responsive": True, "toImageButtonOptions": {"format": "png", "scale": 2}}


class _Figures:
    """Renders figures in page order; the first one carries plotly's script (include_plotlyjs=True)."""

    def __init__(self) -> None:
        self.first = True

    def html(self, fig: Any, div_id: str) -> str:
        out = fig.to_html(full_html=False, include_plotlyjs=self.first, div_id=div_id, config=PLOT_CONFIG)
        self.first = False
        return str(out)


def _document(title: str, header: str, nav: list[tuple[str, str]], body: str, tail: str = "") -> str:
    links = "".join(f'<a href="#{escape(a)}">{escape(t)}</a>' for a, t in nav)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        f"<header>{header}</header><nav>{links}</nav><main>{body}</main>{tail}</body></html>\n"
    )


def _section(anchor: str, title: str, content: str, hint: str = "") -> str:
    lead = f'<p class="hint">{hint}</p>' if hint else ""
    return f'<section id="{escape(anchor)}"><h2>{escape(title)}</h2>{lead}{content}</section>'


def _card(value: str, key: str) -> str:
    return f'<div class="card"><div class="v">{escape(value)}</div><div class="k">{escape(key)}</div></div>'


def _json_script(element_id: str, data: Any) -> str:
    """Data for the script, safe inside HTML: every "<" escaped (valid JSON), so no text can close the element."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    return f'<script type="application/json" id="{escape(element_id)}">{text}</script>'


def run_page(src: RunSources) -> str:
    """The page of one evaluated run."""
    report, metric = src.report, src.metric
    sel, rep = report["select_split"], report["report_split"]
    splits = [s for s in (sel, rep) if s in report["splits"]]
    splits = list(dict.fromkeys(splits + [s for s in report["splits"] if s not in splits]))
    shown = shown_strategies(report, src.calibration, RunFolder(src.path).bind)
    replays = [s.strategy.replay(src.probs, src.labels if s.strategy.needs_labels else None) for s in shown]
    data = payload(
        src.probs, src.labels, src.label_names, shown, replays, texts=src.texts, pairs=src.pairs, split=src.split
    )
    fig = _Figures()

    name = src.path.resolve().name
    config = src.config
    what = [str(report.get("task", config.get("task", "?"))), str(report.get("model", config.get("model", "?")))]
    objective = str(report.get("objective", config.get("objective", "?")))
    method = METHODS.get(objective)
    settings = method.describe(config) if method is not None else ""
    if settings:
        objective += f" ({settings})"
    what.append(objective)
    full = report["splits"][rep]["full_model"][metric]
    oracle = report["splits"][rep]["oracle"]
    cards = [_card(f"{full:.4f}", f"full model {metric} ({rep})"), _card(str(src.num_layers), "layers")]
    cards.append(_card(f"{oracle[metric]:.4f} at {oracle['speedup']:.2f}x", f"oracle ({rep})"))
    best = [(e[rep][metric], f, e) for f, e in report["selected"].items() if e is not None and rep in e]
    if best:
        value, family, entry = max(best, key=lambda t: t[0])
        cards.append(_card(f"{value:.4f} at {entry[rep]['speedup']:.2f}x", f"best selected: {family} ({rep})"))
    cards.append(_card(f"{src.labels.numel():,}", f"{src.split} inputs in the explorer"))
    notes = "".join(f'<p class="note">{escape(n)}</p>' for n in src.notes)
    header = (
        f"<h1>layerexit report: {escape(name)}</h1>"
        f'<div class="meta">{escape(" · ".join(what))} · {escape(str(src.path))}</div>'
        f'<div class="cards">{"".join(cards)}</div>{notes}'
    )
    lo, hi = report.get("band", [1.3, 2.0])
    body = [
        _section(
            "tradeoff",
            f"{metric} against speed-up, every strategy setting",
            fig.html(figures.tradeoff(src.points, report, splits, src.calibration), "fig-tradeoff"),
            f"Faint dots: every setting of the grid; lines: each strategy's best trade-off (Pareto front). Hover a "
            f"point for its setting. Grey band: {lo:g}x-{hi:g}x, where the paper selects; circles: the settings "
            f"selected on {escape(sel)}. Speed-up is L / mean exit layer.",
        ),
        _section(
            "per-layer",
            "Each exit alone, and the oracle",
            fig.html(figures.per_layer(report), "fig-per-layer"),
            "The metric of each internal classifier used for every input; the oracle lets each input out at the "
            "first layer that is right.",
        ),
        _section("selected", f"Selected settings (chosen on {sel}, reported on {rep})", tables.selected_table(report)),
        _section(
            "exits",
            f"Where inputs leave ({src.split} split)",
            fig.html(figures.exit_distribution(_exit_counts(shown, replays, src), shown, src.num_layers), "fig-exits"),
            "Inputs leaving at each layer under each selected strategy, right and wrong (the paper's Figure 8).",
        ),
    ]
    cal_cmd = f"layerexit calibrate {src.path} --target-speedup 1.5"
    body.append(
        _section(
            "calibration",
            "Calibrated choice",
            tables.calibration_section(src.calibration)
            if src.calibration
            else f"<p>No calibration.json in this run: <code>{escape(cal_cmd)}</code> writes one.</p>",
        )
    )
    bench_cmd = f"layerexit bench {src.path}"
    body.append(
        _section(
            "bench",
            "Wall clock (bench.json)",
            tables.bench_section(src.bench)
            if src.bench
            else f"<p>No bench.json in this run: <code>{escape(bench_cmd)}</code> measures it.</p>",
        )
    )
    if src.serving:
        body.append(_section("serving", "Serving measurements", tables.serving_section(src.serving)))
    body.append(_section("explorer", f"Per-input explorer ({src.split} split)", _explorer_html(src)))
    nav = [("tradeoff", "Trade-off"), ("per-layer", "Per layer"), ("selected", "Selected"), ("exits", "Exit layers")]
    nav += [("calibration", "Calibration"), ("bench", "Bench")]
    nav += [("serving", "Serving")] if src.serving else []
    nav.append(("explorer", "Explorer"))
    tail = _json_script("explorer-data", data) + f"<script>{EXPLORER_JS}</script>"
    return _document(f"layerexit report: {name}", header, nav, "".join(body), tail)


def _exit_counts(shown: list[Any], replays: list[Any], src: RunSources) -> dict[str, tuple[list[int], list[int]]]:
    out = {}
    for item, (exit_layer, prediction) in zip(shown, replays, strict=True):
        right = prediction == src.labels
        bins = src.num_layers + 1
        out[item.name] = (
            torch.bincount(exit_layer[right], minlength=bins)[1:].tolist(),
            torch.bincount(exit_layer[~right], minlength=bins)[1:].tolist(),
        )
    return out


def _explorer_html(src: RunSources) -> str:
    search = "search the texts" if src.texts is not None else "no texts in this report"
    return f"""
<p class="hint">Filter the inputs by label, by whether the chosen strategy gets them right, and by the layer it
lets them out at; pick one to see each layer's prediction and probability, the votes and V<sub>l</sub> of the
voting rule (the paper's Figure 7 for that input) and where each strategy lets it out.</p>
<div class="controls">
  <label>search<input id="q" type="search" placeholder="{escape(search)}"></label>
  <label>label<select id="f-label"></select></label>
  <label>strategy<select id="f-strategy"></select></label>
  <label>result<select id="f-correct"><option value="">right or wrong</option><option value="right">right</option>
    <option value="wrong">wrong</option></select></label>
  <label>exit layer<select id="f-exit"></select></label>
</div>
<div class="explorer">
  <div>
    <div class="pager"><span id="count"></span><button id="prev">◀ prev</button><span id="page"></span>
      <button id="next">next ▶</button></div>
    <table id="inputs"><thead><tr><th>#</th><th>text</th><th>label</th><th>predicted</th><th>exit</th><th></th></tr>
    </thead><tbody></tbody></table>
  </div>
  <div>
    <p id="detail-empty">No input matches.</p>
    <div id="detail" hidden>
      <h3 id="d-title"></h3>
      <div class="text" id="d-text"></div>
      <table id="input-exits"><thead><tr><th>strategy</th><th>setting</th><th>exit layer</th><th>predicts</th>
        <th></th></tr></thead><tbody></tbody></table>
      <div id="input-probs" class="explorer-plot"></div>
      <div id="input-votes" class="explorer-plot"></div>
      <table id="input-layers"><thead><tr><th>layer</th><th>predicts</th><th>p(prediction)</th><th>p(label)</th>
        <th>votes so far</th><th>V<sub>l</sub></th><th>exits here</th></tr></thead><tbody></tbody></table>
    </div>
  </div>
</div>"""


def compare_page(src: CompareSources) -> str:
    """The page of a ``compare`` folder: the table, every method's curve overlaid and side by side."""
    summary = src.summary
    metric, rep, sel = summary["metric"], summary["report_split"], summary["select_split"]
    lo, hi = summary["band"]
    fig = _Figures()
    name = src.path.resolve().name
    config = summary.get("config", {})
    notes = "".join(f'<p class="note">{escape(n)}</p>' for n in src.notes)
    seeds = summary["seeds"]
    header = (
        f"<h1>layerexit comparison: {escape(name)}</h1>"
        f'<div class="meta">{escape(str(config.get("task", "?")))} · {escape(str(config.get("model", "?")))} · '
        f"{len(summary['methods'])} methods · seeds {escape(', '.join(map(str, seeds)))} · "
        f"{escape(str(src.path))}</div>"
        f"{notes}"
    )
    body = [
        _section(
            "table",
            f"{metric} on {rep}, each strategy's setting chosen on {sel} in {lo:g}x-{hi:g}x",
            tables.compare_table(summary),
            "Cells: mean ± std over seeds (mean speed-up); ★ the method's own strategy.",
        ),
        _section(
            "overlay",
            "Every method's own strategy",
            fig.html(figures.compare_overlay(src), "fig-compare-overlay"),
            f"{rep} split, seed {seeds[0]}; hover a point for its setting.",
        ),
        _section(
            "side-by-side",
            "Every strategy, method by method",
            fig.html(figures.compare_grid(src), "fig-compare-grid"),
            "Each panel: one training method, the best trade-off of every exit strategy on it.",
        ),
        _section("layers", "Each exit alone", fig.html(figures.compare_per_layer(src), "fig-compare-per-layer")),
    ]
    runs = "".join(
        f"<tr><td>{escape(spec)}</td><td><code>layerexit report {escape(str(run))}</code></td></tr>"
        for spec, run in src.runs.items()
    )
    body.append(
        _section(
            "runs",
            "Runs",
            f"<table><thead><tr><th>method</th><th>its own page</th></tr></thead><tbody>{runs}</tbody></table>",
        )
    )
    nav = [("table", "Table"), ("overlay", "Curves"), ("side-by-side", "Side by side"), ("layers", "Per layer")]
    nav.append(("runs", "Runs"))
    return _document(f"layerexit comparison: {name}", header, nav, "".join(body))

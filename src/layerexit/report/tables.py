"""HTML tables of the report: selected settings, calibration, bench, serving (generic), comparison."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

MAX_ROWS = 200
"""A generic table shows at most this many rows (the rest is counted)."""


def fmt(value: Any) -> str:
    """A cell: numbers with at most 4 decimals, lists joined, None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 1e6 else f"{value:.4g}"
    if isinstance(value, list | tuple) and all(not isinstance(v, dict | list) for v in value):
        return ", ".join(fmt(v) for v in value)
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, cls: str = "", table_id: str = "") -> str:
    attrs = (f' class="{escape(cls)}"' if cls else "") + (f' id="{escape(table_id)}"' if table_id else "")
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def selected_table(report: dict[str, Any]) -> str:
    """Each family's setting chosen on the selection split, with its numbers on both splits."""
    metric, sel, rep = report["metric"], report["select_split"], report["report_split"]
    header = ["strategy", "setting", f"{sel} speed-up", f"{sel} {metric}"]
    if rep != sel:
        header += [f"{rep} speed-up", f"{rep} {metric}"]
    rows: list[list[Any]] = []
    for family, entry in report["selected"].items():
        if entry is None:
            rows.append([family, "(no setting in the band)", None, None] + ([None, None] if rep != sel else []))
            continue
        row = [family, entry["setting"], _x(entry[sel]["speedup"]), entry[sel][metric]]
        if rep != sel:
            shown = entry.get(rep) or {}
            row += [_x(shown.get("speedup")), shown.get(metric)]
        rows.append(row)
    full = ["full", "all layers", "1.00x", report["splits"].get(sel, {}).get("full_model", {}).get(metric)]
    if rep != sel:
        full += ["1.00x", report["splits"].get(rep, {}).get("full_model", {}).get(metric)]
    rows.append(full)
    return table(header, rows, table_id="selected")


def _x(value: Any) -> str | None:
    return f"{value:.2f}x" if isinstance(value, int | float) else None


def calibration_section(calibration: dict[str, Any]) -> str:
    """The calibrated choice: the request (target or bound), the default, each family's choice and its test check."""
    mode = calibration.get("mode")
    request = calibration.get("request", {})
    split = calibration.get("split") or {}
    calib_split, test_split = split.get("calibration", "calibration"), split.get("test") or "test"
    if mode == "risk":
        what = request.get("loss", "loss")
        ask = (
            f"bound: {what} at most {fmt(request.get('max_drop'))} with probability at least "
            f"{fmt(request.get('confidence'))} (Learn-then-Test)"
        )
    else:
        what = request.get("metric") or "metric"
        ask = f"target: speed-up at least {fmt(request.get('target_speedup'))}x on the {calib_split} split"
    checks = {c.get("family"): c for c in calibration.get("test", []) if isinstance(c, dict)}
    header = ["strategy", "setting", f"{calib_split} speed-up", f"{calib_split} {what}"]
    if checks:
        header += [f"{test_split} speed-up", f"{test_split} {what}"]
    rows = []
    for choice in calibration.get("choices", []):
        value = choice.get("risk") if mode == "risk" else choice.get("metric_value")
        row = [choice.get("family"), choice.get("strategy"), _x(choice.get("speedup")), value]
        if checks:
            check = checks.get(choice.get("family"), {})
            realised = check.get("risk") if mode == "risk" else check.get("metric_value")
            row += [_x(check.get("speedup")), realised]
        rows.append(row)
    n = calibration.get("n_calibration")
    return (
        '<p class="callout" id="calibrated-default">Calibrated default: '
        f"<code>{escape(str(calibration.get('default')))}</code> ({escape(ask)}; {escape(str(n))} calibration "
        "inputs). <code>layerexit predict</code>, "
        "<code>bench</code> and <code>Predictor.from_run</code> use it.</p>"
        + table(header, rows, table_id="calibration")
    )


def bench_section(bench: dict[str, Any]) -> str:
    """``bench.json``: per batch size and row, latency, throughput and both speed-ups (each runtime's layer
    speed-up its own where the file has it: int8 exits can differ from PyTorch's)."""
    from layerexit.evaluation.bench import own_layer_speedup

    lead = (
        f"strategy <code>{escape(str(bench.get('strategy')))}</code> · {escape(fmt(bench.get('samples')))} inputs, "
        f"{escape(fmt(bench.get('mean_tokens')))} tokens on average · {escape(fmt(bench.get('threads')))} threads · "
        f"mean exit layer {escape(fmt(bench.get('mean_exit_layer')))} of {escape(fmt(bench.get('num_layers')))}"
    )
    header = ["batch", "row", "median ms", "p90 ms", "inputs/s", "wall-clock speed-up", "layer speed-up", "ratio"]
    rows = []
    for batch_size, entry in (bench.get("batch_sizes") or {}).items():
        if not isinstance(entry, dict):
            continue
        for name, row in entry.items():
            if not isinstance(row, dict):
                continue
            full = name.endswith(("full", "all_layers"))  # runs every layer
            wall = 1.0 if name == "full" else entry.get(f"{name}_wallclock_speedup")
            layers = 1.0 if full else own_layer_speedup(entry, name.removesuffix("early_exit"))
            ratio = None if full or not wall or not layers else wall / layers
            rows.append(
                [
                    batch_size,
                    name,
                    row.get("median_ms"),
                    row.get("p90_ms"),
                    row.get("throughput_per_s"),
                    _x(wall),
                    _x(layers),
                    ratio,
                ]
            )
    return f"<p>{lead}</p>" + table(header, rows, table_id="bench")


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys; lists of scalars stay as they are."""
    if not isinstance(value, dict):
        return {prefix or "value": value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(item, dict):
            out.update(flatten(item, name))
        else:
            out[name] = item
    return out


def generic_tables(data: Any, title: str = "") -> list[tuple[str, str]]:
    """Any JSON as tables: scalars as one key/value table, each list of objects and each object of
    objects as a table of its own (rows: the list items or the keys). Returns (caption, html) pairs."""
    out: list[tuple[str, str]] = []
    if isinstance(data, list):
        if data and all(isinstance(d, dict) for d in data):
            out.append((title or "rows", _records([flatten(d) for d in data], first=None)))
        else:
            out.append((title or "values", table(["value"], [[v] for v in data[:MAX_ROWS]])))
        return out
    if not isinstance(data, dict):
        return [(title or "value", table(["value"], [[data]]))]
    scalars: list[list[Any]] = []
    for key, value in data.items():
        name = f"{title}.{key}" if title else str(key)
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            out.append((name, _records([flatten(v) for v in value], first=None)))
        elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            out.append((name, _records([{"": k, **flatten(v)} for k, v in value.items()], first="")))
        elif isinstance(value, dict):
            scalars += [[k, v] for k, v in flatten(value, str(key)).items()]
        else:
            scalars.append([key, value])
    if scalars:
        out.insert(0, (title or "summary", table(["field", "value"], scalars)))
    return out


def _records(records: list[dict[str, Any]], first: str | None) -> str:
    columns: list[str] = []
    for record in records:
        columns += [k for k in record if k not in columns]
    if first is not None and first in columns:
        columns.remove(first)
        columns.insert(0, first)
    rows = [[r.get(c) for c in columns] for r in records[:MAX_ROWS]]
    more = f"<p>… and {len(records) - MAX_ROWS} more rows</p>" if len(records) > MAX_ROWS else ""
    return table([c or "key" for c in columns], rows, cls="generic") + more


def serving_section(serving: dict[str, Any]) -> str:
    parts = []
    for name, data in serving.items():
        parts.append(f"<h3><code>{escape(name)}</code></h3>")
        for caption, html in generic_tables(data):
            parts.append(f'<div class="generic-block"><div class="caption">{escape(caption)}</div>{html}</div>')
    return "".join(parts)


def compare_table(summary: dict[str, Any]) -> str:
    """compare.json's cells: per method and strategy, mean ± std of the metric (mean speed-up)."""
    from layerexit.evaluation.sweep import FAMILIES
    from layerexit.methods import METHODS, parse_method

    columns = ["full", *[f for f in FAMILIES if f != "static"], "static", "oracle"]
    rows = []
    for spec in summary["methods"]:
        row = summary["cells"].get(spec, {})
        native = summary.get("native_strategy", {}).get(spec)
        cells = [METHODS[parse_method(spec)[0]].label or spec]
        for column in columns:
            cell = row.get(column)
            if cell is None:
                cells.append("–" if column in row else "")
                continue
            text = f"{100 * cell['mean']:.2f}" + (f" ± {100 * cell['std']:.2f}" if cell.get("std") else "")
            text += f" ({cell['speedup']:.2f}x)" + (" ★" if column == native else "")
            cells.append(text)
        rows.append(cells)
    return table(["method", *columns], rows, table_id="compare-cells")

"""The page's style sheet and the explorer's script (plain JavaScript over the embedded data and plotly)."""

CSS = """
:root { --fg: #1d232a; --muted: #5b6570; --line: #dde2e7; --accent: #1f5fa8; --bg-soft: #f5f7f9; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); }
header { padding: 18px 28px 10px; border-bottom: 1px solid var(--line); }
header h1 { margin: 0 0 4px; font-size: 21px; }
header .meta { color: var(--muted); }
nav { position: sticky; top: 0; z-index: 10; background: #fff; border-bottom: 1px solid var(--line);
      padding: 6px 28px; display: flex; gap: 16px; flex-wrap: wrap; }
nav a { color: var(--accent); text-decoration: none; }
main { padding: 0 28px 40px; max-width: 1400px; }
section { margin-top: 26px; }
h2 { font-size: 17px; margin: 0 0 6px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { font-size: 14px; margin: 14px 0 4px; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; margin: 12px 0 4px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; min-width: 150px;
        background: var(--bg-soft); }
.card .v { font-size: 19px; font-weight: 600; }
.card .k { color: var(--muted); font-size: 12px; }
.note { background: #fff7e0; border: 1px solid #f0d890; padding: 6px 10px; border-radius: 4px; margin: 8px 0; }
.callout { background: var(--bg-soft); border-left: 3px solid var(--accent); padding: 6px 10px; }
.hint { color: var(--muted); margin: 2px 0 8px; }
table { border-collapse: collapse; margin: 6px 0; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 3px 9px; text-align: left; vertical-align: top; }
th { background: var(--bg-soft); font-weight: 600; }
td { font-variant-numeric: tabular-nums; }
.generic-block { margin: 6px 0 12px; overflow-x: auto; }
.caption { color: var(--muted); font-size: 12px; }
code { background: var(--bg-soft); padding: 0 3px; border-radius: 3px; }
.controls { display: flex; gap: 12px; flex-wrap: wrap; align-items: end; margin: 8px 0; }
.controls label { display: flex; flex-direction: column; font-size: 12px; color: var(--muted); }
.controls input, .controls select { font: inherit; padding: 3px 5px; min-width: 120px; }
.explorer { display: grid; grid-template-columns: minmax(380px, 5fr) 6fr; gap: 20px; }
#inputs tbody tr { cursor: pointer; }
#inputs tbody tr:hover { background: #eef4fb; }
#inputs tbody tr.current { background: #dcE9f8; }
#inputs td.text { max-width: 420px; }
.ok { color: #1b7f2a; font-weight: 600; } .bad { color: #b3261e; font-weight: 600; }
.pager { display: flex; gap: 10px; align-items: center; margin: 4px 0; }
#detail .text { font-size: 15px; background: var(--bg-soft); padding: 8px 10px; border-radius: 4px; margin: 6px 0;
                white-space: pre-wrap; }
tr.exit-row td { background: #fff3d6; }
@media (max-width: 1000px) { .explorer { grid-template-columns: 1fr; } }
"""

EXPLORER_JS = r"""
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("explorer-data").textContent);
  const el = (id) => document.getElementById(id);
  function unpack(p) {
    const bin = atob(p.b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return p.dtype === "u2" ? new Uint16Array(bytes.buffer) : bytes;
  }
  const L = D.L, C = D.C, N = D.n, names = D.labelNames, scale = D.scale;
  const probs = unpack(D.probs), argmax = unpack(D.argmax), y = unpack(D.y);
  const S = D.strategies.map((s) => Object.assign({}, s, { exit: unpack(s.exit), pred: unpack(s.pred) }));
  const texts = D.texts, pairs = D.pairs;
  const haystack = texts ? texts.map((t, i) => (t + " " + (pairs ? pairs[i] : "")).toLowerCase()) : null;
  const PAGE = 25;
  let matches = [], page = 0, current = -1;

  function option(select, value, text) {
    const o = document.createElement("option");
    o.value = value; o.textContent = text; select.appendChild(o);
  }
  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text; if (cls) td.className = cls; tr.appendChild(td); return td;
  }
  function prob(i, l, c) { return probs[(i * L + (l - 1)) * C + c] / scale; }
  function textOf(i) { return texts ? texts[i] + (pairs && pairs[i] ? "  ‖  " + pairs[i] : "") : "(text unavailable)"; }

  option(el("f-label"), "", "any label");
  names.forEach((n, c) => option(el("f-label"), String(c), n));
  S.forEach((s, j) => option(el("f-strategy"), String(j), s.name + ": " + s.setting));
  option(el("f-exit"), "", "any layer");
  for (let l = 1; l <= L; l++) option(el("f-exit"), String(l), "layer " + l);
  if (!texts) { el("q").disabled = true; el("q").placeholder = "no texts in this report"; }

  function strategy() { return S[+el("f-strategy").value || 0]; }
  function apply() {
    const s = strategy(), label = el("f-label").value, corr = el("f-correct").value, ex = el("f-exit").value;
    const q = el("q").value.trim().toLowerCase();
    matches = [];
    for (let i = 0; i < N; i++) {
      if (label !== "" && y[i] !== +label) continue;
      const right = s.pred[i] === y[i];
      if ((corr === "right" && !right) || (corr === "wrong" && right)) continue;
      if (ex !== "" && s.exit[i] !== +ex) continue;
      if (q && haystack && haystack[i].indexOf(q) < 0) continue;
      matches.push(i);
    }
    page = 0; render();
  }
  function render() {
    const s = strategy(), body = el("inputs").tBodies[0], pages = Math.max(1, Math.ceil(matches.length / PAGE));
    body.replaceChildren();
    for (const i of matches.slice(page * PAGE, (page + 1) * PAGE)) {
      const tr = document.createElement("tr");
      tr.dataset.index = String(i); tr.tabIndex = 0;
      if (i === current) tr.className = "current";
      cell(tr, String(i));
      const t = textOf(i);
      cell(tr, t.length > 140 ? t.slice(0, 139) + "…" : t, "text");
      cell(tr, names[y[i]]);
      cell(tr, names[s.pred[i]]);
      cell(tr, String(s.exit[i]));
      const right = s.pred[i] === y[i];
      cell(tr, right ? "✓" : "✗", right ? "ok" : "bad");
      tr.addEventListener("click", () => show(i));
      tr.addEventListener("keydown", (e) => { if (e.key === "Enter") show(i); });
      body.appendChild(tr);
    }
    el("count").textContent = matches.length + " of " + N + " inputs match";
    el("page").textContent = "page " + (page + 1) + " of " + pages;
    el("prev").disabled = page === 0; el("next").disabled = page >= pages - 1;
  }

  function show(i) {
    current = i;
    for (const tr of el("inputs").tBodies[0].rows) tr.className = +tr.dataset.index === i ? "current" : "";
    el("detail-empty").hidden = true; el("detail").hidden = false;
    el("d-title").textContent = "Input #" + i + " · label " + names[y[i]] + " · full model predicts " +
      names[argmax[i * L + L - 1]];
    el("d-text").textContent = textOf(i);
    // where each strategy lets it out
    const exitsBody = el("input-exits").tBodies[0]; exitsBody.replaceChildren();
    const byLayer = {};
    S.forEach((s) => {
      const tr = document.createElement("tr"), right = s.pred[i] === y[i];
      cell(tr, s.name); cell(tr, s.setting); cell(tr, String(s.exit[i])); cell(tr, names[s.pred[i]]);
      cell(tr, right ? "✓" : "✗", right ? "ok" : "bad");
      exitsBody.appendChild(tr);
      (byLayer[s.exit[i]] = byLayer[s.exit[i]] || []).push(s.name);
    });
    // each layer: prediction, probabilities, votes and V_l of the voting rule
    const k = D.voting.k, votes = new Array(C).fill(0), V = [], voteRows = [];
    const layersBody = el("input-layers").tBodies[0]; layersBody.replaceChildren();
    for (let l = 1; l <= L; l++) {
      const a = argmax[i * L + l - 1];
      votes[a] += 1; voteRows.push(votes.slice());
      V.push(Math.max.apply(null, votes) / Math.pow(l, k));
      const tr = document.createElement("tr");
      if (byLayer[l]) tr.className = "exit-row";
      cell(tr, String(l)); cell(tr, names[a]);
      cell(tr, prob(i, l, a).toFixed(3)); cell(tr, prob(i, l, y[i]).toFixed(3));
      cell(tr, names.map((n, c) => n + " " + votes[c]).join(" · "));
      cell(tr, V[l - 1].toFixed(4));
      cell(tr, (byLayer[l] || []).join(", "));
      layersBody.appendChild(tr);
    }
    drawProbs(i, byLayer); drawVotes(voteRows, V);
  }
  const layers = Array.from({ length: L }, (_, j) => j + 1);
  const palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];
  const layout = (title, extra) => Object.assign({ title: { text: title, font: { size: 13 } }, height: 300,
    margin: { l: 50, r: 10, t: 40, b: 40 }, template: "plotly_white", xaxis: { title: { text: "layer" }, dtick: 1 },
    legend: { font: { size: 11 } } }, extra);
  const config = { displaylogo: false, responsive: true };
  function drawProbs(i, byLayer) {
    const traces = names.map((n, c) => ({ x: layers, y: layers.map((l) => prob(i, l, c)), name: "p(" + n + ")",
      mode: "lines+markers", line: { color: palette[c % palette.length] },
      hovertemplate: "layer %{x}: p(" + n + ") %{y:.3f}<extra></extra>" }));
    const ex = [], ey = [], et = [], ep = [];
    Object.keys(byLayer).forEach((l) => byLayer[l].forEach((name, j) => {
      ex.push(+l); ey.push(1.06 + 0.09 * j); et.push(name); ep.push(+l === L ? "middle left" : "middle right");
    }));
    traces.push({ x: ex, y: ey, text: et, mode: "markers+text", textposition: ep, name: "exits here",
      marker: { symbol: "triangle-down", size: 9, color: "#333" },
      hovertemplate: "%{text} exits at layer %{x}<extra></extra>" });
    const stack = Math.max(0, ...Object.values(byLayer).map((v) => v.length));
    Plotly.react("input-probs", traces, layout("each layer's probability, and where each strategy exits",
      { yaxis: { range: [0, 1.1 + 0.09 * stack], title: { text: "probability" }, tickvals: [0, 0.25, 0.5, 0.75, 1] },
        xaxis: { title: { text: "layer" }, dtick: 1, range: [0.7, L + 0.3] } }), config);
  }
  function drawVotes(voteRows, V) {
    const traces = names.map((n, c) => ({ type: "bar", x: layers, y: voteRows.map((v) => v[c]), name: "votes " + n,
      marker: { color: palette[c % palette.length], opacity: 0.55 },
      hovertemplate: "layer %{x}: %{y} votes " + n + "<extra></extra>" }));
    traces.push({ x: layers, y: V, name: "V<sub>l</sub>", mode: "lines+markers", line: { color: "#000", width: 2 },
      hovertemplate: "V<sub>%{x}</sub> = %{y:.4f}<extra></extra>" });
    if (D.voting.threshold !== null)
      traces.push({ x: [1, L], y: [D.voting.threshold, D.voting.threshold], mode: "lines",
        name: "threshold " + D.voting.threshold,
        line: { color: "#d62728", dash: "dash" }, hovertemplate: D.voting.setting + "<extra></extra>" });
    Plotly.react("input-votes", traces, layout("votes and V<sub>l</sub> = max<sub>c</sub> votes<sub>c</sub>(l) / " +
      "l<sup>k</sup>, k = " + D.voting.k +
      (D.voting.setting ? " (" + D.voting.setting + ")" : ""),
      { barmode: "stack", yaxis: { title: { text: "votes, V<sub>l</sub>" } } }), config);
  }

  ["f-label", "f-correct", "f-strategy", "f-exit"].forEach((id) => el(id).addEventListener("change", apply));
  el("q").addEventListener("input", apply);
  el("prev").addEventListener("click", () => { if (page > 0) { page -= 1; render(); } });
  el("next").addEventListener("click", () => { if ((page + 1) * PAGE < matches.length) { page += 1; render(); } });
  apply();
  if (matches.length) show(matches[0]);
})();
"""

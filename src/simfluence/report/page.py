"""The self-contained HTML report: one file, every script and style inlined, opens offline.

Sections: the metric table of the simulator beside the baselines; a heat map of the
leave-one-out influence of every training example on every test example
(:mod:`simfluence.report.data`); then, for a few test examples, interactive true vs
simulated trajectories on a few held-out runs and the most helpful and harmful
training examples, shown as text or images when the task's data is at hand.

Plots are Plotly figures; ``plotly.min.js`` (from the ``plotly`` package) is inlined once.
Every id and text comes from user data and is HTML-escaped, in the page and in the
figures (Plotly interprets a few tags in its strings).
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from simfluence.evaluate import METRICS, Metrics
from simfluence.report.data import (
    DEFAULT_EXAMPLES,
    DEFAULT_RUNS,
    DEFAULT_TOP,
    INTERVAL_LEVEL,
    ReportData,
    build_report_data,
)
from simfluence.report.examples import ExampleViews, example_views
from simfluence.report.style import EFFECT_COLORMAP, EFFECT_LEGEND
from simfluence.runs.atomic import write_text_atomic
from simfluence.runs.log import RunSet
from simfluence.simulators.base import Simulator

METRIC_LABELS = {"mse": "all-steps MSE", "mae": "MAE", "final_mse": "final MSE", "final_spearman": "final Spearman",
                 "across_run_spearman": "across-run Spearman"}
HIGHER_IS_BETTER = {"final_spearman", "across_run_spearman"}
RUN_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
MAX_HEATMAP_TRAIN = 300
MAX_HEATMAP_TEST = 200
# The mode bar would float over the heat map's top-right cells; zoom and pan stay on the mouse.
PLOT_CONFIG = {"displaylogo": False, "responsive": True, "displayModeBar": False}


def _plotly():
    try:
        import plotly
    except ImportError:
        raise ImportError("the HTML report needs plotly: pip install 'simfluence[report]'") from None
    return plotly


def _escape_all(values) -> list[str]:
    return [html.escape(str(value)) for value in values]


def _number(value: float, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


# --- sections -------------------------------------------------------------------------
def metrics_table(data: ReportData) -> str:
    """The simulator's and the baselines' metrics, the best value of each column in bold.

    Preceded by a warning when some held-out runs were also fitting runs (not held out).
    """
    evaluation = data.evaluation
    note = evaluation.fitting_runs_note()
    warning = f'<p class="warning" role="alert">Warning: {html.escape(note)}.</p>' if note else ""
    rows: list[tuple[str, Metrics]] = [(evaluation.method, evaluation.metrics)]
    rows += [(f"{name} (baseline)", metrics) for name, metrics in evaluation.baselines.items()]
    best = {}
    for key in METRICS:
        values = [getattr(metrics, key) for _, metrics in rows if math.isfinite(getattr(metrics, key))]
        if values:
            best[key] = max(values) if key in HIGHER_IS_BETTER else min(values)
    header = "".join(f"<th>{html.escape(METRIC_LABELS[key])}</th>" for key in METRICS)
    body = []
    for k, (name, metrics) in enumerate(rows):
        cells = []
        for key in METRICS:
            value = getattr(metrics, key)
            text = _number(value)
            cells.append(f'<td class="num"><b>{text}</b></td>' if best.get(key) == value else
                         f'<td class="num">{text}</td>')
        css = ' class="method"' if k == 0 else ' class="baseline"'
        body.append(f"<tr{css}><th scope=\"row\">{html.escape(name)}</th>{''.join(cells)}</tr>")
    verdict = ""
    baseline = evaluation.baselines.get("mean-trajectory")
    if baseline is not None and evaluation.metrics.mse > 0 and math.isfinite(baseline.mse):
        ratio = baseline.mse / evaluation.metrics.mse
        if ratio >= 1:
            text = (f"All-steps MSE {ratio:.2f}× lower than the mean trajectory's: the simulator knows more "
                    "than how training goes on average.")
        else:
            text = (f"All-steps MSE {1 / ratio:.2f}× higher than the mean trajectory's: the simulator does not "
                    "beat knowing how training goes on average.")
        verdict = f'<p class="verdict {"good" if ratio >= 1 else "bad"}">{text}</p>'
    return (f'{warning}<table class="metrics"><thead><tr><th>method</th>{header}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>{verdict}")


def trajectory_figure(data: ReportData, test_index: int):
    """True (solid) and simulated (dashed) loss of test example ``test_index`` on the shown runs."""
    go = _plotly().graph_objects
    runs = data.runs
    figure = go.Figure()
    steps = np.arange(runs.num_steps + 1)
    # Markers show where true losses were recorded when that was not after every step.
    mode = "lines" if runs.every_step else "lines+markers"
    for k, r in enumerate(data.shown_runs):
        colour = RUN_COLOURS[k % len(RUN_COLOURS)]
        run_id = html.escape(str(runs.run_ids[r]))
        figure.add_scatter(x=runs.eval_steps, y=runs.losses[r, :, test_index], name=f"{run_id} true", mode=mode,
                           legendgroup=run_id, line={"color": colour, "width": 2.5},
                           hovertemplate=f"{run_id} true<br>step %{{x}}: %{{y:.4g}}<extra></extra>")
        if data.interval is not None:
            lower, upper = (band[r, :, test_index] for band in data.interval)
            figure.add_scatter(x=np.concatenate([steps, steps[::-1]]), y=np.concatenate([upper, lower[::-1]]),
                               fill="toself", fillcolor=colour, opacity=0.15, line={"width": 0},
                               name=f"{run_id} {INTERVAL_LEVEL:.0%} interval", legendgroup=run_id, hoverinfo="skip")
        figure.add_scatter(x=steps, y=data.predicted[r, :, test_index], name=f"{run_id} simulated",
                           legendgroup=run_id, line={"color": colour, "width": 1.8, "dash": "dash"},
                           hovertemplate=f"{run_id} simulated<br>step %{{x}}: %{{y:.4g}}<extra></extra>")
    figure.update_layout(template="plotly_white", height=330, margin={"l": 60, "r": 20, "t": 20, "b": 50},
                         legend={"orientation": "h", "y": -0.22, "font": {"size": 11}},
                         xaxis_title="training step", yaxis={"title": "test loss", "tickformat": ".3~g"})
    return figure


def _leading_order(matrix: np.ndarray, axis: int) -> np.ndarray:
    """Order of rows (axis 0) or columns (axis 1) along the leading singular vector.

    Examples with similar influence patterns get similar coordinates, so blocks (e.g. a
    class helping its own class) show up as blocks instead of noise.
    """
    if not np.any(matrix):
        return np.arange(matrix.shape[axis])
    u, _, vt = np.linalg.svd(matrix, full_matrices=False)
    vector = u[:, 0] if axis == 0 else vt[0]
    return np.argsort(vector, kind="stable")


def heatmap_figure(data: ReportData):
    """Influence heat map: test examples (rows) × training examples (columns), with a note on what is left out."""
    go = _plotly().graph_objects
    influence = data.influence
    filled = np.nan_to_num(influence, nan=0.0)
    train = np.argsort(-np.abs(filled).mean(axis=1), kind="stable")[:MAX_HEATMAP_TRAIN]
    test = np.argsort(-np.abs(filled).mean(axis=0), kind="stable")[:MAX_HEATMAP_TEST]
    block = filled[np.ix_(train, test)]
    train = train[_leading_order(block, 0)]
    test = test[_leading_order(block, 1)]
    z = influence[np.ix_(train, test)].T
    finite = np.abs(z[np.isfinite(z)])
    limit = float(np.percentile(finite, 99)) if finite.size and finite.max() > 0 else 1.0
    figure = go.Figure(go.Heatmap(
        z=z, x=_escape_all(data.runs.train_ids[train]), y=_escape_all(data.runs.test_ids[test]),
        colorscale=EFFECT_COLORMAP, zmid=0.0, zmin=-limit, zmax=limit, hoverongaps=False,
        colorbar={"title": {"text": "influence<br>(loss units)", "side": "right"}, "thickness": 14},
        hovertemplate="training %{x}<br>test %{y}<br>influence %{z:.3g}<extra></extra>"))
    figure.update_layout(template="plotly_white", height=int(min(900, max(360, 4 * test.size + 140))),
                         margin={"l": 60, "r": 20, "t": 10, "b": 50}, plot_bgcolor="#d9d9d9",
                         xaxis={"title": f"training example ({train.size} shown)", "showticklabels": False},
                         yaxis={"title": f"test example ({test.size} shown)", "showticklabels": False})
    left_out = []
    if train.size < influence.shape[0]:
        left_out.append(f"{train.size} of {influence.shape[0]} training examples")
    if test.size < influence.shape[1]:
        left_out.append(f"{test.size} of {influence.shape[1]} test examples")
    note = f" Shown: the {' and '.join(left_out)} with the largest mean |influence|." if left_out else ""
    return figure, note


def ranked_table(data: ReportData, views: ExampleViews, pairs: list[tuple[int, float]], kind: str) -> str:
    """HTML table of ``(training index, influence)`` ``pairs`` in rank order (``kind``: a CSS class)."""
    if not pairs:
        return f'<p class="empty">No {kind} training example in the held-out curricula.</p>'
    rows = []
    for rank, (i, value) in enumerate(pairs, start=1):
        runs_holding = int(data.influence_runs[i])
        rows.append(f'<tr><td class="rank">{rank}</td><td>{views.html("train", i)}</td>'
                    f'<td class="num {kind}">{_number(value, signed=True)}</td>'
                    f'<td class="num muted">{runs_holding}/{data.runs.num_runs}</td></tr>')
    return (f'<table class="ranked"><thead><tr><th>#</th><th>training example</th><th>influence</th>'
            f'<th title="held-out runs whose curriculum holds the example">runs</th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def _figure_html(figure, div_id: str) -> str:
    height = figure.layout.height
    return _plotly().io.to_html(figure, full_html=False, include_plotlyjs=False, div_id=div_id,
                                default_height=f"{height}px", config=PLOT_CONFIG)


def example_section(data: ReportData, views: ExampleViews, position: int) -> str:
    """HTML section of test example ``data.examples[position]``: facts, trajectories, ranked examples."""
    m = int(data.examples[position])
    runs = data.runs
    per_example = data.evaluation.metrics.per_example
    facts = [("loss before training", runs.losses[:, 0, m].mean()),
             ("true final loss", runs.losses[:, -1, m].mean()),
             ("simulated final loss", data.predicted[:, -1, m].mean()),
             ("MSE over steps", per_example["mse"][m]),
             ("across-run Spearman", per_example["across_run_spearman"][m])]
    facts_html = "".join(f"<dt>{html.escape(name)}</dt><dd>{_number(float(value))}</dd>" for name, value in facts)
    ranked = data.ranked[position]
    band_caption = "" if data.interval is None else \
        f" Shaded: the simulator's {INTERVAL_LEVEL:.0%} prediction interval."
    return f"""
<section class="card example-card" id="example-{position}">
  <h3>Test example {views.id_html("test", m)}</h3>
  <div class="example-head">
    <div class="example-view">{views.content_html("test", m)}</div>
    <dl class="facts">{facts_html}</dl>
  </div>
  <p class="caption">Facts: means over the {runs.num_runs} held-out runs. Plot: {len(data.shown_runs)} of them, each
  in its own colour. Solid: true loss; dashed: simulated from the same loss before training and the same
  curriculum.{band_caption} Legend entries toggle lines.</p>
  <div class="plot" data-plot="trajectory">{_figure_html(trajectory_figure(data, m), f"trajectory-{position}")}</div>
  <div class="ranked-pair">
    <div><h4 class="helpful">Most helpful</h4>{ranked_table(data, views, ranked.helpful, "helpful")}</div>
    <div><h4 class="harmful">Most harmful</h4>{ranked_table(data, views, ranked.harmful, "harmful")}</div>
  </div>
</section>"""


def _describe(data: ReportData) -> list[tuple[str, str]]:
    meta = data.runs.meta
    fit = data.fit_info
    facts = [("simulator", data.evaluation.method)]
    if meta.get("task"):
        facts.append(("task", str(meta["task"])))
    if "learning_rate" in meta:
        facts.append(("learning rate", str(meta["learning_rate"])))
    if fit.get("num_runs"):
        facts.append(("fitted on", f"{fit['num_runs']} runs of {fit.get('num_steps', '?')} steps"))
    if fit.get("ridge") is not None:
        facts.append(("ridge", _number(float(fit["ridge"]))))
    runs = data.runs
    facts.append(("held-out runs", f"{runs.num_runs} of {runs.num_steps} steps, batch {runs.batch_size}"))
    facts.append(("examples", f"{runs.num_train} training, {runs.num_test} test"))
    return facts


def render_report(data: ReportData, views: ExampleViews, title: str | None = None) -> str:
    """The complete HTML page as a string."""
    plotly = _plotly()
    title = title or f"simfluence report: {data.evaluation.method}" + (
        f" on {data.runs.meta['task']}" if data.runs.meta.get("task") else "")
    facts = "".join(f"<div><dt>{html.escape(name)}</dt><dd>{html.escape(value)}</dd></div>"
                    for name, value in _describe(data))
    note = f'<p class="notice">{html.escape(views.note)}.</p>' if views.note else ""
    heatmap, left_out = heatmap_figure(data)
    never = int((data.influence_runs == 0).sum())
    never_note = f" {never} training examples are in no held-out curriculum (grey)." if never else ""
    sections = "".join(example_section(data, views, k) for k in range(len(data.examples)))
    toc = "".join(f'<li><a href="#example-{k}">{views.id_html("test", int(m))}</a></li>'
                  for k, m in enumerate(data.examples))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="simfluence">
<title>{html.escape(title)}</title>
<style>{STYLE}</style>
<script>window.PlotlyConfig = {{MathJaxConfig: "local"}};</script>
<script>{plotly.offline.get_plotlyjs()}</script>
</head>
<body>
<header>
  <h1>{html.escape(title)}</h1>
  <dl class="summary">{facts}</dl>
  {note}
</header>
<main>
<section class="card" id="metrics">
  <h2>Accuracy on held-out runs</h2>
  <p class="caption">Each held-out run is simulated from its true loss before training along its own curriculum and
  compared with the losses recorded in training. The baselines know nothing about the curriculum: the
  <em>mean trajectory</em> of the fitting runs and the <em>constant</em> loss before training. Lower is better for
  the errors, higher for the Spearman correlations (final: across test examples within a run; across-run: across
  runs for one test example, i.e. whether the simulator knows which curriculum helps it).</p>
  {metrics_table(data)}
</section>
<section class="card" id="influence">
  <h2>Influence of training examples on test examples</h2>
  <p class="caption">Cell (test <i>m</i>, training <i>i</i>): simulated final loss of <i>m</i> without <i>i</i>
  minus with <i>i</i>, averaged over the held-out curricula that contain <i>i</i>. {html.escape(EFFECT_LEGEND)}.
  Rows and columns are ordered by the leading singular vectors, so examples with similar
  influence sit together.{never_note}{left_out} Hover for ids; drag to zoom, double-click to reset.</p>
  <div class="plot" data-plot="heatmap">{_figure_html(heatmap, "influence-heatmap")}</div>
</section>
<section class="card" id="examples-intro">
  <h2>Test examples in detail</h2>
  <p class="caption">Trajectories on held-out runs and the training examples with the largest influence (as in
  the heat map) on each test example.</p>
  <ul class="toc">{toc}</ul>
</section>
{sections}
</main>
<footer>Written by simfluence. Self-contained: opens without a network connection.</footer>
</body>
</html>
"""


def write_report(simulator: Simulator, heldout_runs: RunSet, path: str | os.PathLike, *, test_ids=None,
                 num_examples: int = DEFAULT_EXAMPLES, num_runs: int = DEFAULT_RUNS, top: int = DEFAULT_TOP,
                 use_task_data: bool = True, task: Any = None, title: str | None = None,
                 source: str = "<held-out runs>", progress: bool = True) -> Path:
    """Write the HTML report of ``simulator`` on ``heldout_runs`` to ``path`` (atomically).

    Args:
        simulator: a fitted simulator.
        heldout_runs: runs it was not fitted on (same training and test ids); runs it was
            fitted on give a warning, in Python and on the page.
        path: the ``.html`` file to write.
        test_ids: test example ids to show in detail; default ``num_examples`` spread over
            difficulty (mean true final loss).
        num_examples: how many test examples to show when ``test_ids`` is not given.
        num_runs: held-out runs whose trajectories are plotted.
        top: helpful and harmful training examples listed per test example.
        use_task_data: show examples' text or images from the task in the runs' meta
            (or ``task``), where it can be built here; False: ids only.
        task: a :class:`~simfluence.tasks.Task` to render examples with, for
            tasks that are not registered by name.
        title: the page title (default ``simfluence report: <method>``).
        source: names the held-out runs in messages.
        progress: progress bars (only on a terminal).
    """
    data = build_report_data(simulator, heldout_runs, test_ids, num_examples, num_runs, top, source, progress)
    views = example_views(heldout_runs, use_task_data, task)
    path = Path(path)
    write_text_atomic(path, render_report(data, views, title))
    return path


STYLE = """
:root { --ink: #1d232b; --muted: #5f6b7a; --line: #e2e6eb; --bg: #f5f7fa; --card: #fff;
        --accent: #2b5c9e; --good: #1f6f43; --bad: #a1282d; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
header { background: #1f2a38; color: #f3f6fa; padding: 22px 32px 18px; }
header h1 { margin: 0 0 10px; font-size: 22px; font-weight: 600; }
dl.summary { display: flex; flex-wrap: wrap; gap: 6px 28px; margin: 0; }
dl.summary div { display: flex; gap: 6px; }
dl.summary dt { color: #a9b6c6; }
dl.summary dd { margin: 0; font-weight: 500; }
.notice { background: #fff4d6; color: #5b4300; border-radius: 6px; padding: 6px 12px; margin: 12px 0 0;
          display: inline-block; }
main { max-width: 1180px; margin: 0 auto; padding: 20px 24px 8px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 18px 22px;
        margin: 0 0 20px; box-shadow: 0 1px 2px rgba(20, 30, 50, .05); }
h2 { font-size: 18px; margin: 0 0 6px; }
h3 { font-size: 16px; margin: 0 0 10px; }
h4 { font-size: 14px; margin: 6px 0; }
.caption { color: var(--muted); font-size: 13.5px; margin: 0 0 12px; max-width: 95ch; }
table { border-collapse: collapse; font-size: 14px; }
table.metrics { width: 100%; }
table.metrics th, table.metrics td { padding: 7px 12px; border-bottom: 1px solid var(--line); text-align: right; }
table.metrics th:first-child, table.metrics tbody th { text-align: left; }
table.metrics thead th { color: var(--muted); font-weight: 600; font-size: 13px; }
table.metrics tr.method th { color: var(--accent); }
table.metrics tr.baseline { color: var(--muted); }
td.num { font-variant-numeric: tabular-nums; text-align: right; white-space: nowrap; }
.verdict { margin: 12px 0 0; font-weight: 500; }
.verdict.good { color: var(--good); }
.verdict.bad { color: var(--bad); }
.warning { background: #fde8e8; color: var(--bad); border: 1px solid #f3b7b7; border-radius: 6px;
           padding: 8px 12px; margin: 0 0 12px; font-weight: 600; }
.plot { width: 100%; }
.example-head { display: flex; gap: 24px; align-items: flex-start; margin-bottom: 8px; }
.example-view:empty { display: none; }
.example-view { max-width: 60%; }
dl.facts { display: grid; grid-template-columns: auto auto; gap: 2px 14px; margin: 0; font-size: 13.5px; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; font-variant-numeric: tabular-nums; }
.ranked-pair { display: grid; grid-template-columns: 1fr 1fr; gap: 24px; margin-top: 6px; }
@media (max-width: 800px) { .ranked-pair { grid-template-columns: 1fr; } }
h4.helpful { color: #2166ac; }
h4.harmful { color: #b2182b; }
table.ranked { width: 100%; }
table.ranked th { text-align: left; color: var(--muted); font-weight: 600; font-size: 12.5px;
                  border-bottom: 1px solid var(--line); padding: 4px 8px; }
table.ranked td { border-bottom: 1px solid var(--line); padding: 5px 8px; vertical-align: middle; }
td.rank { color: var(--muted); width: 2em; }
td.helpful { color: #2166ac; font-weight: 600; }
td.harmful { color: #b2182b; font-weight: 600; }
td.muted { color: var(--muted); }
.example { display: inline-flex; align-items: center; gap: 10px; }
.example:has(.ex-text) { flex-direction: column; align-items: flex-start; gap: 2px; }
.ex-image { image-rendering: pixelated; border: 1px solid var(--line); border-radius: 3px; background: #fff; }
.ex-text { font-size: 14px; }
code.ex-id { font: 12px ui-monospace, "DejaVu Sans Mono", monospace; color: var(--muted); background: #f0f2f5;
             padding: 1px 5px; border-radius: 4px; white-space: nowrap; }
h3 code.ex-id { font-size: 14px; color: var(--ink); }
.example-view .ex-text { font-size: 16px; }
.example-view .ex-image { width: 96px; height: 96px; }
.empty { color: var(--muted); font-style: italic; }
ul.toc { display: flex; flex-wrap: wrap; gap: 8px 16px; list-style: none; padding: 0; margin: 0; }
ul.toc a { text-decoration: none; }
footer { text-align: center; color: var(--muted); font-size: 12.5px; padding: 8px 0 24px; }
"""

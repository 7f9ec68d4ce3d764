"""Every picture tells one story: helped is blue everywhere, titles and legends name ids, nothing covers data."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import to_rgb

from simfluence.query import influence_over_time, whatif
from simfluence.report.data import build_report_data
from simfluence.report.page import PLOT_CONFIG, heatmap_figure
from simfluence.report.static import influence_over_time_figure, whatif_figure
from simfluence.simulators import AdditiveSimulator
from synthetic import linear_runs


@pytest.fixture(scope="module")
def fitted():
    runs = linear_runs(num_train=12, num_test=4, num_runs=16, num_steps=10, batch=2, seed=4)[0]
    runs = runs.__class__.create(runs.curricula, runs.losses, np.array([f"img-{i:03d}" for i in range(12)]),
                                 np.array([f"probe-{m}" for m in range(4)]), run_ids=runs.run_ids)
    return runs, AdditiveSimulator(ridge=0.01).fit(runs)


def _blueness(rgb) -> float:
    red, _, blue = rgb[:3]
    return blue - red


def _plotly_colour_at(colorscale, position: float):
    from plotly.colors import sample_colorscale

    from plotly.colors import unlabel_rgb

    value = sample_colorscale([list(pair) for pair in colorscale], [position])[0]
    return tuple(channel / 255 for channel in unlabel_rgb(value))


@pytest.mark.filterwarnings("ignore:.*were also fitting runs")
def test_helpful_is_blue_in_the_png_and_in_the_report(fitted):
    runs, simulator = fitted
    result = influence_over_time(simulator, runs.curricula[0], runs.initial_losses[0])
    figure = influence_over_time_figure(result, simulator.train_ids)
    image = figure.axes[0].images[0]
    helped_png = image.cmap(image.norm(image.norm.vmax))               # the most positive effect
    hurt_png = image.cmap(image.norm(image.norm.vmin))
    plt.close(figure)
    assert _blueness(helped_png) > 0.2 and _blueness(hurt_png) < -0.2

    data = build_report_data(simulator, runs, num_examples=2, num_runs=2)
    heatmap, _ = heatmap_figure(data)
    trace = heatmap.data[0]
    assert trace.zmid == 0 and trace.zmax == -trace.zmin
    helped_html = _plotly_colour_at(trace.colorscale, 1.0)
    hurt_html = _plotly_colour_at(trace.colorscale, 0.0)
    assert _blueness(helped_html) > 0.2 and _blueness(hurt_html) < -0.2
    # The same colour for the same effect, not just the same side.
    np.testing.assert_allclose(helped_png[:3], helped_html, atol=0.08)
    np.testing.assert_allclose(hurt_png[:3], hurt_html, atol=0.08)


def test_influence_over_time_rows_are_training_ids(fitted):
    runs, simulator = fitted
    result = influence_over_time(simulator, runs.curricula[0], runs.initial_losses[0])
    figure = influence_over_time_figure(result, simulator.train_ids)
    labels = [tick.get_text() for tick in figure.axes[0].get_yticklabels()]
    plt.close(figure)
    assert labels and all(label.startswith("img-") for label in labels)
    assert "blue" in figure.axes[0].get_title()


def test_whatif_titles_and_panels_match_what_the_command_line_prints(fitted):
    runs, simulator = fitted
    result = whatif(simulator, runs.curricula[0], runs.initial_losses[0], ["drop:3", "insert:5@2"])
    printed = np.array([2, 0])                                           # what the CLI showed, in order
    figure = whatif_figure(result, simulator.test_ids, printed, simulator.train_ids)
    visible = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title().split()[0] for ax in visible] == ["probe-2", "probe-0"]
    title = figure._suptitle.get_text()
    assert "drop:img-003" in title and "insert:img-005@2" in title
    # The legend is the figure's, outside every panel.
    assert not any(ax.get_legend() for ax in visible) and figure.legends
    plt.close(figure)


def test_benchmark_legend_sits_beside_the_panels(fitted):
    from simfluence.benchmark import trajectories_figure

    runs, simulator = fitted
    figure = trajectories_figure(runs, {"additive": simulator.simulate(runs.curricula, runs.initial_losses)},
                                 num_examples=3)
    assert not any(ax.get_legend() for ax in figure.axes) and figure.legends
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    legend_box = figure.legends[0].get_window_extent(renderer)
    for ax in figure.axes:
        assert not legend_box.overlaps(ax.get_window_extent(renderer))
    assert all(ax.get_title().startswith("probe-") for ax in figure.axes)
    plt.close(figure)


def test_report_plots_have_no_floating_toolbar():
    assert PLOT_CONFIG["displayModeBar"] is False

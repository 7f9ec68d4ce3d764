"""The HTML report: its numbers against references computed another way, example views, escaping, CLI."""

from __future__ import annotations

import base64
import html
import io
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.image import imread
from sklearn.datasets import load_digits

from simfluence.cli import main
from simfluence.evaluate import METRICS, evaluate, split_runs
from simfluence.report import build_report_data, influence_matrix, write_report
from simfluence.report.data import rank_training_examples, spread_over_difficulty
from simfluence.report.examples import example_views
from simfluence.runs import RunDataError, RunSet
from simfluence.simulators import LinearIdentitySimulator, LinearSimulator
from simfluence.tasks import get_task
from simfluence.tasks.glosses import load_glosses
from synthetic import linear_runs

class _Page(HTMLParser):
    """The tags, attributes and text of a page, flat."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self._in_script = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag in ("script", "style")

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if not self._in_script:
            self.text.append(data)

    def find(self, tag: str, css_class: str | None = None) -> list[dict]:
        return [attrs for name, attrs in self.tags
                if name == tag and (css_class is None or css_class in (attrs.get("class") or "").split())]


# --- the numbers ----------------------------------------------------------------------
@pytest.mark.parametrize("simulator_class", [LinearIdentitySimulator, LinearSimulator])
def test_influence_matrix_matches_explicit_leave_one_out_rollouts(simulator_class):
    runs, _, _ = linear_runs(num_train=15, num_test=4, num_runs=14, num_steps=12, seed=3)
    fitting, heldout = split_runs(runs, num_heldout=4)
    simulator = simulator_class(ridge=0.1).fit(fitting)
    influence, holding = influence_matrix(simulator, heldout, progress=False)

    expected = np.full((runs.num_train, runs.num_test), np.nan)
    for i in range(runs.num_train):
        deltas = []
        for r in range(heldout.num_runs):
            curriculum = heldout.curricula[r]
            if not (curriculum == i).any():
                continue
            without = np.where(curriculum == i, -1, curriculum)
            # A step that the removal empties is skipped: training would not update on it.
            without = without[(without != -1).any(axis=1)]
            initial = heldout.initial_losses[r].astype(np.float64)
            delta = simulator.simulate(without, initial)[-1] - simulator.simulate(curriculum, initial)[-1]
            deltas.append(delta)
        if deltas:
            expected[i] = np.mean(deltas, axis=0)
        assert holding[i] == len(deltas)
    np.testing.assert_array_equal(np.isnan(influence), np.isnan(expected))
    np.testing.assert_allclose(influence, expected, rtol=1e-4, atol=1e-6, equal_nan=True)


def _true_final_loss(a: np.ndarray, b: np.ndarray, curriculum: np.ndarray, initial: np.ndarray) -> np.ndarray:
    """``L_T`` of the model that generated the synthetic runs (steps left empty are skipped)."""
    loss = initial.astype(np.float64)
    for batch in curriculum:
        batch = batch[batch >= 0]
        if batch.size:
            loss = (1.0 + a[batch].sum(axis=0)) * loss + b[batch].sum(axis=0)
    return loss


def test_influence_recovers_the_known_effects_of_the_generating_model():
    runs, a, b = linear_runs(num_train=20, num_test=5, num_runs=60, num_steps=40, noise=1e-5, seed=4)
    fitting, heldout = split_runs(runs, num_heldout=6)
    # The generating model sums its effects over a batch (no batch-mean loss): fit the same form.
    simulator = LinearIdentitySimulator(ridge=1e-3, batch_mean=False).fit(fitting)
    influence, _ = influence_matrix(simulator, heldout, progress=False)
    truth = np.zeros_like(influence)
    for i in range(runs.num_train):
        deltas = [_true_final_loss(a, b, np.where(c == i, -1, c), initial) - _true_final_loss(a, b, c, initial)
                  for c, initial in zip(heldout.curricula, heldout.initial_losses) if (c == i).any()]
        truth[i] = np.mean(deltas, axis=0)
    assert np.isfinite(influence).all()
    clear = np.abs(truth) > 0.02
    assert clear.sum() > 20
    assert (np.sign(influence[clear]) == np.sign(truth[clear])).mean() > 0.95
    assert np.corrcoef(influence.ravel(), truth.ravel())[0, 1] > 0.95


def test_spread_over_difficulty_takes_inner_quantiles():
    runs, _, _ = linear_runs(num_test=6, seed=5)
    order = np.argsort(runs.losses[:, -1].mean(axis=0), kind="stable")
    np.testing.assert_array_equal(spread_over_difficulty(runs, 3), order[[1, 3, 5]])
    np.testing.assert_array_equal(spread_over_difficulty(runs, 6), order)
    np.testing.assert_array_equal(spread_over_difficulty(runs, 50), order)


def test_ranking_splits_helpful_from_harmful_and_skips_unknown():
    influence = np.array([[0.5, 0.0], [np.nan, 1.0], [-0.2, 2.0], [0.1, -1.0], [-0.7, 0.0], [0.0, 0.0]])
    ranked = rank_training_examples(influence, 0, top=2)
    assert ranked.helpful == [(0, 0.5), (3, 0.1)]
    assert ranked.harmful == [(4, -0.7), (2, -0.2)]
    ranked = rank_training_examples(influence, 1, top=5)
    assert [i for i, _ in ranked.helpful] == [2, 1] and [i for i, _ in ranked.harmful] == [3]


def test_bad_arguments_name_the_argument(digits_fit):
    with pytest.raises(ValueError, match=r"test_ids: unknown test id 'digits-nope'"):
        build_report_data(digits_fit.simulator, digits_fit.heldout, test_ids=["digits-nope"], progress=False)
    with pytest.raises(ValueError, match="num_runs: must be a positive integer"):
        build_report_data(digits_fit.simulator, digits_fit.heldout, num_runs=0, progress=False)
    other, _, _ = linear_runs(seed=1)
    with pytest.raises(RunDataError, match="train_ids"):
        build_report_data(digits_fit.simulator, other, progress=False)


# --- the page on a real fit -------------------------------------------------------------
def test_digits_report_shows_metrics_plots_and_images(digits_fit, tmp_path):
    path = write_report(digits_fit.simulator, digits_fit.heldout, tmp_path / "report.html", num_examples=3,
                        num_runs=2, top=4, progress=False)
    text = path.read_text(encoding="utf-8")
    page = _Page(text)
    # Self-contained: nothing is loaded from elsewhere.
    assert not [attrs for _, attrs in page.tags if "src" in attrs and not attrs["src"].startswith("data:")]
    assert not page.find("link")
    assert len(page.find("div", "plot")) == 1 + 3

    # The metric table: the evaluation's numbers, to the printed precision.
    expected = evaluate(digits_fit.simulator, digits_fit.heldout)
    table = text[text.index('<table class="metrics">'):text.index("</table>")]
    cells = re.findall(r'<td class="num">(?:<b>)?([^<]+)', table)
    rows = [expected.metrics] + list(expected.baselines.values())
    values = [getattr(metrics, key) for metrics in rows for key in METRICS]
    formatted = [f"{value:.4g}" if np.isfinite(value) else "n/a" for value in values]
    assert cells == formatted

    # Each training example listed is shown as its own digit (the PNG decodes to the raw pixels).
    data = build_report_data(digits_fit.simulator, digits_fit.heldout, num_examples=3, num_runs=2, top=4,
                             progress=False)
    digits = load_digits()
    images = {attrs["alt"]: attrs["src"] for attrs in page.find("img", "ex-image")}
    listed = [digits_fit.heldout.train_ids[i] for ranked in data.ranked for i, _ in ranked.helpful + ranked.harmful]
    assert listed and set(listed) <= set(images)
    for example_id in listed[:6]:
        png = base64.b64decode(images[example_id].removeprefix("data:image/png;base64,"))
        grey = imread(io.BytesIO(png))[:, :, 0]
        reference = 1.0 - digits.images[int(example_id.removeprefix("digits-"))] / 16.0
        np.testing.assert_allclose(grey, reference, atol=1 / 255 + 1e-6)
    # The helpful list of the first test example, in order.
    first = text[text.index('id="example-0"'):text.index('id="example-1"')]
    helpful = first[first.index("Most helpful"):first.index("Most harmful")]
    shown = re.findall(r'<code class="ex-id">([^<]+)</code>', helpful)
    assert shown == [digits_fit.heldout.train_ids[i] for i, _ in data.ranked[0].helpful]


def test_example_views_come_from_the_task_or_fall_back_to_ids(digits_fit):
    views = example_views(digits_fit.heldout)
    assert views.task is not None and not views.note
    assert views.content_html("train", 0).startswith('<img class="ex-image" src="data:image/png;base64,')
    assert example_views(digits_fit.heldout, use_task_data=False).content_html("train", 0) == ""

    synthetic, _, _ = linear_runs(seed=2)
    views = example_views(synthetic)
    assert views.task is None and "task 'synthetic-linear' could not be loaded" in views.note
    other_ids = RunSet.create(digits_fit.heldout.curricula, digits_fit.heldout.losses,
                              [f"x{i}" for i in range(digits_fit.heldout.num_train)], digits_fit.heldout.test_ids,
                              meta=digits_fit.heldout.meta)
    assert "other example ids" in example_views(other_ids).note


def test_text_tasks_describe_examples_by_their_text():
    glosses = load_glosses()
    row_of = {synset: row for row, synset in enumerate(glosses.ids)}
    text = get_task("text-minilm")
    for split in ("train", "test"):
        ids = text.train_ids if split == "train" else text.test_ids
        for k in (0, len(ids) - 1):
            assert text.describe_example(split, k) == glosses.definitions[row_of[ids[k]]]
    lm = get_task("tiny-lm")
    for split, ids in (("train", lm.train_ids), ("test", lm.test_ids)):
        for k in range(0, len(ids), 7):
            decoded = lm.describe_example(split, k)
            # Uncased WordPiece: lower case, and punctuation comes back as separate tokens.
            assert decoded.replace(" ", "") == glosses.definitions[row_of[ids[k]]].lower().replace(" ", "")
    with pytest.raises(ValueError, match="split: expected 'train' or 'test'"):
        lm.describe_example("validation", 0)


def test_user_data_is_escaped(hostile, tmp_path):
    fitting, heldout = split_runs(hostile.runs, num_heldout=3)
    simulator = LinearIdentitySimulator(ridge=0.1).fit(fitting)
    text = write_report(simulator, heldout, tmp_path / "r.html", test_ids=[hostile.test_id], top=12,
                        progress=False).read_text(encoding="utf-8")
    assert hostile.train_id not in text and hostile.test_id not in text
    assert html.escape(hostile.train_id) in text and html.escape(hostile.test_id) in text
    page = _Page(text)
    assert sum(tag == "script" for tag, _ in page.tags) == 2 + 1 + 1   # config, plotly.js, heat map, 1 trajectory
    assert not page.find("img")
    assert hostile.test_id in "".join(page.text)


def test_simulators_with_intervals_get_a_band_around_their_trajectories(tmp_path):
    from simfluence.simulators import make_simulator

    runs, _, _ = linear_runs(num_train=12, num_test=5, num_runs=16, num_steps=15, seed=3)
    fitting, heldout = split_runs(runs, num_heldout=4)
    simulator = make_simulator("linear-bootstrap", replicas=8, ridge=0.1).fit(fitting)
    data = build_report_data(simulator, heldout, num_examples=1, progress=False)
    lower, upper = data.interval
    assert lower.shape == upper.shape == data.predicted.shape
    assert (lower <= data.predicted + 1e-6).all() and (data.predicted <= upper + 1e-6).all() and (upper > lower).any()
    text = write_report(simulator, heldout, tmp_path / "r.html", num_examples=1, progress=False).read_text("utf-8")
    assert "90% interval" in text and "90% prediction interval" in text
    plain = LinearIdentitySimulator(ridge=0.1).fit(fitting)
    assert build_report_data(plain, heldout, num_examples=1, progress=False).interval is None


# --- the command ------------------------------------------------------------------------
def test_cli_report(digits_fit, tmp_path):
    runner = CliRunner()
    chosen = list(digits_fit.heldout.test_ids[[5, 17]])
    out = tmp_path / "report.html"
    result = runner.invoke(main, ["report", str(digits_fit.model_path), str(digits_fit.heldout_path), "--out",
                                  str(out), "--test", chosen[0], "--test", chosen[1], "--runs", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    text = out.read_text(encoding="utf-8")
    assert [re.search(r'id="example-%d">\s*<h3>Test example <code class="ex-id">([^<]+)' % k, text).group(1)
            for k in range(2)] == chosen
    assert '<img class="ex-image"' in text

    result = runner.invoke(main, ["report", str(digits_fit.model_path), str(digits_fit.heldout_path), "--out",
                                  str(tmp_path / "ids.html"), "--no-task-data", "--quiet"])
    assert result.exit_code == 0, result.output
    assert '<img class="ex-image"' not in (tmp_path / "ids.html").read_text(encoding="utf-8")

    result = runner.invoke(main, ["report", str(digits_fit.model_path), str(digits_fit.heldout_path), "--out",
                                  str(tmp_path / "bad.html"), "--test", "digits-nope"])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "--test" in result.output and "digits-nope" in result.output
    assert not (tmp_path / "bad.html").exists()

"""Evaluating on runs a simulator was fitted on warns: they are not held out."""

import warnings

import numpy as np
import pytest

from simfluence import RunSet, load_runs, save_runs
from simfluence.evaluate import evaluate, split_runs
from simfluence.report import build_report_data, write_report
from simfluence.simulators import LinearIdentitySimulator, MeanTrajectorySimulator, Simulator
from simfluence.simulators.base import run_digests
from synthetic import linear_runs

NOTE = "were also fitting runs"


@pytest.fixture
def split():
    runs, _, _ = linear_runs(num_train=12, num_test=5, num_runs=12, num_steps=15, seed=7)
    fitting, heldout = split_runs(runs, num_heldout=4)
    return runs, fitting, heldout, LinearIdentitySimulator(ridge=0.1).fit(fitting)


def evaluate_quietly(simulator, runs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        return evaluate(simulator, runs)


def test_evaluating_on_the_fitting_runs_warns_and_says_so_in_the_table(split):
    runs, fitting, heldout, simulator = split
    with pytest.warns(UserWarning, match=f"8 of 8 held-out runs {NOTE}"):
        result = evaluate(simulator, fitting)
    assert result.fitting_runs == 8 and result.as_dict()["heldout_fitting_runs"] == 8
    assert f"WARNING: 8 of 8 held-out runs {NOTE}" in result.table()
    with pytest.warns(UserWarning, match=f"8 of 12 held-out runs {NOTE}"):  # the whole store
        assert f"8 of 12 held-out runs {NOTE}" in evaluate(simulator, runs).table()


def test_disjoint_runs_give_no_warning(split):
    _, _, heldout, simulator = split
    result = evaluate_quietly(simulator, heldout)
    assert result.fitting_runs == 0 and NOTE not in result.table()


def test_digests_survive_save_load_and_match_reloaded_runs(split, tmp_path):
    runs, fitting, heldout, simulator = split
    assert simulator.fit_digests.shape == (8,) and set(simulator.fit_digests) == set(run_digests(fitting))
    loaded = Simulator.load(simulator.save(tmp_path / "model.npz"))
    assert np.array_equal(loaded.fit_digests, simulator.fit_digests)
    save_runs(runs, tmp_path / "store")
    with pytest.warns(UserWarning, match=f"8 of 12 held-out runs {NOTE}"):
        evaluate(loaded, load_runs(tmp_path / "store"))
    assert evaluate_quietly(loaded, heldout).fitting_runs == 0


def test_digest_is_the_runs_content_not_its_id_or_padding(split):
    runs = split[0]
    padded = np.concatenate([runs.curricula, np.full(runs.curricula.shape[:2] + (2,), -1)], axis=2)
    renamed = RunSet.create(padded, runs.losses, runs.train_ids, runs.test_ids,
                            run_ids=[f"other-{r}" for r in range(runs.num_runs)])
    assert np.array_equal(run_digests(renamed), run_digests(runs))
    assert np.unique(run_digests(runs)).size == runs.num_runs
    changed = runs.losses.copy()
    changed[0, 0, 0] += 1e-3
    edited = RunSet.create(runs.curricula, changed, runs.train_ids, runs.test_ids)
    assert (run_digests(edited) != run_digests(runs)).tolist() == [True] + [False] * (runs.num_runs - 1)


def test_a_simulator_saved_without_digests_is_not_flagged(split, tmp_path):
    _, fitting, _, _ = split
    simulator = MeanTrajectorySimulator().fit(fitting)
    simulator.fit_digests = None  # as in files saved before digests were recorded
    loaded = Simulator.load(simulator.save(tmp_path / "old.npz"))
    assert loaded.fit_digests is None
    assert evaluate_quietly(loaded, fitting).fitting_runs is None


def test_report_on_fitting_runs_shows_the_warning(split, tmp_path):
    _, fitting, heldout, simulator = split
    with pytest.warns(UserWarning, match=NOTE):
        data = build_report_data(simulator, fitting, num_examples=1, progress=False)
    assert data.evaluation.fitting_runs == 8
    with pytest.warns(UserWarning, match=NOTE):
        text = write_report(simulator, fitting, tmp_path / "r.html", num_examples=1, use_task_data=False,
                            progress=False).read_text("utf-8")
    assert f'<p class="warning" role="alert">Warning: 8 of 8 held-out runs {NOTE}' in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clean = write_report(simulator, heldout, tmp_path / "h.html", num_examples=1, use_task_data=False,
                             progress=False).read_text("utf-8")
    assert NOTE not in clean

import json

import numpy as np
import pytest
from click.testing import CliRunner

from simfluence.cli import main
from simfluence.runs import save_runs

from synthetic import linear_runs


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_split_fit_evaluate_simulate(tmp_path):
    runs, _, _ = linear_runs(num_runs=14, seed=1)
    save_runs(runs, tmp_path / "store")
    result = invoke("split", tmp_path / "store", "--heldout", 4, "--seed", 1, "--out-dir", tmp_path)
    assert result.exit_code == 0, result.output
    for method in ("linear", "linear-identity", "additive", "mean-trajectory", "constant"):
        result = invoke("fit", tmp_path / "store-train.npz", "--method", method, "--out", tmp_path / f"{method}.npz")
        assert result.exit_code == 0, result.output
    result = invoke("evaluate", tmp_path / "linear-identity.npz", tmp_path / "store-heldout.npz", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["num_runs"] == 4 and record["mse"] < record["baseline_mean_trajectory_mse"]
    table = invoke("evaluate", tmp_path / "linear.npz", tmp_path / "store-heldout.npz").output
    assert "all-steps MSE" in table and "constant (baseline)" in table
    result = invoke("simulate", tmp_path / "additive.npz", tmp_path / "store-heldout.npz", "--out", tmp_path / "t.npz")
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "t.npz") as out:
        assert out["trajectories"].shape == (4, runs.num_steps + 1, runs.num_test)


def test_fit_with_explicit_ridge_and_bad_input(tmp_path):
    runs, _, _ = linear_runs(seed=2)
    save_runs(runs, tmp_path / "runs.npz")
    result = invoke("fit", tmp_path / "runs.npz", "--method", "linear", "--ridge", 0.5, "--out", tmp_path / "m.npz")
    assert result.exit_code == 0 and "ridge 0.5" in result.output and "{" not in result.output
    assert len(result.output.strip().splitlines()) == 2
    result = invoke("fit", tmp_path / "runs.npz", "--method", "linear", "--ridge", 0.5, "--out", tmp_path / "m.npz",
                    "--json")
    assert result.exit_code == 0 and json.loads(result.output)["ridge"] == 0.5
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    result = invoke("fit", tmp_path / "broken.npz", "--out", tmp_path / "x.npz")
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "broken.npz" in result.output
    np.savez(tmp_path / "nocur.npz", initial_losses=np.zeros((1, runs.num_test)))
    result = invoke("simulate", tmp_path / "m.npz", tmp_path / "nocur.npz", "--out", tmp_path / "t.npz")
    assert result.exit_code == 2 and "field 'curricula': is missing" in result.output
    result = invoke("split", tmp_path / "runs.npz", "--heldout", 99)
    assert result.exit_code == 2 and "--heldout" in result.output
    result = invoke("fit", tmp_path / "runs.npz", "--method", "constant", "--ridge", 0.5, "--out", tmp_path / "c.npz")
    assert result.exit_code == 2 and "--ridge: 'constant' has no ridge strength" in result.output
    result = invoke("fit", tmp_path / "runs.npz", "--method", "linear", "--checkpoints", tmp_path, "--out", tmp_path / "c.npz")
    assert result.exit_code == 2 and "--checkpoints: 'linear' reads no checkpoints; gradient-trajectory, tracin-cp" in result.output


def test_benchmark_quick_on_digits_writes_every_method(tmp_path):
    """Acceptance: `simfluence benchmark digits-mlp --quick` holds every method in its JSON."""
    from simfluence.benchmark import ALL_METHODS

    result = invoke("benchmark", "digits-mlp", "--quick", "--out", tmp_path / "bench")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    assert [row["method"] for row in record["methods"]] == list(ALL_METHODS)
    assert all(row["fit_seconds"] >= 0 and row["mse"] is not None for row in record["methods"])
    assert {row["num_runs"] for row in record["data_efficiency"]} == {4, 8, 16}
    assert (tmp_path / "bench" / "trajectories.png").stat().st_size > 10_000
    assert "| linear-identity |" in (tmp_path / "bench" / "benchmark.md").read_text()


def test_tasks_lists_builtin_tasks():
    result = invoke("tasks")
    assert result.exit_code == 0 and "digits-mlp" in result.output


def test_ids_lists_the_ids_queries_take(tmp_path):
    runs, _, _ = linear_runs(num_runs=6, seed=4)
    save_runs(runs, tmp_path / "runs.npz")
    assert invoke("fit", tmp_path / "runs.npz", "--method", "additive", "--out", tmp_path / "m.npz").exit_code == 0
    for source in ("m.npz", "runs.npz"):
        result = invoke("ids", tmp_path / source, "--split", "train", "--head", 3)
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        assert [line.split()[1] for line in lines[:3]] == list(runs.train_ids[:3])
        assert lines[3] == f"... {runs.num_train - 3} more train ids (--head 0 lists all)"
    result = invoke("ids", tmp_path / "m.npz", "--head", 0)
    assert [line.split()[1] for line in result.output.splitlines()] == list(runs.test_ids)
    # The listed id works in a query.
    result = invoke("attribute", tmp_path / "m.npz", "--curriculum", tmp_path / "runs.npz", "--test",
                    runs.test_ids[1], "--top", 2)
    assert result.exit_code == 0, result.output


def test_query_commands_print_json_on_request(tmp_path):
    runs, _, _ = linear_runs(num_runs=8, seed=5)
    save_runs(runs, tmp_path / "runs.npz")
    assert invoke("fit", tmp_path / "runs.npz", "--method", "additive", "--out", tmp_path / "m.npz").exit_code == 0
    model, curriculum = tmp_path / "m.npz", tmp_path / "runs.npz"
    first = runs.curricula[0][0, 0]
    result = invoke("whatif", model, "--curriculum", curriculum, "--edit", f"drop:{runs.train_ids[first]}",
                    "--test", runs.test_ids[0], "--json", "--plot", tmp_path / "w.png")
    record = json.loads(result.output)
    assert record["tests"][0]["test_id"] == runs.test_ids[0] and record["plot"].endswith("w.png")
    assert record["tests"][0]["final_change"] == pytest.approx(record["tests"][0]["after"][-1]
                                                               - record["tests"][0]["before"][-1], abs=1e-5)
    result = invoke("influence-over-time", model, "--curriculum", curriculum, "--test", runs.test_ids[1],
                    "--top", 3, "--json")
    assert [set(m) for m in json.loads(result.output)["moments"]] == [{"step", "train_id", "final_delta"}] * 3
    result = invoke("optimize", model, "--test-set", runs.test_ids[0], "--budget", 3, "--steps", 4,
                    "--initial", curriculum, "--random", 10, "--json")
    record = json.loads(result.output)
    assert len(record["order"]) == 3 and record["objective"] <= record["random_best"] + 1e-6


def test_simulate_accepts_every_source_the_queries_accept(tmp_path):
    runs, _, _ = linear_runs(num_runs=6, seed=6)
    save_runs(runs, tmp_path / "runs.npz")
    save_runs(runs, tmp_path / "store")
    assert invoke("fit", tmp_path / "runs.npz", "--method", "additive", "--out", tmp_path / "m.npz").exit_code == 0
    expected = None
    for source in ("runs.npz", "store"):
        result = invoke("simulate", tmp_path / "m.npz", tmp_path / source, "--out", tmp_path / "t.npz")
        assert result.exit_code == 0, result.output
        with np.load(tmp_path / "t.npz") as out:
            if expected is None:
                expected = out["trajectories"]
            np.testing.assert_array_equal(out["trajectories"], expected)
    np.savez(tmp_path / "one.npz", curriculum=runs.curricula[2], initial_losses=runs.initial_losses[2])
    result = invoke("simulate", tmp_path / "m.npz", tmp_path / "one.npz", "--out", tmp_path / "t1.npz")
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "t1.npz") as out:
        np.testing.assert_allclose(out["trajectories"][0], expected[2], rtol=1e-6)


def test_only_simfluence_errors_become_one_line_messages(tmp_path, monkeypatch):
    """A user error is one line and status 2; any other exception is a bug and keeps its traceback."""
    import simfluence.evaluate
    from simfluence.errors import UsageError

    runs, _, _ = linear_runs(num_runs=6)
    save_runs(runs, tmp_path / "runs.npz")
    args = ("split", tmp_path / "runs.npz", "--heldout", 2, "--out-dir", tmp_path / "split")

    def user_error(*_, **__):
        raise UsageError("num_heldout: must be between 1 and 5")

    monkeypatch.setattr(simfluence.evaluate, "split_runs", user_error)
    result = invoke(*args)
    assert result.exit_code == 2 and result.output == "error: --heldout: must be between 1 and 5\n"

    def bug(*_, **__):
        raise ValueError("an internal bug")

    monkeypatch.setattr(simfluence.evaluate, "split_runs", bug)
    result = invoke(*args)
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)
    assert "an internal bug" in str(result.exception) and "error:" not in result.output


def test_benchmark_refuses_replaying_methods_on_a_trainer_task_before_collecting(tmp_path):
    from simfluence.benchmark import BenchmarkConfig, run_benchmark, sgd_replaying
    from simfluence.errors import UsageError

    assert set(sgd_replaying(["linear", "tracin-cp", "featurized", "hybrid"])) == {"tracin-cp", "featurized", "hybrid"}
    assert sgd_replaying(["gradient-trajectory"]) == []   # the starting model, or a replay through the Trainer
    with pytest.raises(UsageError, match=r"Hugging Face Trainer, which \['tracin-cp'\] cannot replay"):
        run_benchmark(BenchmarkConfig(task="minilm-finetune", out_dir=str(tmp_path / "b"),
                                      methods=("linear", "tracin-cp")), progress=False)
    assert not (tmp_path / "b").exists()


def test_fit_by_default_on_runs_without_a_task_lists_the_skipped_candidates(tmp_path):
    runs, _, _ = linear_runs(num_runs=12, num_steps=20, seed=1)   # meta names no registered task
    save_runs(runs, tmp_path / "runs.npz")
    result = invoke("fit", tmp_path / "runs.npz", "--out", tmp_path / "m.npz")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    skipped = [line for line in lines if line.lstrip().startswith("gradient-trajectory")]
    assert len(skipped) == 1 and "skipped: needs the task" in skipped[0]
    assert any(line.startswith("chose ") for line in lines) and (tmp_path / "m.npz").exists()
    result = invoke("fit", tmp_path / "runs.npz", "--out", tmp_path / "m.npz", "--json")
    assert result.exit_code == 0 and "NaN" not in result.output         # strict JSON: the baseline ranks nothing
    table = {row["method"]: row for row in json.loads(result.output)["cv_table"]}
    assert table["mean-trajectory"]["cv_spearman"] is None and set(table["mean-trajectory"]["fold_spearman"]) == {None}

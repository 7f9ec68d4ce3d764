import numpy as np
import pytest

from simfluence import RunDataError, RunLog, RunSet

TRAIN = [f"t{i}" for i in range(10)]
TEST = ["a", "b", "c"]


def make(**overrides):
    rng = np.random.default_rng(0)
    args = dict(curricula=rng.integers(0, 10, (2, 4, 3)), losses=rng.random((2, 5, 3)),
                train_ids=TRAIN, test_ids=TEST, meta={"lr": 0.1})
    args.update(overrides)
    return RunSet.create(**args, source="file.npz")


def test_create_canonicalises_dtypes():
    runs = make()
    assert runs.curricula.dtype == np.int32 and runs.losses.dtype == np.float32
    assert runs.eval_steps.tolist() == [0, 1, 2, 3, 4] and runs.every_step
    assert runs.run_ids.tolist() == ["run-000000", "run-000001"]
    assert runs.initial_losses.shape == (2, 3)


@pytest.mark.parametrize("overrides, field, words", [
    (dict(curricula=np.full((2, 4, 3), 10)), "curricula", "out of range"),
    (dict(curricula=np.full((2, 4, 3), -2)), "curricula", "out of range"),
    (dict(curricula=np.zeros((2, 4, 3)) + 0.5), "curricula", "integer"),
    (dict(curricula=np.zeros((2, 4), int)), "curricula", "shape"),
    (dict(curricula=np.full((2, 4, 3), -1)), "curricula", "empty batch"),
    (dict(losses=np.full((2, 5, 3), np.nan)), "losses", "NaN"),
    (dict(losses=np.full((2, 5, 3), np.inf)), "losses", "NaN or inf"),
    (dict(losses=np.zeros((2, 5, 4))), "losses", "does not match"),
    (dict(losses=np.zeros((2, 6, 3))), "losses", "evaluations"),
    (dict(losses=np.array([["x"]])), "losses", "dtype"),
    (dict(train_ids=TRAIN[:-1] + ["t0"]), "train_ids", "duplicate"),
    (dict(test_ids=["a", "a", "c"]), "test_ids", "duplicate"),
    (dict(test_ids=[]), "test_ids", "empty"),
    (dict(train_ids=np.arange(10)), "train_ids", "strings"),
    (dict(eval_steps=[1, 2, 3, 4, 5]), "eval_steps", "start at 0"),
    (dict(eval_steps=[0, 2, 2, 3, 4]), "eval_steps", "increasing"),
    (dict(eval_steps=[0, 1, 2, 3, 9]), "eval_steps", "past the last step"),
    (dict(meta="{not json"), "meta", "JSON"),
    (dict(meta=[1, 2]), "meta", "JSON object"),
    (dict(run_ids=["x", "x"]), "run_ids", "duplicate"),
])
def test_validation_names_file_and_field(overrides, field, words):
    with pytest.raises(RunDataError) as info:
        make(**overrides)
    message = str(info.value)
    assert message.startswith(f"file.npz: field '{field}'") and words in message
    assert "\n" not in message


def test_sparse_eval_steps():
    runs = make(losses=np.ones((2, 3, 3)), eval_steps=[0, 2, 4])
    assert not runs.every_step and runs.losses.shape == (2, 3, 3)


def test_from_logs_pads_narrow_batches_and_checks_runs():
    rng = np.random.default_rng(1)
    wide = RunLog("r0", rng.integers(0, 10, (4, 3)), rng.random((5, 3)), np.arange(5))
    narrow = RunLog("r1", rng.integers(0, 10, (4, 2)), rng.random((5, 3)), np.arange(5))
    runs = RunSet.from_logs([wide, narrow], TRAIN, TEST)
    assert runs.batch_size == 3 and (runs.curricula[1, :, 2] == -1).all()
    short = RunLog("r2", rng.integers(0, 10, (3, 3)), rng.random((4, 3)), np.arange(4))
    with pytest.raises(RunDataError, match="r2.*steps"):
        RunSet.from_logs([wide, short], TRAIN, TEST)
    other = RunLog("r3", rng.integers(0, 10, (4, 3)), rng.random((3, 3)), np.array([0, 2, 4]))
    with pytest.raises(RunDataError, match="eval_steps"):
        RunSet.from_logs([wide, other], TRAIN, TEST)
    with pytest.raises(RunDataError, match="no runs"):
        RunSet.from_logs([], TRAIN, TEST)


def test_select_and_logs_round_trip():
    runs = make()
    one = runs.select([1])
    assert one.num_runs == 1 and np.array_equal(one.curricula[0], runs.curricula[1])
    back = RunSet.from_logs(runs.logs(), runs.train_ids, runs.test_ids, runs.meta)
    assert np.array_equal(back.curricula, runs.curricula) and np.array_equal(back.losses, runs.losses)

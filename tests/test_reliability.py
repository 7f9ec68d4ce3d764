"""Bad input and damaged files are refused with one line; nothing silently wrong."""

import json
from pathlib import Path

import numpy as np
import torch
import pytest
from click.testing import CliRunner

from simfluence.cli import main
from simfluence.runs import RunDataError, RunSet, save_runs
from simfluence.simulators import LinearIdentitySimulator, Simulator, TrajectorySimulator
from synthetic import linear_runs


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_non_finite_or_negative_ridge_is_a_one_line_error(tmp_path, value):
    runs, _, _ = linear_runs(num_runs=4)
    save_runs(runs, tmp_path / "runs.npz")
    for method in ("linear-identity", "linear-trajectory"):
        result = CliRunner().invoke(main, ["fit", str(tmp_path / "runs.npz"), "--method", method, "--ridge", value,
                                           "--out", str(tmp_path / "m.npz")])
        assert result.exit_code == 2 and result.output.count("\n") == 1 and "ridge" in result.output, result.output
        assert not (tmp_path / "m.npz").exists()


@pytest.mark.parametrize("make", [lambda: LinearIdentitySimulator(ridge=1e-3), lambda: TrajectorySimulator()])
def test_loading_a_model_with_nan_arrays_is_refused(tmp_path, make):
    runs, _, _ = linear_runs(num_runs=6)
    path = make().fit(runs).save(tmp_path / "m.npz")
    arrays = dict(np.load(path, allow_pickle=False))
    name = next(key for key, value in arrays.items() if key.startswith("state.") and value.dtype.kind == "f")
    arrays[name] = np.full_like(arrays[name], np.nan)
    # A consistent file (checksum matching its NaN arrays), as a buggy fit would write it.
    from simfluence.simulators.base import arrays_checksum

    config = json.loads(str(arrays["config"]))
    config["checksum"] = arrays_checksum({key: value for key, value in arrays.items() if key != "config"})
    arrays["config"] = np.array(json.dumps(config))
    np.savez(tmp_path / "broken.npz", **arrays)
    with pytest.raises(RunDataError, match=rf"field '{name}': holds NaN or inf values"):
        Simulator.load(tmp_path / "broken.npz")


@pytest.mark.parametrize("args, option", [(["attribute", "m.npz", "--top", "-5"], "--top"),
                                          (["optimize", "m.npz", "--test-set", "0", "--budget", "3", "--steps", "4",
                                            "--batch-size", "0"], "--batch-size"),
                                          (["split", "runs.npz", "--heldout", "0"], "--heldout"),
                                          (["fit", "runs.npz", "--out", "m.npz", "--cv-folds", "1"], "--cv-folds"),
                                          (["collect", "digits-mlp", "--runs", "0", "--steps", "3", "--out", "s"],
                                           "--runs")])
def test_out_of_range_options_are_one_line_errors(tmp_path, monkeypatch, args, option):
    monkeypatch.chdir(tmp_path)
    runs, _, _ = linear_runs(num_runs=4)
    save_runs(runs, tmp_path / "runs.npz")
    LinearIdentitySimulator(ridge=1e-3).fit(runs).save(tmp_path / "m.npz")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and result.output.startswith(f"error: Invalid value for '{option}'"), \
        result.output


def test_empty_runs_nested_meta_and_bad_devices_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs, _, _ = linear_runs(num_runs=4)
    save_runs(runs, "runs.npz")
    LinearIdentitySimulator(ridge=1e-3).fit(runs).save("m.npz")
    np.savez("empty.npz", curricula=np.zeros((0, 30, 4), np.int32), losses=np.zeros((0, 31, 6), np.float32),
             train_ids=runs.train_ids, test_ids=runs.test_ids, meta=np.array("{}"))
    np.savez("nested.npz", curricula=runs.curricula, losses=runs.losses, train_ids=runs.train_ids,
             test_ids=runs.test_ids, meta=np.array("[" * 100000 + "]" * 100000))
    cases = [(["evaluate", "m.npz", "empty.npz"], "field 'curricula': holds no runs"),
             (["simulate", "m.npz", "empty.npz", "--out", "t.npz"], "empty.npz: field 'curricula': holds no runs"),
             (["fit", "nested.npz", "--out", "x.npz"], "nested.npz: field 'meta': is nested too deeply"),
             (["fit", "runs.npz", "--out", "x.npz", "--device", "bogus"], "--device: 'bogus' is not a torch device")]
    if not torch.cuda.is_available():
        cases.append((["fit", "runs.npz", "--out", "x.npz", "--device", "cuda"], "no CUDA GPU is available"))
    for args, message in cases:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and result.output.count("\n") == 1 and message in result.output, result.output


def test_no_progress_output_when_not_a_terminal(tmp_path):
    import io
    import subprocess
    import sys
    from contextlib import redirect_stderr

    from simfluence.progress import progress_bar

    captured = io.StringIO()
    with redirect_stderr(captured):
        assert sum(progress_bar(range(5), desc="work")) == 10
    assert captured.getvalue() == ""
    result = subprocess.run([sys.executable, "-m", "simfluence.cli", "collect", "digits-mlp", "--runs", "2", "--steps",
                             "3", "--out", str(tmp_path / "s")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_simulating_past_the_fitting_runs_warns_and_is_flagged(tmp_path, monkeypatch):
    from simfluence.evaluate import evaluate
    from simfluence.runs import RunSet
    from simfluence.simulators.base import ExtrapolationWarning

    runs, _, _ = linear_runs(num_runs=6, num_steps=30, batch=4)
    model = LinearIdentitySimulator(ridge=1e-3).fit(runs)
    with warnings_recorded() as caught:
        model.simulate(runs.curricula, runs.initial_losses)
    assert not caught
    longer = np.concatenate([runs.curricula] * 3, axis=1)
    wider = np.concatenate([runs.curricula] * 2, axis=2)
    for curricula, initial, message in ((longer, runs.initial_losses, "90 steps, the fitting runs had 30"),
                                        (wider, runs.initial_losses, "batches of up to 8 examples"),
                                        (runs.curricula, runs.initial_losses * 100, "losses before training")):
        with pytest.warns(ExtrapolationWarning, match=message):
            model.simulate(curricula, initial)
    far = RunSet.create(longer, np.concatenate([runs.losses, runs.losses[:, 1:], runs.losses[:, 1:]], axis=1),
                        runs.train_ids, runs.test_ids)
    with pytest.warns(ExtrapolationWarning):
        result = evaluate(model, far)
    assert result.as_dict()["extrapolation"] and "WARNING: extrapolating: 90 steps" in result.table()
    monkeypatch.chdir(tmp_path)
    model.save("m.npz")
    save_runs(far, "far.npz")
    out = CliRunner().invoke(main, ["evaluate", "m.npz", "far.npz"])
    assert out.exit_code == 0, out.output
    assert "warning: far.npz: extrapolating: 90 steps, the fitting runs had 30" in out.output


def warnings_recorded():
    import warnings

    return warnings.catch_warnings(record=True)


def test_a_saved_model_whose_arrays_were_altered_is_refused(tmp_path):
    runs, _, _ = linear_runs(num_runs=6)
    path = LinearIdentitySimulator(ridge=1e-3).fit(runs).save(tmp_path / "m.npz")
    arrays = dict(np.load(path, allow_pickle=False))
    name = next(key for key in arrays if key.startswith("state.") and arrays[key].dtype.kind == "f")
    arrays[name] = arrays[name] * 1.001   # plausible, finite numbers: only the checksum can tell
    np.savez(tmp_path / "altered.npz", **arrays)
    with pytest.raises(RunDataError, match="field 'checksum': the arrays do not match"):
        Simulator.load(tmp_path / "altered.npz")
    assert isinstance(Simulator.load(path), LinearIdentitySimulator)


@pytest.mark.parametrize("factor", [1e3, 1e6])
def test_one_extreme_test_example_does_not_set_the_ridge_of_the_linear_family(factor):
    from simfluence.evaluate import split_runs
    from simfluence.runs import RunSet

    runs, _, _ = linear_runs(num_test=8, num_runs=16, seed=5, noise=1e-2)
    fitting, heldout = split_runs(runs, 4, 0)
    clean = LinearIdentitySimulator().fit(fitting)
    losses = fitting.losses.copy()
    losses[:, :, 0] *= factor
    spoiled = LinearIdentitySimulator().fit(RunSet.create(fitting.curricula, losses, fitting.train_ids,
                                                          fitting.test_ids, meta=fitting.meta))
    assert spoiled.chosen_ridge == clean.chosen_ridge
    others = slice(1, None)
    error = {name: float(np.mean((model.simulate(heldout.curricula, heldout.initial_losses)[:, 1:, others]
                                  - heldout.losses[:, 1:, others]) ** 2))
             for name, model in (("clean", clean), ("spoiled", spoiled))}
    assert error["spoiled"] <= 1.05 * error["clean"], error


def test_non_negative_losses_are_never_simulated_below_zero():
    from simfluence.simulators import AdditiveSimulator

    runs, _, _ = linear_runs(num_runs=8, num_steps=30)
    model = AdditiveSimulator(ridge=1e-3).fit(runs)
    long = np.tile(runs.curricula[:1], (1, 20, 1))   # 600 steps of mostly helpful examples
    raw = model._simulate(long, runs.initial_losses[:1].astype(np.float64))
    assert raw.min() < 0   # what the recurrence itself extrapolates to
    with pytest.warns(UserWarning, match="extrapolating"):
        clipped = model.simulate(long, runs.initial_losses[:1])
    assert clipped.min() == 0 and np.array_equal(clipped, np.maximum(raw, 0))


# --- writes the system refuses: disk full, read-only, not writable ---------------------------------
def _subprocess_cli(args, cwd, file_size_limit=None, unprivileged=False, timeout=300):
    """``simfluence ARGS`` in a subprocess, optionally with files capped at ``file_size_limit`` bytes
    (``RLIMIT_FSIZE`` with ``SIGXFSZ`` ignored: a write past it fails with ``EFBIG``, as on a full disk)
    or, when ``unprivileged`` and running as root, without the capabilities that override permission bits."""
    import os
    import resource
    import shutil
    import signal
    import subprocess
    import sys

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    prefix = []
    if unprivileged and os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: permission bits cannot be enforced")
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    return subprocess.run([*prefix, sys.executable, "-m", "simfluence.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit if file_size_limit is not None else None)


def _assert_one_line_error(result, *parts):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for part in parts:
        assert part in result.stderr, result.stderr


def _temporaries(folder):
    return sorted(path.name for path in folder.rglob(".*.tmp*"))


def test_a_full_disk_during_fit_out_is_one_line_and_keeps_the_old_model(tmp_path):
    runs, _, _ = linear_runs(num_runs=4)
    save_runs(runs, tmp_path / "runs.npz")
    LinearIdentitySimulator(ridge=1.0).fit(runs.select([0, 1])).save(tmp_path / "m.npz")
    old = (tmp_path / "m.npz").read_bytes()
    result = _subprocess_cli(["fit", "runs.npz", "--method", "linear-identity", "--ridge", "1e-3", "--out", "m.npz"],
                             tmp_path, file_size_limit=2048)
    _assert_one_line_error(result, "m.npz: cannot write: File too large", "ulimit -f")
    assert (tmp_path / "m.npz").read_bytes() == old and _temporaries(tmp_path) == []
    assert Simulator.load(tmp_path / "m.npz").config.ridge == 1.0


def test_a_full_disk_during_collect_is_one_line_and_the_store_still_loads(tmp_path):
    from simfluence.runs import RunStore

    store = tmp_path / "store"
    args = ["collect", "digits-mlp", "--steps", "3", "--out", store]
    assert CliRunner().invoke(main, [*map(str, args), "--runs", "2"]).exit_code == 0
    before = {path.name: path.read_bytes() for path in (store / "runs").iterdir()}
    # Run files are about 3 KB: the resumed collection cannot write its third run.
    result = _subprocess_cli([*args, "--runs", "4"], tmp_path, file_size_limit=2048)
    _assert_one_line_error(result, "run-00000", "cannot write: File too large")
    assert {path.name: path.read_bytes() for path in (store / "runs").iterdir()} == before
    assert _temporaries(store) == [] and len(RunStore(store).load().run_ids) == 2
    # A new store whose manifest (about 6 KB) cannot be written: no manifest, and a later collection works.
    fresh = tmp_path / "fresh"
    result = _subprocess_cli(["collect", "digits-mlp", "--steps", "3", "--runs", "1", "--out", fresh], tmp_path,
                             file_size_limit=2048)
    _assert_one_line_error(result, "simfluence-store.json: cannot write: File too large")
    assert not (fresh / "simfluence-store.json").exists() and _temporaries(fresh) == []
    assert CliRunner().invoke(main, ["collect", "digits-mlp", "--steps", "3", "--runs", "1", "--out",
                                     str(fresh)]).exit_code == 0


def test_a_full_disk_during_library_writes_raises_a_one_line_write_error(tmp_path):
    import subprocess
    import sys

    runs, _, _ = linear_runs(num_runs=4)
    save_runs(runs.select([0, 1]), tmp_path / "store")
    script = f"""
import errno, resource, signal, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from synthetic import linear_runs
from simfluence.errors import WriteError
from simfluence.runs import RunStore, save_runs
runs, _, _ = linear_runs(num_runs=4)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
for name, write in (("interchange", lambda: save_runs(runs, "runs.npz")),
                    ("store", lambda: RunStore("store").write(runs.logs()[3]))):
    try:
        write()
    except WriteError as error:
        assert error.errno == errno.EFBIG and isinstance(error, OSError) and "\\n" not in str(error), error
        print(name, error)
    else:
        print(name, "written")
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("interchange runs.npz: cannot write: File too large"), lines
    assert lines[1].startswith("store ") and "run-000003.parquet: cannot write: File too large" in lines[1], lines
    assert not (tmp_path / "runs.npz").exists() and _temporaries(tmp_path) == []
    from simfluence.runs import RunStore

    assert RunStore(tmp_path / "store").run_ids() == ["run-000000", "run-000001"]


def test_fit_out_that_cannot_be_written_fails_before_the_fit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs, _, _ = linear_runs(num_runs=4)
    save_runs(runs, "runs.npz")
    Path("broken.npz").write_bytes(b"not an npz")
    (tmp_path / "folder.npz").mkdir()
    cases = [("missing/m.npz", "missing: cannot write: No such file or directory (the directory does not exist"),
             ("runs.npz/m.npz", "runs.npz: cannot write: Not a directory")]
    for out, message in cases:
        # RUNS is broken too: the error names --out, so the output was checked before anything was read.
        result = CliRunner().invoke(main, ["fit", "broken.npz", "--out", out])
        assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
        assert result.output.startswith("error: --out: ") and message in result.output, result.output
        assert not Path("missing").exists()
    result = CliRunner().invoke(main, ["fit", "runs.npz", "--out", "folder.npz"])   # click's own check
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "is a directory" in result.output
    from simfluence.runs.atomic import check_writable

    with pytest.raises(OSError, match="folder.npz: cannot write: Is a directory"):
        check_writable("folder.npz")
    # A read-only directory (permission bits enforced even for root, by dropping its capabilities).
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        result = _subprocess_cli(["fit", "broken.npz", "--out", readonly / "m.npz"], tmp_path, unprivileged=True)
        _assert_one_line_error(result, "--out: ", "readonly/m.npz: cannot write: Permission denied")
        assert list(readonly.iterdir()) == []
    finally:
        readonly.chmod(0o755)


def test_collect_into_a_read_only_store_is_one_line(tmp_path):
    store = tmp_path / "store"
    assert CliRunner().invoke(main, ["collect", "digits-mlp", "--steps", "2", "--runs", "1", "--out",
                                     str(store)]).exit_code == 0
    parent = tmp_path / "locked"
    parent.mkdir()
    paths = [store, *store.rglob("*"), parent]
    for path in paths:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        result = _subprocess_cli(["collect", "digits-mlp", "--steps", "2", "--runs", "2", "--out", store], tmp_path,
                                 unprivileged=True)
        _assert_one_line_error(result, "store/.simfluence-", "cannot write: Permission denied")
        result = _subprocess_cli(["collect", "digits-mlp", "--steps", "2", "--runs", "1", "--out", parent / "new"],
                                 tmp_path, unprivileged=True)
        _assert_one_line_error(result, "locked/new: cannot write: Permission denied")
    finally:
        for path in paths:
            path.chmod(0o755 if path.is_dir() else 0o644)
    from simfluence.runs import RunStore

    assert RunStore(store).run_ids() == ["run-000000"]


@pytest.mark.parametrize("run_id, problem", [("run-1\n", "holds a control character"),
                                             ("run\t1", "holds a control character"),
                                             ("a/b", "holds a path separator"),
                                             ("..\\x", "holds a path separator"),
                                             ("x" * 201, "201 characters long, more than 200"),
                                             ("", "is empty"), (".hidden", "is not a safe file name")])
def test_unsafe_run_ids_are_refused_with_one_line_naming_the_field(tmp_path, run_id, problem):
    from torch import nn

    from simfluence.recorder import Recorder
    from simfluence.runs import RunLog, RunStore

    runs, _, _ = linear_runs(num_runs=2)
    store = RunStore.create(tmp_path / "store", runs.train_ids, runs.test_ids, runs.meta)
    log = runs.logs()[0]
    bad = RunLog(run_id, log.curriculum, log.losses, log.eval_steps)
    fix = "use 1 to 200 letters, digits, '.', '_' and '-'"
    attempts = {
        "RunStore.write": lambda: store.write(bad),
        "RunSet.from_logs": lambda: RunSet.from_logs([bad], runs.train_ids, runs.test_ids),
        "RunSet.create": lambda: RunSet.create(runs.curricula, runs.losses, runs.train_ids, runs.test_ids,
                                               run_ids=[run_id, "run-000001"]),
        "Recorder": lambda: Recorder(tmp_path / "store", model=nn.Linear(2, 2), loss_fn=lambda m, x, y: x.sum(1),
                                     train_ids=runs.train_ids.tolist(), test_inputs=torch.zeros(6, 2),
                                     test_ids=runs.test_ids.tolist(), run_id=run_id).start(),
    }
    for where, attempt in attempts.items():
        with pytest.raises(RunDataError) as caught:
            attempt()
        message = str(caught.value)
        assert "\n" not in message and "run_id" in caught.value.field and problem in message and fix in message, \
            (where, message)
    assert store.run_ids() == [] and list((tmp_path / "store" / "runs").iterdir()) == []
    # An interchange file holding the id: the command line prints one line.
    save_runs(runs, tmp_path / "runs.npz")
    arrays = dict(np.load(tmp_path / "runs.npz"))
    arrays["run_ids"] = np.array([run_id, "run-000001"])
    np.savez(tmp_path / "bad.npz", **arrays)
    result = CliRunner().invoke(main, ["fit", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "m.npz")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "field 'run_ids'" in result.output, \
        result.output


def test_collect_with_an_unreachable_ray_address_fails_at_once(tmp_path):
    import time

    start = time.perf_counter()
    result = CliRunner().invoke(main, ["collect", "digits-mlp", "--runs", "2", "--steps", "3", "--out",
                                       str(tmp_path / "s"), "--executor", "ray", "--address", "127.0.0.1:1"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "no Ray cluster answers at '127.0.0.1:1'" in result.output and "ray start --head" in result.output
    assert time.perf_counter() - start < 20 and not (tmp_path / "s").exists()

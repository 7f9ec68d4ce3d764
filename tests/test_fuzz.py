"""Property-based fault and fuzz suite: damaged, altered or foreign files give a clean error or the right result.

Each case mutates a tiny file (built once) with hypothesis, runs the command line in-process (click's
``CliRunner`` on ``simfluence.cli.main``) and the library call behind it, and accepts two outcomes only:

* a clean error: a nonzero exit with one ``error:`` line (warnings aside) and no traceback; the library
  raises a :class:`~simfluence.errors.SimfluenceError` whose message is one line;
* the correct result: exit 0 with the output of the unmodified file, or, for a valid edit of the data,
  the output the library computes on the edited arrays in memory.

Exit 0 with a silently changed result fails. Hypothesis runs derandomized (the same examples every run)
and without an example database, so CI is deterministic and quick. For a deeper search, multiply the
examples and draw new ones: ``SIMFLUENCE_FUZZ_SCALE=50 SIMFLUENCE_FUZZ_RANDOM=1 pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import traceback
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st

from simfluence.cli import main
from simfluence.errors import SimfluenceError
from simfluence.evaluate import evaluate
from simfluence.runs import RunLog, RunSet, RunStore, load_runs, save_runs
from simfluence.runs.store import MANIFEST
from simfluence.simulators import LinearIdentitySimulator, Simulator
from synthetic import linear_runs

SIZES = dict(num_train=8, num_test=3, num_runs=3, num_steps=4, batch=2)


SCALE = float(os.environ.get("SIMFLUENCE_FUZZ_SCALE", "1"))
RANDOM = os.environ.get("SIMFLUENCE_FUZZ_RANDOM", "") not in ("", "0")


def fuzz(examples: int):
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, derandomize=not RANDOM,
                    database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class World(SimpleNamespace):
    def __repr__(self) -> str:   # hypothesis prints the arguments of a failing example
        return "world"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny runs as an interchange file and a store, a model fitted on other runs of the same task,
    two foreign stores, and what the commands print on the unmodified files."""
    root = tmp_path_factory.mktemp("fuzz")
    runs, _, _ = linear_runs(seed=0, **SIZES)
    save_runs(runs, root / "runs.npz")
    # The store's runs record the learning rate of each step, as a recorder does: it becomes the runs' meta.
    store = RunStore.create(root / "store", runs.train_ids, runs.test_ids, runs.meta)
    for r, log in enumerate(runs.logs()):
        store.write(RunLog(log.run_id, log.curriculum, log.losses, log.eval_steps, seed=r,
                           meta={"learning_rates": [0.1, 0.1, 0.05, 0.025]}))
    model = LinearIdentitySimulator(ridge=1e-3).fit(linear_runs(seed=1, **SIZES)[0])
    model.save(root / "m.npz")
    save_runs(linear_runs(seed=2, **SIZES)[0], root / "other-meta")   # same ids, other settings (meta)
    save_runs(linear_runs(seed=0, **{**SIZES, "num_train": 9})[0], root / "other-ids")
    (root / "work").mkdir()
    world = World(root=root, runs=runs, model=model, work=root / "work", store_runs=load_runs(root / "store"))
    assert world.store_runs.meta["learning_rates"] == [0.1, 0.1, 0.05, 0.025]
    world.arrays = dict(np.load(root / "runs.npz", allow_pickle=False))
    world.model_arrays = dict(np.load(root / "m.npz", allow_pickle=False))
    world.trajectories = model.simulate(runs.curricula, runs.initial_losses)
    world.expected = {}
    for name in ("runs.npz", "store"):
        result = invoke("evaluate", root / "m.npz", root / name, "--json")
        assert result.exit_code == 0 and result.stderr == "", result.output
        world.expected[name] = result.stdout
    return world


# --- outcomes -------------------------------------------------------------------------------------

def invoke(*args):
    """The CLI in-process; an exception that escaped the one-line handler fails the test with its traceback."""
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"simfluence {' '.join(map(str, args))} raised instead of printing one line:\n"
                             + "".join(traceback.format_exception(*result.exc_info)))
    return result


def assert_clean_error(result) -> None:
    assert result.exit_code != 0, f"exit 0 where an error was due:\n{result.output}"
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"not one error line:\n{result.stderr}"
    assert all(line.startswith(("error: ", "warning: ")) for line in lines), f"stray lines:\n{result.stderr}"
    assert "Traceback" not in result.output and result.stdout == "", result.output


def assert_error_or_same(result, expected_stdout: str) -> None:
    if result.exit_code == 0:
        assert result.stdout == expected_stdout, f"exit 0 with a changed result:\n{result.stdout}\n" \
                                                 f"unmodified:\n{expected_stdout}"
    else:
        assert_clean_error(result)


def library(call):
    """``call()``, or ``None`` where it raised a one-line SimfluenceError; any other exception fails."""
    try:
        return call()
    except SimfluenceError as error:
        assert "\n" not in str(error), f"a multi-line message: {error}"
        return None


def same_runs(a: RunSet, b: RunSet) -> bool:
    """Equal runs, with the canonical dtypes (int32 indices, float32 losses; ids compare as strings)."""
    return (all(np.array_equal(getattr(a, name), getattr(b, name)) for name in
                ("curricula", "losses", "eval_steps", "train_ids", "test_ids", "run_ids"))
            and (a.curricula.dtype, a.losses.dtype, a.eval_steps.dtype) == (np.int32, np.float32, np.int32)
            and a.meta == b.meta)


def write_npz(path: Path, arrays: dict, compressed: bool = False) -> Path:
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def mutate_bytes(data: bytes, draw) -> bytes:
    """Flip 1-4 bytes, zero a range, or append garbage (truncation has its own tests)."""
    data = bytearray(data)
    kind = draw(st.sampled_from(["flip", "zero", "append"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    elif kind == "zero":
        start = draw(st.integers(0, len(data) - 1))
        end = min(len(data), start + draw(st.integers(1, 64)))
        if any(data[start:end]):
            data[start:end] = bytes(end - start)
        else:
            data[start] = 1
    else:
        data += draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


# --- (a) interchange files ------------------------------------------------------------------------
def _index(draw, shape):
    return tuple(draw(st.integers(0, size - 1)) for size in shape)


SIMULATE_INPUTS = ("curricula-range", "curricula-float", "curricula-str", "empty-step", "curricula-ndim", "no-runs",
                   "no-steps", "losses-kind")
"""Damage that ``simulate`` (which reads only the curricula and the losses before training) must refuse too."""


def _invalid_interchange(arrays: dict, draw) -> tuple[str, bool]:
    """Make ``arrays`` an invalid run file in place; returns what was done, and whether it damaged the
    curricula or the losses before training (the inputs of ``simulate``)."""
    kind = draw(st.sampled_from([
        "drop", "curricula-range", "curricula-float", "curricula-str", "empty-step", "curricula-ndim", "no-runs",
        "no-steps", "losses-nonfinite", "losses-shape", "losses-kind", "ids-numeric", "ids-2d", "ids-duplicate",
        "ids-empty", "test-ids-short", "eval-steps", "run-ids", "meta", "object"]))
    c, losses = arrays["curricula"], arrays["losses"]
    damaged = kind in SIMULATE_INPUTS
    if kind == "drop":
        name = draw(st.sampled_from(["curricula", "losses", "train_ids", "test_ids", "meta"]))
        del arrays[name]
        damaged = name in ("curricula", "losses")
    elif kind == "curricula-range":
        c[_index(draw, c.shape)] = draw(st.integers(8, 2**31 - 1) | st.integers(-2**31, -2))
    elif kind == "curricula-float":
        arrays["curricula"] = c.astype(draw(st.sampled_from([np.float32, np.float64])))
    elif kind == "curricula-str":
        arrays["curricula"] = c.astype(str)
    elif kind == "empty-step":
        c[draw(st.integers(0, c.shape[0] - 1)), draw(st.integers(0, c.shape[1] - 1))] = -1
    elif kind == "curricula-ndim":
        arrays["curricula"] = draw(st.sampled_from([c.reshape(c.shape[0], -1), c[..., None], c[0, 0]]))
    elif kind == "no-runs":   # R = 0: nothing to evaluate or simulate
        for name in ("curricula", "losses", "run_ids"):
            arrays[name] = arrays[name][:0]
    elif kind == "no-steps":
        arrays["curricula"], arrays["losses"], arrays["eval_steps"] = c[:, :0], losses[:, :1], arrays["eval_steps"][:1]
    elif kind == "losses-nonfinite":
        losses[_index(draw, losses.shape)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    elif kind == "losses-shape":
        arrays["losses"] = draw(st.sampled_from([losses[:, :-1], losses[:, :, :-1], losses[:-1], losses[0],
                                                 losses[..., None]]))
    elif kind == "losses-kind":
        arrays["losses"] = draw(st.sampled_from([losses.astype(str), losses > 2, losses.astype(np.complex64)]))
    elif kind in ("ids-numeric", "ids-2d", "ids-duplicate", "ids-empty"):
        name = draw(st.sampled_from(["train_ids", "test_ids", "run_ids"]))
        ids = arrays[name]
        arrays[name] = {"ids-numeric": np.arange(ids.size), "ids-2d": ids[None], "ids-empty": ids[:0],
                        "ids-duplicate": np.concatenate([ids[:1], ids[:-1]])}[kind]
    elif kind == "test-ids-short":
        arrays["test_ids"] = arrays["test_ids"][:-1]
    elif kind == "eval-steps":
        steps = arrays["eval_steps"]
        arrays["eval_steps"] = draw(st.sampled_from([steps + 1, steps[::-1].copy(), np.where(steps == steps.max(), 9, steps),
                                                     steps.astype(np.float64), steps[None], steps[:-1]]))
    elif kind == "run-ids":
        ids = arrays["run_ids"].astype(object)
        ids[draw(st.integers(0, ids.size - 1))] = draw(st.sampled_from(
            ["run-1\n", "a/b", "../x", "x" * 201, "", "run 1", "tab\there", "nul\x01"]))
        arrays["run_ids"] = ids.astype(str)
    elif kind == "meta":
        arrays["meta"] = draw(st.sampled_from([
            np.array("{not json"), np.array("[1, 2]"), np.array("3"), np.array("null"), np.array('"text"'),
            np.array(["{}", "{}"]), np.array(3), np.array("[" * 5000 + "]" * 5000)]))
    elif kind == "object":   # would need pickle to load
        name = draw(st.sampled_from(["curricula", "losses", "train_ids", "test_ids", "meta", "eval_steps", "run_ids"]))
        arrays[name] = np.array(list(np.atleast_1d(arrays[name])) or [None], dtype=object)
        damaged = name in ("curricula", "losses")
    return kind, damaged


@fuzz(160)
@given(data=st.data())
def test_an_invalid_interchange_file_is_refused_with_one_line(world, data):
    arrays = {name: value.copy() for name, value in world.arrays.items()}
    kind, damaged = _invalid_interchange(arrays, data.draw)
    path = write_npz(world.work / "invalid.npz", arrays)
    if kind != "no-runs":   # an empty run set is a valid file; there is just nothing to evaluate
        assert library(lambda: load_runs(path)) is None, kind
    assert_clean_error(invoke("evaluate", world.root / "m.npz", path))
    if damaged:
        assert_clean_error(invoke("simulate", world.root / "m.npz", path, "--out", world.work / "t.npz"))


@fuzz(80)
@given(data=st.data())
def test_an_equivalent_interchange_file_gives_the_same_result(world, data):
    """Other integer and float widths, byte orders, Fortran order, compression, optional members left out,
    unknown members (even object arrays, which are never loaded), meta re-formatted: the same runs."""
    arrays = {name: value.copy() for name, value in world.arrays.items()}
    draw = data.draw
    arrays["curricula"] = arrays["curricula"].astype(draw(st.sampled_from(["<i4", ">i4", "<i8", ">i2", "u1"])))
    arrays["losses"] = arrays["losses"].astype(draw(st.sampled_from(["<f4", ">f4", "<f8", ">f8"])))
    arrays["eval_steps"] = arrays["eval_steps"].astype(draw(st.sampled_from(["<i4", "<i8", ">i2"])))
    for name in ("train_ids", "test_ids", "run_ids"):
        width = arrays[name].dtype.itemsize // 4 + draw(st.sampled_from([0, 1, 30]))
        arrays[name] = arrays[name].astype(f"{draw(st.sampled_from('<>'))}U{width}")
    if draw(st.booleans()):
        arrays = {name: np.asfortranarray(value) if value.ndim > 1 else value for name, value in arrays.items()}
    for name in draw(st.sets(st.sampled_from(["eval_steps", "run_ids"]))):
        del arrays[name]
    if draw(st.booleans()):
        arrays["notes"] = draw(st.sampled_from([np.array("hello"), np.arange(3), np.array([1, None], dtype=object)]))
    if draw(st.booleans()):
        arrays["meta"] = np.array(json.dumps(json.loads(str(arrays["meta"])), indent=draw(st.integers(0, 4)),
                                             sort_keys=draw(st.booleans())))
    path = write_npz(world.work / "same.npz", arrays, compressed=draw(st.booleans()))
    assert same_runs(library(lambda: load_runs(path)), world.runs)
    result = invoke("evaluate", world.root / "m.npz", path, "--json")
    assert result.exit_code == 0 and result.stdout == world.expected["runs.npz"], result.output


@fuzz(80)
@given(data=st.data())
def test_a_valid_edit_of_the_runs_gives_the_result_of_the_edited_runs(world, data):
    """Another training example, another finite loss, a padded slot, fewer runs: valid data, and the CLI
    on the file must print what the library computes on the same arrays in memory."""
    draw = data.draw
    arrays = {name: value.copy() for name, value in world.arrays.items()}
    c, losses = arrays["curricula"], arrays["losses"]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["example", "loss", "pad", "fewer-runs"]))
        if kind == "example":
            c[_index(draw, c.shape)] = draw(st.integers(0, 7))
        elif kind == "loss":
            losses[_index(draw, losses.shape)] = draw(st.floats(0, 5, width=32))
        elif kind == "pad":
            c[(*_index(draw, c.shape[:2]), draw(st.integers(0, c.shape[2] - 1)))] = -1
            c[(c == -1).all(axis=2)] = 0   # keep every step non-empty
        elif kind == "fewer-runs" and c.shape[0] > 1:
            keep = sorted(draw(st.sets(st.integers(0, c.shape[0] - 1), min_size=1)))
            c = arrays["curricula"] = c[keep]
            losses = arrays["losses"] = losses[keep]
            arrays["run_ids"] = arrays["run_ids"][keep]
    path = write_npz(world.work / "edited.npz", arrays)
    edited = RunSet.create(c, losses, arrays["train_ids"], arrays["test_ids"], arrays["eval_steps"],
                           arrays["run_ids"], str(arrays["meta"]))
    assert same_runs(library(lambda: load_runs(path)), edited)
    expected = json.dumps(evaluate(world.model, edited).as_dict()) + "\n"
    result = invoke("evaluate", world.root / "m.npz", path, "--json")
    assert result.exit_code == 0 and result.stdout == expected, result.output
    assert np.isfinite(json.loads(result.stdout)["mse"])


@fuzz(120)
@given(data=st.data())
def test_damaged_bytes_of_an_interchange_file_are_refused_or_harmless(world, data):
    """Zip CRCs cover each member, so a flipped byte is refused unless it lies where it changes nothing."""
    path = world.work / "bytes.npz"
    path.write_bytes(mutate_bytes((world.root / "runs.npz").read_bytes(), data.draw))
    loaded = library(lambda: load_runs(path))
    assert loaded is None or same_runs(loaded, world.runs)
    assert_error_or_same(invoke("evaluate", world.root / "m.npz", path, "--json"), world.expected["runs.npz"])


@fuzz(60)
@given(fraction=st.floats(0, 1, exclude_max=True))
def test_a_truncated_interchange_file_is_refused(world, fraction):
    source = (world.root / "runs.npz").read_bytes()
    path = world.work / "truncated.npz"
    path.write_bytes(source[:int(fraction * len(source))])
    assert library(lambda: load_runs(path)) is None
    assert_clean_error(invoke("evaluate", world.root / "m.npz", path, "--json"))


def _with_header(member: bytes, shape: tuple) -> bytes:
    """``member`` (a ``.npy``) with its header declaring ``shape``; the data bytes are kept."""
    stream = io.BytesIO(member)
    assert np.lib.format.read_magic(stream) == (1, 0)   # what numpy.savez writes for small headers
    _, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    data = member[stream.tell():]
    header = io.BytesIO()
    # Write the dict by hand: numpy's writer refuses negative or absurd shapes that a damaged file can hold.
    text = "{'descr': %r, 'fortran_order': %r, 'shape': %r, }" % (np.lib.format.dtype_to_descr(dtype), fortran,
                                                                    tuple(shape))
    text += " " * (-(len(text) + 11) % 64) + "\n"
    header.write(np.lib.format.magic(1, 0) + len(text).to_bytes(2, "little") + text.encode("latin1"))
    return header.getvalue() + data


@fuzz(80)
@given(data=st.data())
def test_huge_or_wrong_declared_shapes_are_refused_before_reading(world, data):
    """A header declaring a huge array (or one that disagrees with the bytes) is refused at once:
    no allocation of the declared size, no reading past the member."""
    draw = data.draw
    source = world.root / "runs.npz"
    with zipfile.ZipFile(source) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    name = draw(st.sampled_from(sorted(members)))
    stream = io.BytesIO(members[name])
    assert np.lib.format.read_magic(stream) == (1, 0)
    shape = np.lib.format.read_array_header_1_0(stream)[0]
    new = draw(st.sampled_from(["huge", "huge-nd", "negative", "one-more", "one-less"]))
    if new == "huge":
        declared = (draw(st.integers(2**31, 2**62)),)
    elif new == "huge-nd":
        declared = tuple(draw(st.lists(st.integers(10**4, 10**7), min_size=2, max_size=5)))
    elif new == "negative":
        declared = (-draw(st.integers(1, 2**40)), *shape[1:])
    elif new == "one-more":
        declared = (*shape[:-1], shape[-1] + 1) if shape else (2,)
    else:
        declared = (*shape[:-1], shape[-1] - 1) if shape and shape[-1] > 0 else (0,)
    members[name] = _with_header(members[name], declared)
    path = world.work / "header.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for member, content in members.items():
            archive.writestr(member, content)
    start = time.perf_counter()
    assert library(lambda: load_runs(path)) is None, (name, declared)
    assert_clean_error(invoke("evaluate", world.root / "m.npz", path, "--json"))
    assert time.perf_counter() - start < 5


# --- (b) run stores -------------------------------------------------------------------------------
@pytest.fixture()
def store(world, tmp_path):
    """A fresh copy of the store, for tests that damage it."""
    return Path(shutil.copytree(world.root / "store", tmp_path / "store"))


def _fresh_store(world) -> Path:
    target = world.work / "store"
    shutil.rmtree(target, ignore_errors=True)
    return Path(shutil.copytree(world.root / "store", target))


def _check_store(world, path: Path, must_fail: bool = False) -> None:
    loaded = library(lambda: load_runs(path))
    result = invoke("evaluate", world.root / "m.npz", path, "--json")
    if must_fail:
        assert loaded is None
        assert_clean_error(result)
    else:
        assert loaded is None or same_runs(loaded, world.store_runs), "a changed store was loaded"
        assert_error_or_same(result, world.expected["store"])


@fuzz(120)
@given(data=st.data())
def test_damaged_bytes_of_a_run_file_are_refused_or_harmless(world, data):
    """Parquet page checksums cover the data pages; the footer's run info is checked against the store."""
    store = _fresh_store(world)
    run = store / "runs" / data.draw(st.sampled_from(sorted(p.name for p in (store / "runs").glob("*.parquet"))))
    run.write_bytes(mutate_bytes(run.read_bytes(), data.draw))
    _check_store(world, store)


@fuzz(40)
@given(data=st.data())
def test_a_truncated_run_file_is_refused(world, data):
    store = _fresh_store(world)
    run = store / "runs" / "run-000001.parquet"
    content = run.read_bytes()
    run.write_bytes(content[:data.draw(st.integers(0, len(content) - 1))])
    _check_store(world, store, must_fail=True)


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-10, 10) | st.text(max_size=5),
                     lambda inner: st.lists(inner, max_size=2) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
                     max_leaves=4)


@fuzz(120)
@given(data=st.data())
def test_an_edited_manifest_is_refused_unless_it_means_the_same(world, data):
    """Every run file carries digests of its store's ids and meta, so a manifest whose ids, meta, format
    or version were edited is refused; re-formatting it, or adding an unknown key, changes nothing."""
    draw = data.draw
    store = _fresh_store(world)
    path = store / MANIFEST
    manifest = json.loads(path.read_text())
    original = json.loads(path.read_text())
    kind = draw(st.sampled_from(["meta", "ids", "format", "drop", "extra", "reformat", "text"]))
    if kind == "meta":
        manifest["meta"][draw(st.sampled_from([*manifest["meta"], "new"]))] = draw(_JSON)
    elif kind == "ids":
        name = draw(st.sampled_from(["train_ids", "test_ids"]))
        ids = manifest[name]
        edit = draw(st.sampled_from(["rename", "drop", "swap", "add"]))
        if edit == "rename":
            ids[draw(st.integers(0, len(ids) - 1))] = draw(st.text(min_size=1, max_size=8))
        elif edit == "drop":
            del ids[draw(st.integers(0, len(ids) - 1))]
        elif edit == "swap":
            ids[0], ids[-1] = ids[-1], ids[0]
        else:
            ids.append("added")
    elif kind == "format":
        manifest[draw(st.sampled_from(["format", "version"]))] = draw(_JSON)
    elif kind == "drop":
        del manifest[draw(st.sampled_from(sorted(manifest)))]
    elif kind == "extra":
        manifest[draw(st.text(min_size=1, max_size=8).filter(lambda key: key not in original))] = draw(_JSON)
    text = json.dumps(manifest, indent=draw(st.sampled_from([None, 0, 1, 4])), sort_keys=draw(st.booleans()))
    if kind == "text":
        text = mutate_bytes(text.encode(), draw).decode("latin1")
    path.write_text(text, encoding="latin1" if kind == "text" else "utf-8")
    meaning = {key: original[key] for key in ("format", "version", "train_ids", "test_ids", "meta")}
    try:
        edited = json.loads(path.read_text(encoding="utf-8"))
        same = isinstance(edited, dict) and {key: edited.get(key) for key in meaning} == meaning
    except (ValueError, UnicodeDecodeError):
        same = False
    _check_store(world, store, must_fail=not same)


@pytest.mark.parametrize("source, name, target", [
    ("other-meta", "run-000000.parquet", "run-000000.parquet"),   # other settings, same ids
    ("other-meta", "run-000001.parquet", "run-000009.parquet"),
    ("other-ids", "run-000000.parquet", "run-000000.parquet"),    # another task's ids
    ("store", "run-000001.parquet", "run-000000.parquet"),        # this store's run under another name
    ("store", "run-000001.parquet", "run-000009.parquet"),
    ("store", "simfluence-store.json", "junk.parquet"),          # not a run file at all
])
def test_foreign_run_files_are_refused(world, store, source, name, target):
    folder = world.root / source
    shutil.copy(folder / ("runs" if name.endswith(".parquet") else "") / name, store / "runs" / target)
    _check_store(world, store, must_fail=True)


@fuzz(60)
@given(data=st.data())
def test_stray_files_in_a_store_change_nothing(world, data):
    """Temporaries of killed writers (whole, partial or garbage), editor backups, other files and folders."""
    draw = data.draw
    store = _fresh_store(world)
    runs = store / "runs"
    real = (runs / "run-000001.parquet").read_bytes()
    for _ in range(draw(st.integers(1, 4))):
        name = draw(st.sampled_from([".run-000001.parquet.x1y2.tmp.parquet", ".run-000007.parquet.abc.tmp.parquet",
                                     "run-000001.parquet.bak", "run-000001.parquet~", "notes.txt", ".hidden.parquet",
                                     "run-9\n.parquet", "run 9.parquet", "_tmp.parquet", "-x.parquet"]))
        content = draw(st.sampled_from(["whole", "partial", "garbage", "folder"]))
        path = runs / name
        if path.exists():
            continue
        if content == "folder":
            path.mkdir()
        else:
            path.write_bytes({"whole": real, "partial": real[:draw(st.integers(0, len(real)))],
                              "garbage": draw(st.binary(max_size=200))}[content])
    if draw(st.booleans()):
        (store / ".simfluence-store.json.abc.tmp").write_text("{")
    _check_store(world, store)
    assert same_runs(load_runs(store), world.store_runs)


def _rewrite_run(path: Path, edit) -> None:
    table = pq.read_table(path)
    info = json.loads(table.schema.metadata[b"simfluence"])
    edit(info)
    pq.write_table(table.replace_schema_metadata({"simfluence": json.dumps(info)}), path, use_dictionary=False,
                   write_page_checksum=True)


@fuzz(120)
@given(data=st.data())
def test_edited_run_info_is_refused(world, data):
    """The run info in a run file's footer (id, seed, meta, version, the digests of its store) carries a
    digest of its own, so any edit is refused. In a file without it (written before it was recorded),
    the version, the id and the store's digests are still checked; the seed does not enter the runs."""
    draw = data.draw
    store = _fresh_store(world)
    legacy = draw(st.booleans())
    keys = ["version", "ids_digest", "store_meta_digest", "run_id", "seed"] + ([] if legacy else ["meta", "info_digest"])
    key = draw(st.sampled_from(keys))
    value = draw(_JSON | st.text(alphabet="0123456789abcdef", min_size=16, max_size=16))
    drop = draw(st.booleans())
    path = store / "runs" / "run-000002.parquet"
    before = json.loads(pq.read_schema(path).metadata[b"simfluence"])

    def edit(info):
        if legacy:
            info.pop("info_digest")
        if drop:
            info.pop(key)
        else:
            info[key] = value

    _rewrite_run(path, edit)
    after = json.loads(pq.read_schema(path).metadata[b"simfluence"])
    if not legacy:
        changed = {k: v for k, v in after.items() if k != "info_digest"} != \
            {k: v for k, v in before.items() if k != "info_digest"}
        # A null digest reads as none at all: a file written before it was recorded.
        must_fail = changed or (key == "info_digest" and value not in (None, before["info_digest"]) and not drop)
    elif key in ("version", "ids_digest", "run_id"):   # a missing run_id is the file's name
        must_fail = after.get(key) != before[key] and not (drop and key == "run_id")
    elif key == "store_meta_digest":   # absent or null: a file written before it was recorded
        must_fail = after.get(key) is not None and after[key] != before[key]
    else:
        must_fail = False
    _check_store(world, store, must_fail=must_fail)


# --- (c) saved simulators -------------------------------------------------------------------------
def _check_model(world, path: Path, must_fail: bool = False) -> None:
    loaded = library(lambda: Simulator.load(path))
    if loaded is not None:
        assert not must_fail, "a damaged model was loaded"
        assert np.array_equal(loaded.simulate(world.runs.curricula, world.runs.initial_losses), world.trajectories), \
            "a loaded model simulates other trajectories"
    result = invoke("evaluate", path, world.root / "runs.npz", "--json")
    if must_fail:
        assert_clean_error(result)
    else:
        assert_error_or_same(result, world.expected["runs.npz"])


@fuzz(120)
@given(data=st.data())
def test_damaged_bytes_of_a_saved_model_are_refused_or_harmless(world, data):
    path = world.work / "model-bytes.npz"
    path.write_bytes(mutate_bytes((world.root / "m.npz").read_bytes(), data.draw))
    _check_model(world, path)


@fuzz(40)
@given(fraction=st.floats(0, 1, exclude_max=True))
def test_a_truncated_saved_model_is_refused(world, fraction):
    content = (world.root / "m.npz").read_bytes()
    path = world.work / "model-truncated.npz"
    path.write_bytes(content[:int(fraction * len(content))])
    _check_model(world, path, must_fail=True)


@fuzz(160)
@given(data=st.data())
def test_an_altered_saved_model_is_refused(world, data):
    """Arrays changed in value, dtype or shape, members dropped or added, the config edited: the checksum
    (over the arrays and the config) or the checks on load refuse it. A file without a checksum (saved
    before checksums were written) still loads when nothing else was changed."""
    draw = data.draw
    arrays = {name: value.copy() for name, value in world.model_arrays.items()}
    config = json.loads(str(arrays["config"]))
    original = json.loads(str(arrays["config"]))
    numeric = sorted(name for name, value in arrays.items() if value.dtype.kind in "fiu" and value.size)
    kind = draw(st.sampled_from(["value", "retype", "reshape", "nonfinite", "drop", "add", "kind", "params",
                                 "fit_info", "checksum", "format", "unchecked"]))
    if kind == "value":
        flat = arrays[draw(st.sampled_from(numeric))].reshape(-1)
        flat[draw(st.integers(0, flat.size - 1))] += flat.dtype.type(draw(st.sampled_from([1, -1, 1e-3, 100])))
    elif kind == "retype":
        name = draw(st.sampled_from(numeric))
        arrays[name] = arrays[name].astype(np.float64 if arrays[name].dtype != np.float64 else np.float32)
    elif kind == "reshape":
        name = draw(st.sampled_from(numeric))
        arrays[name] = arrays[name].reshape(-1, 1)
    elif kind == "nonfinite":
        name = draw(st.sampled_from([name for name in numeric if arrays[name].dtype.kind == "f"]))
        arrays[name].reshape(-1)[0] = np.nan
    elif kind == "drop":
        del arrays[draw(st.sampled_from(sorted(name for name in arrays if name != "config")))]
    elif kind == "add":
        arrays[draw(st.sampled_from(["state.extra", "fit_digests"]))] = np.zeros(2, np.float32)
    elif kind == "kind":
        from simfluence.simulators.base import simulator_kinds

        config["kind"] = draw(st.sampled_from([k for k in simulator_kinds() if k != config["kind"]]))
    elif kind == "params":
        config["params"][draw(st.sampled_from([*config["params"], "new"]))] = draw(_JSON)
    elif kind == "fit_info":
        info = config["fit_info"]
        key = draw(st.sampled_from(["loss_range", "num_steps", "batch_size"]))
        info[key] = draw(st.sampled_from([[-1.0, 10.0], [0.0, 1.0], 1, 100, None]))
    elif kind == "checksum":
        config["checksum"] = draw(st.text(alphabet="0123456789abcdef", min_size=64, max_size=64))
    elif kind == "format":
        config[draw(st.sampled_from(["format", "version"]))] = draw(_JSON)
    else:   # a file saved before checksums: loads, and must give the same trajectories
        config.pop("checksum")
        config.pop("config_checksum", None)
    arrays["config"] = np.array(json.dumps(config))
    path = write_npz(world.work / "altered.npz", arrays)
    unchanged = {name: value for name, value in world.model_arrays.items() if name != "config"}
    altered = {name: value for name, value in arrays.items() if name != "config"}
    same_arrays = unchanged.keys() == altered.keys() and all(
        unchanged[name].dtype == altered[name].dtype and np.array_equal(unchanged[name], altered[name])
        for name in unchanged)
    for key in ("checksum", "config_checksum"):
        original.pop(key, None)
        config.pop(key, None)
    _check_model(world, path, must_fail=not (same_arrays and config == original))


# --- exhaustive: every single-byte flip -----------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("target", ["run file", "interchange", "model"])
def test_every_single_byte_flip_is_refused_or_harmless(world, tmp_path, target):
    """Each byte XOR 0x01, 0x80 and 0xff, one at a time, through the library (about 30 s each on 2 cores):
    a one-line SimfluenceError or the unmodified result. Found a footer flip that turned a column
    into a struct, which the random examples above had missed."""
    if target == "run file":
        store = Path(shutil.copytree(world.root / "store", tmp_path / "store"))
        path, load, same = (store / "runs" / "run-000001.parquet", lambda: load_runs(store),
                            lambda loaded: same_runs(loaded, world.store_runs))
    elif target == "interchange":
        path = Path(shutil.copy(world.root / "runs.npz", tmp_path / "runs.npz"))
        load, same = lambda: load_runs(path), lambda loaded: same_runs(loaded, world.runs)
    else:
        path = Path(shutil.copy(world.root / "m.npz", tmp_path / "m.npz"))
        load = lambda: Simulator.load(path)   # noqa: E731
        same = lambda model: np.array_equal(   # noqa: E731
            model.simulate(world.runs.curricula, world.runs.initial_losses), world.trajectories)
    original = path.read_bytes()
    silent = []
    for position in range(len(original)):
        for mask in (0x01, 0x80, 0xff):
            data = bytearray(original)
            data[position] ^= mask
            path.write_bytes(bytes(data))
            loaded = library(load)
            if loaded is not None and not same(loaded):
                silent.append((position, mask))
    assert silent == [], f"flips that changed the result silently: {silent[:10]}"

"""The query commands end to end, through their curriculum files (optimize --out read back by whatif)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from simfluence.cli import main
from simfluence.query import leave_one_out
from simfluence.runs import save_runs


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_queries_end_to_end(fitted, runs, tmp_path):
    model = tmp_path / "model.npz"
    fitted["linear-identity"].save(model)
    save_runs(runs, tmp_path / "runs.npz")
    result = invoke("attribute", model, "--curriculum", tmp_path / "runs.npz", "--run", 2, "--test", "test-1",
                    "--top", 3, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    expected = leave_one_out(fitted["linear-identity"], runs.curricula[2], runs.initial_losses[2], [1])
    assert [row["index"] for row in record["helpful"]] == [i for i, _ in expected.top_helpful(3)]
    assert record["helpful"][0]["final_delta"] == pytest.approx(expected.top_helpful(1)[0][1])
    result = invoke("attribute", model, "--curriculum", tmp_path / "runs.npz", "--group", "g=train-1,train-2,5")
    assert result.exit_code == 0 and "interaction" in result.output, result.output

    result = invoke("optimize", model, "--test-set", "test-0,test-3", "--budget", 5, "--steps", 10,
                    "--initial", tmp_path / "runs.npz", "--random", 30, "--out", tmp_path / "best.npz",
                    "--plot", tmp_path / "opt.png")
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "best.npz") as best:
        assert best["curriculum"].shape == (10, runs.batch_size) and best["objective"] < np.median(
            best["random_objectives"])
        first = int(best["order"][0])
    result = invoke("whatif", model, "--curriculum", tmp_path / "best.npz", "--edit", "shuffle:3", "--edit",
                    f"drop:{first}", "--test", "test-0", "--plot", tmp_path / "whatif.png")
    assert result.exit_code == 0 and "before" in result.output, result.output
    result = invoke("influence-over-time", model, "--curriculum", tmp_path / "runs.npz", "--test", "test-4",
                    "--top", 4, "--plot", tmp_path / "heat.png")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.strip().splitlines()) == 1 + 4 + 1
    for name in ("opt.png", "whatif.png", "heat.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (("attribute", "{model}", "--curriculum", "{runs}", "--test", "nope"), "--test: unknown test id 'nope'"),
    (("whatif", "{model}", "--curriculum", "{runs}", "--edit", "drop:nope"), "unknown training id 'nope'"),
    (("whatif", "{model}", "--curriculum", "{runs}", "--edit", "insert:3@999"), "step 999 is outside"),
    (("attribute", "{model}", "--curriculum", "{runs}", "--run", 99), "--run: 99 is out of range"),
    (("attribute", "{model}", "--curriculum", "{runs}", "--group", "nogroup"), "expected NAME=id"),
    (("influence-over-time", "{model}", "--curriculum", "{bare}", "--test", 0), "field 'initial_losses'"),
    (("optimize", "{model}", "--test-set", "0", "--budget", 999, "--steps", 5, "--initial", "{runs}"),
     "budget: 999"),
])
def test_cli_query_errors_are_one_line(fitted, runs, tmp_path, args, message):
    paths = {"model": tmp_path / "model.npz", "runs": tmp_path / "runs.npz", "bare": tmp_path / "bare.npz"}
    fitted["linear"].save(paths["model"])
    save_runs(runs, paths["runs"])
    np.savez(paths["bare"], curriculum=runs.curricula[0])
    result = invoke(*[str(a).format(**paths) for a in args])
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0 and message in result.output

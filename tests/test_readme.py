"""The README runs as written: every `simfluence` command and Python snippet, on the demo's outputs.

The demo's own commands ("What the demo does") run first in a scratch directory, so the
``out/...`` paths the README uses exist; then every other ``bash`` block's ``simfluence``
commands run in order, and every ``python`` block is executed. A block preceded by
``<!-- readme-test: skip (reason) -->`` is left out (the reason is in the README itself).
Python blocks that continue the prose's example (``fitting``, ``curricula``, ...) get those
names from the demo's outputs.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from simfluence.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- readme-test: skip[^>]*-->\s*)?```(\w+)\n(.*?)```", re.S)


def blocks() -> list[tuple[str, str, bool, int]]:
    """``(language, body, skipped, line)`` of every fenced block of the README."""
    text = README.read_text()
    return [(m.group(2), m.group(3), m.group(1) is not None, text[:m.start()].count("\n") + 1)
            for m in BLOCK.finditer(text)]


def commands(body: str) -> list[list[str]]:
    """The ``simfluence`` command lines of a bash block (continuations joined, comments dropped)."""
    joined = re.sub(r"\\\n\s*", " ", body)
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "simfluence":
            out.append(words[1:])
    return out


def run(args: list[str]) -> str:
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, f"simfluence {' '.join(args)}\n{result.output}"
    return result.output


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory, request):
    directory = tmp_path_factory.mktemp("readme")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.chdir(directory)
    request.addfinalizer(monkeypatch.undo)
    demo = next(body for language, body, _, _ in blocks() if language == "bash" and "simfluence collect" in body)
    for args in commands(demo):
        run(args)
    return directory


def test_the_readme_has_the_blocks_this_test_expects():
    found = blocks()
    assert sum(1 for language, *_ in found if language == "bash") >= 5
    assert sum(1 for language, *_ in found if language == "python") >= 2
    # Every skip says why, and skips stay rare.
    markers = re.findall(r"<!-- readme-test: skip(.*?)-->", README.read_text())
    assert len(markers) == sum(1 for *_, skipped, _ in found if skipped) <= 1
    assert all(re.fullmatch(r" \(.{20,}\) ", marker) for marker in markers), markers


def test_every_simfluence_command_runs(demo_dir):
    ran = 0
    for language, body, skipped, line in blocks():
        if language != "bash" or skipped or "simfluence collect" in body:
            continue
        for args in commands(body):
            run(args)
            ran += 1
    assert ran >= 10
    for written in ("out/whatif.png", "out/best.npz", "out/influence.png", "out/report.html", "out/band.npz",
                    "out/lds-digits/lds.md"):
        assert (demo_dir / written).stat().st_size > 0, written


def test_every_python_snippet_runs(demo_dir, capsys):
    from simfluence import load_runs

    heldout = load_runs("out/digits-heldout.npz")
    context = {"fitting": load_runs("out/digits-train.npz"), "curricula": heldout.curricula[:2],
               "initial": heldout.initial_losses[:2], "new_test_ids": heldout.test_ids[:3],
               "new_initial_losses": heldout.initial_losses[:2, :3]}
    executed, defined = 0, {}
    for language, body, skipped, line in blocks():
        if language != "python" or skipped:
            continue
        namespace = dict(context)
        exec(compile(body, f"README.md:{line}", "exec"), namespace)  # noqa: S102 - the README's own code
        executed += 1
        defined.update(namespace)
    assert executed >= 2
    assert "all-steps MSE" in capsys.readouterr().out
    assert np.isfinite(defined["trajectories"]).all()

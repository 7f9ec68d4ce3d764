"""Fixtures of the report tests: a small real fit on digits-mlp, and a headless Chromium."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from simfluence import RunSet, load_runs
from simfluence.evaluate import split_runs
from simfluence.simulators import LinearIdentitySimulator, Simulator
from synthetic import linear_runs

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


@dataclass
class DigitsFit:
    """A linear-identity simulator fitted on real digits-mlp runs, its held-out runs, and both saved."""

    simulator: Simulator
    heldout: RunSet
    model_path: Path
    heldout_path: Path


@pytest.fixture(scope="session")
def digits_fit(tmp_path_factory) -> DigitsFit:
    from simfluence.collect import collect
    from simfluence.runs import save_runs

    directory = tmp_path_factory.mktemp("digits")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        collect("digits-mlp", directory / "store", num_runs=24, num_steps=40, seed=0, progress=False)
    finally:
        torch.set_num_threads(threads)
    fitting, heldout = split_runs(load_runs(directory / "store"), num_heldout=6)
    simulator = LinearIdentitySimulator().fit(fitting)
    model_path = simulator.save(directory / "model.npz")
    heldout_path = directory / "heldout.npz"
    save_runs(heldout, heldout_path)
    return DigitsFit(simulator, heldout, model_path, heldout_path)


@dataclass
class Hostile:
    """Synthetic runs whose first training and first test id are markup that must never run."""

    runs: RunSet
    train_id: str = "<script>alert('train')</script>"
    test_id: str = '<img src=x onerror="alert(1)">&amp;'


@pytest.fixture
def hostile() -> Hostile:
    runs, _, _ = linear_runs(num_train=12, num_test=5, num_runs=10, num_steps=15, seed=11)
    train_ids, test_ids = runs.train_ids.tolist(), runs.test_ids.tolist()
    train_ids[0], test_ids[0] = Hostile.train_id, Hostile.test_id
    return Hostile(RunSet.create(runs.curricula, runs.losses, train_ids, test_ids, meta=runs.meta))


@pytest.fixture
def artifacts() -> Path:
    """``artifacts/`` at the repository root (ignored by git): screenshots for a person to look at."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium from Debian (scripts/setup.sh installs it), driven by Playwright; no browser download."""
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI") and not os.environ.get("SIMFLUENCE_NO_CHROMIUM"):
            pytest.fail(f"{CHROMIUM} is missing: scripts/setup.sh installs it (apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} is missing: run scripts/setup.sh (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    # Playwright starts it with a fresh temporary profile (user data dir) of its own.
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()

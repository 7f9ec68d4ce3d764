"""The one registry of simulators: declared capabilities, and everything derived from them."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from synthetic import linear_runs

from simfluence import benchmark, lds_benchmark
from simfluence.cli import main
from simfluence.simulators import (
    FAMILIES,
    SIMULATORS,
    Capabilities,
    LinearIdentitySimulator,
    Simulator,
    make_simulator,
    simulator_kinds,
)
from simfluence.simulators.base import register

NO_TASK = [kind for kind in SIMULATORS if SIMULATORS[kind].capabilities.task == "none"]


def test_every_kind_declares_its_own_capabilities():
    for kind, cls in SIMULATORS.items():
        assert vars(cls)["kind"] == kind
        assert isinstance(vars(cls)["capabilities"], Capabilities), kind
    assert list(SIMULATORS) == simulator_kinds()
    families = [SIMULATORS[kind].capabilities.family for kind in SIMULATORS]
    assert families == sorted(families, key=FAMILIES.index)  # listed family by family


def test_cli_and_benchmarks_list_the_registry():
    help_text = CliRunner().invoke(main, ["fit", "--help"]).output
    for kind in SIMULATORS:
        assert kind in help_text
    assert sorted(benchmark.ALL_METHODS) == sorted(SIMULATORS)
    assert set(benchmark.BASELINES) == {kind for kind in SIMULATORS if not SIMULATORS[kind].capabilities.attribution}
    assert set(lds_benchmark.SIMULATORS) == set(SIMULATORS) - set(benchmark.BASELINES)


def test_capability_filters():
    assert set(simulator_kinds(ridge=True)) == {kind for kind, cls in SIMULATORS.items() if cls.capabilities.ridge}
    assert simulator_kinds("gradient", task="none") == []
    assert "linear-bootstrap" in simulator_kinds(intervals=True)
    with pytest.raises(TypeError, match="unknown capabilities"):
        simulator_kinds(colour="blue")
    with pytest.raises(ValueError, match="unknown simulator 'nope'"):
        make_simulator("nope")


def test_register_refuses_undeclared_or_duplicate_kinds():
    class Inherits(LinearIdentitySimulator):
        kind = "inherits"          # capabilities only inherited: refused

    with pytest.raises(TypeError, match="must declare its own 'capabilities'"):
        register(Inherits)

    class Twin(LinearIdentitySimulator):
        kind = "linear-identity"
        capabilities = LinearIdentitySimulator.capabilities

    with pytest.raises(TypeError, match="registered twice"):
        register(Twin)
    with pytest.raises(ValueError, match="family"):
        Capabilities("learnt")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def fitted() -> tuple[dict[str, Simulator], object]:
    runs, _, _ = linear_runs(num_train=16, num_test=5, num_runs=10, num_steps=12, seed=3)
    return {kind: make_simulator(kind).fit(runs) for kind in NO_TASK}, runs


def test_column_rollout_is_declared_and_equals_slicing_a_full_rollout(fitted):
    simulators, runs = fitted
    columns = np.array([3, 0])
    for kind, simulator in simulators.items():
        run = simulator.column_rollout(columns)
        if not simulator.capabilities.column_rollout:
            assert run is None, kind
            continue
        assert run is not None, kind
        full = simulator.simulate(runs.curricula, runs.initial_losses)
        part = run(runs.curricula, runs.initial_losses.astype(np.float64))
        np.testing.assert_allclose(part, full[..., columns], rtol=1e-5, atol=1e-6, err_msg=kind)


def test_intervals_only_where_declared(fitted):
    simulators, runs = fitted
    for kind, simulator in simulators.items():
        if simulator.capabilities.intervals:
            lower, middle, upper = simulator.simulate_interval(runs.curricula[:2], runs.initial_losses[:2])
            assert (lower <= middle + 1e-6).all() and (middle <= upper + 1e-6).all()
        else:
            with pytest.raises(TypeError, match="no prediction intervals"):
                simulator.simulate_interval(runs.curricula[:2], runs.initial_losses[:2])


def test_every_true_or_false_setting_refuses_other_values():
    """A setting given as the string "False" (or 0, or None) is refused, never read by its truthiness."""
    import dataclasses

    from simfluence.errors import UsageError

    checked = 0
    for kind, cls in SIMULATORS.items():
        for item in dataclasses.fields(cls.config_class):
            if not isinstance(item.default, bool):
                continue
            for value in ("False", 0, None):
                with pytest.raises(UsageError, match=f"{item.name}: expected true or false, got {value!r}"):
                    make_simulator(kind, **{item.name: value})
            try:   # the other truth value is accepted, or refused for a reason of the kind's own
                flipped = make_simulator(kind, **{item.name: not item.default}).config
                assert getattr(flipped, item.name) is (not item.default)
            except UsageError as error:
                assert "expected true or false" not in str(error)
            checked += 1
    assert checked >= 8

"""Settings as frozen config dataclasses: one per kind, validated in one place, persisted by name."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from synthetic import linear_runs

from simfluence.errors import UsageError
from simfluence.runs import RunDataError
from simfluence.simulators import SIMULATORS, LinearIdentitySimulator, Simulator, make_simulator
from simfluence.simulators.base import config_checksum
from simfluence.simulators.config import SimulatorConfig
from simfluence.simulators.linear import LinearConfig


@pytest.mark.parametrize("kind", list(SIMULATORS))
def test_every_kind_has_a_documented_frozen_config_that_round_trips(kind):
    cls = SIMULATORS[kind]
    assert issubclass(cls.config_class, SimulatorConfig)
    for name, text in cls.config_class.help().items():
        assert text.strip(), f"{kind}: setting '{name}' has no help text"
    simulator = cls()
    assert isinstance(simulator.config, cls.config_class)
    settings = simulator.settings()
    assert json.loads(json.dumps(settings)) == settings                 # JSON-ready
    assert cls(**settings).settings() == settings                       # by name, back to the same config
    assert cls(config=cls.config_class.from_params(settings)).config == simulator.config
    if dataclasses.fields(cls.config_class):
        name = dataclasses.fields(cls.config_class)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(simulator.config, name, None)


def test_settings_are_checked_in_one_place_and_name_what_is_wrong():
    with pytest.raises(UsageError, match=r"colour: not a setting of LinearSpaceConfig; settings: \['batch_mean'"):
        LinearIdentitySimulator(colour="blue")
    with pytest.raises(UsageError, match="cv_folds: expected an integer >= 2, got 1"):
        LinearConfig(cv_folds=1)
    with pytest.raises(UsageError, match="give a config or settings, not both"):
        LinearIdentitySimulator(LinearConfig(), ridge=1.0)
    with pytest.raises(UsageError, match="config must be a TrajectoryConfig, got LinearConfig"):
        make_simulator("linear-trajectory", config=LinearConfig())
    assert LinearConfig(cv_folds=4.0).cv_folds == 4 and isinstance(LinearConfig(cv_folds=4.0).cv_folds, int)
    assert LinearConfig(ridge_grid=[1, 2]).ridge_grid == (1.0, 2.0)  # normalised: hashable and JSON-ready


def test_old_names_are_accepted_for_one_release():
    with pytest.warns(DeprecationWarning, match="'max_iter' is now called 'cg_max_iter'"):
        simulator = LinearIdentitySimulator(max_iter=7)
    assert simulator.config.cg_max_iter == 7 and "max_iter" not in simulator.settings()
    with pytest.raises(UsageError, match="give 'cg_max_iter' only"):
        LinearIdentitySimulator(max_iter=7, cg_max_iter=8)
    with pytest.warns(DeprecationWarning, match="'rank' is now called 'lanczos_rank'"):
        assert make_simulator("influence", rank=16).config.lanczos_rank == 16
    with pytest.warns(DeprecationWarning, match="'checkpoints' is now called 'num_checkpoints'"):
        assert make_simulator("featurized", checkpoints=2).config.num_checkpoints == 2


def test_a_file_saved_with_an_old_name_loads_with_the_new_one(tmp_path):
    runs, _, _ = linear_runs(seed=2)
    simulator = LinearIdentitySimulator(ridge=0.5, cg_max_iter=500).fit(runs)
    path = simulator.save(tmp_path / "model.npz")
    arrays = dict(np.load(path, allow_pickle=False))
    config = json.loads(str(arrays["config"]))
    config["params"]["max_iter"] = config["params"].pop("cg_max_iter")
    config["config_checksum"] = config_checksum(config)
    np.savez(tmp_path / "old.npz", **{**arrays, "config": np.array(json.dumps(config))})
    with pytest.warns(DeprecationWarning):
        loaded = Simulator.load(tmp_path / "old.npz")
    assert loaded.config == simulator.config


def test_auto_files_from_before_the_fitted_entry_still_load(tmp_path):
    """Older files kept auto's choice in ``params``; it now lives under ``fitted``."""
    runs, _, _ = linear_runs(seed=3)
    simulator = make_simulator("auto", candidates=["linear-identity", "linear"]).fit(runs)
    path = simulator.save(tmp_path / "auto.npz")
    arrays = dict(np.load(path, allow_pickle=False))
    config = json.loads(str(arrays["config"]))
    assert set(config["fitted"]) == {"chosen", "chosen_params"}
    config["params"].update(config.pop("fitted"))
    config["config_checksum"] = config_checksum(config)
    np.savez(tmp_path / "old.npz", **{**arrays, "config": np.array(json.dumps(config))})
    loaded = Simulator.load(tmp_path / "old.npz")
    assert loaded.chosen_ == simulator.chosen_ and loaded.settings() == simulator.settings()
    np.testing.assert_array_equal(loaded.simulate(runs.curricula, runs.initial_losses),
                                  simulator.simulate(runs.curricula, runs.initial_losses))
    config["params"]["chosen"] = "constant"   # not a candidate: one line naming the field
    config["config_checksum"] = config_checksum(config)
    np.savez(tmp_path / "bad.npz", **{**arrays, "config": np.array(json.dumps(config))})
    with pytest.raises(RunDataError, match=r"config\.params.*chosen: 'constant' is not among the candidates"):
        Simulator.load(tmp_path / "bad.npz")


def test_a_task_object_is_kept_and_recorded_by_name():
    from simfluence.tasks import get_task

    task = get_task("digits-mlp", num_train=30, num_test=6)
    simulator = make_simulator("grad-dot", task=task)
    assert simulator.task_object is task and simulator.task_spec is task
    assert simulator.config.task == "digits-mlp" and simulator.config.task_options == task.config()
    assert make_simulator("grad-dot").task_spec is None   # the runs' meta decides

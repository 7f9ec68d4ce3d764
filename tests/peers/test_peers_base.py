"""The shared peer interface: registry, checkpoints and their cost, index checks, the missing-extra error."""

from dataclasses import dataclass

import numpy as np
import pytest

from simfluence.collect.train import train_run, train_states
from simfluence.errors import MissingExtraError
from simfluence.func.checkpoints import checkpoint_weights, final_states
from simfluence.peers import PEERS, Checkpoints, Peer, TracInCP, get_peer, start_checkpoint, trajectory_checkpoints


def test_checkpoint_weights_assign_each_step_to_the_nearest_checkpoint():
    rates = np.arange(1.0, 11.0)                      # steps 1..10; step t uses the weights of step t-1
    # checkpoints at 0, 4, 10: gradient positions 0..9 go to 0 | 4 | 10 as 0,1,2 | 3..7 | 8,9
    # (positions 2 and 7 are ties, which go to the earlier checkpoint)
    np.testing.assert_allclose(checkpoint_weights(rates, [0, 4, 10]), [1 + 2 + 3, 4 + 5 + 6 + 7 + 8, 9 + 10])
    np.testing.assert_allclose(checkpoint_weights(rates, [10, 0, 4]), [19, 6, 30])   # in the order given
    np.testing.assert_allclose(checkpoint_weights(rates, [7]), [rates.sum()])
    with pytest.raises(ValueError, match="0..10"):
        checkpoint_weights(rates, [11])
    with pytest.raises(ValueError, match="repeats"):
        checkpoint_weights(rates, [2, 2])


def test_final_states_are_the_runs_last_weights(digits, curricula):
    states = final_states(digits, curricula)
    assert len(states) == 3
    for curriculum, state in zip(curricula, states):
        replayed = train_states(digits, curriculum, [curriculum.shape[0]])[0]
        for key, value in replayed.items():
            np.testing.assert_allclose(state[key].numpy(), value.numpy(), atol=1e-5)
    log = train_run(digits, curricula[0])
    assert log.losses.shape[0] == 21  # the replay is the real run


def test_costs_follow_the_checkpoints(digits, curricula):
    start = start_checkpoint(digits)
    assert start.trainings == 0 and len(start) == 1 and start.steps.tolist() == [0]
    trajectory = trajectory_checkpoints(digits, curricula[0], [0, 10, 20])
    assert trajectory.trainings == 1.0 and trajectory.seconds > 0
    np.testing.assert_allclose(trajectory.weights.sum(), 20 * digits.learning_rate)
    result = TracInCP().attribute(digits, trajectory, test_index=[2])
    cost = result.cost
    assert (cost.trainings, cost.checkpoints, cost.train_seconds) == (1.0, 3, trajectory.seconds)
    assert cost.seconds == pytest.approx(cost.train_seconds + cost.method_seconds)
    assert set(cost.as_dict()) == {"trainings", "train_seconds", "method_seconds", "seconds", "checkpoints"}
    # a bare list of state dicts is accepted; TracIn then weights every checkpoint by the task's rate
    bare = TracInCP().scores(digits, list(trajectory.states), test_index=[2])
    reweighted = Checkpoints(trajectory.states, weights=np.full(3, digits.learning_rate))
    np.testing.assert_allclose(bare, TracInCP().scores(digits, reweighted, test_index=[2]))
    assert not np.allclose(bare, result.scores)


def test_registry_and_argument_checks(digits):
    assert set(PEERS) == {"trak", "ekfac", "tracin"}
    assert get_peer("ekfac", strategy="kfac").strategy == "kfac"
    with pytest.raises(ValueError, match="unknown"):
        get_peer("datamodels")
    with pytest.raises(ValueError, match="bad settings"):
        get_peer("trak", damping=1.0)
    start = start_checkpoint(digits)
    with pytest.raises(ValueError, match="train_index"):
        TracInCP().scores(digits, start, train_index=[0, 40])
    with pytest.raises(ValueError, match="test_index"):
        TracInCP().scores(digits, start, test_index=np.array([0.5]))
    with pytest.raises(ValueError, match="one per state"):
        Checkpoints(start.states, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="at least one"):
        Checkpoints(())


@dataclass
class Unavailable(Peer):
    """A peer whose library is not installed."""

    name = "unavailable"
    module = "simfluence_peer_library_that_does_not_exist"
    library = "nothing==0"

    def _scores(self, task, checkpoints, train_index, test_index, progress):
        raise AssertionError("must not run without its library")


def test_a_missing_library_names_the_extra(digits):
    with pytest.raises(MissingExtraError, match=r"pip install 'simfluence\[peers\]'") as error:
        Unavailable().scores(digits, start_checkpoint(digits))
    assert error.value.extra == "peers" and "\n" not in str(error.value)

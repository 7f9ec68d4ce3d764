"""The same numbers on every device present: CPU always, CUDA when this machine has a GPU.

`scripts/gpu_check.sh` runs this file on a GPU machine; CI (no GPU) runs the CPU cases.
"""

import numpy as np
import pytest
import torch

from simfluence.evaluate import split_runs
from simfluence.simulators import LinearIdentitySimulator
from synthetic import linear_runs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_linear_fit_and_rollout_on_device_equal_cpu(device):
    runs, _, _ = linear_runs(num_runs=10, seed=11)
    fitting, heldout = split_runs(runs, 3, 0)
    reference = LinearIdentitySimulator(ridge=1e-3).fit(fitting).simulate(heldout.curricula, heldout.initial_losses)
    on_device = LinearIdentitySimulator(ridge=1e-3, device=device).fit(fitting)
    np.testing.assert_allclose(on_device.simulate(heldout.curricula, heldout.initial_losses), reference,
                               rtol=1e-4, atol=1e-5)
    # Removal queries pass padded on-device blocks through the batch design.
    from simfluence.query import leave_one_out

    cpu = LinearIdentitySimulator(ridge=1e-3).fit(fitting)
    effects = leave_one_out(on_device, heldout.curricula[0], heldout.initial_losses[0])
    expected = leave_one_out(cpu, heldout.curricula[0], heldout.initial_losses[0])
    np.testing.assert_allclose(effects.final_delta, expected.final_delta, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_recorder_evaluates_on_device_like_cpu(device, tmp_path):
    transformers = pytest.importorskip("transformers")
    import hf_tiny
    from simfluence.recorder import Recorder, auto_loss

    del transformers
    losses = {}
    for where in ("cpu", device):
        model = hf_tiny.tiny_model().to(where)
        recorder = Recorder(tmp_path / where, model=model, loss_fn=auto_loss, train_ids=hf_tiny.NUM_TRAIN,
                            test_inputs=hf_tiny.TEST, test_collate=hf_tiny.collate, device=where)
        recorder.start()
        losses[where] = recorder.evaluate().cpu().numpy()
        recorder.abort()
    np.testing.assert_allclose(losses[device], losses["cpu"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_minilm_finetune_runs_on_device(device, tmp_path):
    pytest.importorskip("transformers")
    from simfluence.collect import collect
    from simfluence.tasks.finetune import MiniLMFinetune

    task = MiniLMFinetune(device=device, train_per_class=3, test_per_class=2)
    runs = collect(task, tmp_path / "s", num_runs=1, num_steps=2, progress=False).load()
    assert runs.losses.shape == (1, 3, 8) and np.isfinite(runs.losses).all()
    assert runs.meta["task_config"]["device"] == device

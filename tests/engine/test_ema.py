"""The weight average of the ``photos`` recipe: its arithmetic, its buffers and its checkpoint state."""
import math

import pytest
import torch
from torch import nn

from ssd.engine.ema import WeightAverage


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_each_update_moves_the_average_by_the_ramped_decay():
    model = net()
    ema = WeightAverage(model, decay=0.9, ramp=2.0)
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model)
    d = 0.9 * (1 - math.exp(-1 / 2.0))
    torch.testing.assert_close(ema.module[0].weight, d * w0 + (1 - d) * (w0 + 1))
    assert ema.updates == 1 and ema.factor() == pytest.approx(0.9 * (1 - math.exp(-2 / 2.0)))
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training


def test_zero_decay_copies_and_integer_buffers_are_copied():
    model = net()
    ema = WeightAverage(model, decay=0.0)
    model.train()
    model(torch.randn(4, 3))  # batch norm: running stats and its step count move
    ema.update(model)
    for (name, mine), theirs in zip(ema.module.state_dict().items(), model.state_dict().values()):
        assert torch.equal(mine, theirs), name
    assert int(ema.module[1].num_batches_tracked) == 1


def test_state_round_trip_resumes_the_same_average():
    model = net()
    ema = WeightAverage(model, decay=0.99)
    for _ in range(3):
        with torch.no_grad():
            model[0].bias.add_(0.5)
        ema.update(model)
    again = WeightAverage(net(), decay=0.99)
    again.load_state_dict(ema.state_dict())
    assert again.updates == 3
    for a, b in zip(again.module.state_dict().values(), ema.module.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("decay, ramp", [(1.0, 100.0), (-0.1, 100.0), (0.9, 0.0)])
def test_bad_settings_are_refused(decay, ramp):
    with pytest.raises(ValueError, match="EMA decay"):
        WeightAverage(net(), decay, ramp)


@pytest.mark.slow
def test_a_photos_run_killed_in_epoch_2_ends_with_the_average_of_an_uninterrupted_one(tmp_path, mlflow_server):
    """``train.recipe: photos`` in a real training: the checkpoint holds the weight average, so a run
    killed in epoch 2 and rerun saves the same averaged weights as one that was never stopped."""
    import subprocess
    import sys

    from tiny_data import FAULTS, make_project, train_env

    runs = {}
    for name, fault in (("whole", None), ("crashed", "kill@2:1")):
        project = make_project(tmp_path / name, recipe="photos")
        if fault:
            killed = subprocess.run([sys.executable, FAULTS], cwd=project, capture_output=True, timeout=300,
                                    env=train_env(mlflow_server, SSD_TEST_FAULT=fault))
            assert killed.returncode == -9, killed.stderr.decode()[-2000:]
        done = subprocess.run([sys.executable, "-m", "ssd", "train"], cwd=project, env=train_env(mlflow_server),
                              capture_output=True, timeout=300)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        assert ("resuming from" in done.stderr.decode()) == bool(fault)
        runs[name] = torch.load(project / "models/model.pt", map_location="cpu", weights_only=True)
    assert runs["whole"]["config"]["fusion"] and runs["whole"]["params"]["train"]["recipe"] == "photos"
    assert all(torch.equal(runs["whole"]["model"][k], runs["crashed"]["model"][k]) for k in runs["whole"]["model"])

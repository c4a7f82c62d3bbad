"""Learning-rate schedules: warm-up then cosine, constant untouched, resumable mid-run."""
import pytest
import torch

from ssd.core.schedule import lr_factor, make_scheduler


def lrs(kind: str, epochs: int, steps: int, warmup: float, start: int = 0, lr: float = 0.2) -> list[float]:
    """The lr used by each remaining iteration of the run."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = make_scheduler(opt, kind, epochs=epochs, steps_per_epoch=steps, warmup_epochs=warmup, start_step=start)
    out = []
    for _ in range(start, epochs * steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_constant_without_warmup_is_exactly_the_base_lr():
    assert lrs("constant", 3, 4, 0) == [0.2] * 12


def test_warmup_rises_linearly_then_cosine_falls_to_zero():
    got = lrs("cosine", 4, 2, 1)                       # 8 iterations, 2 of warm-up
    assert got[:2] == pytest.approx([0.1, 0.2])
    assert got[2] == pytest.approx(0.2)                # cosine starts at the peak
    assert all(a > b for a, b in zip(got[2:], got[3:]))
    assert got[-1] == pytest.approx(0.2 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 5 / 6)).item()))


def test_constant_with_warmup():
    assert lrs("constant", 2, 4, 0.5) == pytest.approx([0.1, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2])


def test_resumed_schedule_continues_where_it_stopped():
    full = lrs("cosine", 5, 3, 1)
    assert lrs("cosine", 5, 3, 1, start=6) == pytest.approx(full[6:])


@pytest.mark.parametrize("kind, total, warmup, match", [
    ("step", 10, 0, "lr_schedule='step'"), ("cosine", 10, 11, "warm-up"), ("constant", 0, 0, "total")])
def test_bad_settings_are_named(kind, total, warmup, match):
    with pytest.raises(ValueError, match=match):
        lr_factor(kind, total, warmup)

"""``ssd train`` with test faults, installed through ``ssd.engine.step.register_step_hook``.

The shipped training loop holds no fault code: tests run this script instead of ``ssd train``,
alone or under torchrun, with the fault in ``SSD_TEST_FAULT``:

    SSD_TEST_FAULT=nan@2:1 python tests/faults.py            # the loss of epoch 2, step 1 is NaN
    SSD_TEST_FAULT=kill@2:1:1 torchrun --nproc-per-node 2 tests/faults.py   # SIGKILL rank 1 there
    SSD_TEST_FAULT=record@DIR torchrun ... tests/faults.py   # each rank logs its steps to DIR/rank<r>.jsonl
    SSD_TEST_FAULT=rng,kill@2:1 python tests/faults.py       # several: rng scales each loss by a random draw
    SSD_TEST_FAULT=stop@1:1 python tests/faults.py           # SIGSTOP there: a training that holds its lock
    SSD_TEST_FAULT=term@2:1 python tests/faults.py           # SIGTERM there, as a Cancel or `kill` sends
    SSD_TEST_FAULT=killserver@2:1 SSD_TEST_SERVER_PGID=N ...  # SIGKILL process group N there (a server dies)

``EPOCH:STEP`` count from 1; a third number limits the fault to that rank. Faults fire only in a
first attempt, so a ``torchrun --max-restarts`` restart runs clean. Other arguments go to ``ssd train``.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import torch

from ssd.engine import distributed
from ssd.cli import main as cli_main
from ssd.engine.step import TrainStep, register_step_hook


def fault_hook(spec: str):
    """The step hook for ``spec`` (see the module docstring)."""
    kind, _, where = spec.partition("@")
    if kind == "rng":  # makes every step depend on torch's global RNG, as augmentation would
        return lambda s: s.loss * (0.5 + torch.rand((), device=s.loss.device))
    if kind == "record":
        return _recorder(Path(where))
    epoch, step, *rank = (int(p) for p in where.split(":"))
    signals = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "term": signal.SIGTERM}
    if kind not in ("nan", "killserver", *signals):
        raise ValueError(f"SSD_TEST_FAULT={spec!r}: expected nan@E:S[:RANK], kill|stop|term@E:S[:RANK], rng "
                         "or record@DIR")

    def hook(s: TrainStep) -> torch.Tensor | None:
        if (s.epoch, s.step) != (epoch, step) or rank not in ([], [distributed.get_rank()]):
            return None
        if kind == "killserver":
            os.killpg(int(os.environ["SSD_TEST_SERVER_PGID"]), signal.SIGKILL)
            return None
        if kind in signals:
            os.kill(os.getpid(), signals[kind])
            return None
        return s.loss * float("nan")

    return hook


def _recorder(folder: Path):
    """Append, per step, a digest of this rank's images and of its weights (before the update)."""
    folder.mkdir(parents=True, exist_ok=True)

    def hook(s: TrainStep) -> None:
        weights = torch.cat([p.detach().flatten() for p in s.model.parameters()])
        row = {"epoch": s.epoch, "step": s.step,
               "images": [hashlib.sha1(img.cpu().numpy().tobytes()).hexdigest() for img in s.images],
               "weights": hashlib.sha1(weights.cpu().numpy().tobytes()).hexdigest()}
        with open(folder / f"rank{distributed.get_rank()}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    return hook


if __name__ == "__main__":
    spec = os.environ.get("SSD_TEST_FAULT")
    if spec and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        for part in spec.split(","):
            register_step_hook(fault_hook(part))
    sys.exit(cli_main(["train", *sys.argv[1:]]))

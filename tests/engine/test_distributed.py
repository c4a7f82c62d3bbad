"""Several processes: DDP gradients, torchrun on one and on two "nodes", recovery under --max-restarts;
device, backend, precision and RNG-state choices for the machine at hand (CPU or GPU host alike)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssd.engine import distributed
from ssd.core.model import TinySSD
from ssd.engine.checkpoint import rng_state, set_rng_state
from ssd.engine.precision import cpu_has_fast_bf16, resolve_precision
from ssd.engine.step import forward_loss
from servers import free_port
from tiny_data import FAULTS, make_project, torchrun, train_env


def _batch(n: int = 8, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    corner = torch.rand(n, 2, generator=g) * 0.5
    boxes = torch.cat([corner, corner + 0.2 + torch.rand(n, 2, generator=g) * 0.3], dim=1)
    return images, torch.cat([torch.zeros(n, 1), boxes], dim=1)[:, None, :]


def _model() -> TinySSD:
    torch.manual_seed(0)
    # BN in eval mode: batch statistics would otherwise differ between a half batch and the whole.
    return TinySSD().eval()


def cpu_unless_gpus(n: int) -> dict[str, str]:
    """Environment for ``n`` processes: one GPU each where this host has ``n``, else GPUs hidden (CPU, gloo)."""
    return {} if torch.cuda.device_count() >= n else {"CUDA_VISIBLE_DEVICES": ""}


def _ddp_worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), **cpu_unless_gpus(world_size))
    torch.set_num_threads(1)
    info = distributed.init_distributed()
    try:
        assert (distributed.get_rank(), distributed.get_world_size()) == (rank, world_size)
        assert distributed.is_main_process() == (rank == 0)
        assert dist.get_backend() == distributed.backend_for(info.device)
        device_ids = [info.device] if info.device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(_model().to(info.device), device_ids=device_ids)
        images, labels = _batch()
        share = len(images) // world_size
        part = slice(rank * share, (rank + 1) * share)
        loss, stats = forward_loss(net, images[part].to(info.device), labels[part].to(info.device))
        loss.backward()
        distributed.all_reduce_sum(stats)
        if info.is_main:
            torch.save({"grads": {n: p.grad.cpu() for n, p in net.module.named_parameters()}, "stats": stats.cpu(),
                        "device": str(info.device)}, out)
    finally:
        distributed.destroy_distributed()


def test_ddp_gradients_match_single_process_on_the_same_global_batch(tmp_path):
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)

    net = _model()
    loss, stats = forward_loss(net, *_batch())
    loss.backward()
    # The reduced metric sums are the global ones, up to the summation order of two halves (float64).
    torch.testing.assert_close(ddp["stats"], stats, rtol=1e-6, atol=1e-6)
    tol = {"rtol": 1e-4, "atol": 1e-6} if ddp["device"] == "cpu" else {"rtol": 1e-2, "atol": 1e-4}  # TF32 on GPUs
    for name, param in net.named_parameters():
        torch.testing.assert_close(ddp["grads"][name], param.grad, **tol, msg=name)


def _history(project) -> list[dict]:
    return list(csv.DictReader((project / "reports/train_history.csv").open()))


def test_torchrun_two_processes_train_end_to_end(tmp_path, mlflow_server):
    project = make_project(tmp_path / "p", epochs=1)
    done = subprocess.run([torchrun(), "--standalone", "--nproc-per-node", "2", "-m", "ssd", "train"],
                          cwd=project, env={**train_env(mlflow_server), **cpu_unless_gpus(2)}, capture_output=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    metrics = json.loads((project / "reports/train.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs"] == 1
    assert [r["epoch"] for r in _history(project)] == ["1"]
    assert (project / "models/model.pt").is_file() and (project / "models/checkpoints/epoch_0001.pt").is_file()
    # Only rank 0 logs: one epoch line, not two.
    assert done.stderr.decode().count("epoch 1/1: loss") == 1


def test_two_nodes_rendezvous_and_train(tmp_path, mlflow_server):
    project = make_project(tmp_path / "p", epochs=1)
    endpoint = f"127.0.0.1:{free_port()}"
    launches = [subprocess.Popen([torchrun(), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
                                  "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes",
                                  "-m", "ssd", "train"],
                                 cwd=project, env={**train_env(mlflow_server), **cpu_unless_gpus(1)},
                                 stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT)
                for node in (0, 1)]
    logs = [p.communicate(timeout=300)[0].decode() for p in launches]
    assert [p.returncode for p in launches] == [0, 0], "\n----\n".join(log[-2000:] for log in logs)
    metrics = json.loads((project / "reports/train.json").read_text())
    assert metrics["world_size"] == 2
    import mlflow

    run = mlflow.MlflowClient(mlflow_server).get_run(json.loads((project / "models/mlflow_run.json").read_text())["run_id"])
    assert run.data.tags["world_size"] == "2" and run.data.tags["nnodes"] == "2"


def test_killed_worker_recovers_from_checkpoint_under_max_restarts(tmp_path, mlflow_server):
    project = make_project(tmp_path / "p", epochs=2)
    done = subprocess.run([torchrun(), "--standalone", "--nproc-per-node", "2", "--max-restarts", "1", FAULTS],
                          cwd=project, env={**train_env(mlflow_server, SSD_TEST_FAULT="kill@2:1:1"), **cpu_unless_gpus(2)},
                          capture_output=True, timeout=300)
    log = done.stderr.decode()
    assert done.returncode == 0, log[-3000:]
    assert "resuming from" in log and "epoch_0001.pt" in log  # the restart continued from epoch 1
    assert [r["epoch"] for r in _history(project)] == ["1", "2"]
    assert json.loads((project / "reports/train.json").read_text())["epochs"] == 2


def test_two_processes_share_the_data_and_keep_identical_weights(tmp_path, mlflow_server):
    """Each rank trains on its own shard of every epoch, and DDP keeps the ranks' weights equal:
    without the sampler's sharding both ranks would see the same images, without DDP the weights
    would drift apart from the second step on."""
    project = make_project(tmp_path / "p", images=8, epochs=2, batch_size=4)
    steps = tmp_path / "steps"
    done = subprocess.run([torchrun(), "--standalone", "--nproc-per-node", "2", FAULTS], cwd=project,
                          env={**train_env(mlflow_server, SSD_TEST_FAULT=f"record@{steps}"), **cpu_unless_gpus(2)},
                          capture_output=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    ranks = [[json.loads(line) for line in (steps / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert [(s["epoch"], s["step"]) for s in ranks[0]] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert [s["weights"] for s in ranks[0]] == [s["weights"] for s in ranks[1]]
    assert len({s["weights"] for s in ranks[0]}) == 4  # and they did train
    for epoch in (1, 2):
        seen = [[img for s in rank if s["epoch"] == epoch for img in s["images"]] for rank in ranks]
        assert len(seen[0]) == len(seen[1]) == 4 and not set(seen[0]) & set(seen[1])
        assert len(set(seen[0]) | set(seen[1])) == 8  # together, every training image once


def test_nonfinite_loss_on_one_rank_stops_both(tmp_path, mlflow_server):
    project = make_project(tmp_path / "p", images=8, epochs=2, batch_size=4)
    done = subprocess.run([torchrun(), "--standalone", "--nproc-per-node", "2", FAULTS], cwd=project,
                          env={**train_env(mlflow_server, SSD_TEST_FAULT="nan@2:1:1"), **cpu_unless_gpus(2)},
                          capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    # Both ranks stop with the same message (each prints it), neither hangs in a collective.
    assert done.stderr.count("ssd train: error: non-finite loss at epoch 2 step 1") == 2, done.stderr[-3000:]
    assert "epoch_0001.pt" in done.stderr and not (project / "models/model.pt").exists()
# --- Device, backend, precision and RNG state --------------------------------------------------------

def test_device_and_backend_follow_the_hardware(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = distributed.init_distributed()
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert info.device.type == expected and (info.rank, info.world_size) == (0, 1)
    assert distributed.backend_for(info.device) == ("nccl" if expected == "cuda" else "gloo")
    assert distributed.backend_for(torch.device("cuda", 1)) == "nccl"
    assert distributed.backend_for(torch.device("cpu")) == "gloo"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_more_ranks_than_gpus_is_refused():
    with pytest.raises(RuntimeError, match="GPU"):
        distributed.select_device(torch.cuda.device_count())


_RSS_AFTER_FREE = """
import resource, sys, torch
from ssd.engine.distributed import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
x = torch.ones(64 * 2**20 // 4)  # 64 MB: over glibc's mmap threshold
before = rss_mb()
del x
print(before - rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_keeps_a_freed_block_resident():
    def released(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", _RSS_AFTER_FREE, mode], capture_output=True, text=True, check=True)
        return float(out.stdout.strip())

    assert released("default") > 50  # glibc unmaps the block: the memory goes back to the kernel
    assert released("keep") < 5      # kept in the heap for the next step's allocation


def test_auto_precision_counts_only_native_bf16(monkeypatch):
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"
    with pytest.raises(ValueError, match="train.precision='fp8'"):
        resolve_precision("fp8", torch.device("cpu"))
    # A GPU that only emulates bf16 (V100, T4) says yes when emulation is counted: auto must take fp16.
    emulating = lambda including_emulation=True: including_emulation  # noqa: E731
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", emulating)
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"


def test_rng_state_holds_only_this_process_gpu():
    state = rng_state()
    assert len(state["cuda"]) == (1 if torch.cuda.is_initialized() else 0)


def test_rng_state_from_a_machine_with_more_gpus_restores():
    """A checkpoint saved where 8 GPUs were visible resumes here (no IndexError), torch RNG included."""
    state = rng_state()
    expected = torch.rand(3)
    if torch.cuda.is_initialized():
        state["cuda"] = state["cuda"] * 8
    else:  # a process on the CPU has no GPU state to restore: the list is ignored
        state["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 8
    set_rng_state(state)
    assert torch.equal(torch.rand(3), expected)

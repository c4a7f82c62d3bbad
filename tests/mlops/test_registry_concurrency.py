"""Registry writes that take turns and records that tell the truth: two `ssd register` processes at
once against a real `mlflow server`, the lock the server holds, one version per weights, and
decision texts whose figures differ when the numbers do."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ssd.core.model import TinySSD, save_model
from ssd.mlops.lease import lock_name, registry_lock
from ssd.mlops.records import figures
from ssd.mlops.registry import decide_promotion, weights_digest
from ssd.util.errors import TransientError
from test_registry import ROOT, _register_cli, _state, _training_run
from tiny_data import train_env


# ----------------------------------------------------------------------------------------------
# Figures and weights, no server.

def test_figures_that_differ_never_print_equal():
    assert figures(0.5, 0.3) == ("0.5000", "0.3000")  # four decimals when they suffice
    for values in [(0.0, 4.6e-05), (0.123456, 0.123457), (0.0, 1e-20), (0.1 + 0.2, 0.3), (1.0, 1.0 + 2**-52)]:
        shown = figures(*values)
        assert len(set(shown)) == 2 and [float(s) for s in shown] != [float(shown[0])] * 2, (values, shown)
    assert figures(0.25, 0.25) == ("0.2500", "0.2500")


def test_decision_text_shows_figures_that_differ():
    """The registry once read "0.0000 does not beat champion's 0.0000" for 0 vs 4.6e-05."""
    reason = decide_promotion(0.0, 4.6e-05).reason
    assert "0.00000 does not beat champion's 0.00005" in reason, reason
    assert "by 0.00005" in decide_promotion(4.6e-05, 0.0).reason


def test_weights_digest_names_the_weights_not_the_file(tmp_path):
    torch.manual_seed(0)
    net = TinySSD(1)
    save_model(net, tmp_path / "a.pt", history=[{"epoch": 1}])
    save_model(net, tmp_path / "b.pt", history=[{"epoch": 1}], mlflow_run_id="other")
    assert (tmp_path / "a.pt").read_bytes() != (tmp_path / "b.pt").read_bytes()
    assert weights_digest(tmp_path / "a.pt") == weights_digest(tmp_path / "b.pt")
    assert weights_digest(tmp_path / "a.pt").startswith("sha256:")
    with torch.no_grad():
        next(net.parameters()).view(-1)[0] += 1e-6
    save_model(net, tmp_path / "c.pt")
    assert weights_digest(tmp_path / "c.pt") != weights_digest(tmp_path / "a.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    assert weights_digest(tmp_path / "junk.pt").startswith("file-sha256:")


# ----------------------------------------------------------------------------------------------
# Two `ssd register` processes at once.

def _start_register(run: dict, name: str, uri: str, out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "ssd", "register", "--params", str(ROOT / "params.yaml"), "-S",
               "data.image_size=64", "-S", f"registry.model_name={name}", "--model", str(run["model_path"]),
               "--eval", str(run["eval_file"]), "--run-file", str(run["run_file"]), "--out", str(out),
               "--data", str(run["data_dir"])]
    return subprocess.Popen(command, env=train_env(uri), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _both(procs: list[subprocess.Popen], outs: list[Path]) -> list[dict]:
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    return [json.loads(out.read_text()) for out in outs]


def test_two_registers_of_the_same_weights_make_one_version(mlflow_server, tmp_path):
    """They once made versions 1 and 2 of the same run and weights, both records "promoted"."""
    import mlflow

    name = "tinyssd-concurrent-same"
    run = _training_run(tmp_path / "a", mlflow_server, seed=0, map_50=0.4)
    outs = [tmp_path / "first.json", tmp_path / "second.json"]
    records = _both([_start_register(run, name, mlflow_server, out) for out in outs], outs)

    client = mlflow.MlflowClient(mlflow_server, mlflow_server)
    assert _state(client, name) == ([("1", ["challenger", "champion"])], "1")
    assert [r["version"] for r in records] == [1, 1]
    assert sorted(r["decision"] for r in records) == ["kept", "promoted"]  # one crowned it, one found it crowned
    assert sorted(r["reused_version"] for r in records) == [False, True]
    kept = next(r for r in records if r["decision"] == "kept")
    assert kept["reason"] == "version 1 is already the champion"
    for record in records:  # what each says is the registry's state
        assert (record["aliases"], record["champion_version"]) == (["challenger", "champion"], 1)
    assert not client.search_registered_models(f"name='{lock_name(name)}'")  # released


def test_two_registers_of_different_models_crown_the_better(mlflow_server, tmp_path):
    import mlflow

    name = "tinyssd-concurrent-two"
    worse = _training_run(tmp_path / "worse", mlflow_server, seed=1, map_50=0.3)
    better = _training_run(tmp_path / "better", mlflow_server, seed=2, map_50=0.7)
    outs = [tmp_path / "worse.json", tmp_path / "better.json"]
    low, high = _both([_start_register(run, name, mlflow_server, out) for run, out in zip((worse, better), outs)],
                      outs)

    client = mlflow.MlflowClient(mlflow_server, mlflow_server)
    versions, champion = _state(client, name)
    assert sorted(v for v, _ in versions) == ["1", "2"] and champion == str(high["version"])
    assert high["decision"] == "promoted" and high["champion_version"] == high["version"]
    if low["decision"] == "promoted":  # it went first: crowned, then beaten by the better one
        assert low["champion_version"] == low["version"] and "no champion yet" in low["reason"]
        assert high["gate"]["champion_version"] == low["version"] and "beats" in high["reason"]
    else:  # it went second: compared with the better one, which stays
        assert low["decision"] == "kept" and low["champion_version"] == high["version"]
        assert low["gate"]["champion_version"] == high["version"] and "does not beat" in low["reason"]
        assert low["aliases"] == ["challenger"]


def test_a_model_without_a_champion_crowns_its_next_good_version(mlflow_server, tmp_path):
    """MLflow answers "invalid parameter", not "does not exist", for an alias a model lacks: read as
    an error, no version could follow one that failed its load check."""
    import mlflow

    name = "tinyssd-no-champion"
    broken = _training_run(tmp_path / "broken", mlflow_server, seed=0, map_50=0.9)
    broken["model_path"].write_bytes(b"not a TinySSD model file")
    assert _register_cli(broken, name) == 1
    good = _training_run(tmp_path / "good", mlflow_server, seed=1, map_50=0.2)
    assert _register_cli(good, name) == 0
    client = mlflow.MlflowClient(mlflow_server, mlflow_server)
    assert _state(client, name) == ([("1", []), ("2", ["challenger", "champion"])], "2")
    assert json.loads(good["out"].read_text())["decision"] == "promoted"


def test_a_champion_moved_by_hand_meanwhile_is_decided_against(mlflow_server, tmp_path):
    """The decision is made against the champion the registry has when the alias moves: one moved
    by a person (no lock) after `ssd register` read it is read again, and the decision redone."""
    import mlflow

    from ssd.mlops.registry import model_config
    from ssd.stages import register as stage
    from ssd.util.params import load_settings

    name = "tinyssd-moved-meanwhile"
    assert _register_cli(_training_run(tmp_path / "a", mlflow_server, seed=0, map_50=0.5), name) == 0
    assert _register_cli(_training_run(tmp_path / "b", mlflow_server, seed=1, map_50=0.3), name) == 0
    client = mlflow.MlflowClient(mlflow_server, mlflow_server)
    read_earlier = client.get_model_version(name, "1")  # the champion as the stage read it
    client.set_registered_model_alias(name, "champion", "2")  # then a person crowns version 2 in the UI

    settings = load_settings(ROOT / "params.yaml", ["data.image_size=64", f"registry.model_name={name}"])
    run = _training_run(tmp_path / "c", mlflow_server, seed=2, map_50=0.4)
    before = stage._read_before(settings.registry, run["model_path"], run["eval_file"], run["run_file"],
                                run["data_dir"])
    with registry_lock(client, name) as lease:
        config = model_config(settings.data, settings.evaluate)
        version = stage._register_or_reuse(before, None, run["model_path"], config)
        decision, gate = stage._decide_and_move(before, lease, read_earlier, str(version.version), 0.4,
                                                settings.data, settings.evaluate)
    assert decision.promote and gate["champion_version"] == 2, decision.reason  # 0.4 beats 0.3, not 0.5
    assert client.get_model_version_by_alias(name, "champion").version == str(version.version) == "3"


# ----------------------------------------------------------------------------------------------
# The lock itself.

def test_lock_makes_a_second_holder_wait_and_takes_over_a_dead_one(mlflow_server):
    import mlflow

    client = mlflow.MlflowClient(mlflow_server, mlflow_server)
    name = "tinyssd-lock-test"
    order: list[str] = []

    def second() -> None:
        with registry_lock(client, name, poll_s=0.1):
            order.append("second")

    with registry_lock(client, name, renew_s=0.2) as lease:
        thread = threading.Thread(target=second)
        thread.start()
        with pytest.raises(TransientError, match="is held by"):  # a live holder: a short wait gives up
            with registry_lock(client, name, wait_s=1.0, stale_s=0.6, poll_s=0.1):
                pass
        time.sleep(1.0)  # heartbeats keep a live holder's lock from looking stale
        lease.check()
        order.append("first")
    thread.join(timeout=30)
    assert order == ["first", "second"]

    # A holder that died: its lock stays until its heartbeat has stood still for stale_s.
    client.create_registered_model(lock_name(name), tags={"ssd.lock.owner": "dead", "ssd.lock.heartbeat": "3"})
    started = time.monotonic()
    with registry_lock(client, name, stale_s=1.0, poll_s=0.1) as lease:
        lease.check()
    assert 1.0 <= time.monotonic() - started < 20
    assert not client.search_registered_models(f"name='{lock_name(name)}'")

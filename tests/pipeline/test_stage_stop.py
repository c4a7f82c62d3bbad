"""A stage stopped with its flow: a Prefect Cancel signals the flow run's process alone (a served
deployment) or its process group (a worker). Either way the flow stops the stage, one SIGTERM to
each of its processes, and reads the stage's output until it has ended, so its last lines (MLflow
prints one before it records a run KILLED) reach a reader instead of a closed pipe. Real processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# The stage: on SIGTERM it takes a second to stop (ending its MLflow run), then prints a last line;
# it notes each SIGTERM it got, and whether its last line found a reader.
STAGE = textwrap.dedent("""
    import pathlib, signal, sys, time

    marker = pathlib.Path(sys.argv[1])

    def stop(signum, frame):
        with open(marker, "a") as notes:
            notes.write("SIGTERM\\n")
        time.sleep(1.0)
        try:
            print("stopped cleanly", flush=True)
            with open(marker, "a") as notes:
                notes.write("its last line was read\\n")
        except BrokenPipeError:
            pass
        sys.exit(143)

    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    time.sleep(60)
""")

# The flow: runs the stage through flows.stage_runner; SIGTERM raises, as Prefect's handler does.
FLOW = textwrap.dedent("""
    import signal, sys
    from pathlib import Path
    from flows.stage_runner import _stream

    def cancelled(signum, frame):
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, cancelled)
    _stream([sys.executable, "-c", sys.argv[1], sys.argv[2]], Path("."), None, lambda line: print(line, flush=True))
""")


@pytest.mark.parametrize("send", [os.kill, os.killpg], ids=["served: the flow's process", "worker: its group"])
def test_a_stopped_flow_stops_its_stage_once_and_reads_its_last_lines(tmp_path, send):
    marker, log = tmp_path / "marker", tmp_path / "flow.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "w") as out:
        flow = subprocess.Popen([sys.executable, "-c", FLOW, STAGE, str(marker)], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while "ready" not in log.read_text():
        assert flow.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    send(flow.pid, signal.SIGTERM)  # as Prefect's runner does on a Cancel
    assert flow.wait(timeout=30) == 143
    assert marker.read_text() == "SIGTERM\nits last line was read\n" and "stopped cleanly" in log.read_text()

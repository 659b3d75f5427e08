"""Preemption: SIGTERM stops a 2-process run after the step in progress with a checkpoint at that step, and the
same command resumes it with every session of every epoch consumed exactly once (the run's session audit,
data.record_sessions). Two ways a run is told to stop: SIGTERM to `vincie launch local` (it reaches every
training process: exit 0), and SIGTERM to one training process only, as when Kubernetes preempts one pod of a
multi-node job (the ranks agree to stop at the same step; the other rank exits 75 so its pod is restarted)."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from vincie.sessions.index import read_index
from vincie.training import checkpoint

from helpers import REPO, make_data, write_config

SESSIONS, BATCH, STEPS = 48, 4, 24  # two epochs of 12 steps


def launch(config: str, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vincie", "launch", "local", "--nproc", "2", "--config", config],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)


def logged_steps(run: str) -> list[int]:
    path = os.path.join(run, "metrics.jsonl")
    return [json.loads(line)["step"] for line in open(path)] if os.path.exists(path) else []


def workers(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    """The training processes by rank (the children of launch local's torchrun)."""
    (torchrun,) = psutil.Process(launcher.pid).children()
    return {int(p.environ()["RANK"]): p for p in torchrun.children()}


@pytest.mark.slow
@pytest.mark.parametrize("target", ["launcher", "rank 1"])
def test_sigterm_stops_with_a_checkpoint_and_the_resumed_run_reads_every_session_once(tmp_path, target):
    data = make_data(tmp_path / "data", sessions=SESSIONS, turns=(2, 3), image_format="png")
    run = str(tmp_path / "run")
    config = write_config(tmp_path / "run.yaml", run, data,
                          train={"steps": STEPS, "batch_size": BATCH, "log_every": 1, "checkpoint_every": 1000},
                          data={"record_sessions": True, "workers": 1})
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        launcher = launch(config, log)
        try:
            deadline = time.monotonic() + 240
            while max(logged_steps(run), default=0) < 3:  # mid-epoch: step 3 of 12 is done
                assert launcher.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.05)
            process = launcher if target == "launcher" else workers(launcher)[1]
            process.send_signal(signal.SIGTERM)
            code = launcher.wait(timeout=240)
        finally:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
    out = log_path.read_text()
    stopped = int(out.split("stopped by SIGTERM")[1].split("after step ")[1].split()[0])
    assert 3 <= stopped < STEPS, out
    # a checkpoint at the step it stopped at (the only one: checkpoint_every is past the run), logged to there
    assert os.path.basename(checkpoint.latest(run)) == f"step-{stopped:06d}", out
    assert logged_steps(run)[-1] == stopped
    if target == "launcher":
        assert code == 0, out  # every process was asked, and stopped cleanly
    else:
        assert "stopped by SIGTERM to another rank" in out and code != 0, out  # rank 0 exits 75: restart me
    assert "\r" not in out  # stdout is a file: plain progress lines, no redrawn bar

    with open(tmp_path / "second.log", "w") as log:
        assert launch(config, log).wait(timeout=300) == 0, (tmp_path / "second.log").read_text()
    assert f"step-{stopped:06d} (step {stopped})" in (tmp_path / "second.log").read_text()  # "resuming from ..."
    # the audit: per step, the keys both ranks consumed; each epoch (12 steps) holds every session exactly once
    by_step = collections.defaultdict(list)
    for rank in (0, 1):
        for line in open(os.path.join(run, "sessions", f"rank-{rank:03d}.jsonl")):
            record = json.loads(line)
            by_step[record["step"]] += record["keys"]
    assert sorted(by_step) == list(range(1, STEPS + 1))
    ids = sorted(read_index(data)["id"].to_pylist())
    per_epoch = STEPS // 2
    for epoch in range(2):
        keys = [k for step in range(epoch * per_epoch + 1, (epoch + 1) * per_epoch + 1) for k in by_step[step]]
        assert sorted(keys) == ids, f"epoch {epoch}: stopped after step {stopped}"

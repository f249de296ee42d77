"""Fail fast: when one rank raises or dies, every rank exits within 60 s and the failing rank is named."""

import os
import re
import signal
import time

import pytest

from tests.runs import LAUNCHERS, TINY, kill_run, last_step, launch, rank_pid, said_lines, start

pytestmark = pytest.mark.slow


def test_exception_on_rank_1_stops_every_rank_and_names_it(tmp_path):
    started = time.monotonic()
    done = launch(["--config", "configs/demo.yaml", f"output_dir={tmp_path}", *TINY,
                   "students=[{name: a, model: lenet}, {name: b, model: inception_v3}, {name: c, model: lenet}]"],
                  processes=3, check=False)
    assert done.returncode != 0
    assert time.monotonic() - started < 120  # start-up (teacher training included) plus at most 60 s
    summary = done.stderr[done.stderr.rindex("Root Cause"):]
    assert "rank      : 1" in summary and "exitcode  : 1" in summary
    assert "RuntimeError: Calculated padded input size" in summary  # the why, through @record


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_sigkill_of_rank_2_ends_the_job_within_60_seconds_in_one_line_and_a_report_naming_it(tmp_path, launcher):
    """The other ranks, whose collective fails, say it once in one line (before, each gloo's traceback); the report
    names the killed rank, and under dist-tsp-launch only that rank, without the agent's own traceback."""
    process = start(["--config", "configs/demo.yaml", f"output_dir={tmp_path}", *TINY, "train.max_steps=400",
                     "train.epochs=20"], processes=3, launcher=launcher)
    deadline = time.monotonic() + 180
    while last_step(tmp_path) < 2:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    victim = rank_pid(tmp_path, 2)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            kill_run(process, tmp_path)
    assert time.monotonic() - killed < 60
    assert process.returncode == 1
    said = said_lines(stderr)
    gone = r"another rank's process ended while this one waited for it \(gloo: connection (closed|reset) by peer\): "
    assert len(said) == 1 and re.fullmatch(rf"dist-tsp: error \(rank [01]\): {gone}.*", said[0]), stderr[-3000:]
    assert "[rank0]: Traceback" not in stderr and "[rank1]: Traceback" not in stderr, stderr[-3000:]
    assert "rank      : 2" in stderr and "Signal 9 (SIGKILL)" in stderr, stderr[-3000:]
    if launcher == "dist-tsp":  # torchrun's own report may name another rank as root cause, one that exited too
        root_cause = stderr[stderr.rindex("Root Cause"):]
        assert "rank      : 2" in root_cause and "Traceback" not in stderr, stderr[-3000:]
        assert "rank      : 0" not in stderr and "rank      : 1" not in stderr, stderr[-3000:]

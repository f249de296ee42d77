"""Fail fast: when one rank raises or dies, or the disk is full, every rank exits within 60 s and the failure is
named."""

import contextlib
import io
import os
import re
import signal
import subprocess
import time

import pytest
import torch
import torch.distributed as dist

from dist_tsp.checkpoint import complete_checkpoints, read_manifest, save_atomic, step_dir
from dist_tsp.config import load_config
from dist_tsp.errors import OutOfSpace
from tests.multiprocess import run_on_ranks
from tests.runs import LAUNCHERS, ROOT, TINY, kill_run, last_step, launch, no_room, rank_pid, said_lines, start

pytestmark = pytest.mark.slow


def test_exception_on_rank_1_stops_every_rank_and_names_it(tmp_path):
    started = time.monotonic()
    done = launch(["--config", "configs/demo.yaml", f"output_dir={tmp_path}", *TINY,
                   # b, on rank 1, fails its first step: BatchNorm on one value per channel (1x1, one image)
                   "students=[{name: a, model: lenet}, {name: b, model: resnet18}, {name: c, model: lenet}]",
                   "data.batch_size=1"],
                  processes=3, check=False)
    assert done.returncode != 0
    assert time.monotonic() - started < 120  # start-up (teacher training included) plus at most 60 s
    summary = done.stderr[done.stderr.rindex("Root Cause"):]
    assert "rank      : 1" in summary and "exitcode  : 1" in summary
    assert "ValueError: Expected more than 1 value per channel when training" in summary  # the why, through @record


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_sigkill_of_rank_2_ends_the_job_within_60_seconds_in_one_line_and_a_report_naming_it(tmp_path, launcher):
    """The other ranks, whose collective fails, say it once in one line (before, each gloo's traceback); the report
    names the killed rank as the first failure, and under dist-tsp-launch only that rank, without the agent's own
    traceback."""
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
    root_cause = stderr[stderr.rindex("Root Cause"):]  # the others leave a second or more after rank 2
    assert "rank      : 2" in root_cause and "Signal 9 (SIGKILL)" in root_cause, stderr[-3000:]
    if launcher == "dist-tsp":  # torchrun's report also lists the ranks it stopped, with the agent's traceback
        assert "Traceback" not in stderr, stderr[-3000:]
        assert "rank      : 0" not in stderr and "rank      : 1" not in stderr, stderr[-3000:]


def _said_in_two_attempts() -> tuple[int | None, int | None]:
    """Rank 1 records a failure in torchrun's first attempt; what each rank then finds said, in that attempt and in
    the next one (torchrun restarts the workers with the same store)."""
    from dist_tsp import shared_errors

    os.environ["TORCHELASTIC_RESTART_COUNT"] = "0"
    if dist.get_rank() == 1:
        shared_errors.record("an image in rank 1's shard cannot be read", 2)
    dist.barrier()
    first = shared_errors.code_said_by_another_rank()
    os.environ["TORCHELASTIC_RESTART_COUNT"] = "1"
    return first, shared_errors.code_said_by_another_rank()


def test_a_failure_said_in_one_attempt_is_not_taken_for_the_next_attempts_when_torchrun_restarts_the_workers():
    assert run_on_ranks(_said_in_two_attempts, 3) == [(2, None)] * 3


CLOSED = "[gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:30441"
TIMED_OUT = "[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 5000ms for recv operation to complete"


def _ended_by_a_closed_connection() -> list[tuple[int | None, str]]:
    """What train.ended_by gives and says on each rank: in attempt 0, rank 0's collective fails on a closed
    connection, nothing recorded (another rank's process ended); in attempt 1, rank 2's collective times out first
    (gloo then closes its connections), and rank 0's fails on a closed connection."""
    from dist_tsp.train import ended_by

    cfg = load_config(ROOT / "configs" / "demo.yaml", ["train.collective_timeout_s=5"])
    rank, ended = dist.get_rank(), []
    for attempt, (on_rank_2, on_rank_0) in enumerate([(None, CLOSED), (TIMED_OUT, CLOSED)]):
        os.environ["TORCHELASTIC_RESTART_COUNT"] = str(attempt)
        for on_rank, message in ((2, on_rank_2), (0, on_rank_0)):
            if rank == on_rank and message is not None:
                with contextlib.redirect_stderr(io.StringIO()) as said:
                    code = ended_by(RuntimeError(message), cfg, rank, 3)
                ended.append((code, said.getvalue()))
            dist.barrier()
    return ended


def test_a_rank_whose_connection_another_ranks_timeout_closed_ends_quietly_not_blaming_a_dead_process():
    on_rank_0, on_rank_1, on_rank_2 = run_on_ranks(_ended_by_a_closed_connection, 3)
    (gone, quiet), (timed_out,) = on_rank_0, on_rank_2
    assert gone[0] == 1 and "dist-tsp: error (rank 0): another rank's process ended" in gone[1]
    assert quiet == (1, "") and on_rank_1 == []
    assert timed_out[0] == 1 and "a collective waited longer than its timeout (train.collective_timeout_s=5 s" in \
        timed_out[1]


@pytest.mark.parametrize("ballast_mib", [9, 0])  # no room at all (an OSError); room for part of it (a RuntimeError)
def test_a_file_that_finds_no_room_is_one_line_naming_the_file_system_and_leaves_no_part_behind(small_file_system,
                                                                                              ballast_mib):
    (small_file_system / "ballast").write_bytes(bytes(ballast_mib << 20))
    (small_file_system / "run").mkdir()
    with pytest.raises(OutOfSpace) as error:
        save_atomic({"model": torch.zeros(3 << 20)}, small_file_system / "run" / "model.pt")  # 12 MiB
    assert str(error.value) == no_room(small_file_system)
    assert list((small_file_system / "run").iterdir()) == []


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_a_full_disk_stops_every_rank_in_one_line_keeping_the_last_checkpoint_and_the_rerun_resumes_from_it(
        small_file_system, tracker):
    """Each rank meets it writing its own files of step 4's checkpoint (before, every one of them printed a
    traceback, torch's RuntimeError or the OSError, and torchrun's report followed). The tracker, finished as the run
    ends, writes to the full disk too (TensorBoard's writer, W&B's offline run)."""
    run = small_file_system / "run"
    args = ["--config", "configs/demo.yaml", f"output_dir={run}", *TINY, "train.checkpoint_every=2",
            f"tracking.report_to={tracker}"]
    done = launch(args, processes=3, check=False, launcher="dist-tsp")
    assert done.returncode == 1 and "Traceback" not in done.stderr and "Root Cause" not in done.stderr, \
        done.stderr[-3000:]
    assert [re.sub(r"\(rank \d\)", "(rank R)", line) for line in said_lines(done.stderr)] == [
        f"dist-tsp: error (rank R): {no_room(small_file_system)}"], done.stderr[-3000:]
    kept = complete_checkpoints(run)  # step 2's, where it fits (TINY's checkpoints take 6 MiB)
    assert kept and kept[-1] != step_dir(run, 6) and not list(run.rglob(".*.tmp"))
    subprocess.run(["mount", "-o", "remount,size=40m", str(small_file_system)], check=True)
    done = launch(args, processes=3, launcher="dist-tsp")
    assert f"resuming from {kept[-1]} (step {read_manifest(kept[-1])['step']})" in done.stdout + done.stderr
    assert (run / "results.json").is_file()

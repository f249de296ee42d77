"""A stuck rank: a worker that stops answering inside a collective (SIGSTOP during the student phase of a 3-rank
run) makes every other rank exit non-zero after train.collective_timeout_s, saying that it timed out."""

import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from dist_tsp.models import build_model
from tests.runs import TINY, kill_run, last_step, process_state, rank_pid, start

pytestmark = pytest.mark.slow

TIMEOUT_S, MARGIN_S, STUCK = 5, 20, 1


def exited(pid: int) -> bool:
    """Gone, or a zombie waiting for the launcher to reap it."""
    return process_state(pid) in (None, "Z")


def second_step_logged(run: Path) -> bool:
    return last_step(run) >= 2


def first_epoch_checkpointed(run: Path) -> bool:
    """The first epoch's checkpoint is complete: every rank is past the epoch end's collectives over all ranks."""
    return any((run / "checkpoints").glob("step_[0-9]*[0-9]/manifest.json"))


def stop_one_rank(tmp: Path, processes: int, ready, *args: str) -> dict:
    """Start a run on `processes` ranks, SIGSTOP rank STUCK once `ready(run)` (in the student phase), and watch the
    others for TIMEOUT_S + MARGIN_S: when each exited; then the launcher's exit code and stderr. Rank STUCK is also
    held at start-up for longer than TIMEOUT_S, as a slow data scan would: only the student steps' collectives have
    that timeout."""
    torch.manual_seed(0)  # a teacher file, so that the run starts with the students
    torch.save({"model": build_model("resnet_cifar", 10, depth=8, width=8).state_dict()}, tmp / "teacher.pt")
    run, others = tmp / "run", [rank for rank in range(processes) if rank != STUCK]
    process = start(["--config", "configs/demo.yaml", f"output_dir={run}", *TINY, "train.max_steps=400",
                     "train.epochs=20", f"teacher.checkpoint={tmp / 'teacher.pt'}",
                     f"train.collective_timeout_s={TIMEOUT_S}", *args], processes=processes)
    victim = None
    try:
        deadline = time.monotonic() + 180
        while (victim := rank_pid(run, STUCK)) is None:
            assert process.poll() is None and time.monotonic() < deadline, f"rank {STUCK} did not start"
            time.sleep(0.05)
        os.kill(victim, signal.SIGSTOP)
        time.sleep(TIMEOUT_S + 3)
        os.kill(victim, signal.SIGCONT)
        while not ready(run):
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, f"the run did not reach {ready.__name__}"
            time.sleep(0.2)
        pids = {rank: rank_pid(run, rank) for rank in range(processes)}
        assert None not in pids.values(), pids
        victim = pids[STUCK]
        os.kill(victim, signal.SIGSTOP)
        stopped = time.monotonic()
        exit_after = {}
        while len(exit_after) < len(others) and time.monotonic() < stopped + TIMEOUT_S + MARGIN_S:
            for rank in others:
                if rank not in exit_after and exited(pids[rank]):
                    exit_after[rank] = time.monotonic() - stopped
            time.sleep(0.1)
        # The stopped rank cannot act on the launcher's SIGTERM; end it here rather than wait for the SIGKILL that
        # torchrun sends 30 s later.
        os.kill(victim, signal.SIGKILL)
        _, stderr = process.communicate(timeout=120)
        return {"others": others, "exit_after": exit_after, "returncode": process.returncode, "stderr": stderr}
    finally:
        if victim is not None:
            for sig in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(victim, sig)
                except ProcessLookupError:
                    pass
        if process.poll() is None:
            kill_run(process, run)


@pytest.fixture(scope="module")
def stuck_run(tmp_path_factory):
    """3 ranks, one student each: the peer all-gather is over every rank."""
    return stop_one_rank(tmp_path_factory.mktemp("stuck"), 3, second_step_logged)


def failure_exit_codes(stderr: str) -> dict[int, int]:
    """rank -> exit code, from the launcher's failure summary (torchrun's "Failures:" and "Root Cause")."""
    found = re.findall(r"rank\s+:\s+(\d+) \(local_rank: \d+\)\s+exitcode\s+:\s+(-?\d+)", stderr)
    return {int(rank): int(code) for rank, code in found}


def assert_others_exit_non_zero_in_time(stuck: dict, each_on_its_own: bool = True) -> None:
    """Every other rank exits within the timeout and a margin. Each raised on its own (a positive code), not killed by
    a signal of the launcher; or, with `each_on_its_own=False`, the first to exit did and the rest were ended by the
    launcher's SIGTERM after it (a rank that entered its wait later, as one still computing its step does, loses that
    race on a loaded machine)."""
    assert stuck["returncode"] != 0
    for rank in stuck["others"]:
        assert rank in stuck["exit_after"], f"rank {rank} still running {TIMEOUT_S + MARGIN_S} s after the stop"
        assert stuck["exit_after"][rank] < TIMEOUT_S + MARGIN_S, (rank, stuck["exit_after"])
    codes, tail = failure_exit_codes(stuck["stderr"]), stuck["stderr"][-3000:]
    first = min(stuck["others"], key=stuck["exit_after"].get)
    assert codes.get(first, 0) > 0, (first, codes, tail)
    for rank in stuck["others"]:
        code = codes.get(rank, 0)
        assert code > 0 or (not each_on_its_own and code == -signal.SIGTERM), (rank, codes, tail)


def test_every_other_rank_exits_non_zero_within_the_collective_timeout(stuck_run):
    assert_others_exit_non_zero_in_time(stuck_run)


def test_each_other_rank_says_it_timed_out_and_after_how_long_unless_another_ranks_timeout_ended_it(stuck_run):
    """A line of each other rank's output says "timed out"/"timeout" and the value, e.g. today gloo's
    `Timed out waiting 5000ms for recv operation to complete` in its traceback. Gloo closes the connections of a
    rank whose wait timed out, so another rank whose wait was still running may end on that first: it says nothing
    (before, that another rank's process had ended, most often for memory)."""
    value = rf"\b({TIMEOUT_S * 1000} ?ms|{TIMEOUT_S}(\.0)? ?s)\b"
    named = re.compile(rf"(timed out|timeout).*{value}|{value}.*timeout", re.IGNORECASE)
    stderr = stuck_run["stderr"]
    lines = stderr.splitlines()
    said = {rank: [line for line in lines if line.startswith(f"[rank{rank}]:") or f"(rank {rank})" in line]
            for rank in stuck_run["others"]}
    timed_out = [rank for rank, its_lines in said.items() if any(named.search(line) for line in its_lines)]
    assert timed_out and all(not said[rank] for rank in said if rank not in timed_out), (said, stderr[-3000:])


def test_the_error_is_one_line_naming_train_collective_timeout_s(stuck_run):
    """What it should be, as other errors are: `dist-tsp: error (rank R): ...`, naming the key and its value."""
    stderr = stuck_run["stderr"]
    prefixes = [f"dist-tsp: error (rank {rank}): " for rank in stuck_run["others"]]
    ours = [line for line in stderr.splitlines() if any(prefix in line for prefix in prefixes)]
    value = re.compile(rf"\b{TIMEOUT_S}(\.0)? ?s\b")
    assert any("train.collective_timeout_s" in line and value.search(line) for line in ours), stderr[-3000:]


def test_with_replicas_every_other_rank_exits_non_zero_within_the_collective_timeout(tmp_path):
    """4 ranks, 2 students on 2 replicas each: the peer all-gather and the gradient all-reduce are over subgroups.
    Metrics are reduced over all ranks only at the epoch end here (train.log_every=1000), so that no collective over
    every rank (which does time out) ends the wait: rank 1 is stopped inside epoch 1's steps (5 per epoch)."""
    two = "students=[{name: lenet, model: lenet}, {name: mobilenet, model: mobilenet, args: {width_mult: 0.25}}]"
    stuck = stop_one_rank(tmp_path, 4, first_epoch_checkpointed, two, "train.log_every=1000",
                          "data.max_train_samples=320")
    assert_others_exit_non_zero_in_time(stuck, each_on_its_own=False)  # ranks wait in different subgroups' steps

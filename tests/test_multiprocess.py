"""tests/multiprocess.py: a rank that dies, raises or hangs fails the test with a message naming it; nothing hangs."""

import os
import time

import pytest
import torch.distributed as dist

from tests import multiprocess
from tests.multiprocess import run_on_ranks


def _rank_1_exits():
    if dist.get_rank() == 1:
        os._exit(3)  # no traceback, no result: as a segfault or the OOM killer would leave it
    return dist.get_rank()


def _rank_1_raises_rank_0_hangs():
    if dist.get_rank() == 1:
        raise ValueError("rank 1 is broken")
    time.sleep(3600)  # stuck where gloo cannot tell (a collective that rank 1 sees would raise on rank 0 as well)


def _rank_1_hangs():
    if dist.get_rank() == 1:
        time.sleep(3600)
    return dist.get_rank()


def test_a_rank_that_exits_without_a_result_fails_at_once():
    begin = time.monotonic()
    with pytest.raises(AssertionError, match=r"^rank 1 exited with code 3 without a result$"):
        run_on_ranks(_rank_1_exits, 2, timeout=600)
    assert time.monotonic() - begin < 120


def test_a_rank_that_raises_fails_with_its_traceback_and_the_others_are_stopped(monkeypatch):
    monkeypatch.setattr(multiprocess, "FAILURE_GRACE_S", 1.0)
    begin = time.monotonic()
    with pytest.raises(AssertionError, match=r"(?s)^rank 1:\nTraceback.*ValueError: rank 1 is broken\n+ranks \[0\] "
                                             r"gave no result 1 s after rank 1 raised: killed"):
        run_on_ranks(_rank_1_raises_rank_0_hangs, 2, timeout=600)
    assert time.monotonic() - begin < 120


def test_a_rank_that_hangs_fails_after_the_timeout():
    begin = time.monotonic()
    with pytest.raises(AssertionError, match=r"^ranks \[(0, )?1\] gave no result within 10 s: killed"):
        run_on_ranks(_rank_1_hangs, 2, timeout=10)
    assert time.monotonic() - begin < 60

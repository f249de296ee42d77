"""train.profile's accounting: the parts of a step and the host's work between them add up to its wall time."""

import pytest
import torch

from dist_tsp import profiling
from dist_tsp.profiling import StepProfiler


def test_the_parts_and_the_time_between_them_add_up_to_the_wall_time_per_step_without_evaluation(monkeypatch):
    clock = [0.0]  # seconds, advanced by hand: data 2 ms, 1 ms on the host, a 5 ms section, 3 ms on the host
    monkeypatch.setattr(profiling.time, "perf_counter", lambda: clock[0])
    profiler = StepProfiler(True, torch.device("cpu"), warmup=1)

    def batches():
        for _ in range(3):
            clock[0] += 0.002
            yield "batch"

    for _epoch in range(2):
        for index, _batch in enumerate(profiler.timed_batches(batches())):
            clock[0] += 0.001
            with profiler.section("forward"):
                clock[0] += 0.005
            profiler.step_done()
            clock[0] += 0.003
            if (_epoch, index) == (1, 1):  # a mid-epoch checkpoint (after the host's 3 ms): no step's time
                clock[0] += 0.5
                profiler.not_a_step()
        clock[0] += 0.1  # the epoch's evaluation and checkpoint: no step's
    report = profiler.report(batch_size=8, students=1)
    # 5 timed steps (the first is warm-up): 11 ms each, but the second epoch's first and the one after the
    # checkpoint, 8 ms (the host's work before them belongs to the epoch's end or the checkpoint)
    assert report["steps"] == 5
    assert report["ms"]["data"] == pytest.approx(2) and report["ms"]["forward"] == pytest.approx(5)
    assert report["ms"]["between"] == pytest.approx((4 + 4 + 1 + 4 + 1) / 5)
    assert report["step_ms"] == pytest.approx((11 + 11 + 8 + 11 + 8) / 5)

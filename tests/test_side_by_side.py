"""Independent runs side by side (the protocol's and a sweep's --parallel-runs): how many go at once, on which GPUs,
and in which order."""

import io
import threading
import time

import pytest
from tqdm import tqdm

from dist_tsp.errors import UserError
from dist_tsp.protocol import PlannedRun, plan
from dist_tsp.side_by_side import auto_runs, gpu_groups, run_concurrently, slot_devices


@pytest.mark.parametrize("free_gib, processes, cpus, runs", [
    ([], 1, 16, 1),  # no GPU: the runs would share the CPU cores
    ([130.0], 1, 16, 4),  # one H200: capped per GPU
    ([40.0], 1, 16, 2),  # by free memory
    ([5.0], 1, 16, 1),  # never fewer than one
    ([130.0], 1, 2, 2),  # one process per CPU core
    ([130.0] * 6, 3, 64, 8),  # two disjoint groups of three GPUs, four runs each
    ([130.0, 130.0], 3, 64, 4),  # three processes on two GPUs: two on the fuller one, 130 // 32 = 4
    ([130.0, 20.0], 1, 64, 5),  # each GPU its own group: 4 + 1
])
def test_auto_parallel_runs_fit_the_free_gpu_memory_the_gpus_and_the_cpu_cores(free_gib, processes, cpus, runs):
    count, reason = auto_runs(free_gib, processes, cpus)
    assert count == runs and reason.startswith("auto: ")


def test_concurrent_runs_take_disjoint_gpu_groups_in_turn():
    groups = gpu_groups(4, 2)
    assert groups == [range(0, 2), range(2, 4)]
    assert slot_devices(3, groups, ["4", "5", "6", "7"]) == ("4,5", "6,7", "4,5")
    assert slot_devices(2, gpu_groups(1, 3), ["0"]) == (None, None)  # one group: every run sees this process's GPUs


def _recording_run(events: list, seconds: float = 0.05, failing: str | None = None):
    lock = threading.Lock()

    def run(planned: PlannedRun, devices: str | None):
        with lock:
            events.append(("start", planned.name, devices))
        time.sleep(0.01 if planned.name == failing else seconds)
        with lock:
            events.append(("end", planned.name, devices))
        if planned.name == failing:
            raise UserError(f"run {planned.name} failed")
        return planned.name

    return run


def _running_at_most(events: list) -> int:
    running, most = 0, 0
    for kind, *_ in events:
        running += 1 if kind == "start" else -1
        most = max(most, running)
    return most


def test_concurrent_runs_fill_every_slot_wait_for_their_mentors_and_return_in_plan_order():
    runs = [PlannedRun("a", (), 3), PlannedRun("phase1", (), 2), PlannedRun("phase2", (), 3, mentors_from="phase1"),
            PlannedRun("b", (), 3), PlannedRun("c", (), 3)]
    events = []
    with tqdm(total=len(runs), file=io.StringIO()) as bar:
        assert run_concurrently(runs, ("0", "1"), _recording_run(events), bar,
                                waits_for=lambda planned: planned.mentors_from) == [p.name for p in runs]
        assert bar.n == len(runs)
    order = [(kind, name) for kind, name, _ in events]
    assert order.index(("start", "phase2")) > order.index(("end", "phase1"))
    assert _running_at_most(events) == 2
    assert {devices for _, _, devices in events} == {"0", "1"}
    running = {}  # no two runs on one slot at once
    for kind, name, devices in events:
        if kind == "start":
            assert devices not in running.values()
            running[name] = devices
        else:
            del running[name]


def test_after_a_failed_run_none_starts_those_running_finish_and_the_failure_is_raised():
    runs = [PlannedRun(name, (), 3) for name in ("a", "b", "c", "d")]
    events = []
    with tqdm(total=len(runs), disable=True) as bar, pytest.raises(UserError, match="^run a failed$"):
        run_concurrently(runs, (None, None), _recording_run(events, seconds=0.5, failing="a"), bar)
    started = [name for kind, name, _ in events if kind == "start"]
    assert started == ["a", "b"] and [name for kind, name, _ in events if kind == "end"] == ["a", "b"]


def test_with_one_slot_the_runs_go_one_after_another_in_this_thread():
    runs = [PlannedRun(name, (), 3) for name in ("a", "b", "c")]
    threads = []

    def run(planned: PlannedRun, devices: str | None):
        threads.append(threading.current_thread())
        return planned.name

    with tqdm(total=len(runs), file=io.StringIO()) as bar:
        assert run_concurrently(runs, (None,), run, bar) == ["a", "b", "c"]
        assert bar.n == 3
    assert threads == [threading.main_thread()] * 3


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_parallel_runs_value_is_refused_in_one_line_before_any_run(tmp_path, value):
    with pytest.raises(UserError, match=rf"^--parallel-runs {value}: give a number of runs at once \(1, 2, \.\.\.\) "
                                        "or auto$"):
        plan(["--config", "configs/demo.yaml", "--out", str(tmp_path / "p"), "--parallel-runs", value])
    assert not (tmp_path / "p").exists()

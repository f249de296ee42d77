"""Independent runs side by side (the protocol's and a sweep's --parallel-runs): how many go at once, on which GPUs,
in which order, and how a run in the protocol's or the sweep's own process ends it."""

import contextlib
import io
import os
import signal
import socket
import sys
import threading
import time

import pytest
from tqdm import tqdm

from dist_tsp import protocol, side_by_side, sweep, train
from dist_tsp.errors import Preempted, UserError
from dist_tsp.launch import STOP_SIGNALS
from dist_tsp.protocol import PlannedRun, plan
from dist_tsp.side_by_side import (
    PORTS_FROM,
    auto_runs,
    free_port,
    gpu_groups,
    run_concurrently,
    slot_devices,
)


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


def test_the_protocols_alternate_phase_two_starts_only_once_its_phase_one_has_finished(tmp_path, monkeypatch):
    """Its mentors start from phase 1's final weights: with two runs at once, phase 2 waits for them."""
    protocol_, out, slots = plan(["--config", "configs/demo.yaml", "--out", str(tmp_path), "--methods", "alternate",
                                  "--parallel-runs", "2", "--seeds", "2"])
    events = []
    recording = _recording_run(events, seconds=0.2)
    monkeypatch.setattr(protocol.Runner, "run", lambda runner, planned, devices=None: recording(planned, devices))
    runs = protocol.seed_runs(protocol_, {})
    with tqdm(total=len(runs), disable=True) as bar:
        protocol.Runner(protocol_, out, slots, bar).run_all(runs)
    order = [(kind, name) for kind, name, _ in events]
    phases = [planned for planned in runs if planned.mentors_from is not None]
    assert len(phases) == 6 and _running_at_most(events) == 2
    for planned in phases:
        assert order.index(("start", planned.name)) > order.index(("end", planned.mentors_from)), planned.name


def test_after_a_failed_run_none_starts_those_running_finish_and_the_failure_is_raised():
    runs = [PlannedRun(name, (), 3) for name in ("a", "b", "c", "d")]
    events = []
    with tqdm(total=len(runs), disable=True) as bar, pytest.raises(UserError, match="^run a failed$"):
        run_concurrently(runs, (None, None), _recording_run(events, seconds=0.5, failing="a"), bar)
    started = [name for kind, name, _ in events if kind == "start"]
    assert sorted(started) == ["a", "b"] and [name for kind, name, _ in events if kind == "end"] == ["a", "b"]


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


@pytest.mark.parametrize("command", ["protocol", "sweep"])
@pytest.mark.parametrize("code, said", [
    (75, "dist-tsp: stopped by a signal at step 3; checkpoint written: rerun the same command to resume"),
    (3, "dist-tsp: non-finite ce loss for student lenet at step 2: stopping"),
    (1, "dist-tsp: error: a collective waited longer than its timeout"),
])
def test_a_run_stopped_or_crashed_in_process_ends_the_protocol_and_the_sweep_with_its_exit_code(
        tmp_path, monkeypatch, capsys, command, code, said):
    """A stop by a signal (75: a wrapper requeues, the rerun resumes), a non-finite loss (3) or a crash (1), not bad
    input's 2, which every run's failure was; one line with the run's own and its log."""
    def run(_args, _stop_requested):
        print(said, file=sys.stderr)
        sys.exit(code)

    monkeypatch.setattr(train, "main", run)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        if command == "protocol":
            protocol.main(["--config", "configs/demo.yaml", "--out", str(out), "--methods", "scratch",
                           "--parallel-runs", "1"])
        else:
            (tmp_path / "trials.txt").write_text("seed=0\n")
            sweep.main(["run", str(tmp_path / "trials.txt"), str(out), "configs/demo.yaml", "--parallel-runs", "1"])
    name, log = ("teacher", out / "logs" / "teacher.log") if command == "protocol" else \
        ("trial_1", out / "logs" / "trial_1.log")
    prog = "dist-tsp protocol" if command == "protocol" else "dist-tsp"
    assert stop.value.code == code
    assert capsys.readouterr().err.strip().splitlines()[-1] == (  # after the progress bar
        f"{prog}: run {name} {'failed' if code == 1 else 'stopped'} (exit {code}): {said}; its log is {log}. Rerun the "
        "same command to continue from there")


def test_a_run_crashing_in_process_is_a_failure_with_its_traceback_in_its_log_and_no_line_of_an_earlier_attempt(
        tmp_path, monkeypatch, capsys):
    """An exception other than SystemExit escaped the sweep raw, and the failure quoted the last `dist-tsp:` line of
    the appended log, an earlier attempt's."""
    def crash(_args, _stop_requested):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(train, "main", crash)
    log = tmp_path / "out" / "logs" / "trial_1.log"
    log.parent.mkdir(parents=True)
    log.write_text("dist-tsp: stopped by a signal at step 3; checkpoint written: rerun the same command to resume\n")
    (tmp_path / "trials.txt").write_text("seed=0\n")
    with pytest.raises(SystemExit) as stop:
        sweep.main(["run", str(tmp_path / "trials.txt"), str(tmp_path / "out"), "configs/demo.yaml",
                    "--parallel-runs", "1"])
    assert stop.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"dist-tsp: run trial_1 failed (exit 1); its log is {log}. Rerun the same command to continue from there")
    assert log.read_text().strip().endswith("RuntimeError: simulated crash")


def test_a_stop_signal_as_a_run_is_handed_its_slot_or_starts_stops_it_with_75_not_as_a_failure(tmp_path, monkeypatch):
    """A signal between a run's slot and its entry among the running ones reached nobody (the run went to its end);
    one reaching a run still starting killed it, which ended the command with 1 (a crash), not 75."""
    script = tmp_path / "run.py"
    script.write_text("import os, signal, time\nos.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(120)\n")
    monkeypatch.setattr(side_by_side, "TRAIN", str(script))  # a run that a stop signal kills as it starts

    def launch(name: str) -> None:
        side_by_side.launch_run(name, [], tmp_path / f"{name}.log", processes=1, accelerate_config=None, devices=None,
                                in_process=False)

    with pytest.raises(Preempted, match=r"^run starting stopped \(exit -15: SIGTERM\); its log is "):
        launch("starting")
    with side_by_side._stop_signals_reach_the_runs() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.is_set()
        with pytest.raises(Preempted, match=r"^run next was not started: stopped by a signal\. Rerun"):
            launch("next")
    assert not (tmp_path / "next.log").exists()


@pytest.mark.timeout(60)
def test_a_stop_signal_that_comes_as_a_runs_process_starts_is_passed_on_to_it(tmp_path, monkeypatch):
    """Between its start and its entry among the running runs, the handler does not know the new process: the signal
    is sent to it once it is there (else the run went on to its end)."""
    script = tmp_path / "run.py"
    script.write_text("import time\ntime.sleep(120)\n")
    monkeypatch.setattr(side_by_side, "TRAIN", str(script))
    start = side_by_side.subprocess.Popen

    def signalled_as_it_starts(*args, **kwargs):
        child = start(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGUSR1)
        return child

    monkeypatch.setattr(side_by_side.subprocess, "Popen", signalled_as_it_starts)
    started = time.monotonic()
    with side_by_side._stop_signals_reach_the_runs(), \
            pytest.raises(Preempted, match=r"^run starting stopped \(exit -10: SIGUSR1\)"):
        side_by_side.launch_run("starting", [], tmp_path / "starting.log", processes=1, accelerate_config=None,
                                devices=None, in_process=False)
    assert time.monotonic() - started < 30


def test_runs_of_several_processes_side_by_side_each_rendezvous_on_a_port_of_their_own(tmp_path, monkeypatch):
    commands = []

    class Started:
        def __init__(self, command, **_):
            commands.append(command)

        def wait(self):
            return 0

    monkeypatch.setattr(side_by_side.subprocess, "Popen", Started)
    for name in ("a", "b"):
        side_by_side.launch_run(name, ["x=1"], tmp_path / f"{name}.log", processes=3, accelerate_config="cpu.yaml",
                                devices=None, in_process=False)
    for command in commands:
        assert command[1:7] == ["-m", "dist_tsp.launch", "--config_file", "cpu.yaml", "--num_processes", "3"]
        assert command[7] == "--main_process_port" and int(command[8]) > 0 and command[-1] == "x=1"


def test_a_run_in_this_process_answers_a_stop_signal_that_came_before_its_handlers(tmp_path, monkeypatch, capsys):
    """While the run in the protocol's or the sweep's own process plans (before its handlers are in place), the
    signal went to their handler only and the run trained to its end."""
    plan = train.plan

    def signalled_while_planning(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return plan(*args)

    monkeypatch.setattr(train, "plan", signalled_while_planning)
    (tmp_path / "trials.txt").write_text("seed=0\n")
    with pytest.raises(SystemExit) as stop:
        sweep.main(["run", str(tmp_path / "trials.txt"), str(tmp_path / "out"), "configs/demo.yaml",
                    "--parallel-runs", "1", "teacher.args={depth: 8, width: 8}", "teacher.epochs=1",
                    "train.max_steps=20"])
    assert stop.value.code == 75
    assert "stopped by a signal at step 1 of " in capsys.readouterr().err  # the teacher's first step
    assert not (tmp_path / "out" / "trial_1" / "results.json").exists()


@pytest.mark.parametrize("stopped", [False, True])
def test_after_a_run_the_stop_signals_get_back_the_handlers_they_had_before(stopped):
    """Set to be ignored when a run ended, they left the protocol or a sweep running runs in its own process deaf to
    `kill` between runs; a worker of dist-tsp-launch, which starts with them ignored, still ignores the launcher's
    repeats. The same when the run ends, or stops by raising."""
    def own(*_):
        pass

    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        signal.signal(signal.SIGTERM, own)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        with contextlib.suppress(Preempted), train.stop_on_signals():
            assert signal.getsignal(signal.SIGTERM) is not own and signal.getsignal(signal.SIGUSR1) != signal.SIG_IGN
            if stopped:
                raise Preempted("stopped by a signal")
        assert signal.getsignal(signal.SIGTERM) is own and signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def test_a_rendezvous_port_comes_from_outside_the_systems_own_range_and_is_one_nobody_listens_on(tmp_path, monkeypatch):
    """Outside the range Linux picks a socket's port from, no listener bound meanwhile (gloo's, of a run beside it)
    can take it before the launch binds it."""
    ephemeral = tmp_path / "ip_local_port_range"
    monkeypatch.setattr(side_by_side, "EPHEMERAL_PORTS", str(ephemeral))
    ephemeral.write_text("32768\t60999\n")  # Linux's default
    assert all(PORTS_FROM <= port < 32768 or 60999 < port < 65536 for port in (free_port() for _ in range(50)))
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        taken = held.getsockname()[1]
        ephemeral.write_text(f"{taken + 1}\t65535\n")  # outside it: the held port alone
        monkeypatch.setattr(side_by_side, "PORTS_FROM", taken)
        assert free_port() != taken  # the system's pick instead

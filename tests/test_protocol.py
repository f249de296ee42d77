"""The protocol runner: a CI-sized run of the paper's whole protocol (tiny data, 2 seeds), reuse on rerun, W&B,
its accelerate launches, and the alternate-learning phase with mentors on 3 ranks against 1."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from dist_tsp import side_by_side
from dist_tsp.config import DEFAULT_TEACHER_FILE
from dist_tsp.errors import INTERRUPTED, INTERRUPTED_EXIT_CODE
from dist_tsp.protocol import fewer_processes_line, grid_runs, main, plan, processes_for, seed_runs
from tests.runs import ENV, ROOT, launch, no_room, one_thread, train_rows, wandb_runs

pytestmark = pytest.mark.slow
STUDENTS = ("lenet", "alexnet", "mobilenet")
TINY = ["--config", "configs/demo.yaml", "--grid", "0.1,0.8,0.1 0.2,0.6,0.2",
        "students=[{name: lenet, model: lenet}, {name: alexnet, model: alexnet, args: {width: 0.25, hidden: 64}},"
        " {name: mobilenet, model: mobilenet, args: {width_mult: 0.25}}]",
        "data.batch_size=32", "teacher.args={depth: 8, width: 8}", "teacher.epochs=1", "train.epochs=2",
        "train.max_steps=4", "train.log_every=2"]
FILES = ("table1.md", "table1.csv", "table2.md", "table2.csv", "verdicts.md", "curves_loss.png",
         "curves_accuracy.png", "figure4.png", "figure5.png")


@pytest.fixture(scope="module")
def protocol(tmp_path_factory):
    """Its runs in this process with one thread, as the launched ones run (that the 3-rank relaunch of a phase adds
    in their order)."""
    out = tmp_path_factory.mktemp("protocol")
    with one_thread():
        main([*TINY, "--out", str(out), "--seeds", "2"])
    return out


def test_every_seeds_runs_are_given_that_seed(tmp_path):
    protocol, _, _ = plan([*TINY, "--out", str(tmp_path / "protocol"), "--seeds", "3"])
    runs = seed_runs(protocol, {})
    assert {run.name.split("/")[0] for run in runs} == {"seed_0", "seed_1", "seed_2"}
    assert all(f"seed={run.name.split('/')[0].removeprefix('seed_')}" in run.overrides for run in runs)


def test_one_command_writes_every_table_and_figure(protocol):
    for name in FILES:
        assert (protocol / name).stat().st_size > 0, name
    for name in ("figure4.png", "figure5.png", "curves_loss.png"):
        assert (protocol / name).read_bytes()[:4] == b"\x89PNG"


def test_table2_has_every_method_and_rotation_as_mean_and_std_over_two_seeds(protocol):
    table = (protocol / "table2.md").read_text()
    rotations = [f"alternate ({s} last)" for s in STUDENTS]
    for label in ("scratch", "vanilla KD", "TSP (0.1/0.8/0.1)", "TSP tuned", *rotations):
        assert label in table, label
    body = [line for line in table.splitlines()[2:] if line.startswith("|")]
    assert all(line.count("(n=2)") == len(STUDENTS) + 1 for line in body), table  # the students and the teacher
    assert "paper" not in table  # the paper's numbers are shown for CIFAR-10 only


def test_table1_holds_scratch_and_every_grid_point_on_the_validation_split(protocol):
    table = (protocol / "table1.md").read_text()
    assert "| scratch" in table and table.count("| grid") == 2 and "weakest (" in table and "strongest (" in table
    for run in ("scratch", "a0.1_b0.8_g0.1", "a0.2_b0.6_g0.2"):
        results = json.loads((protocol / "grid" / run / "results.json").read_text())
        assert all(s["val_acc"] is not None for s in results["students"].values())


def test_verdicts_pair_the_seeds(protocol):
    lines = (protocol / "verdicts.md").read_text().splitlines()
    for student in STUDENTS:
        assert any(line.startswith(("- TSP > KD for", "- TSP not > KD for")) and line.split(":")[0].endswith(student)
                   for line in lines), student
    assert all("over 2 seeds (holds in" in line for line in lines if line.startswith("- "))


def test_alternate_phase_two_trains_only_the_last_student_with_its_mentors_frozen(protocol):
    phase1 = protocol / "seed_0" / "alternate_lenet" / "phase1"
    phase2 = protocol / "seed_0" / "alternate_lenet" / "phase2"
    first, second = (json.loads((p / "results.json").read_text()) for p in (phase1, phase2))
    assert set(first["students"]) == {"alexnet", "mobilenet"}
    assert second["students"]["alexnet"]["frozen"] and not second["students"]["lenet"]["frozen"]
    assert second["loss"]["alpha"] == 0.1 and second["loss"]["beta"] == 0.6 and second["loss"]["gamma"] == 0.3
    for mentor in ("alexnet", "mobilenet"):  # the mentors teach with phase 1's final weights, unchanged
        assert second["students"][mentor]["test_acc"] == first["students"][mentor]["test_acc"]
    rows = train_rows(phase2)
    assert rows and not any(key.startswith(("train/alexnet", "train/mobilenet")) for row in rows for key in row)
    assert all(row["train/lenet/peer"] > 0 and row["train/lenet/kd"] > 0 for row in rows)


def test_rerunning_reuses_every_finished_run_and_the_progress_bar_counts_every_run(protocol, capsys):
    """Rerun with the same settings given otherwise: the config's path written another way, the overrides in another
    order, another tracker (before: refused as another protocol). Nothing runs again, the teacher's stage neither:
    no log is written to."""
    results = list(protocol.rglob("results.json"))
    finished = {p: p.stat().st_mtime_ns for p in [*results, protocol / DEFAULT_TEACHER_FILE,
                                                  *(protocol / "logs").glob("*.log")]}
    table = (protocol / "table2.md").read_text()
    capsys.readouterr()
    main(["--config", "./configs/demo.yaml", *TINY[2:4], *reversed(TINY[4:]), "tracking.report_to=tensorboard",
          "--out", str(protocol), "--seeds", "2"])
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
    assert (protocol / "table2.md").read_text() == table
    runs = len(results) + 1  # and the teacher stage
    assert f"| {runs}/{runs} [" in capsys.readouterr().err


def test_other_options_or_an_edited_config_file_in_the_same_directory_are_refused_in_one_line(protocol, tmp_path,
                                                                                            monkeypatch, capsys):
    """Refused before anything runs or is written, naming what differs: the directory's finished runs started from
    the config as it read then."""
    with pytest.raises(SystemExit) as stop:
        main([*TINY, "--out", str(protocol), "--seeds", "1"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"dist-tsp protocol: error: {protocol} holds another protocol (seeds: [0, 1] -> [0]): rerun with its "
        "options or choose another --out"]
    monkeypatch.chdir(tmp_path)  # the same --config configs/demo.yaml, edited
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text((ROOT / "configs" / "demo.yaml").read_text().replace(
        "temperature: 4.0", "temperature: 2.0"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "protocol.json").write_bytes((protocol / "protocol.json").read_bytes())
    with pytest.raises(SystemExit) as stop:
        main([*TINY, "--out", "out", "--seeds", "2"])
    assert stop.value.code == 2 and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["protocol.json"]
    assert capsys.readouterr().err.strip().splitlines() == [
        "dist-tsp protocol: error: out holds another protocol (base_config.loss.temperature: 4.0 -> 2.0): rerun with "
        "its options or choose another --out"]


def test_more_seeds_in_the_same_directory_run_the_new_seeds_and_reuse_the_others(protocol, tmp_path):
    """Before: refused as another protocol (seeds: [0] -> [0, 1]), so more seeds meant every run again."""
    out, options = tmp_path / "p", [*TINY, "--methods", "scratch", f"teacher.checkpoint={protocol}/teacher/model.pt"]
    main([*options, "--out", str(out), "--seeds", "1"])
    first = (out / "seed_0" / "scratch" / "results.json").stat().st_mtime_ns
    main([*options, "--out", str(out), "--seeds", "2"])
    assert (out / "seed_0" / "scratch" / "results.json").stat().st_mtime_ns == first
    assert (out / "seed_1" / "scratch" / "results.json").is_file()
    assert json.loads((out / "protocol.json").read_text())["seeds"] == [0, 1]
    assert "(n=2)" in (out / "table2.md").read_text()


def test_mentored_phase_on_three_ranks_matches_one_process(protocol, tmp_path):
    """Phase 2 of a rotation relaunched on 3 gloo ranks (one student each, the mentors' logits in the all-gather)
    gives the same per-step losses as the single-process run."""
    one = protocol / "seed_0" / "alternate_mobilenet" / "phase2"
    launch(["--config", str(one / "config.yaml"), f"output_dir={tmp_path}"], processes=3)
    assert len(train_rows(one)) == 2  # before: none (the rows were read by lenet's loss, here a mentor's)
    for a, b in zip(train_rows(one), train_rows(tmp_path), strict=True):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7)


def test_runs_side_by_side_give_the_sequential_runs_results_with_logs_and_one_start_up_line(protocol, tmp_path,
                                                                                           capsys, monkeypatch):
    """--parallel-runs 2: the seed's runs in processes of their own, two at once, KD and TSP sharing the teacher's
    logit cache (each epoch computed by one of them); the same per-step losses and test accuracies as one at a time
    in this process (each with one thread)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "side_by_side"
    main([*TINY, "--out", str(out), "--seeds", "1", "--methods", "scratch,kd,tsp", "--parallel-runs", "2",
          f"teacher.checkpoint={protocol / 'teacher' / 'model.pt'}"])
    assert "protocol: 2 runs at once (--parallel-runs 2)" in capsys.readouterr().out.splitlines()
    for method in ("scratch", "kd", "tsp"):
        alone, beside = protocol / "seed_0" / method, out / "seed_0" / method
        for a, b in zip(train_rows(alone), train_rows(beside), strict=True):
            assert b == pytest.approx(a, rel=1e-5, abs=1e-7), method
        tested = [{s: r["test_acc"] for s, r in json.loads((d / "results.json").read_text())["students"].items()}
                  for d in (alone, beside)]
        assert tested[1] == pytest.approx(tested[0], abs=1e-6), method
        assert f"Results in {beside}/results.json" in (out / "logs" / f"seed_0-{method}.log").read_text()
    assert "parallel" not in (out / "protocol.json").read_text()
    kd, tsp = (json.loads((out / "seed_0" / m / "results.json").read_text())["teacher"]["cache"] for m in ("kd", "tsp"))
    assert sorted(kd["computed_epochs"] + tsp["computed_epochs"]) == sorted(kd["computed_epochs"] + kd["reused_epochs"])


def test_bad_method_is_refused_before_any_run(tmp_path):
    with pytest.raises(SystemExit) as stop:
        main([*TINY, "--out", str(tmp_path / "p"), "--methods", "scratch,tsp2"])
    assert stop.value.code == 2 and not (tmp_path / "p").exists()


def test_a_protocol_that_finds_no_room_for_its_files_is_one_line_and_exit_1(small_file_system, capsys):
    (small_file_system / "ballast").write_bytes(bytes(9 << 20))  # the whole file system
    with pytest.raises(SystemExit) as stop:
        main([*TINY, "--out", str(small_file_system / "p")])
    assert stop.value.code == 1
    assert capsys.readouterr().err.strip() == f"dist-tsp protocol: error: {no_room(small_file_system)}"


@pytest.mark.parametrize("grid, message", [
    ("0.1,0.8,0.1 inf,0,0", "--grid '0.1,0.8,0.1 inf,0,0': write points as 'alpha,beta,gamma' separated by spaces"),
    ("0.1,0.8,0.1 0.10,0.80,0.10", "--grid lists the point 0.1,0.8,0.1 more than once: give each once"),
])
def test_a_grid_with_an_infinite_weight_or_a_point_twice_is_refused_in_one_line(tmp_path, capsys, grid, message):
    """A point twice would be two runs sharing one output_dir."""
    with pytest.raises(SystemExit) as stop:
        main([*TINY, "--out", str(tmp_path / "p"), "--grid", grid])
    assert stop.value.code == 2 and not (tmp_path / "p").exists()
    assert capsys.readouterr().err.strip().startswith(f"dist-tsp protocol: error: {message}")


@pytest.mark.parametrize("options, message", [
    (["--seeds", "0"], "--seeds 0: give at least 1"),
    (["--val-fraction", "1.5"], "--val-fraction 1.5: give a fraction between 0 and 1"),
])
def test_a_bad_option_is_refused_in_one_line_naming_it(tmp_path, capsys, options, message):
    with pytest.raises(SystemExit) as stop:
        main([*TINY, "--out", str(tmp_path / "p"), *options])
    assert stop.value.code == 2 and not (tmp_path / "p").exists()
    assert capsys.readouterr().err.strip().startswith(f"dist-tsp protocol: error: {message}")


@pytest.mark.parametrize("options, message", [
    (["--methods", ""], "--methods '' names no method: choose from scratch, kd, tsp, tuned, alternate"),
    (["--processes", "2", "--accelerate-config", "missing.yaml"],
     "--accelerate-config missing.yaml does not exist: give an accelerate config, e.g. configs/accelerate/cpu.yaml or "
     "gpu.yaml"),
    (["--processes", "2", "--accelerate-config", "configs"],
     "--accelerate-config configs is a directory: give an accelerate config, e.g. configs/accelerate/cpu.yaml or "
     "gpu.yaml"),
    (["--processes", "2", "--accelerate-config", "configs/demo.yaml"],
     "--accelerate-config configs/demo.yaml is not an accelerate config (ValueError: A `distributed_type` must be "
     "specified in the config file.): give one that `accelerate config` writes, e.g. configs/accelerate/cpu.yaml (a "
     "run's own config is given with --config)"),
    (["output_dir=runs/elsewhere"], "output_dir=runs/elsewhere: every run's output_dir is a folder of --out: leave it "
                                    "out, and give the protocol's folder as --out"),
])
def test_input_found_bad_only_by_a_run_is_refused_in_one_line_before_any_run_or_file(tmp_path, monkeypatch, capsys,
                                                                                     options, message):
    """Before: no method trained the teacher alone and wrote an empty report; an accelerate config not there failed
    the teacher's run after protocol.json was written; an output_dir was ignored."""
    monkeypatch.setattr(side_by_side, "launch_run", lambda name, *_, **__: pytest.fail(f"run {name} was launched"))
    with pytest.raises(SystemExit) as stop:
        main([*TINY, "--out", str(tmp_path / "p"), *options])
    assert stop.value.code == 2 and not (tmp_path / "p").exists()
    assert capsys.readouterr().err.strip().splitlines() == [f"dist-tsp protocol: error: {message}"]


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_out_folder_that_is_a_file_or_under_one_is_refused_in_one_line_before_any_run(tmp_path, monkeypatch,
                                                                                         capsys, where):
    """Before: FileExistsError's or NotADirectoryError's traceback, exit 1."""
    monkeypatch.setattr(side_by_side, "launch_run", lambda name, *_, **__: pytest.fail(f"run {name} was launched"))
    notes = tmp_path / "notes"
    notes.write_text("notes\n")
    out = notes if where == "a file" else notes / "p"
    with pytest.raises(SystemExit) as stop:
        main([*TINY, "--out", str(out)])
    assert stop.value.code == 2 and notes.read_text() == "notes\n"
    assert capsys.readouterr().err.strip().splitlines() == [
        f"dist-tsp protocol: error: --out {out}: {notes} is a file, not a directory; choose another path"]


def test_runs_given_fewer_processes_than_asked_say_so_at_start_up():
    """Before: --processes 2 with 3 students ran every run in one process, silently."""
    assert fewer_processes_line(3, 2) == ("protocol: the runs of all 3 students take 1 process each, the most up to "
                                          "--processes 2 that can hold them")
    assert fewer_processes_line(3, 4) == ("protocol: the runs of all 3 students take 3 processes each, the most up "
                                          "to --processes 4 that can hold them")
    assert fewer_processes_line(3, 3) is None and fewer_processes_line(3, 6) is None


def test_grid_points_that_differ_past_six_digits_are_two_runs_with_their_exact_weights(tmp_path):
    """Written with 6 significant digits, both were grid/a0.123456_b0.8_g0.1 with loss.alpha=0.123456."""
    grid = "0.1234561,0.8,0.1 0.1234562,0.8,0.1 0.1,0.9,0"
    protocol, _, _ = plan([*TINY, "--out", str(tmp_path / "p"), "--grid", grid])
    planned = grid_runs(protocol)
    assert [(run.name, run.overrides[-3:]) for run in planned[1:]] == [
        ("grid/a0.1234561_b0.8_g0.1", ("loss.alpha=0.1234561", "loss.beta=0.8", "loss.gamma=0.1")),
        ("grid/a0.1234562_b0.8_g0.1", ("loss.alpha=0.1234562", "loss.beta=0.8", "loss.gamma=0.1")),
        ("grid/a0.1_b0.9_g0", ("loss.alpha=0.1", "loss.beta=0.9", "loss.gamma=0"))]


def test_a_grid_point_no_run_can_use_is_refused_in_one_line_naming_its_run_before_anything_is_written(
        tmp_path, monkeypatch, capsys):
    """Every planned run's config is checked first: a grid point of weights 0 was found only by its own run, after the
    teacher's and scratch's, and the protocol.json written by then refused a rerun with the grid corrected."""
    monkeypatch.setattr(side_by_side, "launch_run", lambda name, *_, **__: pytest.fail(f"run {name} was launched"))
    out = tmp_path / "p"
    with pytest.raises(SystemExit) as stop:
        main([*TINY, "--out", str(out), "--grid", "0.1,0.8,0.1 0,0,0"])
    assert stop.value.code == 2 and not out.exists()
    assert capsys.readouterr().err.strip().splitlines() == [
        "dist-tsp protocol: error: run grid/a0_b0_g0: config key 'loss': loss.alpha, loss.beta and loss.gamma are all "
        "0: set at least one (scratch is alpha=1)"]


def test_runs_use_the_most_processes_that_fit_their_students():
    assert [processes_for(n, 3) for n in (1, 2, 3, 4, 6)] == [3, 2, 3, 2, 3]


def test_wandb_runs_share_a_group_are_named_for_method_and_seed_and_get_table2(protocol, tmp_path):
    out = tmp_path / "wb"
    options = [*TINY, "--out", str(out), "--seeds", "1", "--methods", "kd", "tracking.report_to=wandb",
               f"teacher.checkpoint={protocol / 'teacher' / 'model.pt'}",
               "--processes", "3"]  # 3 processes: the run is a real accelerate launch
    main(options)
    logged = next((out / "seed_0" / "kd" / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    assert b"kd-seed0" in logged and out.name.encode() in logged and b"train/mobilenet/ce" in logged
    table = json.loads(next((out / "wandb").glob("offline-run-*/files/media/table/table2_*.table.json")).read_text())
    assert table["columns"][:3] == ["method", "label", "student"]
    assert {row[2] for row in table["data"]} == {*STUDENTS, "teacher"}
    main(options)  # every run reused: Table 2 goes to the same W&B run (before, one more table2 run per rerun)
    assert len({run["id"] for run in wandb_runs(out)}) == 1 and len(wandb_runs(out)) == 2


def test_sigterm_while_its_teacher_trains_in_its_own_process_stops_the_protocol_within_seconds_with_exit_75(tmp_path):
    """The teacher run goes in the protocol's process (--parallel-runs 1 on a CPU): before, the signal waited for the
    teacher's whole training."""
    out = tmp_path / "p"
    protocol = subprocess.Popen([sys.executable, "-m", "dist_tsp.protocol", *TINY, "--out", str(out), "--methods",
                                 "scratch", "--parallel-runs", "1", "teacher.epochs=200"],
                                cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = out / "logs" / "teacher.log"
    deadline = time.monotonic() + 120
    while not (log.is_file() and re.search(r"teacher:.*\b[1-9]\d*/\d+", log.read_text())):
        assert protocol.poll() is None and time.monotonic() < deadline, protocol.communicate()[1][-3000:]
        time.sleep(0.1)
    protocol.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    _, stderr = protocol.communicate(timeout=120)
    assert protocol.returncode == 75 and time.monotonic() - signalled < 20, stderr[-3000:]
    assert re.fullmatch(r"dist-tsp protocol: run teacher stopped \(exit 75\): dist-tsp: stopped by a signal at step "
                        rf"\d+ of \d+ of the teacher's training, before it was saved: rerun the same command to train "
                        rf"it again; its log is {re.escape(str(log))}\. Rerun the same command to continue from there",
                        stderr.strip().splitlines()[-1]), stderr[-3000:]
    assert not (out / "teacher" / "model.pt").exists()


@pytest.mark.parametrize("parallel_runs", ["1", "2"])
def test_ctrl_c_on_launch_protocol_sh_run_where_the_user_stands_stops_it_and_its_runs_with_one_line_and_exit_130(
        tmp_path, parallel_runs):
    """A terminal's Ctrl-C (SIGINT to the whole process group), while the teacher trains in the protocol's process
    (--parallel-runs 1 on a CPU) or in one of its own; the script reads the relative --config and --out where it is
    started. Before: a traceback (and the paths read in the repository)."""
    shutil.copy(ROOT / "configs" / "demo.yaml", tmp_path / "mine.yaml")
    options = [*TINY[2:], "--config", "mine.yaml", "--out", "p", "--methods", "scratch", "--parallel-runs",
               parallel_runs, "teacher.epochs=200"]
    protocol = subprocess.Popen([ROOT / "launch" / "protocol.sh", *options], cwd=tmp_path, env=ENV,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "p" / "logs" / "teacher.log"
    deadline = time.monotonic() + 120
    while not (log.is_file() and re.search(r"teacher:.*\b[1-9]\d*/\d+", log.read_text())):
        assert protocol.poll() is None and time.monotonic() < deadline, protocol.communicate()[1][-3000:]
        time.sleep(0.1)
    os.killpg(protocol.pid, signal.SIGINT)
    interrupted = time.monotonic()
    _, stderr = protocol.communicate(timeout=60)
    assert protocol.returncode == INTERRUPTED_EXIT_CODE and time.monotonic() - interrupted < 20, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == f"dist-tsp protocol: {INTERRUPTED}", stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert not [p for p in psutil.process_iter() if _session(p) == protocol.pid]  # its runs are gone too


def _session(process: psutil.Process) -> int | None:
    try:
        return os.getsid(process.pid)
    except ProcessLookupError:
        return None

"""`python -m dist_tsp.sweep run`: a trials file's trials on this machine, two at once, then the table; a rerun
reuses finished trials, if they ran with its settings; a bad trial is refused before any runs."""

import argparse
import csv
import json
import re
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from dist_tsp import sweep as sweeps
from dist_tsp.config import load_config, save_config
from dist_tsp.sweep import main, trial_overrides
from tests.runs import ENV, ROOT

pytestmark = pytest.mark.slow
TINY = ["students=[{name: lenet, model: lenet}, {name: mobilenet, model: mobilenet, args: {width_mult: 0.25}}]",
        "data.batch_size=32", "teacher.args={depth: 8, width: 8}", "teacher.epochs=1", "train.epochs=1",
        "train.max_steps=3", "train.log_every=3"]


def test_trials_run_two_at_a_time_stop_together_on_sigterm_then_resume_fill_the_table_and_a_rerun_reuses_them(
        tmp_path, capsys):
    """SIGTERM to `sweep run` reaches both trials in flight: each stops after its next step with a checkpoint, the
    sweep exits 75 with one line and leaves no process behind, and the same command resumes them."""
    trials, sweep = tmp_path / "seeds.txt", tmp_path / "sweep"
    trials.write_text("seed=0\n# the second seed\nseed=1\n")
    args = ["run", str(trials), str(sweep), "configs/demo.yaml", "--parallel-runs", "2", *TINY, "train.max_steps=30",
            "train.log_every=1"]
    sweeping = subprocess.Popen([sys.executable, "-m", "dist_tsp.sweep", *args], cwd=ROOT, env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not all((sweep / f"trial_{n}" / "metrics.jsonl").is_file() for n in (1, 2)):
        assert sweeping.poll() is None and time.monotonic() < deadline, sweeping.communicate()
        time.sleep(0.1)
    sweeping.send_signal(signal.SIGTERM)
    _, stderr = sweeping.communicate(timeout=120)
    assert sweeping.returncode == 75, stderr[-3000:]
    assert re.fullmatch(r"dist-tsp: run trial_\d stopped \(exit 75\): dist-tsp: stopped by a signal at step \d+; .*",
                        stderr.strip().splitlines()[-1]), stderr[-3000:]
    for number in (1, 2):
        assert "stopped by a signal at step" in (sweep / "logs" / f"trial_{number}.log").read_text()
        assert not (sweep / f"trial_{number}" / "results.json").exists()
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(sweep) in " ".join(p.info["cmdline"] or [])]
    main(args)
    assert "sweep: 2 runs at once (--parallel-runs 2)" in capsys.readouterr().out.splitlines()
    with (sweep / "sweep.csv").open() as table:
        rows = list(csv.DictReader(table))
    assert [row["seed"] for row in rows] == ["0", "1"]
    for number, row in enumerate(rows, 1):
        results = json.loads((sweep / f"trial_{number}" / "results.json").read_text())
        assert results["seed"] == number - 1
        tracking = load_config(sweep / f"trial_{number}" / "config.yaml").tracking  # W&B's run and group
        assert (tracking.run_name, tracking.group) == (f"trial_{number}", "sweep")
        assert {name: float(row[f"{name} test %"]) for name in results["students"]} == pytest.approx(
            {name: 100 * s["test_acc"] for name, s in results["students"].items()})
        log = (sweep / "logs" / f"trial_{number}.log").read_text()
        assert "students: resuming from" in log and f"Results in {sweep / f'trial_{number}'}/results.json" in log
    finished = {p: p.stat().st_mtime_ns for p in sweep.rglob("results.json")}
    main(["run", str(trials), str(sweep), "configs/demo.yaml", "--parallel-runs", "1", *TINY, "train.max_steps=30",
          "train.log_every=1"])
    assert "sweep: 1 run at a time (--parallel-runs 1)" in capsys.readouterr().out.splitlines()
    assert {p: p.stat().st_mtime_ns for p in sweep.rglob("results.json")} == finished


def test_a_bad_trial_is_refused_in_one_line_naming_it_before_any_run(tmp_path, capsys):
    trials, sweep = tmp_path / "grid.txt", tmp_path / "sweep"
    trials.write_text("# gamma, then the temperature\nloss.gamma=0.1\n\nloss.temprature=3\n")
    with pytest.raises(SystemExit) as stop:
        main(["run", str(trials), str(sweep), "configs/demo.yaml", *TINY])
    assert stop.value.code == 2 and not sweep.exists()
    assert capsys.readouterr().err.strip().splitlines() == [
        f"dist-tsp: error: {trials}, trial 2 (loss.temprature=3): unknown config key 'loss.temprature': allowed keys "
        "here are alpha, beta, gamma, temperature, peer_reduction, preset"]


@pytest.mark.parametrize("content, message", [
    (b"# nothing yet\n\n", "trials file {trials} holds no trials: write one line of key=value overrides per trial"),
    (b"seed=0\n\xff\xfe\n", "trials file {trials} is not UTF-8 text: write one line of key=value overrides per "
                             "trial"),
    (b"seed=0\nseed=1 output_dir=/elsewhere\n", "{trials}:2: a trial's output_dir is the sweep's DIR/trial_N: leave "
                                                "it out"),  # it was ignored, yet shown in the table
])
def test_a_trials_file_without_trials_not_text_or_moving_a_trial_is_refused_in_one_line(tmp_path, capsys, content,
                                                                                         message):
    trials, sweep = tmp_path / "trials.txt", tmp_path / "sweep"
    trials.write_bytes(content)
    with pytest.raises(SystemExit) as stop:
        main(["run", str(trials), str(sweep), "configs/demo.yaml", *TINY])
    assert stop.value.code == 2 and not sweep.exists()
    assert capsys.readouterr().err.strip().splitlines() == [f"dist-tsp: error: {message.format(trials=trials)}"]


def test_a_sweep_directory_recorded_before_trials_were_refused_an_output_dir_still_collects(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "trials.txt").write_text("loss.gamma=0.2 output_dir=runs/x\n")
    main(["collect", str(sweep)])
    assert "loss.gamma" in capsys.readouterr().out


def test_a_process_count_that_cannot_hold_a_trials_students_is_refused_in_one_line_before_any_run(tmp_path, capsys):
    trials, sweep = tmp_path / "seeds.txt", tmp_path / "sweep"
    trials.write_text("seed=0\n")
    with pytest.raises(SystemExit) as stop:
        main(["run", str(trials), str(sweep), "configs/demo.yaml", "--processes", "3", *TINY])
    assert stop.value.code == 2 and not sweep.exists()
    assert capsys.readouterr().err.strip().splitlines() == [
        f"dist-tsp: error: {trials}, trial 1: --processes 3 cannot hold its 2 students: give a count that divides or "
        "is a multiple of it"]


def finished_sweep(tmp_path):
    """A sweep of seeds 0 and 1 as `sweep run` leaves it once both trials have finished with TINY, a copy of
    configs/demo.yaml (loss.temperature 4.0) as CONFIG, and train.max_steps=3: each trial's config.yaml saved as
    train.py saves it, and its results."""
    trials, sweep, config = tmp_path / "seeds.txt", tmp_path / "sweep", tmp_path / "demo.yaml"
    trials.write_text("seed=0\nseed=1\n")
    config.write_text((ROOT / "configs" / "demo.yaml").read_text())
    sweep.mkdir()
    (sweep / "trials.txt").write_text(trials.read_text())
    for number in (1, 2):
        directory = sweep / f"trial_{number}"
        directory.mkdir()
        save_config(load_config(config, [*TINY, f"seed={number - 1}", f"output_dir={directory}"]),
                    directory / "config.yaml")
        (directory / "results.json").write_text(json.dumps(
            {"teacher": None, "students": {"lenet": {"val_acc": None, "test_acc": 0.25 * number}}}))
    return trials, sweep, config


def files(folder):
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize("overrides, edit, change", [
    (["loss.temperature=8"], None, "loss.temperature: 4.0 -> 8.0"),
    (["train.max_steps=6"], None, "train.max_steps: 3 -> 6"),  # a finished run's length is part of its results
    ([], ("temperature: 4.0", "temperature: 2.0"), "loss.temperature: 4.0 -> 2.0"),  # CONFIG edited since
])
def test_a_rerun_with_other_settings_is_refused_in_one_line_naming_the_finished_trial_before_anything_is_written(
        tmp_path, capsys, overrides, edit, change):
    trials, sweep, config = finished_sweep(tmp_path)
    if edit:
        config.write_text(config.read_text().replace(*edit))
    before = files(sweep)
    with pytest.raises(SystemExit) as stop:
        main(["run", str(trials), str(sweep), str(config), *TINY, *overrides])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"dist-tsp: error: {sweep / 'trial_1'} finished with other settings ({change}): rerun with the settings it "
        f"ran with, or choose another DIR or remove {sweep / 'trial_1'}"]
    assert files(sweep) == before  # no log, no table, nothing moved


def test_a_rerun_with_the_settings_the_trials_ran_with_reuses_them_and_writes_the_table(tmp_path, capsys):
    trials, sweep, config = finished_sweep(tmp_path)
    main(["run", str(trials), str(sweep), str(config), *TINY, "train.log_every=1"])  # logging: not what a run computes
    assert not (sweep / "logs").exists()
    with (sweep / "sweep.csv").open() as table:
        rows = list(csv.DictReader(table))
    assert [(row["seed"], float(row["lenet test %"])) for row in rows] == [("0", 25.0), ("1", 50.0)]


def test_a_trial_still_running_is_a_dash_in_sweep_md_and_an_empty_cell_in_sweep_csv(tmp_path, capsys):
    _, sweep, _ = finished_sweep(tmp_path)
    (sweep / "trial_2" / "results.json").unlink()
    main(["collect", str(sweep)])
    assert capsys.readouterr().out.splitlines()[-1].replace(" ", "") == "|2|1|-|"
    with (sweep / "sweep.csv").open() as table:
        assert [row["lenet test %"] for row in csv.DictReader(table)] == ["25.0", ""]


def test_of_two_collects_at_once_the_one_that_reads_the_later_results_writes_the_table_last(tmp_path, monkeypatch):
    """Array tasks finishing together each collect: one that read trial 2 before its results.json was written must not
    write its table after one that read it whole."""
    _, sweep, _ = finished_sweep(tmp_path)
    results = sweep / "trial_2" / "results.json"
    written = results.read_text()
    results.unlink()
    read_row, read_early = sweeps._row, threading.Event()
    early = threading.Thread(target=sweeps.collect, args=(sweep,))

    def row_read_early(sweep_dir, number, overrides):
        found = read_row(sweep_dir, number, overrides)
        if threading.current_thread() is early and number == 2:
            read_early.set()
            time.sleep(1)
        return found

    monkeypatch.setattr(sweeps, "_row", row_read_early)
    early.start()
    assert read_early.wait(30)
    results.write_text(written)
    sweeps.collect(sweep)
    early.join()
    with (sweep / "sweep.csv").open() as table:
        assert [row["lenet test %"] for row in csv.DictReader(table)] == ["25.0", "50.0"]


def test_a_trials_own_line_wins_over_the_overrides_given_to_every_trial(tmp_path):
    args = argparse.Namespace(dir=tmp_path / "sweep", overrides=["loss.temperature=8", "seed=5"])
    cfg = load_config(ROOT / "configs" / "demo.yaml", trial_overrides(args, "trial_1", ["loss.temperature=2"]))
    assert (cfg.loss.temperature, cfg.seed) == (2.0, 5)


def test_a_sweep_directory_named_like_a_date_or_a_number_is_the_trackers_group_as_written(tmp_path):
    """The group override is read as YAML: before, every trial of runs/2024-05-01 was refused (a date, not a string)."""
    for name in ("2024-05-01", "3", "true"):
        args = argparse.Namespace(dir=tmp_path / name, overrides=[])
        assert load_config(ROOT / "configs" / "demo.yaml", trial_overrides(args, "trial_1", [])).tracking.group == name


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_sweep_directory_that_is_a_file_or_under_one_is_refused_in_one_line_before_any_run(tmp_path, capsys, where):
    """Before: FileExistsError's or NotADirectoryError's traceback, exit 1."""
    trials, notes = tmp_path / "seeds.txt", tmp_path / "notes"
    trials.write_text("seed=0\n")
    notes.write_text("notes\n")
    sweep = notes if where == "a file" else notes / "sweep"
    with pytest.raises(SystemExit) as stop:
        main(["run", str(trials), str(sweep), "configs/demo.yaml", *TINY])
    assert stop.value.code == 2 and notes.read_text() == "notes\n"
    assert capsys.readouterr().err.strip().splitlines() == [
        f"dist-tsp: error: sweep directory {sweep}: {notes} is a file, not a directory; choose another path"]


@pytest.mark.parametrize("where", ["missing", "a directory"])
def test_an_accelerate_config_that_is_not_a_file_is_refused_in_one_line_before_any_run(tmp_path, capsys, where):
    trials, sweep = tmp_path / "seeds.txt", tmp_path / "sweep"
    trials.write_text("seed=0\n")
    accelerate = tmp_path / "missing.yaml" if where == "missing" else tmp_path
    with pytest.raises(SystemExit) as stop:
        main(["run", str(trials), str(sweep), "configs/demo.yaml", "--processes", "2", "--accelerate-config",
              str(accelerate), *TINY])
    assert stop.value.code == 2 and not sweep.exists()
    assert capsys.readouterr().err.strip().splitlines() == [
        f"dist-tsp: error: --accelerate-config {accelerate} "
        f"{'does not exist' if where == 'missing' else 'is a directory'}: give an accelerate config, e.g. "
        "configs/accelerate/cpu.yaml or gpu.yaml"]


def test_an_output_dir_for_every_trial_is_refused_in_one_line_as_on_a_trials_line(tmp_path, capsys):
    """Before, it was ignored: every trial still ran in DIR/trial_N."""
    trials, sweep = tmp_path / "seeds.txt", tmp_path / "sweep"
    trials.write_text("seed=0\n")
    with pytest.raises(SystemExit) as stop:
        main(["run", str(trials), str(sweep), "configs/demo.yaml", *TINY, "output_dir=runs/elsewhere"])
    assert stop.value.code == 2 and not sweep.exists()
    assert capsys.readouterr().err.strip().splitlines() == [
        "dist-tsp: error: output_dir=runs/elsewhere: a trial's output_dir is the sweep's DIR/trial_N: leave it out"]


def test_the_help_of_run_says_what_each_argument_is(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    said = " ".join(capsys.readouterr().out.split())
    assert "TRIALS the trials file: " in said and "DIR the sweep directory: " in said
    assert "CONFIG the run config every trial starts from" in said

"""`python -m dist_tsp.sweep run`: a trials file's trials on this machine, two at once, then the table; a rerun
reuses finished trials; a bad trial is refused before any runs."""

import csv
import json

import pytest

from dist_tsp.sweep import main

pytestmark = pytest.mark.slow
TINY = ["students=[{name: lenet, model: lenet}, {name: mobilenet, model: mobilenet, args: {width_mult: 0.25}}]",
        "data.batch_size=32", "teacher.args={depth: 8, width: 8}", "teacher.epochs=1", "train.epochs=1",
        "train.max_steps=3", "train.log_every=3"]


def test_trials_run_two_at_a_time_fill_the_table_and_a_rerun_reuses_them(tmp_path, capsys):
    trials, sweep = tmp_path / "seeds.txt", tmp_path / "sweep"
    trials.write_text("seed=0\n# the second seed\nseed=1\n")
    main(["run", str(trials), str(sweep), "configs/demo.yaml", "--parallel-runs", "2", *TINY])
    assert "sweep: 2 runs at once (--parallel-runs 2)" in capsys.readouterr().out.splitlines()
    with (sweep / "sweep.csv").open() as table:
        rows = list(csv.DictReader(table))
    assert [row["seed"] for row in rows] == ["0", "1"]
    for number, row in enumerate(rows, 1):
        results = json.loads((sweep / f"trial_{number}" / "results.json").read_text())
        assert results["seed"] == number - 1
        assert {name: float(row[f"{name} test %"]) for name in results["students"]} == pytest.approx(
            {name: 100 * s["test_acc"] for name, s in results["students"].items()})
        assert f"Results in {sweep / f'trial_{number}'}/results.json" in (sweep / "logs" / f"trial_{number}.log") \
            .read_text()
    finished = {p: p.stat().st_mtime_ns for p in sweep.rglob("results.json")}
    main(["run", str(trials), str(sweep), "configs/demo.yaml", "--parallel-runs", "1", *TINY])
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

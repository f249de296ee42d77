"""End to end: real `accelerate launch` runs of dist_tsp/train.py on CPU (gloo)."""

import json
import re

import pytest
import torch

from dist_tsp.checkpoint import complete_checkpoints, read_manifest
from tests.runs import TINY, launch, student_state, tensorboard_scalars, train_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def single_and_three_ranks(tmp_path_factory):
    """The same config and seed trained on 1 rank (all students, logging to TensorBoard too) and on 3 ranks
    (one each, a checkpoint after every step), same teacher."""
    one, three = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("three")
    launch(["--config", "configs/demo.yaml", f"output_dir={one}", *TINY, "tracking.report_to=tensorboard"])
    launch(["--config", "configs/demo.yaml", f"output_dir={three}", f"teacher.checkpoint={one}/teacher/model.pt",
            *TINY, "train.checkpoint_every=1"], processes=3)
    return one, three


def test_placement_invariance_same_losses_per_step(single_and_three_ranks):
    one, three = map(train_rows, single_and_three_ranks)
    assert [r["step"] for r in one] == [r["step"] for r in three] == list(range(1, 7))
    for a, b in zip(one, three):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


def test_placement_invariance_same_parameters(single_and_three_ranks):
    one, three = single_and_three_ranks
    for name in ("lenet", "alexnet", "mobilenet"):
        a, b = student_state(one, 6, name)["model"], student_state(three, 6, name)["model"]
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=f"{name}.{key}")


def test_run_directory_holds_config_metrics_checkpoints_and_results(single_and_three_ranks):
    _, run = single_and_three_ranks
    assert (run / "config.yaml").is_file() and (run / "results.md").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"train/alexnet/ce", "train/alexnet/kd", "train/alexnet/peer", "train/alexnet/acc"} <= rows[0].keys()
    assert any("test/mobilenet/acc" in r for r in rows)
    results = json.loads((run / "results.json").read_text())
    assert set(results["students"]) == {"lenet", "alexnet", "mobilenet"}
    assert results["teacher"]["name"] == "resnet_cifar"
    saved = student_state(run, 6, "lenet")
    assert {"model", "optimizer", "scheduler", "step", "teacher", "peers"} <= saved.keys()
    assert (run / "checkpoints" / "step_00000006" / "rng" / "lenet.replica0.pt").is_file()
    assert saved["peers"] == ["alexnet", "mobilenet"] and saved["step"] == 6
    kept = [(read_manifest(d)["step"], read_manifest(d)["epoch_end"]) for d in complete_checkpoints(run)]
    assert kept == [(4, False), (5, False), (6, True)]  # train.keep_last=2 step checkpoints, and the run's end


def test_launch_shape_that_does_not_fit_is_rejected(tmp_path):
    done = launch(["--config", "configs/demo.yaml", f"output_dir={tmp_path / 'run'}", *TINY,
                   "students=[{name: a, model: lenet}, {name: b, model: lenet}]"], processes=3, check=False)
    assert done.returncode != 0
    assert "dist-tsp: error: 3 processes cannot hold 2 students" in done.stderr
    assert "Traceback" not in done.stderr.split("dist-tsp: error")[0][-2000:]
    assert not (tmp_path / "run").exists()


def test_demo_on_three_processes_beats_chance(tmp_path):
    done = launch(["--config", "configs/demo.yaml", f"output_dir={tmp_path}", "teacher.epochs=6", "train.epochs=4"],
                  processes=3)  # the demo, half as long (W&B logging: tests/test_protocol.py)
    results = json.loads((tmp_path / "results.json").read_text())
    for name, student in results["students"].items():
        assert student["test_acc"] > 0.3, (name, student)  # 10 classes: chance is 0.1; half a demo is short
    assert results["teacher"]["test_acc"] > 0.6  # half the demo teacher's epochs
    assert "| lenet" in done.stdout and "test acc %" in done.stdout
    ours = re.compile(r"dist_tsp/\w+\.py:\d+: \w*Warning")  # e.g. a deprecated torch API called
    assert not ours.search(done.stderr), done.stderr[-3000:]


def test_tensorboard_tracker_receives_per_student_scalars(single_and_three_ranks):
    one, _ = single_and_three_ranks
    tags = set(tensorboard_scalars(one / "dist-tsp"))
    assert {"train/lenet/loss", "train/mobilenet/peer", "test/alexnet/acc"} <= tags


def test_a_single_student_learns_from_the_teacher_alone(tmp_path):
    launch(["--config", "configs/demo.yaml", f"output_dir={tmp_path}", *TINY, "train.max_steps=3",
            "students=[{name: solo, model: lenet}]"])
    rows = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "train/solo/loss" in r]
    assert len(rows) == 3 and all(r["train/solo/peer"] == 0.0 and r["train/solo/kd"] > 0 for r in rows)


def test_compiled_students_train_to_the_eager_losses(single_and_three_ranks, tmp_path):
    one, _ = single_and_three_ranks
    twins = ["students=[{name: lenet, model: lenet}, {name: lenet_b, model: lenet}]", "train.max_steps=3",
             f"teacher.checkpoint={one}/teacher/model.pt"]
    for mode in ("eager", "compiled"):
        launch(["--config", "configs/demo.yaml", f"output_dir={tmp_path / mode}", *TINY, *twins,
                f"train.compile={mode == 'compiled'}"])
    eager, compiled = train_rows(tmp_path / "eager"), train_rows(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 3
    for step, (a, b) in enumerate(zip(eager, compiled)):
        for key in a:  # the first step's forward is the same math; Adam's steps then amplify rounding a little
            assert b[key] == pytest.approx(a[key], rel=1e-5 if step == 0 else 1e-3, abs=1e-6), (step, key)

"""configs/six_students.yaml end to end: six different students, one per rank and three per rank."""

import json

import pytest

from tests.runs import launch, train_rows

pytestmark = pytest.mark.slow

CONFIG = "configs/six_students.yaml"
TWO_STEPS = ["train.max_steps=2", "train.log_every=1", "teacher.epochs=1", "teacher.args={depth: 8, width: 8}",
             "data.batch_size=16"]
SIX = {"lenet": "lenet", "alexnet": "alexnet", "mobilenet": "mobilenet", "resnet18": "resnet18",
       "vgg11": "vgg11_cifar", "shufflenet": "shufflenet_v2_x0_5"}


@pytest.fixture(scope="module")
def six_and_two_ranks(tmp_path_factory):
    """Two steps of the six-student config on 6 ranks (one student each) and on 2 ranks (three each), same
    teacher."""
    six, two = tmp_path_factory.mktemp("six"), tmp_path_factory.mktemp("two")
    launch(["--config", CONFIG, f"output_dir={six}", *TWO_STEPS], processes=6)
    launch(["--config", CONFIG, f"output_dir={two}", f"teacher.checkpoint={six}/teacher/model.pt", *TWO_STEPS],
           processes=2)
    return six, two


def test_six_students_train_one_per_rank_and_three_per_rank_and_all_six_are_reported(six_and_two_ranks):
    for run in six_and_two_ranks:
        students = json.loads((run / "results.json").read_text())["students"]
        assert {name: s["model"] for name, s in students.items()} == SIX
        assert all(0.0 <= s["test_acc"] <= 1.0 for s in students.values())


def test_one_and_three_students_per_rank_give_the_same_losses_per_step(six_and_two_ranks):
    six, two = map(train_rows, six_and_two_ranks)
    assert [r["step"] for r in six] == [r["step"] for r in two] == [1, 2]
    assert {key.split("/")[1] for key in six[0] if key.startswith("train/")} == SIX.keys()
    for a, b in zip(six, two):
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4), key

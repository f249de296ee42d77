"""The paper's teacher recipe: pretrained weights (torchvision's ImageNet ones or a file) and resized inputs."""

import errno
import os
import urllib.error

import pytest
import torch

from dist_tsp.checkpoint import CheckpointError
from dist_tsp.config import validate_config
from dist_tsp.errors import OutOfSpace
from dist_tsp.models import ModelError, build_model
from dist_tsp.placement import Groups
from dist_tsp.teacher import build_teacher, load_frozen_teacher
from tests.runs import TINY, launch


def config(**teacher):
    return validate_config({"students": [{"name": "a", "model": "lenet"}], "teacher": teacher})


def imagenet_like_file(tmp_path, model="resnet18"):
    torch.manual_seed(1)
    state = build_model(model, 1000).state_dict()
    torch.save(state, tmp_path / "weights.pth")
    return tmp_path / "weights.pth", state


def test_weights_file_is_loaded_and_the_head_reinitialised_for_the_classes(tmp_path):
    path, state = imagenet_like_file(tmp_path)
    teacher = build_teacher(config(model="resnet18", weights=str(path)), 10, pretrained=True)
    assert torch.equal(teacher.conv1.weight, state["conv1.weight"])
    assert torch.equal(teacher.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert teacher.fc.weight.shape == (10, 512)


def test_input_scale_resizes_only_the_teachers_input(tmp_path):
    seen = []
    teacher = build_teacher(config(model="resnet_cifar", args={"depth": 8}, input_scale=7), 10, pretrained=False)
    teacher.features[0].register_forward_pre_hook(lambda _, args: seen.append(args[0].shape))
    assert teacher(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert seen == [torch.Size([2, 3, 224, 224])]


@pytest.mark.parametrize("failure", ["offline", "no room"])
def test_imagenet_weights_offline_say_how_to_use_a_file_and_a_full_disk_says_so(monkeypatch, failure):
    """A disk that fills up as the weights are written is not called offline (before, it was)."""
    def failing(*args, **kwargs):
        raise {"offline": urllib.error.URLError("no network"),
               "no room": OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))}[failure]

    monkeypatch.setattr("torchvision.models._api.WeightsEnum.get_state_dict", failing)
    error, said = {"offline": (ModelError, r"cannot download ImageNet weights for 'resnet18' .*teacher.weights=/path"),
                   "no room": (OutOfSpace, r"^no room left on the file system at /\S* \(Disk quota exceeded\): free "
                                           r"space there \(or raise this user's quota\), then rerun the same command$")
                   }[failure]
    with pytest.raises(error, match=said):
        build_teacher(config(model="resnet18", weights="imagenet"), 10, pretrained=True)


@pytest.mark.parametrize("weights, message", [
    ("/nonexistent/w.pth", r"teacher.weights file /nonexistent/w.pth does not exist"),
    ("lenet", r"weights .* do not fit model 'resnet18': unexpected entries"),
])
def test_bad_weights_are_reported_in_one_line(tmp_path, weights, message):
    if weights == "lenet":
        weights, _ = imagenet_like_file(tmp_path, "lenet")
    with pytest.raises(ModelError, match=message):
        build_teacher(config(model="resnet18", weights=str(weights)), 10, pretrained=True)


@pytest.mark.slow
def test_teacher_fine_tunes_from_a_weights_file_at_a_larger_input_size(tmp_path):
    torch.save(build_model("resnet_cifar", 1000, depth=8, width=8).state_dict(), tmp_path / "w.pth")
    done = launch(["--config", "configs/demo.yaml", f"output_dir={tmp_path / 'run'}", *TINY, "train.max_steps=2",
                   f"teacher.weights={tmp_path / 'w.pth'}", "teacher.input_scale=2"])
    assert "re-initialised: fc.bias, fc.weight" in done.stdout
    assert (tmp_path / "run" / "results.json").is_file()


@pytest.mark.parametrize("saved, message", [
    ({"model": {}, "optimizer": {}, "student": {"name": "lenet", "model": "lenet"}},
     r"is student 'lenet''s checkpoint \(a lenet with args \{\}\), not a resnet_cifar with args \{.*\}: set "
     r"teacher.model and teacher.args to the student's, or point teacher.checkpoint to a run's teacher/model.pt"),
    ({"model": {}, "model_name": "resnet18", "num_classes": 10},
     r"holds a resnet18 teacher, but teacher.model is resnet_cifar: set teacher.model=resnet18 with its teacher.args"),
])
def test_a_student_checkpoint_or_another_model_given_as_the_teacher_is_named_as_such(tmp_path, saved, message):
    """Before: both were 'does not fit the configured model' with a list of missing state-dict keys."""
    torch.save(saved, tmp_path / "file.pt")
    with pytest.raises(CheckpointError, match=message):
        load_frozen_teacher(config(), 10, tmp_path / "file.pt", torch.device("cpu"), Groups(None, None, None))


def test_a_students_checkpoint_teaches_as_a_teacher_of_its_kind(tmp_path):
    torch.manual_seed(0)
    student = build_model("lenet", 10)
    torch.save({"model": student.state_dict(), "optimizer": {}, "student": {"name": "a", "model": "lenet", "args": {}}},
               tmp_path / "a.pt")
    teacher, _ = load_frozen_teacher(config(model="lenet", args={}), 10, tmp_path / "a.pt", torch.device("cpu"),
                                     Groups(None, None, None))
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(teacher(images), student.eval()(images))

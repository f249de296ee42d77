"""The model registry: names, output shapes, kwargs, errors, seeded determinism and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_tsp.config import load_config
from dist_tsp.models import ModelError, UnknownModelError, build_model, model_names
from dist_tsp.placement import Placement
from dist_tsp.students import check_local_students

REGISTERED = ["lenet", "alexnet", "mobilenet", "vgg11_cifar", "resnet_cifar", "resnet50", "airbench"]
TORCHVISION = ["resnet18", "shufflenet_v2_x0_5"]


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_model_names_lists_exactly_the_registered_models_in_order():
    assert model_names() == REGISTERED


@pytest.mark.parametrize("num_classes", [10, 7])
@pytest.mark.parametrize("name", REGISTERED + TORCHVISION)
def test_model_maps_a_32x32_batch_to_logits_of_shape_batch_by_classes(name, num_classes):
    torch.manual_seed(0)
    model = build_model(name, num_classes).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()


def test_resnet_cifar_teacher_accepts_a_larger_64x64_input():
    model = build_model("resnet_cifar", 10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


@pytest.mark.parametrize(
    ("name", "small", "large"),
    [
        ("alexnet", {"width": 0.5, "hidden": 256}, {}),
        ("alexnet", {"width": 0.5}, {}),  # each argument on its own
        ("alexnet", {"hidden": 64}, {}),
        ("mobilenet", {"width_mult": 0.5}, {"width_mult": 1.0}),
        ("vgg11_cifar", {"width": 0.25}, {}),
        ("resnet_cifar", {"depth": 8}, {"depth": 20}),
        ("resnet_cifar", {"width": 8}, {"width": 16}),
    ],
)
def test_size_kwargs_shrink_the_model_and_keep_the_output_shape(name, small, large):
    small_model = build_model(name, 10, **small).eval()
    assert _num_params(small_model) < _num_params(build_model(name, 10, **large))
    with torch.no_grad():
        assert small_model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_vgg11_cifar_is_eight_width_scaled_convs_and_one_linear_layer():
    model = build_model("vgg11_cifar", 10, width=0.25)
    convs = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert convs == [16, 32, 64, 64, 128, 128, 128, 128]
    assert linears == [(128, 10)]


def test_resnet_cifar_rejects_a_depth_that_is_not_6n_plus_2():
    with pytest.raises(ValueError, match=r"resnet_cifar depth must be 6n\+2.*got 9"):
        build_model("resnet_cifar", 10, depth=9)


def test_unknown_model_name_raises_unknown_model_error_listing_the_choices():
    with pytest.raises(UnknownModelError, match=r"^unknown model 'xyz': choose one of lenet, alexnet, .*resnet18"):
        build_model("xyz", 10)
    assert issubclass(UnknownModelError, ValueError)


@pytest.mark.parametrize("name", ["lenet", "resnet_cifar", "resnet18"])
def test_unexpected_kwarg_raises_a_one_line_value_error_naming_model_and_kwarg(name):
    with pytest.raises(ValueError, match=rf"model '{name}'.*'bogus'") as info:
        build_model(name, 10, bogus=1)
    assert not isinstance(info.value, UnknownModelError)
    assert "\n" not in str(info.value)


def test_torchvision_fallback_cannot_be_given_pretrained_weights():
    with pytest.raises(ValueError, match=r"model 'resnet18'.*'weights'"):
        build_model("resnet18", 10, weights="DEFAULT")


@pytest.mark.parametrize("name", REGISTERED)
def test_models_built_under_the_same_seed_have_identical_parameters(name):
    torch.manual_seed(123)
    first = build_model(name, 10)
    torch.manual_seed(123)
    second = build_model(name, 10)
    state_a, state_b = first.state_dict(), second.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[key], state_b[key]) for key in state_a)


def test_models_built_under_different_seeds_differ():
    torch.manual_seed(1)
    first = build_model("lenet", 10)
    torch.manual_seed(2)
    second = build_model("lenet", 10)
    assert not any(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))


@pytest.mark.parametrize("name", REGISTERED)
def test_backward_gives_a_gradient_to_every_parameter(name):
    torch.manual_seed(0)
    model = build_model(name, 10).train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    missing = [key for key, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_the_early_student_check_builds_a_torchvision_model_that_reads_its_tensors_while_it_builds():
    """RegNet's builder calls .tolist(): on the meta device, where the check first built students, it raised."""
    cfg = load_config("configs/demo.yaml", ["students=[{name: a, model: regnet_y_400mf}, {name: b, model: lenet}]"])
    state = torch.get_rng_state()
    check_local_students(cfg, Placement(world_size=1, rank=0, num_students=2), num_classes=10, image_size=32)
    assert torch.equal(torch.get_rng_state(), state)  # the teacher, built next, draws as before


@pytest.mark.parametrize("students, image_size, message", [
    ("{name: a, model: lenet}", 8, r"^student a \(lenet\) cannot take the data's 8x8 images \(RuntimeError: "
                                   r"Calculated padded input size .*\): choose another model, or a data.image_size it "
                                   r"takes$"),
    ("{name: a, model: googlenet}", 32, r"^student a \(googlenet\) returns a GoogLeNetOutputs, not logits \[N, 10\], "
                                       r"as it trains: give it the args that make it return its logits alone "
                                       r"\(torchvision's googlenet and inception_v3: \{aux_logits: false\}\)$"),
])
def test_a_student_that_cannot_take_the_datas_images_or_returns_more_than_logits_is_refused_before_the_teacher(
        students, image_size, message):
    """Before: their first step's traceback, once the teacher had trained."""
    cfg = load_config("configs/demo.yaml", [f"students=[{students}, {{name: b, model: lenet}}]"])
    with pytest.raises(ModelError, match=message):
        check_local_students(cfg, Placement(world_size=1, rank=0, num_students=2), num_classes=10,
                             image_size=image_size)

"""The fast CIFAR teacher recipe (configs/paper/teacher_airbench.yaml): the airbench model, its whitening layer and
BatchNorm-shift learning rate, the triangular schedule, label smoothing, and a tiny training run of the recipe."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_tsp.config import ConfigError, OptimConfig, load_config
from dist_tsp.data import load_dataset
from dist_tsp.models import PatchWhitening, build_model, fit_whitening
from dist_tsp.optim import build_optimizer
from dist_tsp.placement import Groups
from dist_tsp.teacher import prepare_teacher

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "paper" / "teacher_airbench.yaml"


def test_airbench_maps_32x32_images_to_logits_with_airbench94s_two_million_parameters():
    model = build_model("airbench", 10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) == 1_971_352
    assert [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] == [64, 64, 256, 256, 256, 256]


def test_fitted_whitening_makes_the_patches_second_moment_the_identity():
    torch.manual_seed(0)
    images = torch.randn(16, 3, 12, 12)
    images = images + images.roll(1, -1) + 0.5 * images.roll(1, 1)  # neighbouring pixels and channels correlated
    layer = PatchWhitening()
    fit_whitening(nn.Sequential(layer), iter(images.split(8)))
    whitened = F.conv2d(images, layer.weight[:12]).transpose(0, 1).flatten(1)  # the first half: the eigenbasis
    moment = whitened @ whitened.T / whitened.shape[1]
    assert torch.allclose(moment, torch.eye(12), atol=2e-3)
    assert torch.equal(layer.weight[12:], -layer.weight[:12])


def test_fit_whitening_reads_no_image_for_a_model_without_a_whitening_layer():
    def batches():
        raise AssertionError("read")
        yield

    fit_whitening(build_model("lenet", 10), batches())


def _train(model: nn.Module, groups: list[dict], steps: int = 3) -> None:
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.85, nesterov=True, weight_decay=0.01)
    torch.manual_seed(1)
    for _ in range(steps):
        loss = F.cross_entropy(model(torch.randn(8, 3, 16, 16)), torch.randint(0, 10, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_sgd_moves_the_norm_shifts_bias_lr_scale_times_faster_at_the_same_decay_as_airbenchs_parameter_groups():
    torch.manual_seed(0)
    built_in = build_model("airbench", 10, widths=(4, 8, 8), bias_lr_scale=64.0)
    torch.manual_seed(0)
    grouped = build_model("airbench", 10, widths=(4, 8, 8), bias_lr_scale=1.0)
    shifts = [p for name, p in grouped.named_parameters() if name.endswith("shift")]
    others = [p for name, p in grouped.named_parameters() if not name.endswith("shift")]
    _train(built_in, [{"params": list(built_in.parameters())}])
    _train(grouped, [{"params": shifts, "lr": 0.1 * 64, "weight_decay": 0.01 / 64}, {"params": others}])
    for a, b in zip(built_in.modules(), grouped.modules()):
        if isinstance(a, nn.BatchNorm2d):
            torch.testing.assert_close(a.gain * a.shift, b.shift, rtol=1e-4, atol=1e-6)
    for (name, a), b in zip(built_in.named_parameters(), grouped.parameters()):
        if not name.endswith("shift"):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_triangular_schedule_rises_from_a_fifth_to_the_peak_at_a_tenth_then_falls_linearly_to_zero():
    optimizer, schedule = build_optimizer([nn.Parameter(torch.zeros(1))], OptimConfig(name="sgd", lr=2.0,
                                                                                       schedule="triangular"), 100)
    rates = []
    for _ in range(101):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates[0] == pytest.approx(0.4) and rates[5] == pytest.approx(1.2) and rates[10] == pytest.approx(2.0)
    assert rates[55] == pytest.approx(1.0) and rates[100] == 0.0
    assert max(rates) == rates[10]


@pytest.mark.parametrize("override, message", [
    ("teacher.label_smoothing=1", r"^config key 'teacher.label_smoothing': Input should be less than 1 \(got 1\)$"),
    ("teacher.label_smoothing=-0.1", r"^config key 'teacher.label_smoothing': Input should be greater than or equal"),
    ("teacher.optimizer.schedule=linear", r"^config key 'teacher.optimizer.schedule': .*'cosine' or 'triangular'"),
])
def test_bad_recipe_settings_are_one_line_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RECIPE, [override])


def test_label_smoothing_joins_the_run_identity_only_when_set():
    assert "label_smoothing" not in load_config(RECIPE, ["teacher.label_smoothing=0"]).identity()["teacher"]
    assert load_config(RECIPE).identity()["teacher"]["label_smoothing"] == 0.2


def test_the_shipped_recipe_trains_a_whitened_teacher_on_the_cpu_with_its_label_smoothing(tmp_path, monkeypatch):
    from accelerate import Accelerator

    smoothing, cross_entropy = [], F.cross_entropy

    def watched(*args, label_smoothing: float = 0.0, **kwargs):
        smoothing.append(label_smoothing)
        return cross_entropy(*args, label_smoothing=label_smoothing, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", watched)
    cfg = load_config(RECIPE, ["data={name: digits, image_size: 16}", "teacher.args={widths: [8, 16, 16]}",
                               "teacher.epochs=3", "teacher.batch_size=64", f"output_dir={tmp_path}",
                               f"teacher.checkpoint={tmp_path / 'teacher.pt'}"])
    data = load_dataset(cfg.data, cfg.seed)
    model, info, _ = prepare_teacher(cfg, data, Accelerator(cpu=True), Groups.world_only())
    assert info.test_acc > 0.5  # 10 classes
    with torch.no_grad():
        predicted = model.eval()(data.normalize(data.test.images)).argmax(-1)
    assert info.test_acc == pytest.approx((predicted == data.test.labels).float().mean().item(), abs=1e-6)
    assert not torch.equal(model.features[0].weight, PatchWhitening().weight)  # fitted to the digits' patches
    assert smoothing and set(smoothing) == {0.2}  # every training step's loss, as the recipe sets it

"""The ImageNet recipes: the 2-node x 8-GPU layout of four students on four replicas each, planned as 16 ranks, and
the one-node recipe run end to end on 3 CPU ranks on a generated ImageNet-layout folder (1000 classes of tiny
JPEGs, a val/ split, a pretrained-teacher file used as it is)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dist_tsp import checkpoint
from dist_tsp.models import build_model
from dist_tsp.train import plan
from tests.runs import launch

TWO_NODES = "configs/imagenet/four_students_2x8.yaml"


def test_the_two_node_recipe_puts_four_students_on_four_replicas_each_with_lr_scaled_to_the_global_batch(tmp_path):
    placements = [plan(["--config", TWO_NODES, f"output_dir={tmp_path}"], 16, rank) for rank in range(16)]
    cfg = placements[0][0]
    assert [p.replicas for _, p in placements] == [4] * 16 and placements[0][1].peer_group_size == 4
    assert [(p.replica_index, p.local_students) for _, p in placements[4:8]] == [(1, [k]) for k in range(4)]
    assert cfg.train.optimizer.lr == pytest.approx(0.1 * cfg.data.batch_size * 4 / 256)
    assert (cfg.teacher.weights, cfg.teacher.epochs, cfg.data.crop, cfg.data.normalization) == \
        ("imagenet", 0, "random_resized", "imagenet")


def test_the_imagenet_recipe_runs_on_cpu_ranks_on_a_tiny_imagenet_layout_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(1000):
            folder = tmp_path / "imagenet" / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(folder / f"{split}_{c}.JPEG")
    torch.manual_seed(0)
    weights = tmp_path / "resnet50.pth"  # stands in for torchvision's download: a 1000-class ResNet-50 state dict
    checkpoint.save_atomic(build_model("resnet50", 1000).state_dict(), weights)
    run = tmp_path / "run"
    launch(["--config", "configs/imagenet/tsp.yaml", f"data.root={tmp_path / 'imagenet'}", f"output_dir={run}",
            f"teacher.weights={weights}", "data.image_size=32", "data.batch_size=8", "data.eval_batch_size=250",
            "data.loader_workers=1", "train.max_steps=2", "train.log_every=1"], 3)
    results = json.loads((run / "results.json").read_text())
    assert list(results["students"]) == ["resnet18", "mobilenet_v2", "shufflenet"]
    assert results["teacher"]["name"] == "resnet50" and 0 <= results["teacher"]["test_acc"] <= 1
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/resnet18/loss" in r] == [1, 2]
    assert all(np.isfinite(r["train/shufflenet/loss"]) for r in rows if "train/shufflenet/loss" in r)

"""The teacher: trained data-parallel over every rank (or loaded), then frozen; its logits per step."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from dist_tsp import checkpoint
from dist_tsp.config import RunConfig
from dist_tsp.data import Dataset, Normalizer, PeerBatches, mixed_seed
from dist_tsp.evaluation import count_correct
from dist_tsp.exchange import all_gather_cat, all_reduce, group_size
from dist_tsp.models import build_model, load_pretrained, scale_inputs
from dist_tsp.optim import build_optimizer


@dataclass(frozen=True, slots=True)
class TeacherInfo:
    """What results.json and student checkpoints record about the teacher."""

    name: str
    checkpoint: str
    sha256: str
    test_acc: float


def teacher_path(cfg: RunConfig) -> Path:
    """Where the teacher lives: loaded from there when present, else trained and saved there."""
    return cfg.teacher.checkpoint or cfg.output_dir / "teacher" / "model.pt"


def prepare_teacher(cfg: RunConfig, data: Dataset, normalize: Normalizer, accelerator: Accelerator
                    ) -> tuple[nn.Module, TeacherInfo]:
    """Load the teacher if its checkpoint exists, else train it on all ranks and save it; return it frozen."""
    torch.manual_seed(mixed_seed(cfg.seed, -1))
    path = teacher_path(cfg)
    with accelerator.main_process_first():  # a weights download happens once
        model = build_teacher(cfg, data.num_classes, pretrained=not path.is_file(),
                              verbose=accelerator.is_main_process).to(accelerator.device)
    if not path.is_file():
        trained = _fit(model, cfg, data, normalize, accelerator)
        if accelerator.is_main_process:
            checkpoint.save_atomic({"model": trained.state_dict(), "model_name": cfg.teacher.model,
                                    "args": cfg.teacher.args, "num_classes": data.num_classes}, path)
        accelerator.wait_for_everyone()
    elif accelerator.is_main_process:
        print(f"teacher: loading {path}")
    # Every rank loads the saved file: identical teachers on all ranks (DDP does not sync BatchNorm statistics).
    saved = checkpoint.load(path, "teacher")
    if saved.get("num_classes", data.num_classes) != data.num_classes:
        raise checkpoint.CheckpointError(
            f"teacher checkpoint {path} predicts {saved['num_classes']} classes but {cfg.data.name} has "
            f"{data.num_classes}: point teacher.checkpoint to a teacher trained on this dataset")
    checkpoint.load_weights(model, saved["model"], path, "teacher")
    model.eval().requires_grad_(False)
    correct = count_correct([model], data.test, shard=accelerator.process_index, num_shards=accelerator.num_processes,
                            batch_size=cfg.data.eval_batch_size, normalize=normalize, autocast=accelerator.autocast)
    world = dist.group.WORLD if accelerator.num_processes > 1 else None
    test_acc = all_reduce(correct, world).item() / len(data.test)
    info = TeacherInfo(name=cfg.teacher.model, checkpoint=str(path), sha256=checkpoint.file_sha256(path),
                       test_acc=test_acc)
    return model, info


def build_teacher(cfg: RunConfig, num_classes: int, *, pretrained: bool, verbose: bool = False) -> nn.Module:
    """The configured teacher architecture with its input resize, and its pretrained weights if asked for."""
    model = build_model(cfg.teacher.model, num_classes, **cfg.teacher.args)
    if pretrained and cfg.teacher.weights is not None:
        fresh = load_pretrained(model, cfg.teacher.model, cfg.teacher.weights)
        if verbose:
            print(f"teacher: {cfg.teacher.weights} weights loaded; re-initialised: {', '.join(fresh) or 'nothing'}")
    return scale_inputs(model, cfg.teacher.input_scale)


def _fit(model: nn.Module, cfg: RunConfig, data: Dataset, normalize: Normalizer, accelerator: Accelerator) -> nn.Module:
    """Plain data-parallel training of one model over all ranks (DDP through accelerate)."""
    batches = PeerBatches(data.train, batch_size=cfg.teacher.batch_size, num_replicas=accelerator.num_processes,
                          replica=accelerator.process_index, seed=mixed_seed(cfg.seed, -1), augment=cfg.data.augment,
                          hflip=data.hflip, normalize=normalize)
    total = cfg.teacher.epochs * len(batches)
    optimizer, schedule = build_optimizer(model.parameters(), cfg.teacher.optimizer, total)
    model = accelerator.prepare_model(model)
    model.train()
    with tqdm(total=total, desc="teacher", disable=not accelerator.is_main_process) as bar:
        for epoch in range(cfg.teacher.epochs):
            for images, labels in batches.epoch(epoch):
                with accelerator.autocast():
                    loss = F.cross_entropy(model(images).float(), labels)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
                bar.update()
    model = accelerator.unwrap_model(model)
    accelerator.free_memory()
    return model


class TeacherLogits:
    """Teacher logits for a peer group's batch: computed whole ("replicated") or 1/G per rank and
    all-gathered ("sharded")."""

    def __init__(self, teacher: nn.Module, *, mode: str, peer_group: dist.ProcessGroup | None, peer_rank: int,
                 autocast) -> None:
        self.teacher, self.peer_group, self.peer_rank, self.autocast = teacher, peer_group, peer_rank, autocast
        self.sharded = mode == "sharded" and group_size(peer_group) > 1

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if not self.sharded:
            with self.autocast():
                return self.teacher(images)
        batch = images.shape[0]
        share = -(-batch // group_size(self.peer_group))  # ceil: the last slice is zero-padded
        mine = images[self.peer_rank * share : (self.peer_rank + 1) * share]
        if mine.shape[0] < share:
            mine = torch.cat([mine, mine.new_zeros((share - mine.shape[0], *mine.shape[1:]))])
        with self.autocast():
            logits = self.teacher(mine)
        return all_gather_cat(logits, self.peer_group)[:batch]

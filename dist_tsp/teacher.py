"""The teacher: trained data-parallel over every rank (or loaded), frozen, evaluated; its logits per step."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from dist_tsp import checkpoint
from dist_tsp.config import RunConfig
from dist_tsp.data import Dataset, PeerBatches, eval_batches, mixed_seed
from dist_tsp.exchange import all_gather_cat, world_group
from dist_tsp.logit_cache import CachedLogits, cache_key
from dist_tsp.models import build_model, load_pretrained, scale_inputs
from dist_tsp.optim import build_optimizer
from dist_tsp.teacher_modes import (
    PARAMETER_SHARDED,
    RunTeacher,
    TeacherLogits,
    gathered_logits,
    local_parameter_bytes,
    shard_parameters,
)


@dataclass(frozen=True, slots=True)
class TeacherInfo:
    """What results.json and student checkpoints record about the teacher."""

    name: str
    checkpoint: str
    sha256: str
    test_acc: float
    mode: str
    parameter_bytes: int  # the whole teacher's
    parameter_bytes_per_rank: list[int]  # what each rank holds (1/W of it when parameter-sharded)


def teacher_path(cfg: RunConfig) -> Path:
    """Where the teacher lives: loaded from there when present, else trained and saved there."""
    return cfg.teacher.checkpoint or cfg.output_dir / "teacher" / "model.pt"


def prepare_teacher(cfg: RunConfig, data: Dataset, accelerator: Accelerator
                    ) -> tuple[nn.Module, TeacherInfo, torch.Tensor]:
    """Load the teacher if its checkpoint exists, else train it on all ranks and save it; return it frozen
    (parameter-sharded in the fsdp and deepspeed modes) with what results.json records about it and its
    predicted class of every test sample."""
    torch.manual_seed(mixed_seed(cfg.seed, -1))
    path = teacher_path(cfg)
    train_it = not path.is_file()
    sharded_later = cfg.teacher.mode in PARAMETER_SHARDED and accelerator.num_processes > 1
    with accelerator.main_process_first():  # a weights download happens once
        model = build_teacher(cfg, data.num_classes, pretrained=train_it, verbose=accelerator.is_main_process)
    # A teacher to be parameter-sharded is loaded in host memory: only its shard goes to the device.
    model.to(accelerator.device if train_it or not sharded_later else "cpu")
    if cfg.teacher.channels_last and (train_it or not sharded_later):
        model.to(memory_format=torch.channels_last)
    if train_it:
        trained = _fit(model, cfg, data, accelerator)
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
    full_bytes = local_parameter_bytes(model)
    if sharded_later:
        model.to(memory_format=torch.contiguous_format)
        model = shard_parameters(model, cfg.teacher.mode, accelerator.device)
    per_rank = all_gather_cat(torch.tensor([local_parameter_bytes(model)], device=accelerator.device), world_group())
    sharded = RunTeacher(model, sharded=True, autocast=accelerator.autocast)
    predicted = _predictions(sharded, data, cfg.data.eval_batch_size)
    info = TeacherInfo(name=cfg.teacher.model, checkpoint=str(path), sha256=checkpoint.file_sha256(path),
                       test_acc=(predicted == data.test.labels).float().mean().item(), mode=cfg.teacher.mode,
                       parameter_bytes=full_bytes, parameter_bytes_per_rank=per_rank.tolist())
    return model, info, predicted


def _predictions(teacher: RunTeacher, data: Dataset, batch_size: int) -> torch.Tensor:
    """The predicted class of every test sample, each batch split over all ranks (same forwards on every rank)."""
    return torch.cat([gathered_logits(teacher, batch, world_group()).argmax(-1)
                      for batch in eval_batches(data.test, batch_size, data.normalize)])


def teacher_logits(cfg: RunConfig, model: nn.Module, info: TeacherInfo, data: Dataset, accelerator: Accelerator
                   ) -> TeacherLogits:
    """The configured mode's per-step source of teacher logits."""
    if cfg.teacher.mode != "cached":
        return RunTeacher(model, sharded=cfg.teacher.mode != "replicated", autocast=accelerator.autocast)
    views = PeerBatches(data.train, batch_size=1, num_replicas=1, replica=0, seed=cfg.seed,
                        augment=cfg.data.augment, hflip=data.hflip, normalize=data.normalize)
    return CachedLogits.under(
        cfg.teacher.cache_dir or cfg.output_dir / "teacher" / "logit_cache",
        cache_key(cfg, info.sha256, views, accelerator.mixed_precision),
        teacher=RunTeacher(model, sharded=True, autocast=accelerator.autocast), views=views,
        batch_size=cfg.data.eval_batch_size, device=accelerator.device,
        writer=accelerator.is_local_main_process, verbose=accelerator.is_main_process)


def build_teacher(cfg: RunConfig, num_classes: int, *, pretrained: bool, verbose: bool = False) -> nn.Module:
    """The configured teacher architecture with its input resize, and its pretrained weights if asked for."""
    model = build_model(cfg.teacher.model, num_classes, **cfg.teacher.args)
    if pretrained and cfg.teacher.weights is not None:
        fresh = load_pretrained(model, cfg.teacher.model, cfg.teacher.weights)
        if verbose:
            print(f"teacher: {cfg.teacher.weights} weights loaded; re-initialised: {', '.join(fresh) or 'nothing'}")
    return scale_inputs(model, cfg.teacher.input_scale)


def _fit(model: nn.Module, cfg: RunConfig, data: Dataset, accelerator: Accelerator) -> nn.Module:
    """Plain data-parallel training of one model over all ranks (DDP through accelerate)."""
    batches = PeerBatches(data.train, batch_size=cfg.teacher.batch_size, num_replicas=accelerator.num_processes,
                          replica=accelerator.process_index, seed=mixed_seed(cfg.seed, -1), augment=cfg.data.augment,
                          hflip=data.hflip, normalize=data.normalize)
    total = cfg.teacher.epochs * len(batches)
    optimizer, schedule = build_optimizer(model.parameters(), cfg.teacher.optimizer, total)
    model = accelerator.prepare_model(model)
    model.train()
    with tqdm(total=total, desc="teacher", disable=not accelerator.is_main_process) as bar:
        for epoch in range(cfg.teacher.epochs):
            for images, labels, _ in batches.epoch(epoch):
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

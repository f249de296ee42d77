"""The teacher: trained data-parallel over every rank (or loaded), frozen, evaluated; its logits per step."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn
from tqdm.auto import tqdm

from dist_tsp import checkpoint
from dist_tsp.augmentation import mixed_seed
from dist_tsp.config import RunConfig
from dist_tsp.cuda_graph import CapturedStep, choose_teacher_step, step_autocast
from dist_tsp.data import Batch, Dataset, PeerBatches, eval_batches
from dist_tsp.errors import Preempted, SharedUserError
from dist_tsp.exchange import all_gather_cat
from dist_tsp.logit_cache import CachedLogits, CacheLayout, cache_key
from dist_tsp.models import ModelError, build_model, fit_whitening, load_pretrained, scale_inputs
from dist_tsp.optim import build_optimizer
from dist_tsp.placement import Groups
from dist_tsp.run_control import StopRequest, StopVote
from dist_tsp.shared_errors import check_same_on_every_rank, main_process_first, on_every_rank
from dist_tsp.teacher_modes import (
    PARAMETER_SHARDED,
    RunTeacher,
    TeacherLogits,
    gathered_logits,
    local_parameter_bytes,
    shard_parameters,
)

WHITENING_SAMPLES = 5000  # the first training images, whose patches fit a whitening layer (airbench's count)


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


def cache_folder(cfg: RunConfig) -> Path:
    """Where teacher.mode=cached keeps its logits (one folder per cache key inside)."""
    return cfg.teacher.cache_dir or cfg.output_dir / "teacher" / "logit_cache"


def prepare_teacher(cfg: RunConfig, data: Dataset, accelerator: Accelerator, groups: Groups,
                    stop_requested: StopRequest | None = None) -> tuple[nn.Module, TeacherInfo, torch.Tensor]:
    """The frozen teacher for `teacher.mode` (trained on all ranks and saved first when its file is missing), with
    what results.json records about it and its predicted class of every test sample. A stop requested while it
    trains (`stop_requested`, over `groups.control`) ends its training after the next step: Preempted."""
    path = cfg.teacher_file
    if not teacher_file_found(cfg, accelerator):
        train_teacher(cfg, data, accelerator, path, StopVote(stop_requested or StopRequest(), groups.control))
    elif accelerator.is_main_process:
        print(f"teacher: loading {path}")
    # Every rank loads the saved file: identical teachers on all ranks (DDP does not sync BatchNorm statistics).
    model, full_bytes = load_frozen_teacher(cfg, data.num_classes, path, accelerator.device, groups)
    digest = checkpoint.file_sha256(path)
    check_same_on_every_rank("loaded a teacher file", lambda: f"sha256 {digest[:16]}",
                             "every node needs the same teacher file: put teacher.checkpoint on a filesystem every "
                             "node shares")
    per_rank = all_gather_cat(torch.tensor([local_parameter_bytes(model)], device=accelerator.device), groups.world)
    predicted = _predictions(RunTeacher(model, sharded=True, autocast=accelerator.autocast), data, groups.world,
                             cfg.data.eval_batch_size)
    info = TeacherInfo(name=cfg.teacher.model, checkpoint=str(path), sha256=digest,
                       test_acc=(predicted == data.test.labels).float().mean().item(), mode=cfg.teacher.mode,
                       parameter_bytes=full_bytes, parameter_bytes_per_rank=per_rank.tolist())
    return model, info, predicted


def teacher_file_found(cfg: RunConfig, accelerator: Accelerator) -> bool:
    """Whether teacher.checkpoint exists, as the main process sees it: every rank then trains the teacher or loads it
    alike (one that cannot read the file says so when it loads it), even if the file appears while they start."""
    return broadcast_object_list([cfg.teacher_file.is_file() if accelerator.is_main_process else None])[0]


def train_teacher(cfg: RunConfig, data: Dataset, accelerator: Accelerator, path: Path, stop_vote: StopVote) -> None:
    """Build the teacher (from its pretrained weights when configured), train it data-parallel on all ranks, and
    save it to `path` (the main process writes; every rank returns once it is there). When `stop_vote` agrees on a
    stop, every rank raises Preempted after the same step and nothing is saved."""
    if cfg.teacher.epochs == 0 and cfg.teacher.weights is None:
        raise SharedUserError(f"teacher.epochs=0 uses a teacher as it is, but {path} does not exist: point "
                              "teacher.checkpoint to a trained teacher, or give teacher.weights")
    torch.manual_seed(mixed_seed(cfg.seed, -1))
    model = main_process_first(accelerator, lambda: build_teacher(cfg, data.num_classes, pretrained=True,
                                                                  verbose=accelerator.is_main_process))
    model.to(accelerator.device)
    if cfg.teacher.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.teacher.weights is None:  # the same images on every rank: the same start
        first = torch.arange(min(len(data.train), WHITENING_SAMPLES))
        fit_whitening(model, (b.images for b in eval_batches(data.train, cfg.data.eval_batch_size, data.normalize,
                                                             first)))
    started = time.perf_counter()
    if cfg.teacher.epochs > 0:
        _fit(model, cfg, data, accelerator, stop_vote)
    if accelerator.is_main_process:  # a file another run saved meanwhile (sharing teacher.checkpoint) is kept
        saved = checkpoint.save_atomic({"model": model.state_dict(), "model_name": cfg.teacher.model,
                                        "args": cfg.teacher.args, "num_classes": data.num_classes}, path,
                                       replace=False)
        epochs, took = cfg.teacher.epochs, time.perf_counter() - started
        trained = f"teacher: trained {epochs} epoch{'s' * (epochs != 1)}"
        print(f"{trained} and saved in {took:.1f} s" if saved else f"{trained} in {took:.1f} s, but another run saved "
              f"{path} meanwhile: every run that shares it learns from that one, this run too")
    accelerator.wait_for_everyone()


def load_frozen_teacher(cfg: RunConfig, num_classes: int, path: Path, device: torch.device, groups: Groups
                        ) -> tuple[nn.Module, int]:
    """The teacher saved at `path`, frozen and placed for `teacher.mode`: whole on the device, or (fsdp, deepspeed
    on several ranks) its parameters split over all ranks, only each rank's shard leaving host memory. Also the
    whole teacher's parameter bytes."""
    model = on_every_rank(lambda: _read_teacher(cfg, num_classes, path))
    full_bytes = local_parameter_bytes(model)
    if cfg.teacher.mode in PARAMETER_SHARDED and groups.world is not None:
        return shard_parameters(model, cfg.teacher.mode, groups.world_mesh(device.type)), full_bytes
    model.to(device)
    if cfg.teacher.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, full_bytes


def _read_teacher(cfg: RunConfig, num_classes: int, path: Path) -> nn.Module:
    """The teacher saved at `path`, frozen, on the host."""
    saved = checkpoint.load(path, "teacher")
    student = saved.get("student")
    if isinstance(student, dict) and (student.get("model"), student.get("args") or {}) != \
            (cfg.teacher.model, cfg.teacher.args):  # a student of the same kind may teach
        raise checkpoint.CheckpointError(
            f"teacher checkpoint {path} is student {student.get('name')!r}'s checkpoint (a {student.get('model')} "
            f"with args {student.get('args') or {}}), not a {cfg.teacher.model} with args {cfg.teacher.args}: set "
            "teacher.model and teacher.args to the student's, or point teacher.checkpoint to a run's teacher/model.pt")
    if saved.get("model_name", cfg.teacher.model) != cfg.teacher.model:
        raise checkpoint.CheckpointError(
            f"teacher checkpoint {path} holds a {saved['model_name']} teacher, but teacher.model is "
            f"{cfg.teacher.model}: set teacher.model={saved['model_name']} with its teacher.args, or point "
            "teacher.checkpoint to another file")
    if saved.get("num_classes", num_classes) != num_classes:
        raise checkpoint.CheckpointError(
            f"teacher checkpoint {path} predicts {saved['num_classes']} classes but {cfg.data.name} has "
            f"{num_classes}: point teacher.checkpoint to a teacher trained on this dataset")
    model = build_teacher(cfg, num_classes, pretrained=False)
    checkpoint.load_weights(model, saved["model"], path, "teacher")
    return model.eval().requires_grad_(False)


def _predictions(teacher: RunTeacher, data: Dataset, world: dist.ProcessGroup | None, batch_size: int
                 ) -> torch.Tensor:
    """The predicted class of every test sample, each batch split over all ranks (same forwards on every rank)."""
    return torch.cat([gathered_logits(teacher, batch, world).argmax(-1)
                      for batch in eval_batches(data.test, batch_size, data.normalize, group=world,
                                                   what="evaluating the teacher on test")])


def teacher_logits(cfg: RunConfig, model: nn.Module, info: TeacherInfo, data: Dataset, accelerator: Accelerator,
                   groups: Groups, stop_requested: StopRequest) -> TeacherLogits:
    """The configured mode's per-step source of teacher logits (a cache's computation answers `stop_requested`)."""
    if cfg.teacher.mode != "cached":
        return RunTeacher(model, sharded=cfg.teacher.mode != "replicated", autocast=accelerator.autocast)
    augmentation = data.augmentation(cfg.seed, cfg.data.augment)
    topk = cfg.teacher.cache_topk
    if topk is not None and topk > data.num_classes:
        raise SharedUserError(f"teacher.cache_topk={topk} but {cfg.data.name} has {data.num_classes} classes: "
                              f"choose at most {data.num_classes}")
    return CachedLogits.under(
        cache_folder(cfg),
        cache_key(cfg, info.sha256, data, augmentation, accelerator.mixed_precision),
        teacher=RunTeacher(model, sharded=True, autocast=accelerator.autocast), data=data.train,
        augmentation=augmentation, normalize=data.normalize,
        layout=CacheLayout(data.num_classes, topk, cfg.teacher.cache_precision), world=groups.world,
        batch_size=cfg.data.eval_batch_size, device=accelerator.device,
        writer=accelerator.is_local_main_process, main=accelerator.is_main_process,
        stop_vote=StopVote(stop_requested, groups.control))


def build_teacher(cfg: RunConfig, num_classes: int, *, pretrained: bool, verbose: bool = False) -> nn.Module:
    """The configured teacher architecture with its input resize, and its pretrained weights if asked for."""
    model = build_model(cfg.teacher.model, num_classes, **cfg.teacher.args)
    if pretrained and cfg.teacher.weights is not None:
        fresh = load_pretrained(model, cfg.teacher.model, cfg.teacher.weights)
        if fresh and cfg.teacher.epochs == 0:
            raise ModelError(f"teacher.epochs=0 uses the {cfg.teacher.weights} weights as they are, but {fresh[0]} "
                             f"does not fit {num_classes} classes: train the teacher (teacher.epochs > 0)")
        if verbose:
            print(f"teacher: {cfg.teacher.weights} weights loaded; re-initialised: {', '.join(fresh) or 'nothing'}")
    return scale_inputs(model, cfg.teacher.input_scale)


def _fit(model: nn.Module, cfg: RunConfig, data: Dataset, accelerator: Accelerator, stop_vote: StopVote) -> None:
    """Plain data-parallel training of one model over all ranks (DDP through accelerate), in place: its parameters
    are the DDP wrapper's (no unwrap_model, which imports DeepSpeed wherever it is installed). The stop vote runs
    beside every step, as in the student phase."""
    seed = mixed_seed(cfg.seed, -1)
    batches = PeerBatches(data.train, batch_size=cfg.teacher.batch_size, num_replicas=accelerator.num_processes,
                          replica=accelerator.process_index, seed=seed,
                          augmentation=data.augmentation(seed, cfg.data.augment), normalize=data.normalize,
                          batch_size_setting="teacher.batch_size")
    total = cfg.teacher.epochs * len(batches)
    device = accelerator.device
    choice = choose_teacher_step(cfg, accelerator.num_processes, device.type)
    optimizer, schedule = build_optimizer(model.parameters(), cfg.teacher.optimizer, total,
                                          graph_safe_on=device if choice.graph_ready else None)
    wrapped = accelerator.prepare_model(model)
    wrapped.train()
    autocast = step_autocast(accelerator, choice.captured)

    def learn(batch: Batch, _: None = None) -> None:
        with autocast():
            loss = F.cross_entropy(wrapped(batch.images).float(), batch.labels,
                                   label_smoothing=cfg.teacher.label_smoothing)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step = CapturedStep(learn, capture=choice.captured, warmup=cfg.train.graph_warmup) if choice.graph_ready \
        else learn
    if accelerator.is_main_process:
        print(choice.line())
    with tqdm(total=total, desc="teacher", disable=not accelerator.is_main_process) as bar:
        steps = (batch for epoch in range(cfg.teacher.epochs) for batch in batches.epoch(epoch))
        for done, batch in enumerate(steps, start=1):
            stop_vote.start()
            step(batch, None)
            schedule.step()
            bar.update()
            if stop_vote.result() and done < total:
                raise Preempted(f"stopped by a signal at step {done} of {total} of the teacher's training, before it "
                                "was saved: rerun the same command to train it again")
    accelerator.free_memory()

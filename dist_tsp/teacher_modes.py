"""How a step gets the frozen teacher's logits for its peer group's batch, in each `teacher.mode`.

- replicated: every rank runs the teacher on the whole batch.
- sharded: each of the G peer ranks runs 1/G of the batch; the step's all-gather assembles [B, C].
- fsdp / deepspeed: sharded as above, and the teacher's parameters are also split 1/W over all
  ranks (FSDP2 `fully_shard`, or DeepSpeed ZeRO stage 3), gathered layer by layer in the forward.
- cached: read from a logit cache built once per epoch (dist_tsp/logit_cache.py).

All modes give the same logits; tests/test_teacher_modes.py compares them on 3 ranks.
"""

from __future__ import annotations

import os
import warnings
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from dist_tsp.data import Batch
from dist_tsp.errors import UserError
from dist_tsp.exchange import all_gather_cat, group_size

PARAMETER_SHARDED = ("fsdp", "deepspeed")


class TeacherLogits(Protocol):
    """The teacher's logits [B, C] for a batch that every rank of a group holds, in two calls around the step's
    all-gather over that group: what this rank adds to it (`contribution`, possibly nothing), then the batch's
    logits from what the all-gather brought back (`logits`). `capturable`: both calls are device work only, so
    that a CUDA graph can capture them (else a captured step takes the logits at its boundary)."""

    capturable: bool

    def start_epoch(self, epoch: int) -> None: ...

    def contribution(self, batch: Batch, group: dist.ProcessGroup | None) -> torch.Tensor | None: ...

    def logits(self, batch: Batch, gathered: torch.Tensor | None) -> torch.Tensor: ...

    def summary(self) -> dict: ...

    def resume_summary(self, saved: dict) -> None: ...


def gathered_logits(teacher: TeacherLogits, batch: Batch, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The batch's logits outside a training step: the contribution's own all-gather between the two calls."""
    mine = teacher.contribution(batch, group)
    return teacher.logits(batch, None if mine is None else all_gather_cat(mine, group))


class RunTeacher:
    """Run the teacher every step: on the whole batch (replicated), or on this rank's 1/G slice of it, the slices
    joined by the all-gather (sharded, when the group has G > 1 ranks)."""

    capturable = True

    def __init__(self, teacher: nn.Module, *, sharded: bool, autocast) -> None:
        self.teacher, self.sharded, self.autocast = teacher, sharded, autocast

    def start_epoch(self, epoch: int) -> None:
        """Nothing to prepare: the teacher runs every step."""

    def summary(self) -> dict:
        """Nothing cached: results.json's teacher.cache stays empty."""
        return {}

    def resume_summary(self, saved: dict) -> None:
        """Nothing to go on from."""

    def contribution(self, batch: Batch, group: dist.ProcessGroup | None) -> torch.Tensor | None:
        """Sharded over G > 1 ranks: the logits of this rank's 1/G slice of the batch, the last slice zero-padded."""
        size = group_size(group)
        if not self.sharded or size == 1:
            return None
        images = batch.images
        share = -(-images.shape[0] // size)  # ceil
        rank = dist.get_rank(group)
        mine = images[rank * share : (rank + 1) * share]
        if mine.shape[0] < share:
            mine = torch.cat([mine, mine.new_zeros((share - mine.shape[0], *mine.shape[1:]))])
        return self._forward(mine)

    def logits(self, batch: Batch, gathered: torch.Tensor | None) -> torch.Tensor:
        """The gathered slices (in group-rank order) cut to the batch, or the whole batch's forward."""
        if gathered is None:
            return self._forward(batch.images)
        return gathered[: batch.images.shape[0]]

    @torch.no_grad()
    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.teacher(images)


def shard_parameters(teacher: nn.Module, mode: str, world: DeviceMesh) -> nn.Module:
    """Split a frozen teacher's parameters over the ranks of the 1-D mesh `world` (fsdp or deepspeed), each rank's
    shard on the mesh's device; other modes keep it whole."""
    if mode == "fsdp":
        return _fully_shard(teacher, world)
    if mode == "deepspeed":
        return _zero3(teacher, world.device_type)
    return teacher


def _fully_shard(teacher: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """FSDP2 over the mesh's ranks: each block holding >= 1/16 of the parameters is its own unit (bounded peak)."""
    from torch.distributed.fsdp import fully_shard

    total = sum(p.numel() for p in teacher.parameters())

    def shard_blocks(module: nn.Module) -> int:
        """Make units bottom-up; return the parameters of `module` not yet in a unit."""
        left = sum(p.numel() for p in module.parameters(recurse=False))
        left += sum(shard_blocks(child) for child in module.children())
        if module is not teacher and left * 16 >= total:
            fully_shard(module, mesh=mesh)
            return 0
        return left

    shard_blocks(teacher)
    fully_shard(teacher, mesh=mesh)
    return teacher


def deepspeed_zero_settings() -> dict:
    """ZeRO settings from an `accelerate launch` DeepSpeed config (configs/accelerate/deepspeed.yaml), else stage 3."""
    stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3"))
    if stage != 3:
        raise UserError(f"teacher.mode=deepspeed shards the teacher's parameters, which needs ZeRO stage 3, but the "
                        f"accelerate config sets zero_stage: {stage}: set zero_stage: 3")
    offload = os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none")
    settings = {"stage": 3, "stage3_param_persistence_threshold": 0}  # shard even the small tensors: 1/W per rank
    if offload != "none":
        settings["offload_param"] = {"device": offload}
    return settings


def quiet_deepspeed() -> None:
    """Before DeepSpeed is imported, so that the ranks stay quiet: on a machine without CUDA its accelerator is named
    (else each rank warns that it fell back to the CPU), and torch's deprecation of all_gather_into_tensor, which
    DeepSpeed calls (dist-tsp calls all_gather_single), is not said by each rank."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", r"`torch\.distributed\.all_gather_into_tensor` is deprecated", FutureWarning)


def _zero3(teacher: nn.Module, device_type: str) -> nn.Module:
    """DeepSpeed ZeRO-3 inference engine over the existing world process group (no optimizer)."""
    import deepspeed

    # DeepSpeed's CPU shared-memory all-reduce serves only its inference all-reduce: not JIT-building it saves about
    # 30 s on a new machine, and a hang for ever where a killed build (or torch >= 2.14) left a lock file that
    # torch < 2.14 waits on (pytorch/pytorch#189245).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo")
    engine, *_ = deepspeed.initialize(
        model=teacher, config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": deepspeed_zero_settings()})
    engine.eval()  # DeepSpeedEngine.eval returns None, and sets its module's mode but not its own
    engine.training = False
    return engine


def local_parameter_bytes(teacher: nn.Module) -> int:
    """Bytes of teacher parameters this rank holds (its shard when parameter-sharded)."""
    total = 0
    for p in teacher.parameters():
        if hasattr(p, "ds_tensor"):  # DeepSpeed ZeRO-3: the local partition
            local = p.ds_tensor
        elif hasattr(p, "to_local"):  # FSDP2 DTensor
            local = p.to_local()
        else:
            local = p
        total += local.numel() * local.element_size()
    return total

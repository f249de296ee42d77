"""One student phase: this rank's students learn from the teacher and from each other, step by step."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from dist_tsp import checkpoint
from dist_tsp.config import RunConfig
from dist_tsp.data import Dataset, ImageSet, Normalizer, PeerBatches, mixed_seed
from dist_tsp.evaluation import count_correct
from dist_tsp.exchange import all_gather_cat, all_reduce_sum
from dist_tsp.losses import tsp_loss
from dist_tsp.models import build_model
from dist_tsp.optim import build_optimizer
from dist_tsp.placement import Groups, Placement
from dist_tsp.teacher import TeacherInfo, TeacherLogits
from dist_tsp.tracking import Tracker

TRAIN_METRICS = ("loss", "ce", "kd", "peer", "acc")


class StudentTrainer:
    """Trains the students of `placement.local_students` on this rank (TSP, KD or scratch by the loss weights).

    Every step: teacher logits for the peer group's batch, each local student's logits, one
    all-gather of detached logits over the peer group, each student's loss, one backward (gradients
    averaged over the student's replicas by DDP when R > 1), optimizer steps. Metrics stay on the
    device and are reduced once per log interval.
    """

    def __init__(self, cfg: RunConfig, placement: Placement, groups: Groups, accelerator: Accelerator,
                 data: Dataset, normalize: Normalizer, teacher: TeacherLogits | None,
                 teacher_info: TeacherInfo | None, tracker: Tracker) -> None:
        self.cfg, self.placement, self.groups, self.accelerator = cfg, placement, groups, accelerator
        self.data, self.normalize, self.teacher, self.teacher_info = data, normalize, teacher, teacher_info
        self.tracker = tracker
        self.names = cfg.student_names
        self.local = placement.local_students
        self.batches = PeerBatches(data.train, batch_size=cfg.data.batch_size, num_replicas=placement.replicas,
                                   replica=placement.replica_index, seed=cfg.seed, augment=cfg.data.augment,
                                   hflip=data.hflip, normalize=normalize)
        self.total_steps = cfg.train.epochs * len(self.batches)
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.students = [self._build_student(i) for i in self.local]
        self.optimizers, self.schedules = zip(
            *(build_optimizer(s.parameters(), cfg.train.optimizer, self.total_steps) for s in self.students)
        )
        self.rng_states = [self._seeded_rng(i) for i in self.local]
        device = accelerator.device
        self.peer_index = [torch.tensor([j for j in range(len(self.names)) if j != i], device=device)
                           for i in self.local]
        self.local_index = torch.tensor(self.local, device=device)
        self.running = torch.zeros(len(self.names), len(TRAIN_METRICS), device=device)
        self.steps_since_log = 0

    def _build_student(self, index: int) -> nn.Module:
        spec = self.cfg.students[index]
        torch.manual_seed(mixed_seed(self.cfg.seed, index))
        model = build_model(spec.model, self.data.num_classes, **spec.args).to(self.accelerator.device)
        if self.groups.replica is None:
            return model
        device_ids = [self.accelerator.device] if self.accelerator.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, process_group=self.groups.replica)

    def _seeded_rng(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A private generator state per student (dropout etc.), independent of its rank-mates."""
        with torch.random.fork_rng(devices=self._rng_devices):
            torch.manual_seed(mixed_seed(self.cfg.seed, index, self.placement.replica_index))
            return self._current_rng()

    @property
    def _rng_devices(self) -> list[torch.device]:
        return [self.accelerator.device] if self.accelerator.device.type == "cuda" else []

    def _current_rng(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        cuda = torch.cuda.get_rng_state(self.accelerator.device) if self._rng_devices else None
        return torch.get_rng_state(), cuda

    @contextmanager
    def _student_rng(self, k: int) -> Iterator[None]:
        with torch.random.fork_rng(devices=self._rng_devices):
            cpu, cuda = self.rng_states[k]
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, self.accelerator.device)
            yield
            self.rng_states[k] = self._current_rng()

    def train(self) -> dict[str, dict[str, float]]:
        """Run every epoch; return each student's final val/test accuracy."""
        step, accuracies = 0, {}
        bar = tqdm(total=self.total_steps, desc="students", disable=not self.accelerator.is_main_process)
        for epoch in range(self.cfg.train.epochs):
            for images, labels in self.batches.epoch(epoch):
                self.train_step(images, labels)
                step += 1
                bar.update()
                if step % self.cfg.train.log_every == 0 or step == self.total_steps:
                    bar.set_postfix(self._log_train(step, epoch), refresh=False)
                if step == self.total_steps:
                    break
            if self.steps_since_log:
                self._log_train(step, epoch)
            accuracies = self.evaluate()
            self.tracker.log({"step": step, "epoch": epoch, **_flatten(accuracies)})
            self.save(step, epoch)
            if step == self.total_steps:
                break
        bar.close()
        return accuracies

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """One TSP step for this rank's students on the peer group's batch."""
        loss_cfg = self.cfg.loss
        teacher_logits = self.teacher(images) if self.teacher is not None and loss_cfg.beta > 0 else None
        outputs = []
        for k, student in enumerate(self.students):
            with self._student_rng(k), self.accelerator.autocast():
                outputs.append(student(images))
        logits = torch.stack(outputs)
        everyone = all_gather_cat(logits, self.groups.peer) if loss_cfg.gamma > 0 else None
        total, rows = 0.0, []
        for k, peers in enumerate(self.peer_index):
            peer_logits = everyone[peers] if everyone is not None else logits.new_empty((0, *logits.shape[1:]))
            terms = tsp_loss(logits[k], labels, teacher_logits, peer_logits, alpha=loss_cfg.alpha,
                             beta=loss_cfg.beta, gamma=loss_cfg.gamma, temperature=loss_cfg.temperature,
                             peer_reduction=loss_cfg.peer_reduction)
            total = total + terms.total
            accuracy = (logits[k].argmax(-1) == labels).float().mean()
            rows.append(torch.stack([*terms, accuracy]).detach())
        total.backward()
        for optimizer, schedule in zip(self.optimizers, self.schedules):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
        self.running.index_add_(0, self.local_index, torch.stack(rows))
        self.steps_since_log += 1

    def _log_train(self, step: int, epoch: int) -> dict[str, str]:
        """Reduce the running metrics over all ranks (one collective), log them, reset; return a bar summary."""
        means = all_reduce_sum(self.running, self.groups.world) / (self.steps_since_log * self.placement.replicas)
        values = means.tolist()
        row: dict[str, Any] = {"step": step, "epoch": epoch}
        for name, student_values in zip(self.names, values):
            row.update({f"train/{name}/{metric}": v for metric, v in zip(TRAIN_METRICS, student_values)})
        self.tracker.log(row)
        self.running.zero_()
        self.steps_since_log = 0
        return {name: f"{v[0]:.3f}" for name, v in zip(self.names, values)}

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Accuracy of every student on val (when split off) and test: {split: {name: acc}}."""
        models = [_unwrap(s) for s in self.students]
        results = {}
        for split, data in (("val", self.data.val), ("test", self.data.test)):
            if data is not None:
                results[split] = self._accuracy(models, data)
        return results

    def _accuracy(self, models: list[nn.Module], data: ImageSet) -> dict[str, float]:
        correct = torch.zeros(len(self.names), device=self.accelerator.device)
        correct[self.local_index] = count_correct(
            models, data, shard=self.placement.replica_index, num_shards=self.placement.replicas,
            batch_size=self.cfg.data.eval_batch_size, normalize=self.normalize, autocast=self.accelerator.autocast)
        counts = all_reduce_sum(correct, self.groups.world).tolist()
        return {name: c / len(data) for name, c in zip(self.names, counts)}

    def save(self, step: int, epoch: int) -> None:
        """Per-student checkpoint at the end of an epoch, written by the student's first replica."""
        if self.placement.replica_index != 0:
            return
        for k, index in enumerate(self.local):
            name = self.names[index]
            payload = {
                "model": _unwrap(self.students[k]).state_dict(),
                "optimizer": self.optimizers[k].state_dict(),
                "scheduler": self.schedules[k].state_dict(),
                "student": self.cfg.students[index].model_dump(mode="json"),
                "step": step,
                "epoch": epoch,
                "rng": checkpoint.rng_state(),
                "student_rng": self.rng_states[k],
                "teacher": None if self.teacher_info is None else self.teacher_info.checkpoint,
                "peers": [n for n in self.names if n != name],
                "loss": self.cfg.loss.model_dump(mode="json"),
            }
            checkpoint.save_atomic(payload, student_checkpoint(self.cfg.output_dir, name, epoch))


def student_checkpoint(output_dir: Path, name: str, epoch: int) -> Path:
    return output_dir / "students" / name / f"epoch_{epoch:03d}.pt"


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _flatten(accuracies: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{split}/{name}/acc": acc for split, per in accuracies.items() for name, acc in per.items()}

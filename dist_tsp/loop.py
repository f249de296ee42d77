"""One student phase: this rank's students learn from the teacher and from each other, step by step."""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from dist_tsp import checkpoint
from dist_tsp.config import RunConfig
from dist_tsp.data import Batch, Dataset, ImageSet, Normalizer, PeerBatches, mixed_seed
from dist_tsp.errors import NonFiniteLoss, Preempted
from dist_tsp.evaluation import count_correct
from dist_tsp.exchange import all_gather_cat, all_reduce
from dist_tsp.losses import tsp_loss
from dist_tsp.models import build_model
from dist_tsp.optim import build_optimizer
from dist_tsp.placement import Groups, Placement
from dist_tsp.profiling import StepProfiler
from dist_tsp.teacher import TeacherInfo
from dist_tsp.teacher_modes import TeacherLogits
from dist_tsp.tracking import Tracker

TRAIN_METRICS = ("loss", "ce", "kd", "peer", "acc")
NEVER = float(2**52)  # "no non-finite loss yet" in the first-bad-step tracker


class StudentTrainer:
    """Trains the students of `placement.local_students` on this rank (TSP, KD or scratch by the loss weights).

    Every step: teacher logits for the peer group's batch, each local student's logits, one
    all-gather of detached logits over the peer group, each student's loss, one backward (gradients
    averaged over the student's replicas by DDP when R > 1), optimizer steps. Metrics stay on the
    device and are reduced once per log interval.
    """

    def __init__(self, cfg: RunConfig, placement: Placement, groups: Groups, accelerator: Accelerator,
                 data: Dataset, normalize: Normalizer, teacher: TeacherLogits | None,
                 teacher_info: TeacherInfo | None, tracker: Tracker, stop_requested: threading.Event) -> None:
        self.cfg, self.placement, self.groups, self.accelerator = cfg, placement, groups, accelerator
        self.data, self.normalize, self.teacher, self.teacher_info = data, normalize, teacher, teacher_info
        self.tracker, self.stop_requested, self.stop_agreed = tracker, stop_requested, False
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
        self.peer_index = [torch.tensor([j for j in range(len(self.names)) if j != i], dtype=torch.long, device=device)
                           for i in self.local]
        self.local_index = torch.tensor(self.local, device=device)
        self.running = torch.zeros(len(self.names), len(TRAIN_METRICS), device=device)
        self.steps_since_log = 0
        self.device_step = torch.zeros((), device=device)
        self.profiler = StepProfiler(cfg.train.profile, device)
        self.first_nonfinite = torch.full((len(self.names),), NEVER, device=device)

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

    def train(self, start_step: int = 0) -> dict[str, dict[str, float]]:
        """Run the steps from `start_step` (see resume) to the end; return final val/test accuracy."""
        step, accuracies = start_step, None
        self.device_step.fill_(start_step)
        with tqdm(total=self.total_steps, initial=step, desc="students",
                  disable=not self.accelerator.is_main_process) as self.bar:
            while step < self.total_steps:
                epoch = step // len(self.batches)
                step = self._train_epoch(epoch, step)
                accuracies = self.evaluate()
                self.tracker.log({"step": step, "epoch": epoch, **_flatten(accuracies)})
                self.save(step, epoch_end=True)
                self._stop_if_asked(step)
        if self.profiler.enabled:
            path = self.cfg.output_dir / "profile" / f"rank{self.placement.rank}.json"
            path.parent.mkdir(exist_ok=True)
            self.profiler.write(path, self.cfg.data.batch_size, len(self.local))
        return accuracies if accuracies is not None else self.evaluate()

    def _train_epoch(self, epoch: int, step: int) -> int:
        """The rest of one epoch from global `step`: log, checkpoint and obey signals at step boundaries."""
        steps_per_epoch, every = len(self.batches), self.cfg.train.checkpoint_every
        if self._uses_teacher:
            self.teacher.start_epoch(epoch)
        for batch in self.profiler.timed_batches(self.batches.epoch(epoch, step % steps_per_epoch)):
            self.train_step(batch)
            step += 1
            self.bar.update()
            epoch_done = step % steps_per_epoch == 0 or step == self.total_steps
            checkpoint_due = every is not None and step % every == 0
            if epoch_done or checkpoint_due or step % self.cfg.train.log_every == 0:
                self.bar.set_postfix(self._log_train(step, epoch), refresh=False)
            if epoch_done:
                break
            if checkpoint_due or self.stop_agreed:
                self.save(step, epoch_end=False)
                self._stop_if_asked(step)
        return step

    def _stop_if_asked(self, step: int) -> None:
        if self.stop_agreed and step < self.total_steps:
            raise Preempted(f"stopped by a signal at step {step}; checkpoint written: rerun the same command to resume")

    @property
    def _uses_teacher(self) -> bool:
        return self.teacher is not None and self.cfg.loss.beta > 0

    def train_step(self, batch: Batch) -> None:
        """One TSP step for this rank's students on the peer group's batch."""
        loss_cfg = self.cfg.loss
        profiler = self.profiler
        images, labels = batch.images, batch.labels
        teacher_logits = None
        if self._uses_teacher:
            profiler.wait_for_peers(self.groups.peer)  # so the teacher's all-gather is not charged the peers' backward
            with profiler.section("teacher"):
                teacher_logits = self.teacher(batch)
        with profiler.section("forward"):
            outputs = []
            for k, student in enumerate(self.students):
                with self._student_rng(k), self.accelerator.autocast():
                    outputs.append(student(images))
            logits = torch.stack(outputs)
        everyone = None
        if loss_cfg.gamma > 0:
            profiler.wait_for_peers(self.groups.peer)
            with profiler.section("exchange"):
                everyone = all_gather_cat(logits, self.groups.peer)
        with profiler.section("loss"):
            total, rows = 0.0, []
            for k, peers in enumerate(self.peer_index):
                peer_logits = everyone[peers] if everyone is not None else logits.new_empty((0, *logits.shape[1:]))
                terms = tsp_loss(logits[k], labels, teacher_logits, peer_logits, alpha=loss_cfg.alpha,
                                 beta=loss_cfg.beta, gamma=loss_cfg.gamma, temperature=loss_cfg.temperature,
                                 peer_reduction=loss_cfg.peer_reduction)
                total = total + terms.total
                accuracy = (logits[k].argmax(-1) == labels).float().mean()
                rows.append(torch.stack([*terms, accuracy]).detach())
        with profiler.section("backward"):
            total.backward()
        with profiler.section("optimizer"):
            for optimizer, schedule in zip(self.optimizers, self.schedules):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
        profiler.step_done()
        rows = torch.stack(rows)
        self.device_step += 1
        broken = ~torch.isfinite(rows[:, :4]).all(dim=1)
        seen = self.first_nonfinite[self.local_index]
        self.first_nonfinite[self.local_index] = torch.where(broken, torch.minimum(seen, self.device_step), seen)
        self.running.index_add_(0, self.local_index, rows)
        self.steps_since_log += 1

    def _log_train(self, step: int, epoch: int) -> dict[str, str]:
        """Reduce the running metrics over all ranks, log them, reset; agree on stopping; return a bar summary.

        Two collectives per log interval: the metric sums, and a max over (stop requested, -first bad step).
        """
        means = all_reduce(self.running, self.groups.world) / (self.steps_since_log * self.placement.replicas)
        control = torch.cat([torch.tensor([float(self.stop_requested.is_set())], device=self.running.device),
                             -self.first_nonfinite])
        control = all_reduce(control, self.groups.world, dist.ReduceOp.MAX).tolist()
        values = means.tolist()
        if min(-c for c in control[1:]) < NEVER:
            self._raise_nonfinite(values, [-c for c in control[1:]])
        self.stop_agreed = control[0] > 0
        row: dict[str, Any] = {"step": step, "epoch": epoch}
        for name, student_values in zip(self.names, values):
            row.update({f"train/{name}/{metric}": v for metric, v in zip(TRAIN_METRICS, student_values)})
        self.tracker.log(row)
        self.running.zero_()
        self.steps_since_log = 0
        return {name: f"{v[0]:.3f}" for name, v in zip(self.names, values)}

    def _raise_nonfinite(self, values: list[list[float]], first_bad: list[float]) -> None:
        index = min(range(len(self.names)), key=lambda i: first_bad[i])
        terms = [m for m, v in zip(TRAIN_METRICS[1:4], values[index][1:4]) if not math.isfinite(v)] or ["total"]
        kept = checkpoint.complete_checkpoints(self.cfg.output_dir)
        last = f"the last good checkpoint {kept[-1]} is kept" if kept else "no checkpoint was written yet"
        raise NonFiniteLoss(f"non-finite {'/'.join(terms)} loss for student {self.names[index]} at step "
                            f"{int(first_bad[index])}: stopping; {last} (lower the learning rate or the temperature)")

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Accuracy of every student on val (when split off) and test: {split: {name: acc}}."""
        models = [_unwrap(s) for s in self.students]
        if self.groups.replica is not None:  # BatchNorm statistics are per replica: evaluate replica 0's
            source = dist.get_global_rank(self.groups.replica, 0)
            for model in models:
                for buffer in model.buffers():
                    dist.broadcast(buffer, src=source, group=self.groups.replica)
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
        counts = all_reduce(correct, self.groups.world).tolist()
        return {name: c / len(data) for name, c in zip(self.names, counts)}

    def save(self, step: int, *, epoch_end: bool) -> None:
        """Checkpoint every student: model/optimizer/schedule from its first replica, RNG from every replica.

        Files go to checkpoints/step_N.partial/; once every rank is done the main process writes the
        manifest and renames the directory, so a complete checkpoint is never half-written.
        """
        directory = checkpoint.step_dir(self.cfg.output_dir, step, partial=True)
        if checkpoint.step_dir(self.cfg.output_dir, step).exists():
            return
        replica = self.placement.replica_index
        for k, index in enumerate(self.local):
            name = self.names[index]
            if replica == 0:
                checkpoint.save_atomic({
                    "model": _unwrap(self.students[k]).state_dict(),
                    "optimizer": self.optimizers[k].state_dict(),
                    "scheduler": self.schedules[k].state_dict(),
                    "student": self.cfg.students[index].model_dump(mode="json"),
                    "step": step,
                    "teacher": None if self.teacher_info is None else self.teacher_info.checkpoint,
                    "peers": [n for n in self.names if n != name],
                    "loss": self.cfg.loss.model_dump(mode="json"),
                }, checkpoint.student_file(directory, name))
            checkpoint.save_atomic({"student_rng": self.rng_states[k], "rng": checkpoint.rng_state()},
                                   checkpoint.rng_file(directory, name, replica))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            checkpoint.finalize(directory, self._manifest(step, epoch_end), self.cfg.train.keep_last)

    def _manifest(self, step: int, epoch_end: bool) -> dict[str, Any]:
        teacher = None if self.teacher_info is None else {"checkpoint": self.teacher_info.checkpoint,
                                                          "sha256": self.teacher_info.sha256}
        return {"step": step, "epoch": step // len(self.batches), "epoch_end": epoch_end, "students": self.names,
                "replicas": self.placement.replicas, "teacher": teacher, "config": self.cfg.identity(),
                "tracker_run_id": self.tracker.run_id}

    def resume(self) -> int:
        """Load the latest complete checkpoint in output_dir (if any, and if it is this run's); return its step."""
        teacher_sha = None if self.teacher_info is None else self.teacher_info.sha256
        directory = checkpoint.resumable(self.cfg, self.placement.replicas, teacher_sha)
        if directory is None:
            return 0
        manifest = checkpoint.read_manifest(directory)
        for k, index in enumerate(self.local):
            name = self.names[index]
            state = checkpoint.load(checkpoint.student_file(directory, name), f"student {name}")
            checkpoint.load_weights(_unwrap(self.students[k]), state["model"], directory, f"student {name}")
            self.optimizers[k].load_state_dict(state["optimizer"])
            self.schedules[k].load_state_dict(state["scheduler"])
            rng = checkpoint.load(checkpoint.rng_file(directory, name, self.placement.replica_index),
                                  f"student {name} RNG", required="student_rng")
            self.rng_states[k] = rng["student_rng"]
            checkpoint.restore_rng_state(rng["rng"])
        self.tracker.truncate_after(manifest["step"])
        if self.accelerator.is_main_process:
            print(f"students: resuming from {directory} (step {manifest['step']})")
        return manifest["step"]


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _flatten(accuracies: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{split}/{name}/acc": acc for split, per in accuracies.items() for name, acc in per.items()}

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
from dist_tsp.evaluation import predict
from dist_tsp.exchange import all_gather_cat_parts, all_reduce
from dist_tsp.graph import TeachingGraph
from dist_tsp.losses import graph_terms
from dist_tsp.models import build_model
from dist_tsp.optim import build_optimizer
from dist_tsp.placement import Groups, Placement
from dist_tsp.profiling import StepProfiler
from dist_tsp.teacher import TeacherInfo
from dist_tsp.teacher_modes import RunTeacher, TeacherLogits
from dist_tsp.tracking import Tracker

TRAIN_METRICS = ("loss", "ce", "kd", "peer", "acc")
NEVER = float(2**52)  # "no non-finite loss yet" in the first-bad-step tracker


class StudentTrainer:
    """Trains the students of `placement.local_students` on this rank, each learning along the edges of the
    teaching graph (scratch, KD, TSP, mentored or mutual, by the loss weights and the frozen students).

    Every step: teacher logits for the peer group's batch, each local student's logits (frozen mentors in
    eval mode), one all-gather of detached logits over the peer group (carrying the batch-sharded teacher's
    slices too, so that a TSP step has one collective), the learners' losses, one backward
    (gradients averaged over the student's replicas by DDP when R > 1), optimizer steps. Metrics stay on the
    device and are reduced once per log interval.
    """

    def __init__(self, cfg: RunConfig, placement: Placement, groups: Groups, accelerator: Accelerator,
                 data: Dataset, normalize: Normalizer, teacher: TeacherLogits | None,
                 teacher_info: TeacherInfo | None, tracker: Tracker, stop_requested: threading.Event) -> None:
        self.cfg, self.placement, self.groups, self.accelerator = cfg, placement, groups, accelerator
        self.data, self.normalize, self.teacher, self.teacher_info = data, normalize, teacher, teacher_info
        self.tracker, self.stop_vote, self.stop_agreed = tracker, StopVote(stop_requested, groups.control), False
        self.names = cfg.student_names
        self.graph = TeachingGraph.from_config(cfg)
        # the sharded teacher's group is the peer group: its slices can ride in the peer all-gather
        self.teacher_slices_in_exchange = (isinstance(teacher, RunTeacher) and teacher.gathers_slices
                                           and self.graph.uses_peers)
        self.local = placement.local_students
        self.learning = [k for k, i in enumerate(self.local) if not cfg.students[i].frozen]  # positions in local
        self.batches = PeerBatches(data.train, batch_size=cfg.data.batch_size, num_replicas=placement.replicas,
                                   replica=placement.replica_index, seed=cfg.seed, augment=cfg.data.augment,
                                   hflip=data.hflip, normalize=normalize)
        self.total_steps = cfg.train.epochs * len(self.batches)
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.students = [self._build_student(i) for i in self.local]
        schedules = [build_optimizer(self.students[k].parameters(), cfg.train.optimizer, self.total_steps)
                     for k in self.learning]
        self.optimizers, self.schedules = [o for o, _ in schedules], [s for _, s in schedules]
        self.rng_states = [self._seeded_rng(i) for i in self.local]
        device = accelerator.device
        self.local_index = torch.tensor(self.local, device=device)
        self.learning_position = torch.tensor(self.learning, dtype=torch.long, device=device)
        self.learner_index = self.local_index[self.learning_position]
        self.term_weights = self.graph.term_weights(device)[self.learner_index]
        self.peer_shares = self.graph.peer_shares(device)[self.learner_index]
        self.running = torch.zeros(len(self.names), len(TRAIN_METRICS), device=device)
        self.steps_since_log = 0
        self.device_step = torch.zeros((), device=device)
        self.profiler = StepProfiler(cfg.train.profile, device)
        self.first_nonfinite = torch.full((len(self.names),), NEVER, device=device)
        self.test_predictions: torch.Tensor | None = None

    def _build_student(self, index: int) -> nn.Module:
        """The student's model (from its init weights when given); a frozen one in eval mode, never in DDP;
        compiled when train.compile is set."""
        spec = self.cfg.students[index]
        torch.manual_seed(mixed_seed(self.cfg.seed, index))
        model = build_model(spec.model, self.data.num_classes, **spec.args).to(self.accelerator.device)
        if self.cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        if spec.init is not None:
            what = f"student {spec.name}'s init"
            checkpoint.load_weights(model, checkpoint.load(spec.init, what)["model"], spec.init, what)
        if spec.frozen:
            model.eval().requires_grad_(False)
        elif self.groups.replica is not None:
            device_ids = [self.accelerator.device] if self.accelerator.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=device_ids, process_group=self.groups.replica)
        if self.cfg.train.compile:
            model.compile()  # in place: the module, its state_dict keys and DDP's wrapping are unchanged
        return model

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
            self.stop_vote.start()  # beside the step: every rank learns whether any was asked to stop
            self.train_step(batch)
            self.stop_agreed = self.stop_vote.result()
            step += 1
            self.bar.update()
            epoch_done = step % steps_per_epoch == 0 or step == self.total_steps
            checkpoint_due = every is not None and step % every == 0
            if epoch_done or checkpoint_due or step % self.cfg.train.log_every == 0:
                self.bar.set_postfix(self._log_train(step, epoch), refresh=False)
            elif self.stop_agreed:
                self._raise_if_nonfinite()  # the checkpoint below keeps the metrics summed since the last log step
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
        return self.teacher is not None and self.graph.uses_teacher

    def train_step(self, batch: Batch) -> None:
        """One step for this rank's students on the peer group's batch."""
        profiler = self.profiler
        images, labels = batch.images, batch.labels
        teacher_logits = teacher_slice = None
        if self._uses_teacher:
            profiler.wait_for_peers(self.groups.peer)  # so the teacher's all-gather is not charged the peers' backward
            with profiler.section("teacher"):
                if self.teacher_slices_in_exchange:
                    teacher_slice = self.teacher.local_logits(images)
                else:
                    teacher_logits = self.teacher(batch)
        with profiler.section("forward"):
            outputs = []
            for k, student in enumerate(self.students):
                with self._student_rng(k), self.accelerator.autocast(), torch.set_grad_enabled(student.training):
                    outputs.append(student(images))
            logits = torch.stack(outputs)
        everyone = None
        if self.graph.uses_peers:
            profiler.wait_for_peers(self.groups.peer)
            with profiler.section("exchange"):
                parts = [logits] if teacher_slice is None else [logits, teacher_slice]
                everyone, *teacher_slices = all_gather_cat_parts(parts, self.groups.peer)
                if teacher_slices:
                    teacher_logits = self.teacher.assemble(teacher_slices[0], len(labels))
        self.device_step += 1
        self.steps_since_log += 1
        if not self.learning:  # only mentors here: they teach through the exchange and learn nothing
            profiler.step_done()
            return
        with profiler.section("loss"):
            learning = logits[self.learning_position]
            terms = graph_terms(learning, labels, teacher_logits, everyone, self.peer_shares,
                                self.cfg.loss.temperature)
            per_student = (self.term_weights * terms).sum(dim=1)
            accuracy = (learning.argmax(-1) == labels).float().mean(dim=1)
            rows = torch.cat([per_student[:, None], terms, accuracy[:, None]], dim=1).detach()
        with profiler.section("backward"):
            per_student.sum().backward()
        with profiler.section("optimizer"):
            for optimizer, schedule in zip(self.optimizers, self.schedules):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
        profiler.step_done()
        broken = ~torch.isfinite(rows[:, :4]).all(dim=1)
        seen = self.first_nonfinite[self.learner_index]
        self.first_nonfinite[self.learner_index] = torch.where(broken, torch.minimum(seen, self.device_step), seen)
        self.running.index_add_(0, self.learner_index, rows)

    def _log_train(self, step: int, epoch: int) -> dict[str, str]:
        """Stop on a non-finite loss; reduce the running metrics over all ranks, log them, reset; return a bar summary.

        Two collectives per log interval: every student's first bad step, and the metric sums.
        """
        self._raise_if_nonfinite()
        means = all_reduce(self.running, self.groups.world) / (self.steps_since_log * self.placement.replicas)
        values = means.tolist()
        learners = {name: v for name, v in zip(self.names, values) if name in self.graph.learners}
        row: dict[str, Any] = {"step": step, "epoch": epoch}
        for name, student_values in learners.items():
            row.update({f"train/{name}/{metric}": v for metric, v in zip(TRAIN_METRICS, student_values)})
        self.tracker.log(row)
        self.running.zero_()
        self.steps_since_log = 0
        return {name: f"{v[0]:.3f}" for name, v in learners.items()}

    def _raise_if_nonfinite(self) -> None:
        """NonFiniteLoss, naming the student, step and term, when a loss was NaN or inf since the last log step:
        before any checkpoint could keep the damage."""
        first_bad = all_reduce(self.first_nonfinite.clone(), self.groups.world, dist.ReduceOp.MIN).tolist()
        if min(first_bad) == NEVER:
            return
        index = min(range(len(self.names)), key=lambda i: first_bad[i])
        sums = all_reduce(self.running.clone(), self.groups.world)[index].tolist()
        terms = [m for m, v in zip(TRAIN_METRICS[1:4], sums[1:4]) if not math.isfinite(v)] or ["total"]
        kept = checkpoint.complete_checkpoints(self.cfg.output_dir)
        last = f"the last good checkpoint {kept[-1]} is kept" if kept else "no checkpoint was written yet"
        raise NonFiniteLoss(f"non-finite {'/'.join(terms)} loss for student {self.names[index]} at step "
                            f"{int(first_bad[index])}: stopping; {last} (lower the learning rate or the temperature)")

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Accuracy of every student on val (when split off) and test: {split: {name: acc}}; the test predictions
        are kept in `test_predictions` [N, len(test)]."""
        models = [_unwrap(s) for s in self.students]
        if self.groups.replica is not None:  # BatchNorm statistics are per replica: evaluate replica 0's
            source = dist.get_global_rank(self.groups.replica, 0)
            for model in models:
                for buffer in model.buffers():
                    dist.broadcast(buffer, src=source, group=self.groups.replica)
        results = {}
        for split, data in (("val", self.data.val), ("test", self.data.test)):
            if data is not None:
                predicted = self.predictions(models, data)
                results[split] = dict(zip(self.names, (predicted == data.labels).float().mean(dim=1).tolist()))
        self.test_predictions = predicted
        return results

    def predictions(self, models: list[nn.Module], data: ImageSet) -> torch.Tensor:
        """Every student's predicted class for every sample [N, len(data)], on every rank (one all-reduce):
        each replica predicts its strided share of the samples."""
        mine = predict(models, data, shard=self.placement.replica_index, num_shards=self.placement.replicas,
                       batch_size=self.cfg.data.eval_batch_size, normalize=self.normalize,
                       autocast=self.accelerator.autocast)
        everyone = torch.zeros(len(self.names), len(data), dtype=torch.long, device=mine.device)
        everyone[self.local_index] = mine + 1  # -1 (another replica's sample) becomes 0, the sum's identity
        return all_reduce(everyone, self.groups.world) - 1

    def save(self, step: int, *, epoch_end: bool) -> None:
        """Checkpoint every learner: model/optimizer/schedule from its first replica, RNG and the metrics summed since
        the last log step (a signal's checkpoint may fall between two) from every replica.

        Files go to checkpoints/step_N.partial/; once every rank is done the main process writes the
        manifest and renames the directory, so a complete checkpoint is never half-written.
        """
        directory = checkpoint.step_dir(self.cfg.output_dir, step, partial=True)
        if checkpoint.step_dir(self.cfg.output_dir, step).exists():
            return
        replica = self.placement.replica_index
        for position, k in enumerate(self.learning):
            index = self.local[k]
            name = self.names[index]
            if replica == 0:
                checkpoint.save_atomic({
                    "model": _unwrap(self.students[k]).state_dict(),
                    "optimizer": self.optimizers[position].state_dict(),
                    "scheduler": self.schedules[position].state_dict(),
                    "student": self.cfg.students[index].model_dump(mode="json"),
                    "step": step,
                    "teacher": None if self.teacher_info is None else self.teacher_info.checkpoint,
                    "peers": self.graph.sources_of(name),
                    "loss": self.cfg.loss.model_dump(mode="json"),
                }, checkpoint.student_file(directory, name))
        for k, index in enumerate(self.local):
            name = self.names[index]
            checkpoint.save_atomic({"student_rng": self.rng_states[k], "rng": checkpoint.rng_state(),
                                    "metrics_since_log": self.running[index]},
                                   checkpoint.rng_file(directory, name, replica))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            checkpoint.finalize(directory, self._manifest(step, epoch_end), self.cfg.train.keep_last)

    def _manifest(self, step: int, epoch_end: bool) -> dict[str, Any]:
        teacher = None if self.teacher_info is None else {"checkpoint": self.teacher_info.checkpoint,
                                                          "sha256": self.teacher_info.sha256}
        return {"step": step, "epoch": step // len(self.batches), "epoch_end": epoch_end, "students": self.names,
                "replicas": self.placement.replicas, "teacher": teacher, "config": self.cfg.identity(),
                "tracker_run_id": self.tracker.run_id, "steps_since_log": self.steps_since_log}

    def resume(self) -> int:
        """Load the latest complete checkpoint in output_dir (if any, and if it is this run's); return its step."""
        teacher_sha = None if self.teacher_info is None else self.teacher_info.sha256
        directory = checkpoint.resumable(self.cfg, self.placement.replicas, teacher_sha)
        if directory is None:
            return 0
        manifest = checkpoint.read_manifest(directory)
        for position, k in enumerate(self.learning):
            name = self.names[self.local[k]]
            state = checkpoint.load(checkpoint.student_file(directory, name), f"student {name}")
            checkpoint.load_weights(_unwrap(self.students[k]), state["model"], directory, f"student {name}")
            self.optimizers[position].load_state_dict(state["optimizer"])
            self.schedules[position].load_state_dict(state["scheduler"])
        for k, index in enumerate(self.local):
            name = self.names[index]
            rng = checkpoint.load(checkpoint.rng_file(directory, name, self.placement.replica_index),
                                  f"student {name} RNG", required="student_rng")
            self.rng_states[k] = rng["student_rng"]
            checkpoint.restore_rng_state(rng["rng"])
            if "metrics_since_log" in rng:  # older checkpoints were all written at log steps, with nothing summed
                self.running[index] = rng["metrics_since_log"]
        self.steps_since_log = manifest.get("steps_since_log", 0)
        self.tracker.truncate_after(manifest["step"])
        if self.accelerator.is_main_process:
            print(f"students: resuming from {directory} (step {manifest['step']})")
        return manifest["step"]


class StopVote:
    """Whether every rank stops after this step: asked every step without holding it up or reading the device.

    A rank votes 1 once a stop was requested (SIGTERM, SIGUSR1). The votes meet in a MAX all-reduce of one CPU value
    over the gloo `control` group, started before the step and read after it, so that it runs beside the step, and
    every rank stops after the same step: the one after the step that the signal interrupted.
    """

    def __init__(self, requested: threading.Event, group: dist.ProcessGroup | None) -> None:
        self.requested, self.group = requested, group
        self.vote = torch.zeros(1)
        self.pending: dist.Work | None = None

    def start(self) -> None:
        self.vote.fill_(float(self.requested.is_set()))
        if self.group is not None:
            self.pending = dist.all_reduce(self.vote, dist.ReduceOp.MAX, group=self.group, async_op=True)

    def result(self) -> bool:
        if self.pending is not None:
            self.pending.wait()
        return self.vote.item() > 0


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _flatten(accuracies: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{split}/{name}/acc": acc for split, per in accuracies.items() for name, acc in per.items()}

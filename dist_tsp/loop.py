"""One student phase: this rank's students learn from the teacher and from each other, step by step."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from dist_tsp.checkpointer import Checkpointer
from dist_tsp.config import RunConfig
from dist_tsp.cuda_graph import CapturedStep, choose_step, step_autocast
from dist_tsp.data import Batch, Dataset, PeerBatches, Samples
from dist_tsp.errors import Preempted
from dist_tsp.evaluation import predict
from dist_tsp.exchange import all_gather_cat_parts, all_reduce
from dist_tsp.graph import TeachingGraph
from dist_tsp.placement import Groups, Placement
from dist_tsp.profiling import WARMUP_STEPS, StepProfiler
from dist_tsp.run_control import RunControl, StopRequest
from dist_tsp.students import LocalStudent, build_local_students
from dist_tsp.teacher import TeacherInfo
from dist_tsp.teacher_modes import TeacherLogits
from dist_tsp.tracking import Tracker


class Evaluation(NamedTuple):
    """Every student's accuracy {split: {name: acc}} on val (when split off) and test, and its predicted class of
    every test sample [N, len(test)]."""

    accuracies: dict[str, dict[str, float]]
    test_predictions: torch.Tensor


class StudentTrainer:
    """Trains the students of `placement.local_students` on this rank, each learning along the edges of the
    teaching graph (scratch, KD, TSP, mentored or mutual, by the loss weights and the frozen students).

    Every step: the teacher's contribution for the peer group's batch, each local student's logits (frozen mentors
    in eval mode), one all-gather over the peer group of the detached logits and the teacher's contribution (so that
    a TSP step has one collective), the learners' losses, one backward (gradients averaged over the student's
    replicas by DDP when R > 1), optimizer steps. Metrics stay on the device and are reduced once per log interval.
    """

    def __init__(self, cfg: RunConfig, placement: Placement, groups: Groups, accelerator: Accelerator,
                 data: Dataset, data_identity: str, graph: TeachingGraph, teacher: TeacherLogits | None,
                 teacher_info: TeacherInfo | None, tracker: Tracker, stop_requested: StopRequest) -> None:
        """`data_identity`: the dataset's (Dataset.identity, computed where it was loaded), which checkpoints record."""
        self.cfg, self.placement, self.groups, self.accelerator = cfg, placement, groups, accelerator
        self.data, self.graph, self.tracker = data, graph, tracker
        self.teacher = teacher if self.graph.uses_teacher else None
        self.batches = PeerBatches(data.train, batch_size=cfg.data.batch_size, num_replicas=placement.replicas,
                                   replica=placement.replica_index, seed=cfg.seed,
                                   augmentation=data.augmentation(cfg.seed, cfg.data.augment), normalize=data.normalize)
        self.total_steps = cfg.train.epochs * len(self.batches)
        if cfg.train.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        device = accelerator.device
        self.step_choice = choose_step(cfg, placement.replicas, self.graph.uses_teacher, device.type)
        self.students = build_local_students(cfg, placement, groups, device, data.num_classes, self.total_steps,
                                             graph_ready=self.step_choice.graph_ready)
        self.learners = [s for s in self.students if s.learns]
        learner_indices = [s.index for s in self.learners]
        # on the device once: the learners' rows among this rank's logits, and among all students (config order)
        self.learner_rows = torch.tensor([k for k, s in enumerate(self.students) if s.learns], device=device)
        self.learner_index = torch.tensor(learner_indices, dtype=torch.long, device=device)
        self.losses = self.graph.losses_for(learner_indices, device)
        self.control = RunControl(cfg.student_names, self.graph.learners, replicas=placement.replicas,
                                  world=groups.world, control=groups.control, stop_requested=stop_requested,
                                  device=device, output_dir=cfg.output_dir)
        self.checkpointer = Checkpointer(cfg, placement, self.graph, teacher_info, self.teacher, tracker, accelerator,
                                         data_identity, len(self.batches), self.total_steps)
        # a captured step's eager warm-up and capture are not what its replays cost: timing starts after them too
        self.profiler = StepProfiler(cfg.train.profile, device,
                                     WARMUP_STEPS + (cfg.train.graph_warmup if self.step_choice.captured else 0))
        self.autocast = step_autocast(accelerator, self.step_choice.captured)
        self.captured, self.parts_profiler = None, self.profiler
        self.buckets_to_lay_out = False  # a resumed run's, before its first step (train)
        if self.step_choice.graph_ready:
            if self.step_choice.captured:
                for student in self.students:
                    student.draw_from_generator(device)
            self.captured = CapturedStep(self._learn, capture=self.step_choice.captured,
                                         warmup=cfg.train.graph_warmup,
                                         generators=[s.generator for s in self.students if s.generator is not None])
            self.parts_profiler = StepProfiler(False, device)  # a captured step is timed whole ("graph")
        if accelerator.is_main_process:
            print(self.step_choice.line())

    def resume(self) -> int:
        """Load the latest complete checkpoint of this run, if any; return the step to start from."""
        return self.checkpointer.resume(self.students, self.control)

    def train(self, start_step: int = 0) -> Evaluation:
        """Run the steps from `start_step` (see resume) to the end; return the final evaluation."""
        step, evaluation = start_step, None
        self.buckets_to_lay_out = start_step > 0
        self.control.device_step.fill_(start_step)
        with tqdm(total=self.total_steps, initial=step, desc="students",
                  disable=not self.accelerator.is_main_process) as self.bar:
            while step < self.total_steps:
                epoch = step // len(self.batches)
                step = self._train_epoch(epoch, step)
                evaluation = self.evaluate()
                self.tracker.log({"step": step, "epoch": epoch, **_flatten(evaluation.accuracies)})
                self.checkpointer.save(step, self.students, self.control, epoch_end=True)
                self._stop_if_asked(step)
        if self.profiler.enabled:
            path = self.cfg.output_dir / "profile" / f"rank{self.placement.rank}.json"
            path.parent.mkdir(exist_ok=True)
            self.profiler.write(path, self.cfg.data.batch_size, len(self.students))
        return evaluation if evaluation is not None else self.evaluate()

    def _train_epoch(self, epoch: int, step: int) -> int:
        """The rest of one epoch from global `step`: log, checkpoint and obey signals at step boundaries."""
        steps_per_epoch, every = len(self.batches), self.cfg.train.checkpoint_every
        if self.teacher is not None:
            self.teacher.start_epoch(epoch)
        for batch in self.profiler.timed_batches(self.batches.epoch(epoch, step % steps_per_epoch)):
            self.control.start_step()  # beside the step: every rank learns whether any was asked to stop
            self.train_step(batch)
            stop = self.control.end_step()
            step += 1
            self.bar.update()
            epoch_done = step % steps_per_epoch == 0 or step == self.total_steps
            checkpoint_due = every is not None and step % every == 0
            if epoch_done or checkpoint_due or step % self.cfg.train.log_every == 0:
                self.bar.set_postfix(self._log_train(step, epoch), refresh=False)
            elif stop:  # the checkpoint below keeps the metrics summed since the last log step
                self.control.raise_if_nonfinite()
            if epoch_done:
                break
            if checkpoint_due or stop:
                self.checkpointer.save(step, self.students, self.control, epoch_end=False)
                self.profiler.not_a_step()
                self._stop_if_asked(step)
        return step

    def _stop_if_asked(self, step: int) -> None:
        if self.control.stop_agreed and step < self.total_steps:
            raise Preempted(f"stopped by a signal at step {step}; checkpoint written: rerun the same command to resume")

    def train_step(self, batch: Batch) -> None:
        """One step for this rank's students on the peer group's batch."""
        if self.buckets_to_lay_out:
            for student in self.learners:
                student.lay_out_gradient_buckets(batch.images, self.accelerator.device, self.autocast)
            self.buckets_to_lay_out = False
        if self.captured is None:
            rows = self._learn(batch)
        else:  # a teacher that reads the host (the cache) gives its logits at the captured step's boundary
            boundary = self.teacher is not None and not self.teacher.capturable
            with self.profiler.section("graph"):
                rows = self.captured(batch, self.teacher.logits(batch, None) if boundary else None)
        for student in self.learners:
            student.schedule.step()
        self.profiler.step_done()
        if rows is None:
            self.control.record()
        else:
            self.control.record(self.learner_index, rows)

    def _learn(self, batch: Batch, teacher_logits: torch.Tensor | None = None) -> torch.Tensor | None:
        """The step's device work: the teacher's logits (unless given), the students' forwards, the exchange, the
        learners' losses, backward and optimizer steps. Returns the learners' metric rows [K, 5] (None when this
        rank has only mentors)."""
        profiler, peers = self.parts_profiler, self.groups.peer
        teacher = self.teacher if teacher_logits is None else None
        contribution = contributions = everyone = None
        if teacher is not None:
            profiler.wait_for_peers(peers)  # so the teacher's time is not charged the peers' backward
            with profiler.section("teacher"):
                contribution = teacher.contribution(batch, peers)
        with profiler.section("forward"):
            logits = torch.stack([self._forward(student, batch.images) for student in self.students])
        # one all-gather over the peer group: the students' logits when peers teach, and the teacher's contribution
        parts = ([logits] if self.graph.uses_peers else []) + ([] if contribution is None else [contribution])
        if parts:
            profiler.wait_for_peers(peers)
            with profiler.section("exchange"):
                gathered = all_gather_cat_parts(parts, peers)
            everyone = gathered.pop(0) if self.graph.uses_peers else None
            contributions = gathered.pop(0) if contribution is not None else None  # every rank's, in rank order
        if teacher is not None:
            with profiler.section("teacher"):
                teacher_logits = teacher.logits(batch, contributions)
        if not self.learners:  # only mentors here: they teach through the exchange and learn nothing
            return None
        with profiler.section("loss"):
            learning = logits[self.learner_rows]
            per_student, terms = self.losses(learning, batch.labels, teacher_logits, everyone)
            accuracy = (learning.argmax(-1) == batch.labels).float().mean(dim=1)
            rows = torch.cat([per_student[:, None], terms, accuracy[:, None]], dim=1).detach()
        with profiler.section("backward"):
            per_student.sum().backward()
        with profiler.section("optimizer"):
            for student in self.learners:
                student.optimizer.step()
                student.optimizer.zero_grad(set_to_none=True)
        return rows

    def _forward(self, student: LocalStudent, images: torch.Tensor) -> torch.Tensor:
        """The student's logits, drawing from its own random state; no graph for a mentor."""
        with student.generating(self.accelerator.device), self.autocast(), \
                torch.set_grad_enabled(student.learns):
            return student.model(images)

    def _log_train(self, step: int, epoch: int) -> dict[str, str]:
        """Log the metrics since the last log step (stopping on a non-finite loss); return a bar summary."""
        row = self.control.metrics_row(step, epoch)
        self.tracker.log(row)
        return {name: f"{row[f'train/{name}/loss']:.3f}" for name in self.graph.learners}

    def evaluate(self) -> Evaluation:
        """Every student's accuracy on val (when split off) and test, and its test predictions."""
        models = [s.module for s in self.students]
        if self.groups.replica is not None:  # BatchNorm statistics are per replica: evaluate replica 0's
            source = dist.get_global_rank(self.groups.replica, 0)
            for model in models:
                for buffer in model.buffers():
                    dist.broadcast(buffer, src=source, group=self.groups.replica)
        accuracies = {}
        if self.data.val is not None:
            accuracies["val"] = self._accuracy(self.predictions(models, self.data.val, "val"), self.data.val)
        test_predictions = self.predictions(models, self.data.test, "test")
        accuracies["test"] = self._accuracy(test_predictions, self.data.test)
        return Evaluation(accuracies, test_predictions)

    def _accuracy(self, predicted: torch.Tensor, data: Samples) -> dict[str, float]:
        return dict(zip(self.cfg.student_names, (predicted == data.labels).float().mean(dim=1).tolist()))

    def predictions(self, models: list[nn.Module], data: Samples, split: str) -> torch.Tensor:
        """Every student's predicted class for every sample [N, len(data)] of `split`, on every rank (one
        all-reduce): each replica predicts its strided share of the samples."""
        mine = predict(models, data, shard=self.placement.replica_index, num_shards=self.placement.replicas,
                       batch_size=self.cfg.data.eval_batch_size, normalize=self.data.normalize,
                       autocast=self.accelerator.autocast, group=self.groups.peer, what=f"evaluating on {split}")
        everyone = torch.zeros(len(self.cfg.student_names), len(data), dtype=torch.long, device=mine.device)
        everyone[[s.index for s in self.students]] = mine + 1  # -1 (another replica's sample): 0, the sum's identity
        return all_reduce(everyone, self.groups.world) - 1


def _flatten(accuracies: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"{split}/{name}/acc": acc for split, per in accuracies.items() for name, acc in per.items()}

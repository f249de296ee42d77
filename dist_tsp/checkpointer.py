"""The student phase's checkpoints: what every rank writes into one, and resuming from the latest (the files and
their layout are dist_tsp/checkpoint.py's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate import Accelerator

from dist_tsp import checkpoint
from dist_tsp.config import RunConfig
from dist_tsp.graph import TeachingGraph
from dist_tsp.optim import resume_state
from dist_tsp.placement import Placement
from dist_tsp.run_control import RunControl
from dist_tsp.shared_errors import check_same_on_every_rank, on_every_rank
from dist_tsp.students import LocalStudent
from dist_tsp.teacher import TeacherInfo
from dist_tsp.teacher_modes import TeacherLogits
from dist_tsp.tracking import Tracker


class Checkpointer:
    """Writes and reads checkpoints/step_N/: every learner's model, optimizer and schedule (from its first replica),
    every local student's random state and metrics summed since the last log step (from every replica), and the
    manifest that identifies the run."""

    def __init__(self, cfg: RunConfig, placement: Placement, graph: TeachingGraph, teacher_info: TeacherInfo | None,
                 teacher: TeacherLogits | None, tracker: Tracker, accelerator: Accelerator, data_identity: str,
                 steps_per_epoch: int, total_steps: int) -> None:
        """`teacher`: the one the students learn from (its summary goes on across attempts); `data_identity`: the
        dataset's (Dataset.identity)."""
        self.cfg, self.placement, self.graph, self.teacher_info = cfg, placement, graph, teacher_info
        self.teacher, self.tracker, self.accelerator = teacher, tracker, accelerator
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        # what the config does not say but the steps depend on: the manifest records it, and a resume compares it
        # (the frozen mentors' weights are read from their init files again by every attempt)
        self.started = {"mixed_precision": accelerator.mixed_precision, "data": data_identity,
                        "mentors": {s.name: f"sha256 {checkpoint.file_sha256(s.init)[:16]}"
                                    for s in cfg.students if s.frozen}}

    def save(self, step: int, students: list[LocalStudent], control: RunControl, *, epoch_end: bool) -> None:
        """Every rank writes its files into checkpoints/step_N.partial/; once all are done the main process writes the
        manifest and renames the directory, so a complete checkpoint is never half-written."""
        directory = checkpoint.step_dir(self.cfg.output_dir, step, partial=True)
        if checkpoint.is_complete(checkpoint.step_dir(self.cfg.output_dir, step)):
            return
        replica = self.placement.replica_index
        for student in students:
            if student.learns and replica == 0:
                checkpoint.save_atomic({
                    "model": student.module.state_dict(),
                    "optimizer": student.optimizer.state_dict(),
                    "scheduler": student.schedule.state_dict(),
                    "student": self.cfg.students[student.index].model_dump(mode="json"),
                    "step": step,
                    "teacher": None if self.teacher_info is None else self.teacher_info.checkpoint,
                    "peers": self.graph.sources_of(student.name),
                    "loss": self.cfg.loss.model_dump(mode="json"),
                }, checkpoint.student_file(directory, student.name))
        for student in students:
            checkpoint.save_atomic({"student_rng": student.saved_random_state(), "rng": checkpoint.rng_state(),
                                    "metrics_since_log": control.running[student.index]},
                                   checkpoint.rng_file(directory, student.name, replica))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            checkpoint.finalize(directory, self._manifest(step, epoch_end, control), self.cfg.train.keep_last)

    def _manifest(self, step: int, epoch_end: bool, control: RunControl) -> dict[str, Any]:
        teacher = None if self.teacher_info is None else {"checkpoint": self.teacher_info.checkpoint,
                                                          "sha256": self.teacher_info.sha256}
        return {"step": step, "epoch": step // self.steps_per_epoch, "epoch_end": epoch_end,
                "students": self.cfg.student_names, "replicas": self.placement.replicas, "teacher": teacher,
                "config": self.cfg.identity(), **self.started, "tracker_run_id": self.tracker.run_id,
                "steps_since_log": control.steps_since_log,
                "teacher_summary": None if self.teacher is None else self.teacher.summary()}

    def resume(self, students: list[LocalStudent], control: RunControl) -> int:
        """Load the latest complete checkpoint in output_dir (if any, and if it is this run's) on every rank, bad
        input on any of them stopping all; return its step. Every rank must find the one rank 0 finds."""
        used_teacher = self.teacher_info is not None and self.graph.uses_teacher
        directory = on_every_rank(lambda: checkpoint.resumable(
            self.cfg, self.placement.replicas, self.teacher_info.sha256 if used_teacher else None, self.total_steps,
            self.started))
        check_same_on_every_rank("would resume from a checkpoint",
                                 lambda: "none" if directory is None else
                                 f"{directory.name} of run {checkpoint.read_manifest(directory).get('tracker_run_id')}",
                                 checkpoint.SHARED_OUTPUT_DIR)
        if directory is None:
            return 0
        step = on_every_rank(lambda: self._load(directory, students, control))
        self.tracker.truncate_after(step)
        if self.accelerator.is_main_process:
            print(f"students: resuming from {directory} (step {step})")
        return step

    def _load(self, directory: Path, students: list[LocalStudent], control: RunControl) -> int:
        """This rank's part of the checkpoint in `directory`, loaded; its step."""
        manifest = checkpoint.read_manifest(directory)
        roles = checkpoint.file_roles(directory, self.cfg, self.placement.replicas)
        for student in students:
            if student.learns:
                path = checkpoint.student_file(directory, student.name)
                with checkpoint.restoring(directory, path, roles[path]) as state:
                    checkpoint.load_weights(student.module, state["model"], path, f"student {student.name}",
                                            checkpoint.resume_fix(directory))
                    resume_state(student.optimizer, student.schedule, state["optimizer"], state["scheduler"])
        for student in students:
            path = checkpoint.rng_file(directory, student.name, self.placement.replica_index)
            with checkpoint.restoring(directory, path, roles[path]) as rng:
                student.load_random_state(rng["student_rng"])
                checkpoint.restore_rng_state(rng["rng"])
                if "metrics_since_log" in rng:  # older checkpoints were all written at log steps, with nothing summed
                    control.running[student.index] = rng["metrics_since_log"]
        control.steps_since_log = manifest.get("steps_since_log", 0)
        if self.teacher is not None and manifest.get("teacher_summary"):
            self.teacher.resume_summary(manifest["teacher_summary"])
        return manifest["step"]

"""Where metrics go: metrics.jsonl in the run directory and accelerate's trackers (W&B, TensorBoard)."""

from __future__ import annotations

import json
import netrc
import os
import uuid
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from dist_tsp.checkpoint import write_text_atomic, written_into
from dist_tsp.config import RunConfig


def wandb_has_credentials() -> bool:
    """True when W&B could log in without asking: an API key in the environment or ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def tracker_settings(cfg: RunConfig) -> str | None:
    """The accelerate `log_with` value; W&B is switched to offline mode when there are no credentials."""
    if cfg.tracking.report_to == "none":
        return None
    if cfg.tracking.report_to == "wandb" and "WANDB_MODE" not in os.environ and not wandb_has_credentials():
        os.environ["WANDB_MODE"] = "offline"
    return cfg.tracking.report_to


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    """Dotted keys and scalar values (what TensorBoard's hparams accepts); lists and None become text."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


class Tracker:
    """Logs one dict per call: appended to metrics.jsonl (main process) and sent to accelerate's trackers."""

    def __init__(self, cfg: RunConfig, accelerator: Accelerator) -> None:
        self.cfg = cfg
        self.accelerator = accelerator
        self.path = Path(cfg.output_dir) / "metrics.jsonl"
        self.run_id = None

    def start(self) -> None:
        """Start (or continue) the trackers' run: once the resume is accepted, so that a refused one leaves the W&B
        run (its config and state) and the run directory as they were."""
        tracking = self.cfg.tracking
        if tracking.report_to == "none" or not self.accelerator.is_main_process:
            return
        self.run_id = persistent_run_id(Path(self.cfg.output_dir) / "tracker_run_id")
        wandb_args = {"name": tracking.run_name, "group": tracking.group, "dir": str(self.cfg.output_dir),
                      "id": self.run_id, "resume": "allow"}
        self.accelerator.init_trackers(tracking.project, config=flat_config(self.cfg.to_dict()),
                                       init_kwargs={"wandb": {k: v for k, v in wandb_args.items() if v is not None}})

    def log(self, row: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        with written_into(self.path.parent):  # TensorBoard's writer raises what its thread met writing before
            with self.path.open("a") as file:
                file.write(json.dumps(row) + "\n")
            self.accelerator.log({k: v for k, v in row.items() if k not in ("step", "epoch")}, step=row["step"])

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after `step` (a resumed run logs them again), and a last row cut short by a kill."""
        if not self.accelerator.is_main_process or not self.path.is_file():
            return
        whole_rows = self.path.read_text().split("\n")[:-1]  # what follows the last newline was cut short
        rows = [line for line in whole_rows if json.loads(line)["step"] <= step]
        write_text_atomic(self.path, "".join(line + "\n" for line in rows))

    def close(self, exit_code: int, rerun: bool = False) -> None:
        """End the trackers' run as a run ends before its last step (a stop, Ctrl-C, an error), leaving the process
        groups to the caller (other ranks may have gone): TensorBoard writes what its writer still holds (it writes
        every 2 minutes); W&B records the process's exit code (not 0: failed), and a stop that a `rerun` resumes is
        marked preempting (W&B shows it preempted and a sweep's agent requeues it)."""
        for tracker in self.accelerator.trackers:
            if tracker.name != "wandb":
                with written_into(self.path.parent):  # its last events, on a disk that may be full
                    tracker.finish()
                continue
            if rerun:
                tracker.run.mark_preempting()
            tracker.run.finish(exit_code=exit_code)

    def finish(self) -> None:
        """At the run's end: the trackers closed, the process groups ended."""
        self.accelerator.end_training()


def tensorboard_folder(cfg: RunConfig) -> Path:
    """Where accelerate's TensorBoard tracker writes the run's event files (its project_dir, then the project)."""
    return Path(cfg.output_dir) / cfg.tracking.project


def persistent_run_id(path: Path) -> str:
    """The tracker's run id, created once per run directory so a resumed run continues the same W&B run (written
    whole or not at all; an empty file, as a kill left one before, is none)."""
    if path.is_file() and (saved := path.read_text().strip()):
        return saved
    run_id = uuid.uuid4().hex[:12]
    write_text_atomic(path, run_id + "\n")
    return run_id

"""configs/sweeps/tsp_grid.yaml: every grid point the W&B agent runs is a valid dist-tsp command line."""

import itertools
import os
import subprocess

import pytest
import yaml
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from dist_tsp.config import load_config
from dist_tsp.train import parse_args
from tests.runs import ROOT

SWEEP = yaml.safe_load((ROOT / "configs" / "sweeps" / "tsp_grid.yaml").read_text())


def grid_points() -> list[dict]:
    """Every combination of the grid's parameter values, as the agent receives it (`command["args"]`)."""
    parameters = SWEEP["parameters"]
    names = sorted(parameters)
    return [{n: {"value": v} for n, v in zip(names, values)}
            for values in itertools.product(*(parameters[n]["values"] for n in names))]


def agent_command(args: dict) -> list[str]:
    """The sweep's `command` with its macros expanded the way wandb's agent does (wandb_agent.py)."""
    macros = {"env": ["/usr/bin/env"], "program": [SWEEP["program"]], **create_sweep_command_args({"args": args})}
    return [word for item in SWEEP["command"] for word in (macros[item[2:-1]] if item.startswith("${") else [item])]


def train_argv(command: list[str], fake_bin, run_id: str) -> list[str]:
    """Run `command` with a stand-in `dist-tsp-launch` that prints its arguments; return what train.py would get."""
    fake = fake_bin / "dist-tsp-launch"
    fake.write_text('#!/bin/sh\nprintf "%s\\0" "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "WANDB_RUN_ID": run_id}
    argv = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout.split("\0")
    assert argv[:3] == ["--config_file", "configs/accelerate/cpu.yaml", SWEEP["program"]]
    return argv[3:-1]


def test_grid_is_alpha_by_gamma_with_beta_making_the_weights_sum_to_one():
    demo = load_config(ROOT / "configs" / "demo.yaml")
    values = SWEEP["parameters"]["loss"]["values"]
    assert SWEEP["method"] == "grid"
    assert [(v["alpha"], v["gamma"]) for v in values] == list(itertools.product([0.1, 0.2], [0.1, 0.2, 0.3]))
    for value in values:
        assert value["beta"] == pytest.approx(1 - value["alpha"] - value["gamma"])
        assert value["temperature"] == demo.loss.temperature


def test_every_grid_point_launches_a_valid_config_with_its_loss_weights_and_own_output_dir(tmp_path):
    for number, args in enumerate(grid_points()):
        parsed = parse_args(train_argv(agent_command(args), tmp_path, f"run{number}"))
        cfg = load_config(parsed.config, parsed.overrides)  # a misspelt key fails here
        weights = {"alpha": cfg.loss.alpha, "beta": cfg.loss.beta, "gamma": cfg.loss.gamma,
                   "temperature": cfg.loss.temperature}
        assert weights == args["loss"]["value"]
        assert str(cfg.output_dir) == f"runs/tsp_grid/run{number}"
        assert cfg.data.val_fraction > 0 and cfg.tracking.report_to == "wandb"


def test_command_ends_with_the_overrides_and_the_metric_is_a_logged_val_accuracy():
    assert SWEEP["command"][-1] == "${args_no_hyphens}"
    students = load_config(ROOT / "configs" / "demo.yaml").student_names
    assert SWEEP["metric"]["goal"] == "maximize"
    assert SWEEP["metric"]["name"] in {f"val/{name}/acc" for name in students}

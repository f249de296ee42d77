import itertools
import json
import shlex
from pathlib import Path

import pytest
import yaml

from dist_tsp.checkpoint import MANIFEST, file_roles, resumable, step_dir
from dist_tsp.config import ConfigError, OptimConfig, RunConfig, load_config, save_config
from dist_tsp.errors import UserError
from dist_tsp.placement import Placement
from dist_tsp.sweep import read_trials
from dist_tsp.train import parse_args, plan

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


MINIMAL = "students: [{name: a, model: lenet}, {name: b, model: lenet}]\n"


ACCELERATE = sorted((CONFIGS / "accelerate").glob("*.yaml"))
SWEEPS = sorted((CONFIGS / "sweeps").glob("*.yaml"))  # W&B sweep files
EXPERIMENTS = sorted(set(CONFIGS.rglob("*.yaml")) - set(ACCELERATE) - set(SWEEPS))
# launched by slurm/peer.sh with the job's world size (16), not the shipped accelerate configs' 3 processes; its
# layout is pinned in tests/test_imagenet_recipe.py
SIXTEEN_RANKS = {CONFIGS / "imagenet" / "four_students_2x8.yaml"}
TRIALS = sorted((ROOT / "slurm").glob("*.txt"))  # slurm/sweep.sh's trials files
DEMO = CONFIGS / "demo.yaml"


def test_the_shipped_files_are_found():  # (an empty list of parameters would only skip the tests below)
    assert EXPERIMENTS and ACCELERATE and SWEEPS and TRIALS


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_shipped_experiment_config_validates(path):
    assert load_config(path).students


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_every_accelerate_config_loads_with_accelerates_loader_and_fits_the_shipped_students(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(path))  # what `accelerate launch --config_file` reads: raises on unknown keys
    assert isinstance(config, ClusterConfig)  # (not a SageMaker config)
    options = {action.dest: action for action in launch_command_parser()._actions}
    for section in ("deepspeed_config", "fsdp_config", "dynamo_config"):  # copied into launch options by name
        unknown = [key for key in getattr(config, section) if key not in options]
        assert not unknown, f"{section}: {unknown} are not `accelerate launch` options, so accelerate ignores them"
    assert config.mixed_precision in options["mixed_precision"].choices
    assert config.mixed_precision in ("no", "bf16")  # what dist_tsp/train.py accepts
    assert config.num_processes % config.num_machines == 0
    for students in {len(load_config(p).students) for p in set(EXPERIMENTS) - SIXTEEN_RANKS}:  # each fits the world
        Placement(world_size=config.num_processes, rank=0, num_students=students)
    if config.distributed_type == DistributedType.DEEPSPEED:
        assert config.deepspeed_config["zero_stage"] == 3  # teacher.mode=deepspeed refuses any other stage


def sweep_points(sweep: dict) -> list[dict]:
    """Every combination of the sweep's listed parameter values (a W&B grid; a sample of the other methods)."""
    parameters = sweep["parameters"]
    choices = [parameters[n]["values"] if "values" in parameters[n] else [parameters[n]["value"]] for n in parameters]
    return [dict(zip(parameters, values, strict=True)) for values in itertools.product(*choices)]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_sweep_file_gives_valid_configs_logging_its_metric(path):
    """What the W&B agent passes to the program (its `command`, then each grid point as the agent writes it),
    read by dist_tsp's own parsers: a misspelt key or a bad value fails here (tests/test_sweep_file.py runs the
    command itself for tsp_grid.yaml)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] in ("grid", "random", "bayes") and sweep["metric"]["goal"] in ("minimize", "maximize")
    assert (ROOT / sweep["program"]).is_file()
    words = shlex.split(" ".join(word for word in sweep["command"] if not word.startswith("${")))
    start = words.index("--config")  # the program's own arguments: --config FILE key=value ...
    fixed = words[start:start + 2] + [word for word in words[start + 2:] if "=" in word]
    points = sweep_points(sweep)
    assert points
    for point in points:
        agent = create_sweep_command_args({"args": {name: {"value": value} for name, value in point.items()}})
        args = parse_args([*fixed, *agent["args_no_hyphens"]])
        cfg = load_config(ROOT / args.config, args.overrides)
        for name, value in point.items():
            section = cfg.to_dict()
            for part in name.split("."):  # the point reached its key
                section = section[part]
            assert section == value if not isinstance(value, dict) else value.items() <= section.items(), name
        assert sweep["metric"]["name"] in {f"val/{s}/acc" for s in cfg.student_names}  # a metric the run logs,
        assert cfg.data.val_fraction > 0  # on a validation split


@pytest.mark.parametrize("path", TRIALS, ids=lambda p: p.name)
def test_every_trials_file_gives_valid_configs(path):
    trials = read_trials(path)  # dist_tsp.sweep's own reader, as slurm/sweep.sh uses it
    assert trials
    for overrides in trials:
        load_config(DEMO, overrides)


def test_overrides_set_nested_keys_with_yaml_types(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["train.epochs=3", "loss.temperature=2.5", "students.1.model=alexnet",
                                                 "students.1.args={width: 0.5}", "data.augment=false"])
    assert cfg.train.epochs == 3 and cfg.loss.temperature == 2.5 and cfg.data.augment is False
    assert cfg.students[1].model == "alexnet" and cfg.students[1].args == {"width": 0.5}


# One key in every nested section, each to a value neither the files below nor the defaults give it.
ONE_KEY_OVERRIDES = ["data.batch_size=16", "loss.temperature=3.0", "tracking.project=other", "teacher.epochs=2",
                     "train.log_every=3", "teacher.optimizer.lr=0.2", "train.optimizer.lr=0.2",
                     "students.1.model=mobilenet", "students.1.args.width=0.5"]
# MINIMAL plus every section, each with some key but not the overridden one.
EVERY_SECTION = MINIMAL + """data: {augment: false}
loss: {peer_reduction: mean}
tracking: {group: g}
teacher: {batch_size: 16, optimizer: {momentum: 0.8}}
train: {epochs: 2, optimizer: {momentum: 0.8}}
"""
FILES = {"no_sections": MINIMAL, "every_section": EVERY_SECTION, "demo": CONFIGS / "demo.yaml",
         "tsp": CONFIGS / "paper" / "tsp.yaml"}


def config_file(tmp_path, name: str) -> Path:
    return FILES[name] if isinstance(FILES[name], Path) else write(tmp_path, FILES[name])


def with_key(tree: dict, key: str, value) -> dict:
    """A copy of a resolved config with the dotted `key` set to `value`."""
    tree = yaml.safe_load(yaml.safe_dump(tree))
    *parents, leaf = [int(part) if part.isdigit() else part for part in key.split(".")]
    node = tree
    for part in parents:
        node = node[part]
    node[leaf] = value
    return tree


@pytest.mark.parametrize("file", FILES)
@pytest.mark.parametrize("override", ONE_KEY_OVERRIDES)
def test_dotted_override_changes_only_the_key_it_names(tmp_path, file, override):
    path = config_file(tmp_path, file)
    key, _, text = override.partition("=")
    before = load_config(path, []).to_dict()
    expected = with_key(before, key, yaml.safe_load(text))
    assert expected != before
    assert load_config(path, [override]).to_dict() == expected


def test_overrides_may_come_before_and_after_the_config_option(tmp_path):
    """In an output_dir of its own: the demo's runs/demo, where a user's demo run left its checkpoints, would be
    refused as a checkpoint of another run."""
    cfg, _ = plan(["train.epochs=3", "--config", str(CONFIGS / "demo.yaml"), "loss.gamma=0.5",
                   f"output_dir={tmp_path}"], 1, 0)
    assert (cfg.train.epochs, cfg.loss.gamma) == (3, 0.5)


@pytest.mark.parametrize("file", FILES)
@pytest.mark.parametrize("override, value", [
    ("teacher.args={}", {}),
    ("train.optimizer={name: sgd, lr: 0.1}", OptimConfig(name="sgd", lr=0.1).model_dump(mode="json")),
    ("teacher.optimizer={lr: 0.1}", OptimConfig(lr=0.1).model_dump(mode="json")),
    ("students.1.args={hidden: 64}", {"hidden": 64}),
])
def test_mapping_override_replaces_the_key_whole(tmp_path, file, override, value):
    path = config_file(tmp_path, file)
    expected = with_key(load_config(path, []).to_dict(), override.partition("=")[0], value)
    assert load_config(path, [override]).to_dict() == expected


def test_loss_override_on_a_file_without_loss_pins_no_weight(tmp_path):
    loss = load_config(write(tmp_path, MINIMAL), ["loss.temperature=4", "loss.preset=kd"]).loss
    assert (loss.alpha, loss.beta, loss.gamma, loss.temperature) == (0.1, 0.9, 0.0, 4.0)


def test_a_preset_on_the_command_line_replaces_the_files_weights_and_later_weights_must_agree(tmp_path):
    file = write(tmp_path, MINIMAL + "loss: {alpha: 0.3, beta: 0.3, gamma: 0.4, temperature: 4}\n")
    loss = load_config(file, ["loss.preset=kd"]).loss
    assert (loss.alpha, loss.beta, loss.gamma, loss.temperature) == (0.1, 0.9, 0.0, 4.0)
    with pytest.raises(ConfigError, match=r"preset kd sets .* but beta=0.3 is also given"):
        load_config(file, ["loss.preset=kd", "loss.beta=0.3"])
    with pytest.raises(ConfigError, match=r"preset kd sets .* but beta=0.3 is also given"):
        load_config(write(tmp_path, MINIMAL + "loss: {preset: kd, beta: 0.3}\n"))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["output_dir=/tmp/x", "seed=7"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("override", ["train.step=graph", "train.graph_warmup=5", "train.deterministic=true",
                                      "train.channels_last=false", "train.profile=true", "data.loader_workers=2"])
def test_how_a_run_runs_is_not_which_run_it_is_so_its_checkpoints_still_resume(tmp_path, override):
    file = write(tmp_path, MINIMAL)
    assert load_config(file, [override]).identity() == load_config(file).identity()


def test_yaml_merge_keys_still_merge(tmp_path):
    """The loader that refuses a key given twice builds the keys itself: `<<` has no constructor of its own."""
    config = write(tmp_path, "students:\n  - &s {name: a, model: lenet}\n  - <<: *s\n    name: b\n")
    assert [(s.name, s.model) for s in load_config(config).students] == [("a", "lenet"), ("b", "lenet")]


def checkpoint_at_step_3(cfg: RunConfig, manifest: dict) -> Path:
    """A checkpoint in cfg.output_dir with `manifest`, one replica's files present (empty: resumable() reads only the
    manifest)."""
    step = step_dir(cfg.output_dir, 3)
    for file in file_roles(step, cfg, replicas=1):
        file.parent.mkdir(parents=True, exist_ok=True)
        file.touch()
    (step / MANIFEST).write_text(json.dumps(manifest))
    return step


def test_a_checkpoint_that_named_the_default_teacher_file_still_resumes(tmp_path):
    """Its manifest, written before naming the default was the same run, kept the name."""
    run = tmp_path / "run"
    named = load_config(write(tmp_path, MINIMAL), [f"output_dir={run}", f"teacher.checkpoint={run}/teacher/model.pt"])
    identity = named.identity()
    identity["teacher"]["checkpoint"] = str(run / "teacher" / "model.pt")  # as identity() wrote it before
    step = checkpoint_at_step_3(named, {"step": 3, "epoch_end": False, "students": named.student_names,
                                        "replicas": 1, "teacher": None, "config": identity})
    assert resumable(load_config(write(tmp_path, MINIMAL), [f"output_dir={run}"]), 1) == step


def test_a_checkpoint_of_other_data_or_precision_is_refused_unless_forced_and_one_that_did_not_record_them_resumes(
        tmp_path):
    """What a started run knows beside its config (its data's content, its mixed precision, its frozen mentors' files)
    is compared where the manifest records it: before, an image folder changed between attempts resumed with another
    sample order."""
    run = tmp_path / "run"
    cfg = load_config(write(tmp_path, MINIMAL), [f"output_dir={run}"])
    manifest = {"step": 3, "epoch_end": False, "students": cfg.student_names, "replicas": 1, "teacher": None,
                "config": cfg.identity()}
    step = checkpoint_at_step_3(cfg, manifest)
    started = {"mixed_precision": "no", "data": "40 training images, content 0123", "mentors": {"a": "sha256 01"}}
    assert resumable(cfg, 1, started=started) == step  # written before they were recorded
    (step / "manifest.json").write_text(json.dumps({**manifest, **started}))
    assert resumable(cfg, 1, started=started) == step
    with pytest.raises(UserError, match=r"holds a checkpoint of a different run \(data: '40 training images, content "
                                        r"0123' -> '40 training images, content 4567'\): use another output_dir, or "
                                        r"resume=force"):
        resumable(cfg, 1, started={**started, "data": "40 training images, content 4567"})
    with pytest.raises(UserError, match=r"different run \(mixed_precision: 'no' -> 'bf16'\)"):
        resumable(cfg, 1, started={**started, "mixed_precision": "bf16"})
    with pytest.raises(UserError, match=r"different run \(mentors.a: 'sha256 01' -> 'sha256 23'\)"):
        resumable(cfg, 1, started={**started, "mentors": {"a": "sha256 23"}})
    forced = load_config(write(tmp_path, MINIMAL), [f"output_dir={run}", "resume=force"])
    assert resumable(forced, 1, started={"mixed_precision": "bf16", "data": "another"}) == step


def test_naming_the_default_teacher_file_is_the_same_run_and_another_file_is_not(tmp_path):
    """Before: a run resumed with teacher.checkpoint=<output_dir>/teacher/model.pt, the file it had used, was refused
    as a different run."""
    config = write(tmp_path, MINIMAL)
    run = tmp_path / "run"
    default = load_config(config, [f"output_dir={run}"])
    named = load_config(config, [f"output_dir={run}", f"teacher.checkpoint={run}/teacher/model.pt"])
    other = load_config(config, [f"output_dir={run}", f"teacher.checkpoint={tmp_path}/model.pt"])
    assert named.teacher_file == default.teacher_file == run / "teacher" / "model.pt"
    assert named.identity() == default.identity() != other.identity()


@pytest.mark.parametrize("overrides, message", [
    (["loss.temprature=3"], r"unknown config key 'loss.temprature': allowed keys here are alpha, beta, gamma, tem"),
    (["bogus=1"], r"unknown config key 'bogus'"),
    (["students.0.size=3"], r"unknown config key 'students.0.size': allowed keys here are model, args, name"),
    (["loss.temperature=0"], r"'loss.temperature': Input should be greater than 0 \(got 0\)"),
    (["loss.alpha=-1"], r"'loss.alpha': Input should be greater than or equal to 0"),
    (["loss.alpha=0", "loss.beta=0", "loss.gamma=0"], r"all 0: set at least one"),
    (["train.epochs=abc"], r"'train.epochs': Input should be a valid integer"),
    (["teacher.mode=cached-ish"], r"'teacher.mode': Input should be 'replicated', 'sharded', 'cached', 'fsdp' or"),
    (["data.name=mnist"], r"'data.name': Input should be 'digits', 'fashion_mnist', 'cifar10', 'npz', 'image_folder'"
                          r" or 'arrow'"),
    (["students.0.model=resnet9000"], r"unknown model 'resnet9000': choose one of lenet"),
    (["students.1.name=a"], r"duplicate student names \['a'\]"),
    (["students.1.name=bad name"], r"'students.1.name': String should match pattern"),
    (["data.val_fraction=1.0"], r"'data.val_fraction': Input should be less than 1"),
    (["data.name=image_folder"], r"data.root is required for data.name=image_folder"),
    (["students=[]"], r"'students': List should have at least 1 item"),
    (["train.epochs"], r"override 'train.epochs' is not key=value"),
    (["=3"], r"override '=3' is not key=value"),
    (["students.5.model=lenet"], r"override key students.5: use a list index from 0 to 1"),
    (["train.epochs.x=1"], r"train.epochs is a value, not a section"),
    (["train.max_steps=true"], r"'train.max_steps': a boolean is not a number: give a number \(got True\)"),
    (["loss.alpha=yes"], r"'loss.alpha': a boolean is not a number"),  # YAML 1.1: yes is true, which was 1.0
    (["loss.temperature=.inf"], r"'loss.temperature': Input should be a finite number"),
    (["train.optimizer.lr=.inf"], r"'train.optimizer.lr': Input should be a finite number"),
    (["output_dir="], r"'output_dir'"),
    (["output_dir=''"], r"'output_dir': is empty: give a directory, e.g. runs/demo"),  # not the current directory
    (["teacher.cache_topk=3"], r"teacher.cache_topk and teacher.cache_precision shape the logit cache: they need "
                               r"teacher.mode=cached"),
    (["teacher.cache_precision=float16"], r"they need teacher.mode=cached"),
    (["teacher.epochs=0"], r"teacher.epochs=0 uses the teacher as it is: give teacher.weights \(e.g. imagenet\) or "
                           r"teacher.checkpoint"),
])
def test_bad_values_fail_with_one_line_naming_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(write(tmp_path, MINIMAL + "train: {epochs: 2}\n"), overrides)
    assert "\n" not in str(info.value)


def test_missing_students_is_reported(tmp_path):
    with pytest.raises(ConfigError, match=r"config key 'students' is required"):
        load_config(write(tmp_path, "seed: 1\n"))


def test_missing_and_malformed_files_are_reported(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist: pass an existing YAML file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"is not valid YAML"):
        load_config(write(tmp_path, "students: [\n"))
    with pytest.raises(ConfigError, match=r"must hold a mapping of keys, not list"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match=r"is not valid YAML: key 'alpha' is given twice: keep one .* line 4"):
        load_config(write(tmp_path, MINIMAL + "loss:\n  alpha: 0.1\n  alpha: 0.5\n"))  # was the last, silently
    with pytest.raises(ConfigError, match=r"config file .* is a directory: pass an existing YAML file"):
        load_config(tmp_path)
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe students")
    with pytest.raises(ConfigError, match=r"config file .*binary.yaml is not UTF-8 text"):
        load_config(tmp_path / "binary.yaml")


def test_saved_config_is_plain_yaml(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    save_config(cfg, tmp_path / "out.yaml")
    data = yaml.safe_load((tmp_path / "out.yaml").read_text())
    assert data["students"][0] == {"model": "lenet", "args": {}, "name": "a", "init": None, "frozen": False}
    assert data["teacher"]["mode"] == "sharded"

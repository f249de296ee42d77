"""The run configuration: one typed schema, read from YAML plus dotted overrides, validated here."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dist_tsp.errors import UserError, not_a_file


class ConfigError(UserError):
    """A one-line message naming the bad config key or file and how to fix it."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are type-checked."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
    # an override of the first key drops the others given before it (in the file or earlier overrides)
    replaces: ClassVar[dict[str, tuple[str, ...]]] = {}

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML's true/yes/on would pass as 1 (pydantic reads a boolean as a number)."""
        if isinstance(value, bool) and _is_number(cls.model_fields[info.field_name].annotation):
            raise ValueError("a boolean is not a number: give a number")
        return value


def _is_number(annotation: Any) -> bool:
    """int, float or one of them or None."""
    kinds = {a for a in (get_args(annotation) if get_origin(annotation) else (annotation,)) if a is not type(None)}
    return bool(kinds) and kinds <= {int, float}


WEEK_S = 7 * 24 * 3600  # the longest a collective may wait (a timeout in milliseconds fits a C int)
STREAMABLE = ("image_folder", "arrow")  # datasets read from disk as the steps need them (dist_tsp/streaming.py)


class DataConfig(Section):
    """Which dataset, how it is split, batched, loaded and augmented.

    Image folders stream from disk (decoded by `loader_workers` DataLoader workers per rank) unless `in_memory`;
    `npz` reads images already decoded (data.root/train.npz and test.npz or val.npz: `images` uint8 [N, H, W, 3],
    `labels` [N], optionally `classes`). `crop` is the training crop (padded: CIFAR-style; random_resized:
    ImageNet-style, with a resize and centre crop for evaluation); `normalization` is the training set's own
    statistics or ImageNet's constants.

    `max_train_samples` keeps a fixed random subset of the training images (the same for every seed), for
    quick experiments; the validation split, when asked for, is taken from that subset.
    """

    name: Literal[("digits", "fashion_mnist", "cifar10", "npz", *STREAMABLE)] = "digits"
    root: Path | None = None
    download: bool = True
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    max_train_samples: int | None = Field(None, gt=0)
    augment: bool = True
    batch_size: int = Field(64, gt=0)
    eval_batch_size: int = Field(512, gt=0)
    image_size: int = Field(32, ge=8)
    in_memory: bool | None = None  # image_folder: decode every image into memory up front (default: stream)
    loader_workers: int | None = Field(None, ge=0)  # per rank, decoding streamed images (default: up to 4, the
    # CPUs this process may use shared among the node's ranks)
    loader_timeout_s: float = Field(300.0, ge=0)  # a batch not delivered by the workers in this long: one is stuck
    # (a decoder looping on an image, a file system that stopped answering) and the run ends; 0: wait for ever
    crop: Literal["padded", "random_resized"] = "padded"
    normalization: Literal["dataset", "imagenet"] = "dataset"

    @model_validator(mode="after")
    def _root_where_needed(self) -> DataConfig:
        if self.name in STREAMABLE and self.root is None:
            raise ValueError(f"data.root is required for data.name={self.name} (a folder with train/ and test/)")
        if self.name == "npz" and self.root is None:
            raise ValueError("data.root is required for data.name=npz (a folder with train.npz and test.npz)")
        streamed = self.name in STREAMABLE and not self.in_memory
        if self.in_memory is False and self.name not in STREAMABLE:
            raise ValueError(f"data.in_memory=false streams image folders and Arrow shards; {self.name} is always "
                             "held in memory: remove data.in_memory")
        if self.in_memory and self.name == "arrow":
            raise ValueError("data.in_memory=true decodes image folders up front; data.name=arrow is always "
                             "streamed: remove data.in_memory")
        if self.crop == "random_resized" and not streamed:
            raise ValueError("data.crop=random_resized is made per sample by loader workers: it needs a streamed "
                             "dataset (data.name=image_folder or arrow, without data.in_memory=true)")
        return self


class OptimConfig(Section):
    """An optimizer and its learning-rate schedule: constant, cosine (down to 0), or triangular (linear from 0.2x up to
    1x over the first 10 % of the steps, then down to 0: airbench's)."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    schedule: Literal["constant", "cosine", "triangular"] = "constant"


class ModelSpec(Section):
    """A model from the registry by name, with keyword arguments for its constructor."""

    model: str
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("model")
    def _known_model(cls, name: str) -> str:
        from dist_tsp.models import UnknownModelError, check_model_name

        try:
            check_model_name(name)
        except UnknownModelError as error:
            raise ValueError(str(error)) from None
        return name


LABELS, TEACHER = "labels", "teacher"  # the sources beside the students: in the teaching graph, and in predictions.npz


class StudentConfig(ModelSpec):
    """One student: a unique display name and the model it is.

    `init` starts it from saved weights: a student file of an earlier run
    (output_dir/checkpoints/step_N/students/<name>.pt). `frozen` makes it a mentor: it is not trained and runs
    in eval mode, but still teaches the others through the per-step logit exchange (alternate learning).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    init: Path | None = None
    frozen: bool = False

    @field_validator("name")
    def _not_another_source(cls, name: str) -> str:
        if name in (LABELS, TEACHER):
            what = {LABELS: "the true labels", TEACHER: "the teacher"}[name]
            raise ValueError(f"student name {name!r} names {what} in the teaching graph and predictions.npz: "
                             "rename the student")
        return name

    @model_validator(mode="after")
    def _mentor_has_weights(self) -> StudentConfig:
        if self.init is not None and not self.init.is_file():
            raise ValueError(f"student {self.name}: init file {self.init} {not_a_file(self.init)}: point it at a "
                             "student file of an earlier run (checkpoints/step_N/students/<name>.pt)")
        if self.frozen and self.init is None:
            raise ValueError(f"student {self.name} is frozen but has no init: give it the weights it teaches "
                             "with (init=PATH), or set frozen=false")
        return self


TEACHER_MODES = ("replicated", "sharded", "cached", "fsdp", "deepspeed")  # see dist_tsp/teacher_modes.py
# Settings that change results but came after checkpoints were first written: left out of a run's identity at
# their defaults, so those checkpoints still resume.
DEFAULT_TEACHER_FILE = Path("teacher") / "model.pt"  # under output_dir, where teacher.checkpoint is not given
SETTINGS_ADDED_SINCE_CHECKPOINTS = (("data", "crop"), ("data", "normalization"), ("teacher", "cache_topk"),
                                    ("teacher", "cache_precision"), ("teacher", "label_smoothing"))


class TeacherConfig(ModelSpec):
    """The frozen teacher: loaded from `checkpoint` when that file exists, else trained data-parallel and
    saved there (default: output_dir/teacher/model.pt); then used in eval mode.

    `weights` starts that training from pretrained weights: `imagenet` (torchvision's weights, downloaded)
    or a state-dict file; the classifier head is re-initialised for the dataset's classes, unless it already has
    them. `epochs=0` uses the pretrained teacher as it is (an ImageNet teacher on ImageNet).
    `input_scale` resizes the teacher's inputs on the device (paper: 7, 32 -> 224); students keep theirs.
    `mode` is how each step gets the teacher's logits (all give the same logits):
    replicated (every rank runs the whole batch), sharded (1/G of the batch per rank, all-gathered),
    cached (computed once per epoch's augmented views, stored under `cache_dir`, then read; `cache_topk=k` keeps
    each sample's k largest logits and their classes, the KD term then against the renormalised top-k
    distribution as in FKD; `cache_precision` stores the values in float32 or float16),
    fsdp / deepspeed (batch-sharded, with the parameters sharded 1/W over the ranks: FSDP2 or ZeRO-3).
    `channels_last` trains and runs it in the channels-last memory format (faster convolutions on CPUs and
    GPUs); the parameter-sharded modes run it in the default format. `label_smoothing` mixes the targets of its
    training loss with the uniform distribution (F.cross_entropy's label_smoothing; airbench's 0.2).
    """

    model: str = "resnet_cifar"
    weights: str | None = None
    input_scale: int = Field(1, ge=1, le=16)
    checkpoint: Path | None = None
    mode: Literal[TEACHER_MODES] = "sharded"
    cache_dir: Path | None = None
    cache_topk: int | None = Field(None, gt=0)
    cache_precision: Literal["float32", "float16"] = "float32"
    channels_last: bool = True
    epochs: int = Field(3, ge=0)
    batch_size: int = Field(128, gt=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    optimizer: OptimConfig = Field(
        default_factory=lambda: OptimConfig(name="sgd", lr=0.05, weight_decay=5e-4, schedule="cosine")
    )

    @model_validator(mode="after")
    def _consistent(self) -> TeacherConfig:
        if self.mode != "cached" and (self.cache_topk is not None or self.cache_precision != "float32"):
            raise ValueError("teacher.cache_topk and teacher.cache_precision shape the logit cache: they need "
                             "teacher.mode=cached")
        if self.epochs == 0 and self.weights is None and self.checkpoint is None:
            raise ValueError("teacher.epochs=0 uses the teacher as it is: give teacher.weights (e.g. imagenet) or "
                             "teacher.checkpoint")
        return self


LOSS_PRESETS = {
    "scratch": (1.0, 0.0, 0.0),
    "kd": (0.1, 0.9, 0.0),
    "tsp": (0.1, 0.8, 0.1),
    "mentored": (0.1, 0.6, 0.3),  # alternate learning's second phase: the teacher and frozen mentors teach
    "mutual": (1.0, 0.0, 1.0),  # online mutual learning: no teacher
}
LOSS_WEIGHTS = ("alpha", "beta", "gamma")  # what a preset sets, in its tuple's order


class LossConfig(Section):
    """Weights of L = alpha*CE + beta*T^2*KL(teacher||s) + gamma*sum_j T^2*KL(peer_j||s).

    `preset` sets alpha/beta/gamma from LOSS_PRESETS (scratch, kd, tsp, mentored, mutual); a weight given
    beside it must agree with it. On the command line, loss.preset replaces the weights given before it.
    """

    replaces: ClassVar[dict[str, tuple[str, ...]]] = {"preset": LOSS_WEIGHTS}

    alpha: float = Field(0.1, ge=0.0)
    beta: float = Field(0.8, ge=0.0)
    gamma: float = Field(0.1, ge=0.0)
    temperature: float = Field(10.0, gt=0.0)
    peer_reduction: Literal["sum", "mean"] = "sum"
    preset: Literal[tuple(LOSS_PRESETS)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, raw: Any) -> Any:
        if not isinstance(raw, dict) or raw.get("preset") not in LOSS_PRESETS:
            return raw
        weights = dict(zip(LOSS_WEIGHTS, LOSS_PRESETS[raw["preset"]]))
        for key, value in weights.items():
            if key in raw and raw[key] != value:
                preset = ", ".join(f"{k}={v:g}" for k, v in weights.items())
                raise ValueError(f"preset {raw['preset']} sets {preset} but {key}={raw[key]} is also given: drop "
                                 f"loss.{key}, or drop loss.preset and give all three weights")
        return {**raw, **weights}

    @model_validator(mode="after")
    def _some_weight(self) -> LossConfig:
        if self.alpha == self.beta == self.gamma == 0.0:
            raise ValueError("loss.alpha, loss.beta and loss.gamma are all 0: set at least one (scratch is alpha=1)")
        return self


class TrainConfig(Section):
    """How long students train, how often metrics are reduced and logged, and how often to checkpoint.

    `channels_last` runs the students in the channels-last memory format (13-25 % shorter steps on CPU in
    benchmarks/step_breakdown.py). `compile` compiles each student's forward and backward with `torch.compile`
    (the first steps wait for the compiler; see the README's benchmarks for when it pays). `step` is how each step
    runs: `eager`, `graph` (captured once in a CUDA graph and replayed, see dist_tsp/cuda_graph.py; on the CPU the
    same step without capture), or `auto` (the graph where it can be captured, else eager); `graph_warmup` is the
    number of eager steps before the capture. `deterministic` has cuDNN use deterministic kernels only, so that the
    same seed on the same GPU gives the same bits run after run (slower; CPU kernels are deterministic already).
    `collective_timeout_s` bounds the student steps' collectives (a week at most); before the steps (data, teacher,
    checkpoints) ranks may wait for each other up to 30 minutes, or longer if it is longer.
    """

    epochs: int = Field(5, gt=0)
    max_steps: int | None = Field(None, gt=0)
    log_every: int = Field(10, gt=0)
    checkpoint_every: int | None = Field(None, gt=0)
    keep_last: int = Field(2, gt=0)
    collective_timeout_s: float = Field(600.0, gt=0, le=WEEK_S)
    profile: bool = False
    channels_last: bool = True
    compile: bool = False
    step: Literal["eager", "graph", "auto"] = "eager"
    graph_warmup: int = Field(3, ge=1)
    deterministic: bool = False
    optimizer: OptimConfig = Field(default_factory=OptimConfig)


class TrackingConfig(Section):
    """Where metrics go besides metrics.jsonl: accelerate's trackers."""

    report_to: Literal["none", "wandb", "tensorboard"] = "none"
    project: str = "dist-tsp"
    run_name: str | None = None
    group: str | None = None


class RunConfig(Section):
    """Everything one run needs; saved resolved as config.yaml in output_dir."""

    output_dir: Path = Path("runs/demo")
    resume: Literal["auto", "force", "off"] = "auto"
    seed: int = Field(0, ge=0, lt=2**32)  # numpy's seeds
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    students: list[StudentConfig] = Field(min_length=1)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("output_dir", mode="before")
    def _not_empty(cls, value: Any) -> Any:
        if value in ("", None):  # Path("") is the current directory; `output_dir=` gives None
            raise ValueError("is empty: give a directory, e.g. runs/demo")
        return value

    @field_validator("resume", mode="before")
    def _off_is_not_false(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML reads a bare `off` as false

    @field_validator("students")
    def _unique_names(cls, students: list[StudentConfig]) -> list[StudentConfig]:
        names = [s.name for s in students]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate student names {duplicates}: give every student a unique name")
        if all(s.frozen for s in students):
            raise ValueError("every student is frozen: leave at least one to train (frozen=false)")
        return students

    @property
    def student_names(self) -> list[str]:
        return [s.name for s in self.students]

    @property
    def teacher_file(self) -> Path:
        """Where the teacher lives: teacher.checkpoint, by default output_dir/teacher/model.pt."""
        return self.teacher.checkpoint or self.output_dir / DEFAULT_TEACHER_FILE

    def identity(self, finished: bool = False) -> dict[str, Any]:
        """The settings a checkpoint must agree with to be resumed (not run length, logging or paths); `finished`: a
        finished run's results, which its length decides too (train.epochs and train.max_steps)."""
        tree = self.to_dict()
        for key in ("output_dir", "resume", "tracking"):
            tree.pop(key)
        for key in ("eval_batch_size", "in_memory", "loader_workers", "loader_timeout_s"):  # how it is read, not what
            tree["data"].pop(key)
        for section, key in SETTINGS_ADDED_SINCE_CHECKPOINTS:  # at their defaults, older checkpoints still match
            if tree[section][key] == type(getattr(self, section)).model_fields[key].default:
                tree[section].pop(key)
        for key in ("mode", "cache_dir", "channels_last"):
            tree["teacher"].pop(key)
        tree["teacher"]["checkpoint"] = self.teacher_checkpoint_identity(tree["teacher"]["checkpoint"])
        for key in ("log_every", "checkpoint_every", "keep_last", "collective_timeout_s", "profile", "channels_last",
                    "compile", "step", "graph_warmup", "deterministic", *(() if finished else ("epochs", "max_steps"))):
            tree["train"].pop(key)
        return tree

    def teacher_checkpoint_identity(self, checkpoint: str | None) -> str | None:
        """teacher.checkpoint as a run's identity has it: None for the default file, named or not (a checkpoint's
        manifest from before kept the name)."""
        default = (self.output_dir / DEFAULT_TEACHER_FILE).absolute()
        return None if checkpoint and Path(checkpoint).absolute() == default else checkpoint

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, for logging and for config.yaml."""
        return self.model_dump(mode="json")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML file (or nothing), apply `a.b=value` overrides, and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} {not_a_file(path)}: pass an existing YAML file to --config")
        try:
            raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {_one_line(str(error))}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text: pass a YAML file to --config") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(raw).__name__}")
    for override in overrides:
        apply_override(raw, override)
    return validate_config(raw)


MERGE_TAG = "tag:yaml.org,2002:merge"  # `<<: *anchor`, which the base class merges


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key given twice in one mapping (PyYAML keeps the last, silently); merge
    keys (`<<: *anchor`) merge as before."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=deep)
            marker = (type(key), key)  # 1 and true are two keys
            with contextlib.suppress(TypeError):  # an unhashable key (a list): the base class says so
                if marker in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice: keep one",
                                                            key_node.start_mark)
                seen.add(marker)
        return super().construct_mapping(node, deep=deep)


def validate_config(raw: dict[str, Any]) -> RunConfig:
    """Build a RunConfig, turning the first validation problem into a one-line ConfigError."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe(error.errors()[0])) from None


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set a dotted key (`train.epochs=3`, `students.0.model=lenet`) in a nested dict, in place.

    Only the named key changes, and the keys its section says it replaces (loss.preset: the weights): a section the
    dict lacks starts as its field's default (teacher.optimizer: the SGD recipe), not as its class's. A mapping value
    (`train.optimizer={name: sgd}`) replaces the key whole.
    """
    key, sep, text = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r} is not key=value: write e.g. train.epochs=3")
    try:
        value = yaml.load(text, Loader=_UniqueKeyLoader) if text else None
    except yaml.YAMLError as error:  # a key given twice, an unhashable key: what the loader says
        problem = getattr(error, "problem", None)
        raise ConfigError(f"override {override!r} has a value that is not valid YAML"
                          + (f" ({problem})" if problem else "")) from None
    *parents, leaf = key.split(".")
    node: Any = raw
    model: type[BaseModel] | None = RunConfig  # the section class of `node` (of its items, for a list)
    for depth, part in enumerate(parents):
        where = ".".join(parents[: depth + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, where)]
        else:
            node = node.setdefault(part, _default_section(model, part))
            model = _section_class(model, part)
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override {override!r}: {where} is a value, not a section")
    if isinstance(node, list):
        node[_list_index(node, leaf, key)] = value
    else:
        for replaced in model.replaces.get(leaf, ()) if model else ():
            node.pop(replaced, None)
        node[leaf] = value


def _section_class(model: type[BaseModel] | None, part: str) -> type[BaseModel] | None:
    """The section class of `model`'s field `part` (for a list, its items'), or None if it is no section."""
    field = model.model_fields.get(part) if model else None
    annotation = field.annotation if field else None
    if get_origin(annotation) is list:
        annotation = get_args(annotation)[0]
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _default_section(model: type[BaseModel] | None, part: str) -> dict[str, Any]:
    """`model`'s field `part` by default, as only what differs from its class's defaults (so no loss weight
    is pinned beside a later loss.preset); {} if the field is no section or has no default."""
    field = model.model_fields.get(part) if model else None
    default = field.get_default(call_default_factory=True) if field else None
    return default.model_dump(exclude_defaults=True) if isinstance(default, BaseModel) else {}


def _list_index(items: list, part: str, where: str) -> int:
    if not (part.isascii() and part.isdigit()) or int(part) >= len(items):  # not '²', which isdigit() takes
        raise ConfigError(f"override key {where}: use a list index from 0 to {len(items) - 1}")
    return int(part)


def _describe(problem: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in problem["loc"]) or "config"
    if problem["type"] == "extra_forbidden":
        section, _, name = where.rpartition(".")
        allowed = _allowed_keys(section)
        return f"unknown config key {where!r}: allowed keys here are {', '.join(allowed)}"
    if problem["type"] == "missing":
        return f"config key {where!r} is required: add it to the YAML file or as {where}=..."
    message = problem["msg"].removeprefix("Value error, ")
    shown = problem.get("input")
    got = "" if isinstance(shown, dict) or shown is None else f" (got {shown!r})"
    return f"config key {where!r}: {_one_line(message)}{got}"


def _allowed_keys(section: str) -> list[str]:
    model: type[BaseModel] = RunConfig
    for part in section.split(".") if section else []:
        if not part.isdigit():
            model = _section_class(model, part)
    return list(model.model_fields)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def save_config(config: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML (loadable again with --config), atomically."""
    from dist_tsp.checkpoint import write_text_atomic  # which loads configs

    write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))

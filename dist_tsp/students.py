"""This rank's students, one record each: its model, its optimizer and schedule when it learns, its random state."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dist_tsp import checkpoint
from dist_tsp.augmentation import mixed_seed
from dist_tsp.config import RunConfig
from dist_tsp.models import build_model, check_logits
from dist_tsp.optim import build_optimizer
from dist_tsp.placement import Groups, Placement
from dist_tsp.shared_errors import on_every_rank

RandomState = tuple[torch.Tensor, torch.Tensor | None]  # the CPU generator's state, and the device's on CUDA


@dataclass(eq=False)
class LocalStudent:
    """One student this rank holds. A learner has an optimizer and a schedule; a frozen mentor has neither and only
    teaches. `random_state` is its private generator state (dropout etc.), independent of its rank-mates."""

    name: str
    index: int  # in the config's student list, which is also its row in the peer exchange
    model: nn.Module  # wrapped in DDP when the student has replicas
    optimizer: torch.optim.Optimizer | None
    schedule: torch.optim.lr_scheduler.LRScheduler | None
    random_state: RandomState
    generator: torch.Generator | None = None  # captured step: its CUDA random state, drawn from in place

    @property
    def learns(self) -> bool:
        return self.optimizer is not None

    @property
    def module(self) -> nn.Module:
        """The model without its DDP wrapper: what checkpoints and evaluation use."""
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model

    def saved_random_state(self) -> RandomState:
        """Its random state as checkpoints keep it (the generator's, when it draws from one)."""
        cpu, cuda = self.random_state
        return (cpu, cuda) if self.generator is None else (cpu, self.generator.get_state())

    def load_random_state(self, state: RandomState) -> None:
        """Raises for what is not a random state (a damaged checkpoint's) now, not at the step that uses it."""
        cpu, cuda = state
        torch.Generator().set_state(cpu)
        self.random_state = cpu, cuda
        if self.generator is not None and cuda is not None:  # None: written where there was no CUDA
            self.generator.set_state(cuda)

    def lay_out_gradient_buckets(self, images: torch.Tensor, device: torch.device,
                                 autocast: Callable[[], AbstractContextManager]) -> None:
        """For a replicated learner that resumes: DDP lays out its gradient buckets again after its first backward,
        in the order the gradients came, and with 3 or more replicas another layout sums their gradients in another
        order. One backward of a zero loss on the step's `images` gives it the layout the run it continues had; its
        buffers, random state and gradients are put back."""
        if not isinstance(self.model, DistributedDataParallel):
            return
        buffers = [buffer.clone() for buffer in self.model.buffers()]
        with torch.random.fork_rng(devices=_generator_devices(device)), autocast():
            logits = self.model(images)
        logits.float().sum().mul(0).backward()
        for buffer, saved in zip(self.model.buffers(), buffers):
            buffer.copy_(saved)
        self.model.zero_grad(set_to_none=True)

    def draw_from_generator(self, device: torch.device) -> None:
        """Draw device random numbers from a CUDA generator of its own instead of swapping states on the host, so
        that a CUDA graph can capture its forward (the graph registers the generator)."""
        self.generator = torch.Generator(device)
        self.generator.set_state(self.random_state[1])

    @contextmanager
    def generating(self, device: torch.device) -> Iterator[None]:
        """Run with this student's random state on the global generators, and keep where it got to."""
        if self.generator is not None:  # graph-safe: the default generator points at the student's state
            default = torch.cuda.default_generators[device.index if device.index is not None else
                                                    torch.cuda.current_device()]
            previous = default.graphsafe_get_state()
            default.graphsafe_set_state(self.generator)
            try:
                yield
            finally:
                default.graphsafe_set_state(previous)
            return
        with torch.random.fork_rng(devices=_generator_devices(device)):
            cpu, cuda = self.random_state
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda, device)
            yield
            self.random_state = _current_random_state(device)


def build_local_students(cfg: RunConfig, placement: Placement, groups: Groups, device: torch.device,
                         num_classes: int, total_steps: int, graph_ready: bool = False) -> list[LocalStudent]:
    """The students of `placement.local_students`, in config order, built on `device` (with graph-safe optimizers
    for the graph-ready step). Every rank reads its init files before the first collective (DDP's wrap), so that a
    bad one, met by some ranks only, stops every rank."""
    models = on_every_rank(lambda: [_build_model(cfg, index, device, num_classes)
                                    for index in placement.local_students])
    students = []
    for index, model in zip(placement.local_students, models):
        spec = cfg.students[index]
        model = _wrap(cfg, spec.frozen, model, groups, device)
        optimizer, schedule = (None, None) if spec.frozen else build_optimizer(
            model.parameters(), cfg.train.optimizer, total_steps, graph_safe_on=device if graph_ready else None)
        with torch.random.fork_rng(devices=_generator_devices(device)):
            torch.manual_seed(mixed_seed(cfg.seed, index, placement.replica_index))
            random_state = _current_random_state(device)
        students.append(LocalStudent(spec.name, index, model, optimizer, schedule, random_state))
    return students


def check_local_students(cfg: RunConfig, placement: Placement, num_classes: int, image_size: int) -> None:
    """Every rank builds its students on the CPU (the random state put back after), reads their init files into
    them and trains each a step's forward on two blank images of the data's size, all ranks at once: a model argument,
    init file or image size that does not fit stops every rank in one line before a teacher trains, not after. (Not
    on the meta device: some torchvision models read their tensors as they build.)"""
    def check() -> None:
        for index in placement.local_students:
            spec = cfg.students[index]
            with torch.random.fork_rng(devices=[]):
                model = build_model(spec.model, num_classes, **spec.args)
                _load_init(model, cfg, index)
                check_logits(model, f"student {spec.name} ({spec.model})", num_classes, image_size)

    on_every_rank(check)


def _build_model(cfg: RunConfig, index: int, device: torch.device, num_classes: int) -> nn.Module:
    """The student's model (from its init weights when given), a frozen one in eval mode; no collective."""
    spec = cfg.students[index]
    torch.manual_seed(mixed_seed(cfg.seed, index))
    model = build_model(spec.model, num_classes, **spec.args).to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    _load_init(model, cfg, index)
    if spec.frozen:
        model.eval().requires_grad_(False)
    return model


def _load_init(model: nn.Module, cfg: RunConfig, index: int) -> None:
    """The student's init weights into `model`, when it has an init file."""
    spec = cfg.students[index]
    if spec.init is not None:
        what = f"student {spec.name}'s init"
        checkpoint.load_weights(model, checkpoint.load(spec.init, what)["model"], spec.init, what)


def _wrap(cfg: RunConfig, frozen: bool, model: nn.Module, groups: Groups, device: torch.device) -> nn.Module:
    """A learner with replicas in DDP (a collective: it broadcasts the first replica's weights), a frozen one never;
    compiled when train.compile is set."""
    if not frozen and groups.replica is not None:
        device_ids = [device] if device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids, process_group=groups.replica)
    if cfg.train.compile:
        model.compile()  # in place: the module, its state_dict keys and DDP's wrapping are unchanged
    return model


def _generator_devices(device: torch.device) -> list[torch.device]:
    return [device] if device.type == "cuda" else []


def _current_random_state(device: torch.device) -> RandomState:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda

"""A training step never reads a tensor back to the host: metrics stay on the device until the log step."""

import sys

import pytest
import torch

from dist_tsp.config import load_config
from dist_tsp.data import load_dataset
from dist_tsp.graph import TeachingGraph
from dist_tsp.loop import StudentTrainer
from dist_tsp.models import build_model
from dist_tsp.placement import Groups, Placement
from dist_tsp.run_control import StopRequest
from dist_tsp.teacher_modes import RunTeacher
from dist_tsp.tracking import Tracker
from tests.runs import TINY
from tests.test_streaming import write_folder

READ_BACKS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


@pytest.fixture(params=["in memory", "streamed folder"])
def trainer(tmp_path, request):
    from accelerate import Accelerator

    folder = [] if request.param == "in memory" else ["data.name=image_folder", "data.loader_workers=1",
                                                      f"data.root={write_folder(tmp_path / 'folder', per_class=40)}"]
    cfg = load_config("configs/demo.yaml", [*TINY, f"output_dir={tmp_path}", *folder])
    accelerator = Accelerator(cpu=True)
    data = load_dataset(cfg.data, cfg.seed)
    teacher = RunTeacher(build_model(cfg.teacher.model, data.num_classes, **cfg.teacher.args).eval(), sharded=True,
                         autocast=accelerator.autocast)
    return StudentTrainer(cfg, Placement(world_size=1, rank=0, num_students=3), Groups.from_mesh(None), accelerator,
                          data, data.identity(), TeachingGraph.from_config(cfg), teacher, None,
                          Tracker(cfg, accelerator), StopRequest())


def test_training_steps_between_log_steps_read_nothing_back_from_the_device(trainer, monkeypatch):
    batches = trainer.batches.epoch(0)
    trainer.train_step(next(batches))  # the epoch's plan is drawn at its first batch
    calls = []
    for name in READ_BACKS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "/dist_tsp/" in caller:  # ours, not torch's own bookkeeping (e.g. Adam's step count)
                calls.append((_name, caller, sys._getframe(1).f_lineno))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for _ in range(3):
        trainer.train_step(next(batches))
    assert calls == []
    trainer._log_train(4, 0)  # the log step is where metrics come back, once
    assert calls

"""Replicas (R > 1): one student on W = 2 gloo ranks (R = 2, one student per rank) trains as one model.

The ranks run the project's StudentTrainer (as a run does, with DDP over the student's replica group) from an init
file written here. Both replicas hold the same parameters after every step, and the first step's update is the
one a single process computes from the mean of the two replicas' losses on their own batches (PeerBatches with
num_replicas=2, replica=0 and 1): the gradients are averaged over the replicas, not summed, not kept apart. The
evaluation, each replica predicting its share of the test set, is the one process's of the trained model.
"""

import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_tsp.config import load_config
from dist_tsp.data import PeerBatches, load_dataset
from dist_tsp.graph import TeachingGraph
from dist_tsp.models import build_model
from tests.multiprocess import run_on_ranks
from tests.runs import one_thread

WORLD, STEPS, LR = 2, 4, 0.05
TEACHER_ARGS = {"depth": 8, "width": 8}
STUDENT, STUDENT_ARGS = "vgg11_cifar", {"width": 0.125}


def config(tmp):
    """One student with BatchNorm (VGG-11 at 1/8 width: its batch statistics are each replica's own), KD at T=10,
    plain SGD (no momentum, so that one step's update is -lr times the gradient: a sum of the replicas' gradients
    would show as twice their mean, where Adam's first step would hide it)."""
    return load_config(None, [
        f"output_dir={tmp / 'run'}", "data.batch_size=32", "data.val_fraction=0.2", "loss.preset=kd",
        "loss.temperature=10",
        f"students=[{{name: solo, model: {STUDENT}, args: {json.dumps(STUDENT_ARGS)}, init: {tmp / 'solo.pt'}}}]",
        f"train.optimizer={{name: sgd, lr: {LR}, momentum: 0.0}}", f"teacher.checkpoint={tmp / 'teacher.pt'}",
        f"teacher.args={json.dumps(TEACHER_ARGS)}"])


def teacher_model(tmp):
    model = build_model("resnet_cifar", 10, **TEACHER_ARGS)
    model.load_state_dict(torch.load(tmp / "teacher.pt", weights_only=True)["model"])
    return model.eval().requires_grad_(False)


def parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _train_replicas(tmp):
    """On each rank: the trainer's STEPS steps; its parameters after each step, its first batch's indices, then its
    evaluation and the model's state it evaluated."""
    from accelerate import Accelerator

    from dist_tsp.loop import StudentTrainer
    from dist_tsp.placement import Groups, Placement
    from dist_tsp.run_control import StopRequest
    from dist_tsp.teacher_modes import RunTeacher
    from dist_tsp.tracking import Tracker

    cfg = config(tmp)
    accelerator = Accelerator(cpu=True)
    placement = Placement(world_size=WORLD, rank=dist.get_rank(), num_students=1)
    assert (placement.replicas, placement.replica_index) == (2, dist.get_rank())
    groups = Groups.from_mesh(placement.build_mesh("cpu"))
    data = load_dataset(cfg.data, cfg.seed)
    teacher = RunTeacher(teacher_model(tmp), sharded=True, autocast=accelerator.autocast)
    trainer = StudentTrainer(cfg, placement, groups, accelerator, data, data.identity(), TeachingGraph.from_config(cfg),
                             teacher, None, Tracker(cfg, accelerator), StopRequest())
    (student,) = trainer.students
    assert isinstance(student.model, torch.nn.parallel.DistributedDataParallel)
    model = student.module
    after, first = [], None
    for _, batch in zip(range(STEPS), trainer.batches.epoch(0)):
        first = batch.indices.clone() if first is None else first
        trainer.train_step(batch)
        after.append(parameters(model))
    evaluation = trainer.evaluate()
    return {"after": after, "first_indices": first, "evaluation": evaluation, "evaluated": model.state_dict()}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replicas")
    torch.manual_seed(1)
    torch.save({"model": build_model("resnet_cifar", 10, **TEACHER_ARGS).state_dict()}, tmp / "teacher.pt")
    torch.save({"model": build_model(STUDENT, 10, **STUDENT_ARGS).state_dict()}, tmp / "solo.pt")
    return tmp, run_on_ranks(_train_replicas, WORLD, tmp)


def test_the_replicas_train_on_disjoint_batches(replicas):
    _, ranks = replicas
    first = [set(r["first_indices"].tolist()) for r in ranks]
    assert len(first[0]) == len(first[1]) == 32 and not first[0] & first[1]


def test_both_replicas_hold_identical_parameters_after_every_step(replicas):
    tmp, ranks = replicas
    start = torch.load(tmp / "solo.pt", weights_only=True)["model"]
    for step in range(STEPS):
        a, b = ranks[0]["after"][step], ranks[1]["after"][step]
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (step + 1, name)
    assert any(not torch.equal(ranks[0]["after"][-1][k], start[k]) for k in start if k in ranks[0]["after"][-1])


def kd_loss(logits, labels, teacher_logits, alpha, beta, t):
    """alpha * CE + beta * T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch mean, written out here."""
    log_q = logits / t - torch.logsumexp(logits / t, dim=-1, keepdim=True)
    log_p = teacher_logits / t - torch.logsumexp(teacher_logits / t, dim=-1, keepdim=True)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()
    return alpha * F.cross_entropy(logits, labels) + beta * t * t * kl


def test_first_update_is_sgd_on_the_mean_of_the_two_replicas_losses(replicas):
    """One process: the init weights, replica 0's and replica 1's first batches, loss = (L_0 + L_1) / 2, backward,
    p - lr * grad; the distributed parameters after step 1 agree to 1e-5 relative, and their update to 3e-5 of its
    largest entry."""
    tmp, ranks = replicas
    cfg = config(tmp)
    data = load_dataset(cfg.data, cfg.seed)
    start = torch.load(tmp / "solo.pt", weights_only=True)["model"]
    model = build_model(STUDENT, 10, **STUDENT_ARGS)
    model.load_state_dict(start)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    teacher = teacher_model(tmp)
    losses = []
    with one_thread():
        for replica in range(WORLD):
            batches = PeerBatches(data.train, batch_size=cfg.data.batch_size, num_replicas=WORLD, replica=replica,
                                  seed=cfg.seed, augmentation=data.augmentation(cfg.seed, cfg.data.augment),
                                  normalize=data.normalize)
            batch = next(batches.epoch(0))
            assert torch.equal(batch.indices, ranks[replica]["first_indices"])
            with torch.no_grad():
                teacher_logits = teacher(batch.images)
            losses.append(kd_loss(model.train()(batch.images), batch.labels, teacher_logits, cfg.loss.alpha,
                                  cfg.loss.beta, cfg.loss.temperature))
        (sum(losses) / WORLD).backward()
    for name, p in model.named_parameters():
        expected = p.detach() - LR * p.grad
        got = ranks[0]["after"][0][name]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7, msg=f"{name} after step 1")
        # the update itself, relative to its largest entry: a sum over the replicas would be off by 100 %, one
        # replica's own gradient by tens of %; rounding through the BatchNorm layers' backward gives about 6e-6,
        # and storing p - lr * grad rounds to one float32 step of p (BatchNorm scales near 1: 1.2e-7, 8e-5 of an
        # update of 1.5e-3, seen on an AVX2 CPU)
        update, expected_update = got - start[name], expected - start[name]
        rounding = torch.finfo(torch.float32).eps * start[name].abs().max()
        assert (update - expected_update).abs().max() <= 3e-5 * expected_update.abs().max() + rounding, name


def test_the_replicas_evaluation_is_one_processs_prediction_of_every_held_out_image(replicas):
    """Each replica predicts every other test image (its BatchNorm statistics made replica 0's first) and one
    all-reduce joins them: every rank holds, for every test image, the class that one process predicts with the
    trained model, and its accuracy (a prediction may differ only where the two best logits tie to 1e-4); the
    validation images' accuracy likewise."""
    tmp, ranks = replicas
    evaluated = ranks[0]["evaluated"]
    assert all(torch.equal(ranks[1]["evaluated"][k], v) for k, v in evaluated.items())  # BatchNorm's statistics too
    cfg = config(tmp)
    data = load_dataset(cfg.data, cfg.seed)
    model = build_model(STUDENT, 10, **STUDENT_ARGS)
    model.load_state_dict(evaluated)
    with torch.no_grad(), one_thread():
        logits = {split: model.eval()(data.normalize(images.images)) for split, images in
                  (("val", data.val), ("test", data.test))}
    tied = {split: (split_logits.topk(2, dim=-1).values.diff(dim=-1).abs() < 1e-4).squeeze(-1)
            for split, split_logits in logits.items()}  # the two best logits within 1e-4
    for rank in ranks:
        (predicted,) = rank["evaluation"].test_predictions
        differ = predicted != logits["test"].argmax(-1)
        assert tied["test"][differ].all(), f"{int(differ.sum())} of {len(differ)} differ"
        for split, images in (("val", data.val), ("test", data.test)):
            accuracy = (logits[split].argmax(-1) == images.labels).float().mean().item()
            ties = tied[split].float().mean().item()
            assert rank["evaluation"].accuracies[split]["solo"] == pytest.approx(accuracy, abs=ties), split

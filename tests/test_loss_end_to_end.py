"""The loss end to end: a real run's first logged step, recomputed by hand from the batch, on 3 ranks (one student
each: the peers' logits come through the all-gather) and in one process holding all three (their rows among the
rank's own logits), there also with one of them a frozen mentor (it teaches with its eval-mode logits, learns
nothing).

Built only on public seams: the CLI launched with accelerate, the run directory (config.yaml, metrics.jsonl,
checkpoints), a teacher file and student init files written here, and the batch stream (`PeerBatches` over
`load_dataset`, normalised by the Dataset). The logits come from the models; every term (CE, T^2*KL to the teacher,
the sum of T^2*KL to every other student, the weighted total) is computed here in float64 with a softmax and a
KL written out by hand, so a weighting or scaling bug anywhere between the batch and metrics.jsonl shows.
"""

import copy
import json

import pytest
import torch

from dist_tsp.config import load_config
from dist_tsp.data import PeerBatches, load_dataset
from dist_tsp.models import build_model
from tests.runs import launch, one_thread, student_state

pytestmark = pytest.mark.slow

T = 10.0  # the paper's temperature
ALPHA, BETA, GAMMA = 0.2, 0.7, 0.1  # a grid point of the paper's tuned TSP: three different weights, so a swap shows
TEACHER_ARGS = {"depth": 8, "width": 8}
# No dropout in any of them: their train-mode forward is a function of the weights and the batch alone.
STUDENTS = {"lenet": ("lenet", {}), "mobilenet": ("mobilenet", {"width_mult": 0.25}),
            "vgg": ("vgg11_cifar", {"width": 0.125})}
STUDENT_LIST = ("students=[" + ", ".join(
    f"{{name: {name}, model: {model}, args: {json.dumps(args)}, init: {{init}}/{name}.pt}}"
    for name, (model, args) in STUDENTS.items()) + "]")
ARGS = ["--config", "configs/demo.yaml", "data.batch_size=64", f"teacher.args={json.dumps(TEACHER_ARGS)}",
        f"loss.alpha={ALPHA}", f"loss.beta={BETA}", f"loss.gamma={GAMMA}", f"loss.temperature={T}",
        "train.max_steps=1", "train.log_every=1"]


def first_batch(cfg):
    """The peer group's first batch (replica 0 of 1, epoch 0, step 0), from the public batch stream."""
    data = load_dataset(cfg.data, cfg.seed)
    batches = PeerBatches(data.train, batch_size=cfg.data.batch_size, num_replicas=1, replica=0, seed=cfg.seed,
                          augmentation=data.augmentation(cfg.seed, cfg.data.augment), normalize=data.normalize)
    return next(batches.epoch(0))


def last_linear(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]


def spread_weights(model, images, std, train):
    """The model's weights with its last layer scaled so that its logits on `images` have standard deviation `std`:
    random-init logits are near 0, where T=10 makes every KL too small to check to 1e-5."""
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        logits = model.train(train)(images)
    head = next(k for k, p in model.named_parameters() if p is last_linear(model).weight).rsplit(".", 1)[0]
    factor = std / logits.std().item()
    for key in (f"{head}.weight", f"{head}.bias"):
        state[key] = state[key] * factor
    return state


PLACEMENTS = {"3 ranks": (3, []), "one process": (None, []),
              "one process, vgg a frozen mentor": (None, ["students.2.frozen=true"])}  # BatchNorm: eval mode shows


@pytest.fixture(scope="module", params=PLACEMENTS)
def first_step(tmp_path_factory, request):
    """A run of one step at T=10 (see PLACEMENTS: on 3 ranks, one student per rank, sharded teacher; or in one
    process, all three students), from a teacher file and student init files written here; returns the run
    directory and the files."""
    processes, overrides = PLACEMENTS[request.param]
    files, run = tmp_path_factory.mktemp("weights"), tmp_path_factory.mktemp("run")
    cfg = load_config(ARGS[1], ARGS[2:])
    images = first_batch(cfg).images
    torch.manual_seed(0)
    teacher = build_model("resnet_cifar", 10, **TEACHER_ARGS)
    torch.save({"model": spread_weights(teacher, images, 5.0, train=False), "model_name": "resnet_cifar",
                "args": TEACHER_ARGS, "num_classes": 10}, files / "teacher.pt")
    for name, (model, args) in STUDENTS.items():
        student = build_model(model, 10, **args)
        torch.save({"model": spread_weights(student, images, 3.0, train=True)}, files / f"{name}.pt")
    launch([*ARGS, f"output_dir={run}", f"teacher.checkpoint={files / 'teacher.pt'}",
            STUDENT_LIST.replace("{init}", str(files)), *overrides], processes=processes)
    return run, files


def log_softmax64(logits):
    """By hand, in float64: z - max - log(sum exp(z - max))."""
    z = logits.double()
    shifted = z - z.max(dim=-1, keepdim=True).values
    return shifted - shifted.exp().sum(dim=-1, keepdim=True).log()


def kl64(target, student, t):
    """T^2 * KL(softmax(target/T) || softmax(student/T)), summed over classes, mean over the batch."""
    log_p, log_q = log_softmax64(target / t), log_softmax64(student / t)
    return t * t * (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean().item()


def ce64(logits, labels):
    return -log_softmax64(logits)[torch.arange(len(labels)), labels].mean().item()


@pytest.fixture(scope="module")
def by_hand(first_step):
    """Every learner's ce, kd, peer, loss and acc at step 1, recomputed from the run's config, the batch stream,
    the teacher file (eval mode) and the init files (train mode, the batch's own BatchNorm statistics; a frozen
    mentor's in eval mode). Every other student, mentor or learner, is a peer."""
    run, files = first_step
    cfg = load_config(run / "config.yaml")
    batch = first_batch(cfg)
    teacher = build_model(cfg.teacher.model, 10, **cfg.teacher.args)
    teacher.load_state_dict(torch.load(cfg.teacher.checkpoint, weights_only=True)["model"])
    logits = {}
    with torch.no_grad(), one_thread():
        teacher_logits = teacher.eval()(batch.images)
        for spec in cfg.students:
            model = build_model(spec.model, 10, **spec.args)
            model.load_state_dict(torch.load(spec.init, weights_only=True)["model"])
            if cfg.train.channels_last:
                model.to(memory_format=torch.channels_last)
            logits[spec.name] = model.train(not spec.frozen)(batch.images)
    expected = {}
    for name, z in ((s.name, logits[s.name]) for s in cfg.students if not s.frozen):
        ce, kd = ce64(z, batch.labels), kl64(teacher_logits, z, T)
        peer = sum(kl64(logits[j], z, T) for j in logits if j != name)
        acc = (z.argmax(-1) == batch.labels).double().mean().item()
        expected[name] = {"ce": ce, "kd": kd, "peer": peer, "loss": ALPHA * ce + BETA * kd + GAMMA * peer,
                          "acc": acc}
    return expected


def test_the_run_is_the_one_recomputed_here(first_step, by_hand):
    run, _ = first_step
    cfg = load_config(run / "config.yaml")
    assert (cfg.loss.alpha, cfg.loss.beta, cfg.loss.gamma, cfg.loss.temperature) == (ALPHA, BETA, GAMMA, T)
    assert cfg.loss.peer_reduction == "sum" and cfg.teacher.input_scale == 1
    assert [s.name for s in cfg.students] == list(STUDENTS)
    assert list(by_hand) == [s.name for s in cfg.students if not s.frozen]
    for name, terms in by_hand.items():  # the terms are large enough for a 1e-5 check to mean something
        assert terms["kd"] > 1 and terms["peer"] > 1, (name, terms)


def test_first_logged_step_matches_the_formula_recomputed_by_hand_for_every_student(first_step, by_hand):
    run, _ = first_step
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    row = next(r for r in rows if r.get("step") == 1 and "train/lenet/loss" in r)
    for name, terms in by_hand.items():
        for metric in ("ce", "kd", "peer", "loss"):
            assert row[f"train/{name}/{metric}"] == pytest.approx(terms[metric], rel=1e-5, abs=0), (name, metric)
        assert row[f"train/{name}/acc"] == pytest.approx(terms["acc"], abs=1e-6), name


def test_every_other_student_is_recorded_as_a_peer(first_step, by_hand):
    run, _ = first_step
    for name in by_hand:  # the learners
        assert student_state(run, 1, name)["peers"] == [j for j in STUDENTS if j != name]

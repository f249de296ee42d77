"""The five teacher modes on 3 gloo ranks: the same logits as one process running the whole teacher,
the parameter-sharded modes holding 1/W of the parameters per rank, and the logit cache reused."""

import fcntl
import json
import os
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dist_tsp import checkpoint
from dist_tsp.config import load_config
from dist_tsp.data import PeerBatches, load_dataset
from dist_tsp.errors import SharedUserError, UserError
from dist_tsp.models import build_model
from dist_tsp.placement import Groups, Placement
from dist_tsp.run_control import StopRequest, StopVote
from dist_tsp.teacher import prepare_teacher, teacher_logits
from dist_tsp.teacher_modes import gathered_logits
from dist_tsp.train import plan
from tests.multiprocess import run_on_ranks
from tests.runs import DEEPSPEED, TINY, launch, start, student_state, train_rows

WORLD, BATCH, EPOCHS, STEPS = 3, 13, (0, 1), 2  # a batch of 13 over 3 ranks: the last slice is padded
MODES = ("replicated", "sharded", "fsdp", "deepspeed", "cached")


def teacher_file(path):
    torch.manual_seed(3)
    model = build_model("resnet_cifar", 10, depth=8, width=8)
    checkpoint.save_atomic({"model": model.state_dict()}, path)
    return path


# the top-k caches, each in its own folder: every class in float32 (the dense cache exactly), and 3 in float16
TOPK = {"cached_top10": ["teacher.cache_topk=10"],
        "cached_top3_fp16": ["teacher.cache_topk=3", "teacher.cache_precision=float16"]}


def config(tmp, mode: str):
    teacher_mode, cache, options = ("cached", f"cache-{mode}", TOPK[mode]) if mode in TOPK else (mode, "cache", [])
    return load_config(None, [
        "students=[{name: a, model: lenet}, {name: b, model: lenet}, {name: c, model: lenet}]",
        f"output_dir={tmp / mode}", f"teacher.checkpoint={tmp / 'teacher.pt'}", f"teacher.mode={teacher_mode}",
        "teacher.args={depth: 8, width: 8}", f"teacher.cache_dir={tmp / cache}", f"data.batch_size={BATCH}",
        "data.eval_batch_size=100", *options])


def first_batches(cfg, data):
    """Per epoch of EPOCHS, its first STEPS batches of the one peer group."""
    batches = PeerBatches(data.train, batch_size=BATCH, num_replicas=1, replica=0, seed=cfg.seed,
                          augmentation=data.augmentation(cfg.seed, enabled=True), normalize=data.normalize)
    return {epoch: list(islice(batches.epoch(epoch), STEPS)) for epoch in EPOCHS}


def _logits_in_modes(tmp, modes=MODES):
    """Per mode: the logits of the first steps of two epochs, this rank's teacher bytes, the cache summary."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    placement = Placement(world_size=WORLD, rank=dist.get_rank(), num_students=3)
    groups = Groups.from_mesh(placement.build_mesh("cpu"))
    data = load_dataset(config(tmp, modes[0]).data, seed=0)
    results = {}
    for mode in modes:
        cfg = config(tmp, mode)
        model, info, _ = prepare_teacher(cfg, data, accelerator, groups)
        source = teacher_logits(cfg, model, info, data, accelerator, groups, StopRequest())
        logits, images = [], []
        for epoch, batches in first_batches(cfg, data).items():
            source.start_epoch(epoch)
            for batch in batches:
                logits.append(gathered_logits(source, batch, groups.peer))
                images.append(batch.images)
        results[mode] = {"logits": torch.stack(logits).numpy(), "images": torch.stack(images).numpy(), "info": info,
                         "summary": source.summary(), "held_as": _how_held(model)}
    return results


def _how_held(teacher: torch.nn.Module) -> dict:
    """Whether any of the teacher's modules is in train mode or is a DDP wrapper, and any parameter takes gradients."""
    from torch.nn.parallel import DistributedDataParallel

    return {"training": any(m.training for m in teacher.modules()),
            "ddp": any(isinstance(m, DistributedDataParallel) for m in teacher.modules()),
            "requires_grad": any(p.requires_grad for p in teacher.parameters())}


@pytest.fixture(scope="module")
def every_mode(tmp_path_factory):
    """The modes on 3 ranks, which JIT-build any C++ extension they load in tmp/torch_extensions."""
    tmp = tmp_path_factory.mktemp("modes")
    teacher_file(tmp / "teacher.pt")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_EXTENSIONS_DIR", str(tmp / "torch_extensions"))
        return tmp, run_on_ranks(_logits_in_modes, WORLD, tmp, (*MODES, *TOPK), timeout=600)


@pytest.fixture(scope="module")
def single_process(every_mode):
    """The first batches' images as one process without a process group draws them, and the whole teacher's
    logits on them."""
    tmp, _ = every_mode
    cfg = config(tmp, "replicated")
    data = load_dataset(cfg.data, seed=0)
    images = torch.stack([batch.images for batches in first_batches(cfg, data).values()
                          for batch in batches])
    assert images.shape[:2] == (len(EPOCHS) * STEPS, BATCH)
    model = build_model("resnet_cifar", 10, depth=8, width=8).eval()
    model.load_state_dict(torch.load(tmp / "teacher.pt")["model"])
    with torch.no_grad():
        return images, torch.stack([model(batch) for batch in images])


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_gives_the_single_process_teachers_logits_on_every_rank(every_mode, single_process, mode):
    _, ranks = every_mode
    images, expected = single_process
    for number, rank in enumerate(ranks):
        same = torch.equal(torch.from_numpy(rank[mode]["images"]), images)
        assert same, f"rank {number}, {mode}: other images than the batches one process draws"
        torch.testing.assert_close(torch.from_numpy(rank[mode]["logits"]), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["fsdp", "deepspeed"])
def test_parameter_sharded_modes_hold_a_third_of_the_teacher_per_rank(every_mode, mode):
    _, ranks = every_mode
    info = ranks[0][mode]["info"]
    held, full = info.parameter_bytes_per_rank, info.parameter_bytes
    assert all(r[mode]["info"].parameter_bytes_per_rank == held for r in ranks)
    assert sum(held) >= full  # every parameter is somewhere
    assert max(held) <= 1.1 * full / WORLD + 4096  # and no rank holds much more than its third (plus padding)


def test_the_deepspeed_mode_builds_no_cpu_extension(every_mode):
    """DeepSpeed's CPU shared-memory all-reduce (for its inference alone) is not built: no compile on a new machine, no
    hang on a lock file left to torch < 2.14 (pytorch/pytorch#189245)."""
    tmp, ranks = every_mode
    assert ranks[0]["deepspeed"]["info"].mode == "deepspeed"
    assert not (tmp / "torch_extensions").exists()


@pytest.mark.parametrize("mode", ["replicated", "sharded", "cached"])
def test_other_modes_hold_the_whole_teacher_on_every_rank(every_mode, mode):
    _, ranks = every_mode
    info = ranks[0][mode]["info"]
    assert info.parameter_bytes_per_rank == [info.parameter_bytes] * WORLD


def test_the_teacher_is_frozen_in_eval_mode_and_never_wrapped_in_ddp_in_every_mode_on_every_rank(every_mode):
    _, ranks = every_mode
    held = {(number, mode): rank[mode]["held_as"] for number, rank in enumerate(ranks) for mode in (*MODES, *TOPK)}
    assert all(h == {"training": False, "ddp": False, "requires_grad": False} for h in held.values()), held


def test_every_mode_reports_the_same_teacher_accuracy(every_mode):
    _, ranks = every_mode
    accuracies = {mode: ranks[0][mode]["info"].test_acc for mode in MODES}
    assert max(accuracies.values()) - min(accuracies.values()) <= 2 / 360, accuracies  # <= 2 near-ties of 360


def test_a_top_k_cache_of_every_class_in_float32_is_the_dense_cache_exactly(every_mode):
    _, ranks = every_mode
    for rank in ranks:
        assert (rank["cached_top10"]["logits"] == rank["cached"]["logits"]).all()


def test_a_top_3_float16_cache_keeps_each_samples_3_largest_logits_and_no_other_class(every_mode):
    _, ranks = every_mode
    dense, top3 = (torch.from_numpy(ranks[0][mode]["logits"]) for mode in ("cached", "cached_top3_fp16"))
    kept = top3.isfinite()
    assert (kept.sum(-1) == 3).all() and (top3[~kept] == -torch.inf).all()
    assert torch.equal(kept, dense >= dense.topk(3, dim=-1).values[..., -1:])  # the 3 largest, no other
    torch.testing.assert_close(top3[kept], dense[kept].half().float(), rtol=0, atol=0)  # float16 storage


def test_cache_is_computed_once_per_epoch_then_reused(every_mode):
    tmp, ranks = every_mode
    assert ranks[0]["cached"]["summary"]["computed_epochs"] == list(EPOCHS)
    folder = tmp / "cache"
    files = sorted(folder.glob("*/epoch_*.npy"))
    assert [f.name for f in files] == ["epoch_0000.npy", "epoch_0001.npy"]
    written = {f: f.stat().st_mtime_ns for f in files}
    again = run_on_ranks(_logits_in_modes, WORLD, tmp, ("cached",), timeout=300)
    for rank, before in zip(again, ranks, strict=True):
        summary = rank["cached"]["summary"]
        assert summary["computed_epochs"] == [] and summary["reused_epochs"] == list(EPOCHS)
        assert (rank["cached"]["logits"] == before["cached"]["logits"]).all()
    assert {f: f.stat().st_mtime_ns for f in files} == written  # not rewritten


def _teacher_refused(tmp, other_nodes_see: str):
    """On each rank: the teacher prepared while the other nodes see its file otherwise than rank 0 (`other_nodes_see`
    "no file" on ranks 1 and 2, or "another file" on rank 2); the one line refusing it."""
    from pathlib import Path

    from accelerate import Accelerator

    cfg = config(tmp, "replicated")
    if other_nodes_see == "no file" and dist.get_rank() > 0:
        is_file, exists = Path.is_file, Path.exists
        Path.is_file = lambda path: path != cfg.teacher.checkpoint and is_file(path)
        Path.exists = lambda path, *args, **kwargs: path != cfg.teacher.checkpoint and exists(path, *args, **kwargs)
    if other_nodes_see == "another file" and dist.get_rank() == 2:
        cfg.teacher.checkpoint = tmp / "other" / "teacher.pt"
    accelerator = Accelerator(cpu=True)
    groups = Groups.from_mesh(Placement(world_size=WORLD, rank=dist.get_rank(), num_students=3).build_mesh("cpu"))
    try:
        prepare_teacher(cfg, load_dataset(cfg.data, seed=0), accelerator, groups)
    except SharedUserError as error:
        return str(error)
    return None


def test_a_teacher_file_rank_0_alone_finds_is_refused_on_every_rank_naming_the_others(tmp_path):
    """Every rank follows rank 0 in loading it, not training a teacher of its own in collectives that do not match."""
    path = teacher_file(tmp_path / "teacher.pt")
    said = run_on_ranks(_teacher_refused, WORLD, tmp_path, "no file", timeout=60)
    assert said == [f"ranks 1, 2: teacher checkpoint {path} does not exist: check the path"] * WORLD


def test_a_node_whose_teacher_file_differs_from_rank_0s_is_refused_on_every_rank_naming_it(tmp_path):
    """A node-local teacher.checkpoint left from another run: rank 2 taught with other logits, silently."""
    path = teacher_file(tmp_path / "teacher.pt")
    torch.manual_seed(4)
    checkpoint.save_atomic({"model": build_model("resnet_cifar", 10, depth=8, width=8).state_dict()},
                           tmp_path / "other" / "teacher.pt")
    digests = [checkpoint.file_sha256(p)[:16] for p in (path, tmp_path / "other" / "teacher.pt")]
    said = run_on_ranks(_teacher_refused, WORLD, tmp_path, "another file", timeout=60)
    assert said == [f"rank 2 loaded a teacher file other than rank 0's (sha256 {digests[1]}; rank 0: sha256 "
                    f"{digests[0]}): every node needs the same teacher file: put teacher.checkpoint on a filesystem "
                    "every node shares"] * WORLD


@pytest.fixture(scope="module")
def cached_runs(tmp_path_factory):
    """Two accelerate launches (3 ranks) of the same run in cached mode, sharing one cache folder; the teacher in
    the default layout, as the parameter-sharded modes run it (Adam's first steps amplify the last-bit differences
    between channels-last and default-layout convolutions). The second (the graph-ready step, no capture) starts
    while the test plays a run beside it still computing the cache: holding its lock, the file not there yet; once
    the second says it waits, the file comes and the lock goes. Its output is in second.out."""
    tmp = tmp_path_factory.mktemp("cached")
    common = ["--config", "configs/demo.yaml", *TINY, f"teacher.checkpoint={teacher_file(tmp / 'teacher.pt')}",
              "teacher.mode=cached", "teacher.channels_last=false", f"teacher.cache_dir={tmp / 'cache'}"]
    launch([*common, f"output_dir={tmp / 'first'}", "train.step=eager"], processes=3)
    [computed] = (tmp / "cache").glob("*/*.npy")  # epoch 0's: the six steps end inside it
    computed.rename(tmp / "computed_beside")
    with open(computed.with_suffix(".lock"), "ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        second = start([*common, f"output_dir={tmp / 'second'}", "train.step=graph"], processes=3)
        printed = []
        while (line := second.stdout.readline()) and "another run is computing them" not in line:
            printed.append(line)
        (tmp / "computed_beside").rename(computed)
    stdout, stderr = second.communicate(timeout=600)
    (tmp / "second.out").write_text("".join(printed) + line + stdout)
    assert second.returncode == 0, stderr[-5000:]
    return tmp


def test_cached_mode_run_computes_each_epoch_once_and_a_second_run_reuses_them(cached_runs):
    first, second = (json.loads((cached_runs / r / "results.json").read_text()) for r in ("first", "second"))
    assert first["teacher"]["cache"]["computed_epochs"] == [0] and first["teacher"]["cache"]["reused_epochs"] == []
    assert second["teacher"]["cache"]["computed_epochs"] == [] and second["teacher"]["cache"]["reused_epochs"] == [0]
    assert first["students"] == second["students"]
    assert train_rows(cached_runs / "first") == train_rows(cached_runs / "second")


def test_a_run_beside_one_computing_the_same_epoch_waits_for_its_file_and_reuses_it(cached_runs):
    cache = json.loads((cached_runs / "second" / "results.json").read_text())["teacher"]["cache"]
    assert cache["computed_epochs"] == [] and cache["reused_epochs"] == [0]
    said = [line for line in (cached_runs / "second.out").read_text().splitlines() if "another run" in line]
    assert said == [f"teacher logits, epoch 0: another run is computing them in {cache['path']}; waiting"]


def test_graph_ready_step_given_the_cached_logits_at_its_boundary_trains_bitwise_like_the_eager_step(cached_runs):
    for name in ("lenet", "alexnet", "mobilenet"):
        eager, graph_ready = (student_state(cached_runs / run, 6, name) for run in ("first", "second"))
        assert all(torch.equal(eager["model"][k], graph_ready["model"][k]) for k in eager["model"]), name
        assert eager["optimizer"]["param_groups"] == graph_ready["optimizer"]["param_groups"], name


def test_deepspeed_accelerate_config_shards_the_teacher_and_trains_like_the_cached_run(cached_runs, tmp_path):
    """The ranks stay quiet (before, each warned that DeepSpeed fell back to the CPU, and repeated torch's deprecation
    of the all-gather DeepSpeed calls); accelerate's launcher itself may warn once."""
    args = ["--config", "configs/demo.yaml", *TINY, f"teacher.checkpoint={cached_runs / 'teacher.pt'}",
            "teacher.mode=deepspeed", f"output_dir={tmp_path}"]
    done = launch(args, processes=3, accelerate_config=DEEPSPEED)
    output = done.stdout + done.stderr
    assert output.count("Setting accelerator to CPU") <= 1 and "FutureWarning" not in output, output[-3000:]
    teacher = json.loads((tmp_path / "results.json").read_text())["teacher"]
    assert teacher["mode"] == "deepspeed" and max(teacher["parameter_bytes_per_rank"]) < teacher["parameter_bytes"] / 2
    expected = train_rows(cached_runs / "first")
    assert expected
    for a, b in zip(expected, train_rows(tmp_path), strict=True):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6)


def test_deepspeed_accelerate_config_without_the_deepspeed_mode_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` with deepspeed.yaml sets
    with pytest.raises(UserError, match=r"DeepSpeed accelerate config but teacher.mode=sharded: add teacher.mode="):
        plan(["--config", "configs/demo.yaml", f"output_dir={tmp_path / 'run'}"], 3, 0)
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    with pytest.raises(UserError, match=r"needs ZeRO stage 3, but the accelerate config sets zero_stage: 2"):
        plan(["--config", "configs/demo.yaml", f"output_dir={tmp_path / 'run'}", "teacher.mode=deepspeed"], 3, 0)
    assert not (tmp_path / "run").exists()


def in_process_cache(folder: Path):
    """A cache of 64 digits' logits, one process (no process group), augmented: a file per epoch."""
    from contextlib import nullcontext

    from dist_tsp.config import DataConfig
    from dist_tsp.logit_cache import CachedLogits, CacheLayout
    from dist_tsp.teacher_modes import RunTeacher

    data = load_dataset(DataConfig(name="digits", max_train_samples=64), seed=0)
    teacher = RunTeacher(build_model("lenet", data.num_classes).eval(), sharded=False, autocast=nullcontext)
    return CachedLogits.under(folder, {"run": 1}, teacher=teacher, data=data.train,
                              augmentation=data.augmentation(0, enabled=True), normalize=data.normalize,
                              layout=CacheLayout(data.num_classes, None, "float32"), world=None, batch_size=32,
                              device=torch.device("cpu"), writer=True, main=True,
                              stop_vote=StopVote(StopRequest(), None))


def test_a_resumed_caches_summary_lists_each_epoch_once_and_another_caches_is_not_taken(tmp_path):
    """The epoch a resumed run goes on with was listed twice when its file had gone (a cleaned cache) and was computed
    again; a forced resume under another cache key took the old cache's lists."""
    cache = in_process_cache(tmp_path)
    cache.resume_summary({"path": str(cache.folder), "computed_epochs": [0, 1], "reused_epochs": []})
    cache.start_epoch(1)  # its file is not there: computed again
    assert cache.summary()["computed_epochs"] == [0, 1] and cache.summary()["reused_epochs"] == []
    cache.start_epoch(2)
    cache.start_epoch(2)
    assert cache.summary()["computed_epochs"] == [0, 1, 2] and cache.summary()["reused_epochs"] == []
    cache.resume_summary({"path": str(tmp_path / "another"), "computed_epochs": [7], "reused_epochs": [8]})
    assert cache.summary()["computed_epochs"] == [0, 1, 2]


def test_a_damaged_cache_file_or_an_epoch_missing_where_the_run_cannot_write_is_one_line(tmp_path, monkeypatch):
    """Before: numpy's ValueError (mmap length ...) on every rank; and in a folder this run may only read, the epoch's
    logits computed, then an OSError's traceback (a read-only file system) on every rerun."""
    cache = in_process_cache(tmp_path)
    cache.start_epoch(0)
    cache.current, path = None, cache.path(0)
    fix = "delete it, and the next run computes it again$"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match=rf"^teacher logits {path} cannot be read \(ValueError: mmap length is "
                                        rf"greater than file size\): {fix}"):
        in_process_cache(tmp_path).start_epoch(0)
    np.save(path, np.zeros((3, 10), np.float32))
    with pytest.raises(UserError, match=rf"^teacher logits {path} cannot be read \(an array \(3, 10\) of float32, "
                                        rf"not \(64, 10\) of float32\): {fix}"):
        in_process_cache(tmp_path).start_epoch(0)
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: access(p, mode) and not Path(p).is_relative_to(cache.folder))
    with pytest.raises(UserError, match=rf"^the teacher's logits for epoch 1 are not in {cache.folder}, which this "
                                        "run cannot write into: give it write access there, or point "
                                        "teacher.cache_dir to a folder it can write$"):
        in_process_cache(tmp_path).start_epoch(1)
    assert not cache.path(1).exists()

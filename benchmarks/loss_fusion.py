"""The fused loss against one loss call per student: milliseconds for the loss's forward and backward.

    python benchmarks/loss_fusion.py            # CPU, one thread (what a rank of a CPU run has)
    python benchmarks/loss_fusion.py --gpu      # one GPU
    python benchmarks/loss_fusion.py --quick    # a tiny version (what CI runs)

A rank holding K of the N students computes, each step, every learner's CE, teacher-KL and peer-KL
terms. "fused" is what the trainer does: one `losses.graph_terms` call for all K students against all
N sources. "per student" is the call pattern it replaced: one `losses.tsp_loss` call per student, with
its peers indexed out of the all-gathered logits.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from step_breakdown import arguments, at_least
from tabulate import tabulate

from dist_tsp.errors import ArgumentParser, UserError
from dist_tsp.losses import graph_terms, tsp_loss

WEIGHTS = {"alpha": 0.1, "beta": 0.8, "gamma": 0.1}
TEMPERATURE = 4.0
# (N students, K on this rank, batch, classes)
SHAPES = [(3, 1, 128, 10), (3, 3, 128, 10), (6, 2, 48, 10), (6, 6, 48, 10), (6, 6, 128, 100), (8, 8, 256, 1000)]
QUICK_SHAPES = [(3, 3, 16, 10)]


def fused(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor, everyone: torch.Tensor,
          local: list[int]) -> torch.Tensor:
    """The trainer's loss: one call; each student's own logits in `everyone` get a zero share."""
    n = everyone.shape[0]
    shares = torch.ones(len(local), n, device=logits.device)
    shares[torch.arange(len(local)), torch.tensor(local)] = 0
    terms = graph_terms(logits, labels, teacher, everyone, shares, TEMPERATURE)
    weights = torch.tensor([WEIGHTS["alpha"], WEIGHTS["beta"], WEIGHTS["gamma"]], device=logits.device)
    return (terms * weights).sum()


def per_student(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor, everyone: torch.Tensor,
                local: list[int]) -> torch.Tensor:
    """The replaced call pattern: one tsp_loss per student against its peers."""
    n = everyone.shape[0]
    return sum(tsp_loss(logits[k], labels, teacher, everyone[[j for j in range(n) if j != s]], **WEIGHTS,
                        temperature=TEMPERATURE).total for k, s in enumerate(local))


def time_ms(loss: Callable[..., torch.Tensor], shape: tuple[int, int, int, int], device: torch.device,
            repeats: int) -> tuple[float, float]:
    """Median milliseconds of the loss's forward + backward, and its value (to check both agree)."""
    n, k, b, c = shape
    g = torch.Generator().manual_seed(0)
    everyone = torch.randn(n, b, c, generator=g).to(device)
    teacher, labels = torch.randn(b, c, generator=g).to(device), torch.randint(0, c, (b,), generator=g).to(device)
    local = list(range(k))
    logits = everyone[:k].clone().requires_grad_(True)
    times, value = [], 0.0
    for _ in range(repeats + 3):  # 3 warm-up
        _sync(device)
        start = time.perf_counter()
        total = loss(logits, labels, teacher, everyone, local)
        total.backward()
        _sync(device)
        times.append(1000 * (time.perf_counter() - start))
        value = total.item()
        logits.grad = None
    return statistics.median(times[3:]), value


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_benchmark(args: argparse.Namespace) -> None:
    if args.gpu and not torch.cuda.is_available():
        raise UserError("--gpu: no CUDA device here: leave it out to measure on the CPU")


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="on one GPU")
    parser.add_argument("--quick", action="store_true", help="one small shape, few repeats (what CI runs)")
    parser.add_argument("--repeats", type=at_least(1), default=50, help="timed repeats per shape (median reported)")
    args = arguments(parser, check_benchmark)
    device = torch.device("cuda" if args.gpu else "cpu")
    torch.set_num_threads(1)
    rows = []
    for shape in QUICK_SHAPES if args.quick else SHAPES:
        fused_ms, fused_value = time_ms(fused, shape, device, 3 if args.quick else args.repeats)
        looped_ms, looped_value = time_ms(per_student, shape, device, 3 if args.quick else args.repeats)
        if abs(fused_value - looped_value) > 1e-4 * max(1.0, abs(looped_value)):
            raise SystemExit(f"the two losses disagree at {shape}: {fused_value} vs {looped_value}")
        rows.append([*shape, f"{looped_ms:.3f}", f"{fused_ms:.3f}", f"{looped_ms / fused_ms:.2f}x"])
    print(f"Loss forward + backward, ms (median), {device.type}:\n")
    print(tabulate(rows, headers=["N", "K", "batch", "classes", "per student", "fused", "speed-up"],
                   tablefmt="github"))


if __name__ == "__main__":
    main()

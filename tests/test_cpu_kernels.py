"""No model configuration reaches oneDNN's faulty strided 1x1 weight-gradient kernel on CPUs (issue 6035 upstream).

Each check runs in a child process: the fault is a segmentation fault (AVX-512), a hang or wrong gradients (AVX2),
which would otherwise take pytest down with it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from dist_tsp.models import (
    ResNetCifar,
    SubsampledPointwiseConv2d,
    build_model,
    scale_inputs,
    subsample_strided_pointwise,
)
from tests.runs import ENV, ROOT

# The shortcut of resnet_cifar width 8 at input_scale 2, as oneDNN's verbose log names it:
# jit_1x1:avx512_core backward_weights, acdb, mb32_ic8oc16_ih64oh32kh1sh2_iw64ow32kw1sw2. Four input channels hang
# AVX2's kernel instead.
FAULTING_SHAPES = [(32, 8, 16, 64), (32, 4, 8, 64)]  # batch, in channels, out channels, input size
WIDTHS = {"resnet_cifar": [4, 8, 16, 32, 64], "alexnet": [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1],
          "mobilenet": [1 / 8, 1 / 4, 1 / 2, 1, 2], "vgg11_cifar": [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1]}
WIDTH_ARG = {"resnet_cifar": "width", "alexnet": "width", "mobilenet": "width_mult", "vgg11_cifar": "width"}


def in_child(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python with two threads (the kernel also misbehaves with one); fail on a crash or hang."""
    env = {**ENV, "OMP_NUM_THREADS": "2"}
    try:
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the child hung for {timeout} s")
    assert done.returncode == 0, f"exit {done.returncode} after:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done


def pointwise_gradients(batch: int, c_in: int, c_out: int, size: int, memory_format: torch.memory_format,
                        dtype: torch.dtype, subsampled: bool) -> list[torch.Tensor]:
    """Output, input gradient and weight gradient of a seeded 1x1 stride-2 convolution."""
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, 1, 2, bias=False)
    if subsampled:
        subsample_strided_pointwise(conv)
    conv.to(dtype=dtype, memory_format=memory_format)
    x = torch.randn(batch, c_in, size, size).to(dtype=dtype, memory_format=memory_format).requires_grad_()
    y = conv(x)
    y.backward(torch.randn(y.shape).to(dtype))
    return [y.detach(), x.grad, conv.weight.grad]


def test_the_faulting_shapes_give_the_float64_gradients_in_channels_last():
    in_child("""
import torch
from tests.test_cpu_kernels import FAULTING_SHAPES, pointwise_gradients
for shape in FAULTING_SHAPES:
    print(shape, flush=True)
    got = pointwise_gradients(*shape, torch.channels_last, torch.float32, subsampled=True)
    want = pointwise_gradients(*shape, torch.contiguous_format, torch.float64, subsampled=False)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5 * w.abs().max().item())
""")


def sweep_models_forward_and_backward() -> None:
    """Every registered model at widths 4-64 channels, the teacher at input_scale 1-4, both memory layouts."""
    torch.set_num_threads(2)
    for name, widths in WIDTHS.items():
        scales = [1, 2, 3, 4] if name == "resnet_cifar" else [1]
        for width in widths:
            for scale in scales:
                for memory_format in (torch.channels_last, torch.contiguous_format):
                    print(name, width, scale, memory_format, flush=True)  # the last line names a crash
                    args = {"depth": 8} if name == "resnet_cifar" else {}
                    model = scale_inputs(build_model(name, 10, **args, **{WIDTH_ARG[name]: width}), scale)
                    model.to(memory_format=memory_format)
                    images = torch.randn(8, 3, 32, 32).to(memory_format=memory_format)
                    model(images).sum().backward()


def test_no_model_width_input_scale_or_layout_crashes_the_cpu_backward():
    in_child("from tests.test_cpu_kernels import sweep_models_forward_and_backward as f; f()", timeout=600)


def test_only_narrow_strided_pointwise_convolutions_are_subsampled_and_keep_their_state_dict_keys():
    def subsampled(model: nn.Module) -> list[int]:
        return [m.in_channels for m in model.modules() if isinstance(m, SubsampledPointwiseConv2d)]

    assert subsampled(build_model("resnet_cifar", 10, depth=8, width=4)) == [4, 8]
    assert subsampled(build_model("resnet_cifar", 10, depth=8, width=8)) == [8]  # 16 channels keep the fast kernel
    assert subsampled(build_model("resnet_cifar", 10, depth=8, width=16)) == []
    assert subsampled(build_model("resnet18", 10)) == []
    built, constructed = build_model("resnet_cifar", 10, depth=8, width=4), ResNetCifar(10, depth=8, width=4)
    assert list(built.state_dict()) == list(constructed.state_dict())

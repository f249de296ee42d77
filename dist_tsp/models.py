"""Model registry: a name maps to a constructor of an image classifier returning logits [B, num_classes].

The students follow "Offline Knowledge Distillation using Teacher and Peer Learning" (Keras models adapted
to 3x32x32 inputs); any other torchvision classification model can be built by its torchvision name.
torchvision is imported where it is used: its import (which brings torch._dynamo) would add seconds to every rank's
start-up, and the registered models never need it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from dist_tsp.checkpoint import read, written_into
from dist_tsp.errors import OutOfSpace, UserError, not_a_file

__all__ = ["AirbenchNet", "ModelError", "PatchWhitening", "SubsampledPointwiseConv2d", "UnknownModelError",
           "build_model", "check_model_name", "fit_whitening", "load_pretrained", "model_names", "register",
           "scale_inputs", "subsample_strided_pointwise"]

_Constructor = TypeVar("_Constructor", bound=Callable[..., nn.Module])
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


class ModelError(UserError):
    """A model that cannot be built as configured."""


def check_logits(model: nn.Module, what: str, num_classes: int, image_size: int) -> None:
    """ModelError unless `model`, as it trains (dropout, auxiliary heads), maps two blank images of `image_size` to
    logits [2, num_classes]: one that cannot take the data's images, or returns more than its logits (torchvision's
    googlenet and inception_v3 with their auxiliary heads), is refused before anything trains."""
    try:
        with torch.no_grad():
            logits = model.train()(torch.zeros(2, 3, image_size, image_size))
    except Exception as error:  # a kernel larger than the image, a model made for one input size
        why = " ".join(str(error).split())[:200]
        raise ModelError(f"{what} cannot take the data's {image_size}x{image_size} images ({type(error).__name__}: "
                         f"{why}): choose another model, or a data.image_size it takes") from None
    if not isinstance(logits, torch.Tensor) or logits.shape != (2, num_classes):
        got = f"a tensor {list(logits.shape)}" if isinstance(logits, torch.Tensor) else f"a {type(logits).__name__}"
        raise ModelError(f"{what} returns {got}, not logits [N, {num_classes}], as it trains: give it the args that "
                         "make it return its logits alone (torchvision's googlenet and inception_v3: "
                         "{aux_logits: false})")


class UnknownModelError(ModelError):
    """A model name that is neither registered nor a torchvision classification model."""


def register(name: str) -> Callable[[_Constructor], _Constructor]:
    """Decorator: register a constructor called as ``constructor(num_classes=..., **kwargs)`` under ``name``."""

    def decorator(constructor: _Constructor) -> _Constructor:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = constructor
        return constructor

    return decorator


def model_names() -> list[str]:
    """The registered model names, in registration order (torchvision names are accepted too)."""
    return list(_REGISTRY)


def check_model_name(name: str) -> None:
    """Raise UnknownModelError unless ``name`` is registered or a torchvision classification model."""
    if name in _REGISTRY:
        return
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise UnknownModelError(
            f"unknown model {name!r}: choose one of {', '.join(_REGISTRY)} "
            "or a torchvision classification model name (e.g. resnet18)"
        )


def build_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build model ``name`` with randomly initialised weights and a ``num_classes``-way head (its strided 1x1
    convolutions as SubsampledPointwiseConv2d)."""
    check_model_name(name)
    constructor = _REGISTRY.get(name) or functools.partial(_torchvision_model, name)
    try:
        model = constructor(num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"cannot build model {name!r} with args {kwargs}: {exc}") from None
    return subsample_strided_pointwise(model)


ONEDNN_CHANNEL_BLOCK = 16  # the widest input-channel block of oneDNN's f32 1x1 kernels (AVX-512; AVX2 has 8)


class SubsampledPointwiseConv2d(nn.Conv2d):
    """A strided 1x1 convolution that, on the CPU, subsamples its input and then runs at unit stride: the same
    numbers, parameters and state_dict as ``nn.Conv2d``.

    oneDNN's CPU kernel for the weight gradient of a strided 1x1 convolution on channels-last inputs with fewer
    input channels than its block (16 with AVX-512, 8 with AVX2) writes past its workspace: a segmentation fault
    with AVX-512, a hang or wrong gradients with AVX2 (oneDNN issue 6035). A unit-stride 1x1 convolution never
    takes that path. Wider convolutions keep the strided kernel, which is faster.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.device.type != "cpu":
            return super().forward(input)
        rows, columns = self.stride
        return F.conv2d(input[:, :, ::rows, ::columns], self.weight, self.bias, 1, 0, self.dilation, self.groups)


def subsample_strided_pointwise(model: nn.Module) -> nn.Module:
    """Make every strided, unpadded 1x1 ``nn.Conv2d`` of ``model`` with fewer input channels per group than
    ONEDNN_CHANNEL_BLOCK a SubsampledPointwiseConv2d, in place (same parameters, hooks and state_dict keys)."""
    for module in model.modules():
        if (type(module) is nn.Conv2d and module.kernel_size == (1, 1) and module.stride != (1, 1)
                and module.padding == (0, 0) and module.in_channels // module.groups < ONEDNN_CHANNEL_BLOCK):
            module.__class__ = SubsampledPointwiseConv2d
    return model


def _torchvision_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """A randomly initialised torchvision classification model; ``kwargs`` go to its builder."""
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


def _scaled(channels: int, factor: float) -> int:
    """``channels`` scaled by ``factor``, at least 1."""
    return max(1, int(channels * factor))


def _conv_bn_relu(c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """A same-padded convolution (no bias) followed by BatchNorm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


@register("lenet")
class LeNet5(nn.Module):
    """LeNet-5 for 3x32x32: conv 6@5x5, pool, conv 16@5x5, pool, fc 120, fc 84, fc num_classes, ReLU.

    The second pool is adaptive (to 5x5), identical to a 2x2 max-pool at 32x32 and tolerant of other sizes.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.AdaptiveMaxPool2d(5),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register("alexnet")
class AlexNetCifar(nn.Module):
    """AlexNet for 32x32: 3x3 convs 64-192-384-256-256 (BatchNorm, ReLU), 3 max-pools, two dropout+fc layers.

    ``width`` scales the conv channels, ``hidden`` is the fc width. The last pool is adaptive (to 4x4),
    identical to a 2x2 max-pool at 32x32.
    """

    def __init__(self, num_classes: int, width: float = 1.0, hidden: int = 1024, dropout: float = 0.5) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = (_scaled(c, width) for c in (64, 192, 384, 256, 256))
        self.features = nn.Sequential(
            _conv_bn_relu(3, c1), nn.MaxPool2d(2),
            _conv_bn_relu(c1, c2), nn.MaxPool2d(2),
            _conv_bn_relu(c2, c3),
            _conv_bn_relu(c3, c4),
            _conv_bn_relu(c4, c5), nn.AdaptiveMaxPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout), nn.Linear(c5 * 4 * 4, hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _PooledConvNet(nn.Module):
    """A stack of convolutional layers, global average pooling and one linear layer (any input size)."""

    def __init__(self, layers: list[nn.Module], channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@register("mobilenet")
class MobileNetV1(_PooledConvNet):
    """MobileNet v1 for 32x32: a stride-1 stem and 13 depthwise-separable blocks, 4 of them stride 2 (32 -> 2).

    ``width_mult`` is the Keras ``alpha``: it scales every layer's channels.
    """

    # (output channels, stride) of each depthwise-separable block
    BLOCKS: tuple[tuple[int, int], ...] = (
        (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
        (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
    )

    def __init__(self, num_classes: int, width_mult: float = 1.0) -> None:
        c_in = _scaled(32, width_mult)
        layers: list[nn.Module] = [_conv_bn_relu(3, c_in)]
        for channels, stride in self.BLOCKS:
            c_out = _scaled(channels, width_mult)
            layers += [_conv_bn_relu(c_in, c_in, stride=stride, groups=c_in), _conv_bn_relu(c_in, c_out, kernel_size=1)]
            c_in = c_out
        super().__init__(layers, c_in, num_classes)


@register("vgg11_cifar")
class VGG11Cifar(_PooledConvNet):
    """VGG-11 (configuration A) for 32x32: 3x3 convs 64-M-128-M-256-256-M-512-512-M-512-512-M with BatchNorm and
    ReLU, global average pooling and one linear layer.

    ``width`` scales the conv channels. Unlike torchvision's ``vgg11`` (a 25088x4096x4096 classifier, ~130M
    parameters at 32x32), the head is a single ``Linear(channels, num_classes)``.
    """

    # conv output channels, or "M" for a 2x2 max-pool
    LAYERS: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, num_classes: int, width: float = 1.0) -> None:
        layers: list[nn.Module] = []
        c_in = 3
        for layer in self.LAYERS:
            if layer == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                c_out = _scaled(layer, width)
                layers.append(_conv_bn_relu(c_in, c_out))
                c_in = c_out
        super().__init__(layers, c_in, num_classes)


class _BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity shortcut, or a 1x1 conv+BN one where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(c_in, c_out, stride=stride)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn2(self.conv2(self.conv1(x))) + self.shortcut(x))


@register("resnet_cifar")
class ResNetCifar(_PooledConvNet):
    """CIFAR ResNet (He et al. 2016): a 3x3 stem and 3 stages of (depth - 2) / 6 basic blocks.

    Stage widths are ``width``, 2x and 4x; stages 2 and 3 halve the resolution; adaptive average pooling
    makes any input size >= 8 work.
    """

    def __init__(self, num_classes: int, depth: int = 20, width: int = 16) -> None:
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"resnet_cifar depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110), got {depth}")
        blocks_per_stage = (depth - 2) // 6
        layers: list[nn.Module] = [_conv_bn_relu(3, width)]
        c_in = width
        for stage, c_out in enumerate((width, 2 * width, 4 * width)):
            for block in range(blocks_per_stage):
                layers.append(_BasicBlock(c_in, c_out, stride=2 if stage > 0 and block == 0 else 1))
                c_in = c_out
        super().__init__(layers, c_in, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


@register("resnet50")
def resnet50(num_classes: int, **kwargs) -> nn.Module:
    """torchvision's ResNet-50, randomly initialised; ``kwargs`` go to ``torchvision.models.resnet50``."""
    import torchvision

    return torchvision.models.resnet50(weights=None, num_classes=num_classes, **kwargs)


class PatchWhitening(nn.Module):
    """A frozen 2x2 convolution that whitens image patches, with a learned bias (Page 2018; airbench).

    Its filters are the eigenvectors of the training patches' second moment divided by sqrt(eigenvalue + eps), and
    their negations, so the GELU after it loses nothing. Until ``fit``, they are those of an identity second moment:
    each output is one patch pixel (or its negation).
    """

    def __init__(self, kernel_size: int = 2, eps: float = 5e-4) -> None:
        super().__init__()
        dims = 3 * kernel_size**2
        basis = torch.eye(dims).view(dims, 3, kernel_size, kernel_size)
        self.register_buffer("weight", torch.cat([basis, -basis]))
        self.bias = nn.Parameter(torch.zeros(2 * dims))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias)

    @torch.no_grad()
    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Whiten the patches of ``batches`` of normalised images [B, 3, H, W] (their second moment, in float64)."""
        moment, count = 0.0, 0
        for images in batches:
            patches = F.unfold(images.double(), self.weight.shape[-2:])  # [B, 3*k*k, positions]
            moment = moment + torch.einsum("bip,bjp->ij", patches, patches)
            count += patches.shape[0] * patches.shape[2]
        eigenvalues, eigenvectors = torch.linalg.eigh(moment / count)
        filters = (eigenvectors.T / (eigenvalues + self.eps).sqrt()[:, None]).view(-1, *self.weight.shape[1:])
        self.weight.copy_(torch.cat([filters, -filters]))


def fit_whitening(model: nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Fit every PatchWhitening layer of ``model`` to ``batches`` of normalised training images (read only if it has
    one)."""
    layers = [m for m in model.modules() if isinstance(m, PatchWhitening)]
    if layers:
        batches = list(batches)
        for layer in layers:
            layer.fit(batches)


class _UnscaledBatchNorm(nn.BatchNorm2d):
    """BatchNorm with a learned shift and no learned scale (airbench's: eps 1e-12, running-stat momentum 0.4).

    The shift is stored divided by sqrt(``bias_lr_scale``): plain SGD then moves it ``bias_lr_scale`` times faster
    than the weights, at the same relative weight decay, exactly as airbench's separate BatchNorm-bias learning rate.
    """

    def __init__(self, channels: int, bias_lr_scale: float) -> None:
        super().__init__(channels, eps=1e-12, momentum=0.4, affine=False)
        self.gain = math.sqrt(bias_lr_scale)
        self.shift = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, None, self.gain * self.shift, self.training,
                            self.momentum, self.eps)


def _identity_conv(c_in: int, c_out: int) -> nn.Conv2d:
    """A same-padded 3x3 convolution (no bias) whose first filters pass their input channel through (Dirac)."""
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    nn.init.dirac_(conv.weight[:c_in])
    return conv


@register("airbench")
class AirbenchNet(nn.Module):
    """The airbench CIFAR-10 network (Keller Jordan's cifar10-airbench, after hlb-CIFAR10 and Page 2018), our own
    implementation: a PatchWhitening layer and GELU, three blocks of (3x3 conv, 2x2 max-pool, BatchNorm, GELU,
    3x3 conv, BatchNorm, GELU) with Dirac-initialised convs, a global max-pool and a bias-free linear layer whose
    logits are scaled by ``logit_scale``.

    ``widths`` are the blocks' channels (airbench94: 64, 256, 256; airbench95: 128, 384, 384); ``bias_lr_scale``
    see _UnscaledBatchNorm (meant for SGD). Teacher training fits the whitening layer to the training images first
    (dist_tsp/teacher.py); elsewhere it keeps its data-free start.
    """

    def __init__(self, num_classes: int, widths: Sequence[int] = (64, 256, 256), bias_lr_scale: float = 64.0,
                 logit_scale: float = 1 / 9) -> None:
        super().__init__()
        if len(widths) != 3 or min(widths) < 1 or bias_lr_scale <= 0:
            raise ValueError(f"airbench needs three positive widths and bias_lr_scale > 0, got widths={widths}, "
                             f"bias_lr_scale={bias_lr_scale}")
        whiten = PatchWhitening()
        layers: list[nn.Module] = [whiten, nn.GELU()]
        c_in = whiten.weight.shape[0]
        for c_out in widths:
            layers += [_identity_conv(c_in, c_out), nn.MaxPool2d(2), _UnscaledBatchNorm(c_out, bias_lr_scale),
                       nn.GELU(), _identity_conv(c_out, c_out), _UnscaledBatchNorm(c_out, bias_lr_scale), nn.GELU()]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(c_in, num_classes, bias=False)
        self.logit_scale = logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1)) * self.logit_scale


def load_pretrained(model: nn.Module, name: str, weights: str) -> list[str]:
    """Copy pretrained weights into ``model``: ``imagenet`` (torchvision's default weights for ``name``) or a
    state-dict file. Entries whose shape differs (the classifier head) keep their fresh initialisation; their
    names are returned."""
    if weights == "imagenet":
        import torchvision

        try:
            with written_into(Path(torch.hub.get_dir()), then="rerun the same command"):  # the download's file
                state = torchvision.models.get_model_weights(name).DEFAULT.get_state_dict(progress=False)
        except ValueError:
            raise ModelError(f"torchvision has no pretrained weights for {name!r}: drop teacher.weights") from None
        except OutOfSpace:
            raise
        except OSError as error:  # URLError and friends: offline
            raise ModelError(f"cannot download ImageNet weights for {name!r} ({error}): download them once and "
                             "set teacher.weights=/path/to/weights.pth") from None
    else:
        path = Path(weights)
        if not path.is_file():
            raise ModelError(f"teacher.weights file {path} {not_a_file(path)}: give a state-dict file or 'imagenet'")
        state = read(path, "teacher.weights file")
        state = state.get("model", state) if isinstance(state, dict) else state
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ModelError(f"weights {weights} do not fit model {name!r}: unexpected entries {unknown[:3]}")
    fresh = sorted(k for k in own if k not in state or state[k].shape != own[k].shape)
    model.load_state_dict({k: v for k, v in state.items() if k not in fresh}, strict=False)
    return fresh


def scale_inputs(model: nn.Module, factor: int) -> nn.Module:
    """Make ``model`` resize its input by ``factor`` (bilinear, on the input's device) before its forward."""
    if factor != 1:
        model.register_forward_pre_hook(
            lambda _, args: (F.interpolate(args[0], scale_factor=factor, mode="bilinear", align_corners=False),
                             *args[1:]))
    return model

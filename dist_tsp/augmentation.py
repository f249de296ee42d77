"""The seeded per-sample augmentation of training views, and the evaluation view of a decoded image.

A sample's view depends on (seed, epoch, sample) alone: never on the placement, the batch it falls in, the loader
worker that makes it or who asks (the batch stream, the teacher-logit cache and its key share one `Augmentation`).
Two crops:

- padded: a random crop of the image zero-padded by 1/8 of its side, plus a horizontal flip, for small sets held
  in memory (CIFAR-style); done on the device as one gather per batch, or per sample in a loader worker with the
  same numbers.
- random_resized: torchvision's RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) plus a flip, for ImageNet-style
  sets streamed from disk; done per sample in loader workers. Its evaluation view is a resize of the shorter side
  to size/0.875 and a centre crop (Resize(256) + CenterCrop(224) at 224 px).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

# torchvision is imported by the two functions that resize images: its import (which brings torch._dynamo) would add
# seconds to every rank's start-up, and runs whose images are all of one size never need it.

VIEW_STREAM = 0x5EED  # seeds the per-sample augmentation, apart from the sample order
CENTER_CROP_SHARE = 0.875  # evaluation: the centre crop's side over the resized shorter side (224 of 256)
Crop = Literal["padded", "random_resized"]


def mixed_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from several integers (seed, epoch, replica, ...)."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


class Views(NamedTuple):
    """Per-sample padded-crop augmentation of one epoch: crop offsets [N, 2] and horizontal flips [N] (or None)."""

    offsets: torch.Tensor
    flips: torch.Tensor | None


@dataclass(frozen=True, slots=True)
class Augmentation:
    """The seeded per-sample augmentation of the training views (disabled: every view is the evaluation view)."""

    enabled: bool
    hflip: bool
    pad: int
    seed: int
    crop: Crop = "padded"

    def key(self) -> dict:
        """What a sample's view depends on, besides the image (for the teacher-logit cache's key)."""
        key = {"augment": self.enabled, "hflip": self.hflip, "pad": self.pad, "seed": self.seed}
        return key if self.crop == "padded" else {**key, "crop": self.crop}

    def epoch_views(self, epoch: int, num_samples: int, device: torch.device) -> Views | None:
        """Every sample's padded-crop offset [N, 2] and flip [N] in this epoch, on `device` (None: no padded crop)."""
        if not self.enabled or self.crop != "padded":
            return None
        generator = torch.Generator().manual_seed(mixed_seed(self.seed, epoch, VIEW_STREAM))
        offsets = torch.randint(0, 2 * self.pad + 1, (num_samples, 2), generator=generator)
        flips = torch.rand(num_samples, generator=generator) < 0.5 if self.hflip else None
        return Views(offsets.to(device), None if flips is None else flips.to(device))

    def view(self, images: torch.Tensor, indices: torch.Tensor, views: Views | None) -> torch.Tensor:
        """The uint8 views of samples `indices` of `images` [N, 3, H, W] (on the images' device)."""
        selected = images[indices]
        if views is None:
            return selected
        return self.crop_flip(selected, views.offsets[indices], None if views.flips is None else views.flips[indices])

    def crop_flip(self, images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor | None) -> torch.Tensor:
        """Each image's crop at `offsets` [B, 2] of the zero-padded images (flipped where `flips`), as one gather."""
        b, c, h, w = images.shape
        padded = F.pad(images, (self.pad,) * 4)
        rows = offsets[:, 0, None] + torch.arange(h, device=images.device)
        cols = offsets[:, 1, None] + torch.arange(w, device=images.device)
        if flips is not None:
            cols = torch.where(flips[:, None], cols.flip(1), cols)
        pixels = (rows[:, :, None] * padded.shape[-1] + cols[:, None, :]).view(b, 1, h * w)
        return padded.flatten(2).gather(2, pixels.expand(b, c, h * w)).view(b, c, h, w)

    def random_resized(self, image: torch.Tensor, size: int, epoch: int, index: int) -> torch.Tensor:
        """Sample `index`'s RandomResizedCrop (and flip) of decoded `image` [3, H, W] in `epoch`, at size x size."""
        from torchvision.transforms import RandomResizedCrop
        from torchvision.transforms.v2 import functional as TF

        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(mixed_seed(self.seed, epoch, VIEW_STREAM, index))  # not CUDA's
            top, left, height, width = RandomResizedCrop.get_params(image, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
            flip = self.hflip and bool(torch.rand(1) < 0.5)
        view = TF.resized_crop(image, top, left, height, width, [size, size], antialias=True)
        return TF.horizontal_flip(view) if flip else view


def import_transforms() -> None:
    """Import the torchvision transforms that the views import where they are made (torchvision's import adds
    seconds), in a process about to fork loader workers: a worker's own first import of a package W&B watches runs
    W&B's import hook there, which raises in a forked process (wandb 0.25 and later)."""
    import torchvision.transforms  # noqa: F401
    import torchvision.transforms.v2.functional  # noqa: F401


def evaluation_view(image: torch.Tensor, size: int, crop: Crop) -> torch.Tensor:
    """A decoded image [3, H, W] as the model sees it unaugmented: resized to size x size (padded), or its shorter
    side resized to size/0.875 and centre-cropped (random_resized)."""
    from torchvision.transforms.v2 import functional as TF

    if crop == "padded":
        return TF.resize(image, [size, size], antialias=True)
    return TF.center_crop(TF.resize(image, round(size / CENTER_CROP_SHARE), antialias=True), [size, size])

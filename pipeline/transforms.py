"""Image transforms of the published method, as constants shared by the DALI and PIL paths.

Train: resize 256x128 (bicubic), horizontal flip p=0.5, pad 10 (zeros), random crop back to
256x128, ImageNet mean/std; at other sizes the padding scales with the width
(``pipeline.augment.default_pad``). Test: resize + normalise. The torchvision compositions
below are the published way (the folder baseline); the torch fallback loader runs the same
steps as :func:`train_pixels` / :func:`test_pixels` in its workers, which hand over uint8 pixels
(a quarter of the bytes of floats), and :func:`normalize` runs where the batch lands, on the GPU
when there is one. ``pipeline.dali`` builds the same graph.

The training loaders draw the random parts (flip, crop offset) with
``pipeline.augment.augment_params`` (the augmentation's policy, torch-free for the workers).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from pipeline.augment import FLIP_P, resolve_pad

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def train_transform(height: int = 256, width: int = 128, pad: int | None = None) -> T.Compose:
    """PIL image -> normalised float tensor [3, H, W] with the training augmentation (``pad``
    None: ``pipeline.augment.default_pad``)."""
    return T.Compose([
        T.Resize((height, width), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=FLIP_P),
        T.Pad(resolve_pad(pad, width)),  # zeros, torchvision's default fill
        T.RandomCrop((height, width)),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


def test_transform(height: int = 256, width: int = 128) -> T.Compose:
    """PIL image -> normalised float tensor [3, H, W] (evaluation and centre initialisation)."""
    return T.Compose([
        T.Resize((height, width), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


_MEAN_STD: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """MEAN and STD as float32 tensors on ``device``, built once per device: building them for
    every batch is, on CUDA, a synchronous copy from pageable host memory, so the host would
    wait for the GPU to finish the previous step at every iteration."""
    if device not in _MEAN_STD:
        _MEAN_STD[device] = (torch.tensor(MEAN, device=device), torch.tensor(STD, device=device))
    return _MEAN_STD[device]


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels, channels last [..., 3] -> float32 normalised with MEAN/STD: the same
    arithmetic, element by element, as torchvision's ``to_tensor`` then ``Normalize``."""
    mean, std = _mean_std(pixels.device)
    return pixels.float().div_(255).sub_(mean).div_(std)


def test_pixels(image: Image.Image, height: int = 256, width: int = 128) -> np.ndarray:
    """The test transform up to normalisation: uint8 [H, W, 3]."""
    return np.array(TF.resize(image, [height, width], interpolation=T.InterpolationMode.BICUBIC))


def train_pixels(image: Image.Image, mirror: int, dy: int, dx: int, height: int = 256,
                 width: int = 128) -> np.ndarray:
    """The training transform with given random parts, up to normalisation: resize, pad, crop
    at the shift, mirror (the order of the DALI graph); uint8 [H, W, 3]. Same distribution as
    :func:`train_transform`."""
    image = TF.resize(image, [height, width], interpolation=T.InterpolationMode.BICUBIC)
    pad = max(abs(int(dy)), abs(int(dx)))  # any padding that holds the shift gives the same crop
    image = TF.crop(TF.pad(image, pad), pad + int(dy), pad + int(dx), height, width)
    if mirror:
        image = TF.hflip(image)
    return np.array(image)

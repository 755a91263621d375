"""Image transforms of the published method, as constants shared by the DALI and PIL paths.

Train: resize 256x128 (bicubic), horizontal flip p=0.5, pad 10 (zeros), random crop back to
256x128, ImageNet mean/std. Test: resize + normalise. The torchvision versions below are the
PIL path (torch fallback loader, folder baseline); ``pipeline.dali`` builds the same graph.
"""
from __future__ import annotations

from torchvision import transforms as T

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PAD = 10
FLIP_P = 0.5


def train_transform(height: int = 256, width: int = 128) -> T.Compose:
    """PIL image -> normalised float tensor [3, H, W] with the training augmentation."""
    return T.Compose([
        T.Resize((height, width), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=FLIP_P),
        T.Pad(PAD),  # zeros, torchvision's default fill
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

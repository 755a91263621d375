"""ResNet backbone for re-ID: last stride 1, average pooling, BatchNorm1d neck with a frozen
bias, L2-normalised output (docs/design.md). ``resnet50_ibn_a`` is ResNet-50 with IBN-Net's
instance-batch normalisation (:class:`IBN`) in layer1..layer3.

Training forwards carry statistics groups (``model.groups``): ``model(x, sizes=[...])`` is the
first forward of several sources at once, each source's batch cut into ``bn_groups`` groups with
their own BatchNorm statistics; ``model(x, style=True)`` (or ``style=False`` in the FBF baseline)
is the shuffled second forward, cut the same way, with per-group UBS statistics too. That is how
the published runs (``nn.DataParallel`` on 4 GPUs) normalised, and ``rank``/``world`` make the
groups the same sets of images on any number of ranks. Every BatchNorm is a ``GroupBatchNorm*``
(the BatchNorm half of an :class:`IBN` too): plain ``nn.BatchNorm`` in evaluation and outside a
grouped forward.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from model.groups import BN_IMPLS, Layout, batch_norm_groups, make_layout


class IBN(nn.Module):
    """Instance-batch normalisation, the "a" variant of IBN-Net (Pan et al., ECCV 2018): the first
    half of the channels normalised per image (InstanceNorm, affine), the rest by BatchNorm.
    Per-image statistics take each image's contrast and colour out of half of the early
    features, which is why generalizable re-ID uses it. The names ``IN`` and ``BN`` are those of
    the public checkpoint's parameters. Only ``BN`` has batch statistics (and so statistics
    groups); InstanceNorm keeps no running statistics and normalises each image in evaluation too."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.half = int(planes * 0.5)
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = x.is_contiguous(memory_format=torch.channels_last)
        fmt = torch.channels_last if last else torch.contiguous_format
        a, b = (t.contiguous(memory_format=fmt) for t in x.split([self.half, x.shape[1] - self.half], dim=1))
        b = self.BN(b)
        # InstanceNorm returns NCHW whatever it is given: the result takes x's layout and the BN half's dtype
        return torch.cat([self.IN(a).to(b.dtype), b], dim=1).contiguous(memory_format=fmt)


def resnet50_ibn_a(weights: None = None) -> torchvision.models.ResNet:
    """ResNet-50-IBN-a: torchvision's ResNet-50 (the same stem, stride on each bottleneck's 3x3
    convolution, parameter names) whose bottlenecks in layer1, layer2 and layer3 normalise
    after their first convolution with :class:`IBN` instead of BatchNorm (layer4 unchanged)."""
    net = torchvision.models.resnet50(weights=weights)
    for layer in (net.layer1, net.layer2, net.layer3):
        for block in layer:
            block.bn1 = IBN(block.bn1.num_features)
    return net


# the public ImageNet weights of resnet50_ibn_a (not torchvision's): IBN-Net's v1.0 GitHub release
IBN_A_RELEASE = "resnet50_ibn_a-d9d0bb7b.pth"

# arch -> (constructor, torchvision's ImageNet weights or None, feature size)
ARCHS = {
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1, 2048),
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1, 512),
    "resnet50_ibn_a": (resnet50_ibn_a, None, 2048),
}


class _GroupBN:
    """Mixin for nn.BatchNorm*d: per-group statistics while ``layout`` is set (training), computed
    by the ``impl`` of ``model.groups.BN_IMPLS``."""

    layout: Layout | None = None
    impl: str = BN_IMPLS[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.layout is None:
            return super().forward(x)
        return batch_norm_groups(x, self, self.layout, self.impl)


class GroupBatchNorm2d(_GroupBN, nn.BatchNorm2d):
    """nn.BatchNorm2d with statistics groups (see the module docstring)."""


class GroupBatchNorm1d(_GroupBN, nn.BatchNorm1d):
    """nn.BatchNorm1d with statistics groups (the neck)."""


def _group_bns(module: nn.Module) -> None:
    """Replace every BatchNorm2d below `module` by a GroupBatchNorm2d (same settings, fresh
    init: weights are loaded afterwards)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, GroupBatchNorm2d(child.num_features, child.eps, child.momentum,
                                                   child.affine, child.track_running_stats))
        else:
            _group_bns(child)


class ReIDNet(nn.Module):
    """Backbone (torchvision layer names, so ImageNet weights load as they are) + neck.

    ``bn_groups``: statistics groups per source batch in training forwards. ``rank``, ``world``:
    this process's part of every global batch (train.py sets them under torchrun). ``bn_impl``:
    how local groups are computed (``model.groups.BN_IMPLS``; the same result either way).
    """

    def __init__(self, arch: str = "resnet50", last_stride: int = 1, stem_relu: bool = False,
                 style: nn.Module | None = None, bn_groups: int = 4, bn_impl: str = BN_IMPLS[0]) -> None:
        super().__init__()
        if bn_groups < 1:
            raise ValueError(f"bn_groups must be at least 1, got {bn_groups}")
        if bn_impl not in BN_IMPLS:
            raise ValueError(f"bn_impl must be one of {', '.join(BN_IMPLS)}, got {bn_impl!r}")
        self.bn_groups, self.bn_impl, self.rank, self.world = bn_groups, bn_impl, 0, 1
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        ctor, _, self.num_features = ARCHS[arch]
        base = ctor(weights=None)
        for m in base.layer4[0].modules():
            if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
                m.stride = (last_stride, last_stride)
        _group_bns(base)
        self.conv1, self.bn1 = base.conv1, base.bn1
        # the published training code has no ReLU after the stem BatchNorm
        self.stem_relu = nn.ReLU(inplace=True) if stem_relu else nn.Identity()
        self.maxpool = base.maxpool
        self.layer1, self.layer2 = base.layer1, base.layer2
        self.layer3, self.layer4 = base.layer3, base.layer4
        self.style = style
        self.neck = GroupBatchNorm1d(self.num_features)
        nn.init.ones_(self.neck.weight)
        nn.init.zeros_(self.neck.bias)
        self.neck.bias.requires_grad_(False)

    @contextmanager
    def _grouped(self, layout: Layout | None) -> Iterator[None]:
        grouped = [m for m in self.modules() if isinstance(m, _GroupBN) or m is self.style]
        for m in grouped:
            m.layout = layout
            if isinstance(m, _GroupBN):
                m.impl = self.bn_impl
        try:
            yield
        finally:
            for m in grouped:
                m.layout = None

    def layout(self, rows: int, sizes: list[int] | None) -> Layout:
        """The statistics groups of a training forward of ``rows`` rows on this rank."""
        return make_layout([rows] if sizes is None else sizes, self.bn_groups, self.rank, self.world)

    def forward(self, x: torch.Tensor, sizes: list[int] | None = None, style: bool = False) -> torch.Tensor:
        """Features [N, num_features], L2-normalised. In training, ``sizes`` gives the rows of each
        source (the first forward); without it the batch is one source (the second forward), and
        ``style`` applies the style module after layer1."""
        if sizes is not None:
            sizes = [int(s) for s in sizes]
            if sum(sizes) != x.shape[0] or min(sizes, default=0) <= 0:
                raise ValueError(f"sizes {sizes} must be positive and sum to the batch size {x.shape[0]}")
        layout = self.layout(x.shape[0], sizes) if self.training else None
        if style and sizes is not None and len(sizes) > 1:
            raise ValueError("style restyles the shuffled second forward: call model(x, style=True) "
                             "without per-source sizes")
        with self._grouped(layout):
            x = self.maxpool(self.stem_relu(self.bn1(self.conv1(x))))
            x = self.layer1(x)
            if style and self.training and self.style is not None:
                x = self.style(x)
            x = self.layer4(self.layer3(self.layer2(x)))
            x = self.neck(torch.mean(x, dim=(2, 3), dtype=torch.promote_types(x.dtype, torch.float32)))
        return F.normalize(x, dim=1)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (parameter name -> tensor), "
                         f"got {type(state).__name__}")
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def load_backbone(model: ReIDNet, path: str | Path) -> None:
    """Load torchvision-named ResNet weights (``fc.*`` ignored; the neck keeps its init).
    Any missing, unexpected or wrongly shaped key is an error naming them."""
    path = Path(path)
    state = _read_state_dict(path)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("neck.")}
    missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
                    for k, v in own.items() if k in state and state[k].shape != v.shape)
    problems = [f"{what} ({len(keys)}): {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
                for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                   ("wrong shapes", shapes)) if keys]
    if problems:
        raise ValueError(f"{path} does not match the backbone: " + "; ".join(problems))
    model.load_state_dict(state, strict=False)


def imagenet_weights_file(arch: str) -> Path:
    """Torchvision's cached ImageNet weights for `arch`, downloaded if absent and possible; an
    arch torchvision has no weights of is refused, saying where its public file is."""
    weights = ARCHS[arch][1]
    if weights is None:
        raise RuntimeError(f"{arch} has no torchvision weights: download {IBN_A_RELEASE} from the "
                           f"XingangPan/IBN-Net GitHub releases (v1.0) and pass it as --pretrained FILE")
    url = weights.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            digest = torch.hub.HASH_REGEX.search(path.name)
            torch.hub.download_url_to_file(url, str(path), hash_prefix=digest.group(1) if digest else None)
        except Exception as err:
            raise RuntimeError(
                f"ImageNet weights for {arch} are not in torchvision's cache and could not be downloaded "
                f"({err}). Put {url} at {path}, or pass the local file as pretrained=PATH "
                f"(--pretrained PATH; e.g. the published resnet50-19c8e357.pth).") from err
    return path


def input_problem(arch: str, height: int, width: int) -> str | None:
    """Why `arch` cannot take `height` x `width` images, or None: IBN's InstanceNorm normalises
    each image over its positions, and layer3's map (a sixteenth of the input's height and
    width) must have two at least."""
    if arch == "resnet50_ibn_a" and -(-height // 16) * -(-width // 16) < 2:
        return (f"too small for {arch}, whose instance normalisation in layer3 takes each image's "
                "statistics over a sixteenth of the input's height and width: it needs two positions at "
                "least (e.g. --height 32 --width 16)")
    return None


def build_model(arch: str = "resnet50", pretrained: str = "none", last_stride: int = 1,
                stem_relu: bool = False, style: nn.Module | None = None, bn_groups: int = 4,
                bn_impl: str = BN_IMPLS[0]) -> ReIDNet:
    """`pretrained`: "none" (random init), "imagenet" (torchvision's weights; resnet50_ibn_a has none:
    pass IBN-Net's released file) or a local file;
    `bn_groups`: statistics groups per source batch (4 = the published runs, 1 = whole batches);
    `bn_impl`: how they are computed (``model.groups.BN_IMPLS``)."""
    model = ReIDNet(arch, last_stride=last_stride, stem_relu=stem_relu, style=style, bn_groups=bn_groups,
                    bn_impl=bn_impl)
    if pretrained == "imagenet":
        load_backbone(model, imagenet_weights_file(arch))
    elif pretrained != "none":
        load_backbone(model, pretrained)
    return model

"""The network as the training iterations run it: built from the run's settings and placed on
this rank's device in channels_last (:func:`build_network`), then wrapped in DDP over the ranks
and ``torch.compile`` (:func:`wrap_network`).

The training run's set-up (``engine/run.py``) calls both, and so does ``tools/benchmark.py``:
the benchmark times the very network train.py trains.
"""
from __future__ import annotations

import logging

import torch
from torch.nn.parallel import DistributedDataParallel

from engine.distributed import DistInfo
from model.groups import resolve_bn_impl
from model.resnet import build_model
from model.style import UBS

log = logging.getLogger("train")


def build_network(cfg, dist_info: DistInfo, pretrained: str = "none") -> torch.nn.Module:
    """The model of ``cfg`` (an :class:`engine.config.RunConfig`: arch, stem_relu, rho, bn_groups,
    bn_impl with ``auto`` resolved for the device) with its place among the ranks (``model.rank``,
    ``model.world``: which rows of the global batch its statistics groups hold), on the device in
    channels_last, the layout every training batch has (NHWC convolutions, and the grouped
    BatchNorm's views cost no copy in it). Raises
    ``ValueError`` for weights of another network."""
    model = build_model(cfg.arch, pretrained, stem_relu=cfg.stem_relu, style=UBS(rho=cfg.rho),
                        bn_groups=cfg.bn_groups, bn_impl=resolve_bn_impl(cfg.bn_impl, dist_info.device))
    model.rank, model.world = dist_info.rank, dist_info.world
    return model.to(dist_info.device, memory_format=torch.channels_last)


def wrap_network(model: torch.nn.Module, dist_info: DistInfo, compile: bool = False) -> torch.nn.Module:
    """What the iterations call: ``model`` in DDP when there are several ranks (gradient buckets as
    views of the gradients, which saves a copy of them), then ``torch.compile``d when asked. The
    unwrapped ``model`` stays the one to save, evaluate and broadcast. On CUDA, cuDNN picks each
    convolution's fastest algorithm by timing them once per shape: the training shapes are fixed."""
    if dist_info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        log.info("cuDNN autotuning on (torch.backends.cudnn.benchmark): the training shapes are fixed")
    net = model
    if dist_info.world > 1:
        device = dist_info.device
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                      gradient_as_bucket_view=True)
    if compile:
        net = torch.compile(net)
    return net

"""The fast training iteration (engine.step) against the published one written literally
(tools/reference.py): one forward per source, the unfused style module, the per-sample memory
loop. Same initial weights, images, labels, shuffle and random draws must give the same loss,
the same weights after the optimizer steps and the same memories. (NCHW inputs: channels_last
changes the convolutions' summation order, and Adam's first steps amplify such rounding in
near-zero gradients; the channels_last forward is checked in tests/test_resnet.py.)"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from engine.optim import build_scaler
from engine.step import MODES, shuffle_plan, train_step
from model.memory import MemoryClassifier
from model.resnet import build_model
from model.style import UBS
from tools.reference import LiteralUBS, reference_step

SIZES = [8, 8, 8]
CLASSES = [5, 7, 6]


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(sum(SIZES), 3, 64, 32, generator=g)
    # 2 identities x 4 images per source, in sampler order, so labels repeat within a batch
    labels = torch.cat([torch.randperm(n, generator=g)[:2].repeat_interleave(4) for n in CLASSES])
    return images, labels


@pytest.mark.parametrize("mode", ["il", "fbf", "fb"])
def test_fast_iteration_matches_the_published_one(mode):
    torch.manual_seed(0)
    fast = build_model("resnet18", style=UBS()).train()
    ref = copy.deepcopy(fast)
    ref.style = LiteralUBS()
    memories = [MemoryClassifier(fast.num_features, n) for n in CLASSES]
    for m in memories:
        m.centers.copy_(F.normalize(torch.randn_like(m.centers), dim=1))
    centers = [m.centers.clone() for m in memories]
    opt_fast = torch.optim.Adam(fast.parameters(), lr=3.5e-4, weight_decay=5e-4)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=3.5e-4, weight_decay=5e-4)
    scaler = build_scaler(torch.device("cpu"), None)

    for it in range(2):
        images, labels = batch(it)
        plan = shuffle_plan(SIZES, 1, 0, seed=3, epoch=0, it=it, shuffle=mode != "fb")
        torch.manual_seed(10 + it)
        loss_fast = train_step(fast, memories, images, labels,
                               SIZES, opt_fast, scaler, None, mode, plan)
        torch.manual_seed(10 + it)
        if mode == "fb":
            loss_ref = reference_fb(ref, centers, images, labels, opt_ref)
        else:
            loss_ref = reference_step(ref, centers, list(images.split(SIZES)), list(labels.split(SIZES)),
                                      opt_ref, mode, perm=plan.perm)
        assert float(loss_fast) == pytest.approx(loss_ref, rel=1e-5)
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    for m, c in zip(memories, centers):
        torch.testing.assert_close(m.centers, c, rtol=1e-4, atol=1e-5)


def reference_fb(model, centers, images, labels, optimizer) -> float:
    """The FB baseline as published: forward per source, step, memories take those features."""
    from tools.reference import loop_update, memory_loss

    feats = [model(x) for x in images.split(SIZES)]
    loss = sum(memory_loss(f, c, y, 0.05) for f, c, y in zip(feats, centers, labels.split(SIZES))) / 3
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    for f, c, y in zip(feats, centers, labels.split(SIZES)):
        loop_update(c, f.detach(), y, 0.2)
    return loss.item()


def fake_step(mode: str, round_sizes: list[list[int]] | None) -> torch.Tensor:
    """One iteration where every tensor holds a shape and no values (FakeTensorMode): reading a
    value back to the host (``item``, ``tolist``, ``bool``, ``nonzero``...) raises, just as it
    would stall the host until the GPU has caught up."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        net = build_model("resnet18", style=UBS()).train()
        memories = [MemoryClassifier(net.num_features, n) for n in CLASSES]
        opt = torch.optim.Adam(net.parameters(), lr=3.5e-4, weight_decay=5e-4, fused=True)
        images, labels = torch.randn(sum(SIZES), 3, 64, 32), torch.cat([torch.arange(n) % 2 for n in SIZES])
        plan = shuffle_plan(SIZES, 1, 0, seed=3, epoch=0, it=0, shuffle=mode != "fb", round_sizes=round_sizes)
        return train_step(net, memories, images, labels, SIZES, opt, build_scaler(torch.device("cpu"), None),
                          None, mode, plan)


@pytest.mark.parametrize("mode", MODES)
def test_the_step_reads_nothing_back_from_the_device(mode):
    """With the sampler's round sizes the whole iteration (forwards, loss, fused Adam, memory
    updates) only queues work; without them the memory update reads its round sizes back."""
    assert fake_step(mode, round_sizes=[[2] * 4] * 3).shape == ()
    with pytest.raises(DataDependentOutputException):
        fake_step(mode, round_sizes=None)

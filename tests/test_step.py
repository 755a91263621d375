"""The fast training iteration (engine.step) against the published one written literally
(reference/): a forward per source through 4 (or G) DataParallel replicas, the unfused
style module, the per-sample memory loop. Same initial weights, images, labels, shuffle and
random draws must give the same loss, weights, running statistics and memories, on 1 rank here
and on 2 and 4 gloo ranks under torchrun, with every implementation of the statistics groups
(model.groups.BN_IMPLS). All in float64 (tests/step_case.py says why)."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from engine.optim import build_scaler
from engine.step import MODES, shuffle_plan, train_step
from model.groups import BN_IMPLS
from model.memory import MemoryClassifier
from model.resnet import build_model
from model.style import UBS
from tests import step_case
from reference import reference_step

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def literal_run(mode: str, groups: int, sources: int = 3) -> dict[str, torch.Tensor]:
    """tests/step_case.py's iterations as the published code runs them."""
    model, memories = step_case.build(groups, sources=sources)
    ref = step_case.literal(model)
    centers = [m.centers for m in memories]
    opt = torch.optim.Adam(ref.parameters(), lr=3.5e-4, weight_decay=5e-4)
    sizes = step_case.sizes(sources)
    for it in range(step_case.ITERS):
        images, labels, per_source = step_case.batch(it, sources)
        plan = shuffle_plan(sizes, 1, 0, 3, 0, it, per_source, shuffle=mode != "fb")
        torch.manual_seed(10 + it)
        reference_step(ref, centers, list(images.split(sizes)), list(labels.split(sizes)),
                       opt, mode, perm=plan.perm, replicas=groups)
    return step_case.state(ref, memories)


def fast_run(mode: str, groups: int, impl: str = "group-norm",
             sources: int = 3) -> tuple[dict[str, torch.Tensor], list[float]]:
    model, memories = step_case.build(groups, impl, sources)
    opt = torch.optim.Adam(model.parameters(), lr=3.5e-4, weight_decay=5e-4)
    losses = []
    sizes = step_case.sizes(sources)
    for it in range(step_case.ITERS):
        images, labels, per_source = step_case.batch(it, sources)
        plan = shuffle_plan(sizes, 1, 0, 3, 0, it, per_source, shuffle=mode != "fb")
        torch.manual_seed(10 + it)
        losses.append(float(train_step(model, memories, images, labels, sizes, opt,
                                       build_scaler(torch.device("cpu"), None), None, mode, plan)))
    return step_case.state(model, memories), losses


@pytest.mark.parametrize("impl", BN_IMPLS)
@pytest.mark.parametrize("mode, groups", [("il", 4), ("fbf", 4), ("fb", 4), ("il", 1), ("il", 2)])
def test_fast_iteration_matches_the_published_one(mode, groups, impl):
    got, losses = fast_run(mode, groups, impl=impl)
    assert all(0 < loss < 20 for loss in losses)
    step_case.assert_same_state(got, literal_run(mode, groups))


@pytest.mark.parametrize("sources, mode, groups", [
    (1, "il", 4), (1, "il", 1), (2, "il", 4), (2, "il", 2), (4, "il", 4), (4, "il", 1),
    *(pytest.param(*case, marks=pytest.mark.slow) for case in [(1, "fbf", 4), (1, "fb", 4), (4, "fb", 4)])])
def test_any_number_of_sources_matches_the_published_iteration(sources, mode, groups):
    """1, 2 and 4 sources (1: the single-source transfer setting): a memory per source, the
    statistics groups of each source's batch and of the shuffled second forward over all of
    them (G groups of sources x 16 / G rows), as DataParallel on G GPUs computes them."""
    got, losses = fast_run(mode, groups, sources=sources)
    assert all(0 < loss < 20 for loss in losses)
    want = literal_run(mode, groups, sources)
    assert sum(k.startswith("memory.") for k in want) == sources
    step_case.assert_same_state(got, want)


def test_statistics_groups_change_the_result():
    """The literal comparison above means something: 4 groups and whole batches differ."""
    four, one = literal_run("il", 4), literal_run("il", 1)
    assert not torch.allclose(four["param.layer1.0.conv1.weight"], one["param.layer1.0.conv1.weight"])
    assert not torch.allclose(four["buffer.bn1.running_var"], one["buffer.bn1.running_var"])


@pytest.mark.slow
@pytest.mark.parametrize("world, mode, groups, impl", [
    (2, "il", 4, "group-norm"), (2, "il", 4, "batch-norm"), (4, "il", 4, "group-norm"),
    (4, "il", 4, "batch-norm"), (2, "il", 1, "group-norm"), (4, "il", 2, "group-norm"),
    (2, "fb", 4, "group-norm")])
def test_ranks_repeat_the_published_iteration(tmp_path, world, mode, groups, impl):
    """2 and 4 gloo ranks: the same groups of images, held whole by the ranks (groups=4: each
    implementation) or synchronised where a group spans ranks over the world group (groups=1 on 2
    ranks, groups=2 on 4; the implementations differ only in local groups), the global shuffle
    moved by all-to-all, memories updated in the global shuffled order. Rank 0 ends where the
    literal single process does."""
    run_ranks(tmp_path, world, mode, groups, impl)


@pytest.mark.slow
@pytest.mark.parametrize("sources, mode, groups", [(1, "il", 4), (2, "il", 1), (4, "il", 4), (1, "fb", 1)])
def test_ranks_repeat_the_published_iteration_with_any_number_of_sources(tmp_path, sources, mode, groups):
    """2 gloo ranks, 1, 2 and 4 sources: groups held whole by the ranks (4 groups) or spanning
    both (1 group), as above."""
    run_ranks(tmp_path, 2, mode, groups, "group-norm", sources)


def run_ranks(tmp_path: Path, world: int, mode: str, groups: int, impl: str, sources: int = 3) -> None:
    """tests/dist_step_check.py on ``world`` gloo ranks; rank 0's state against the literal run."""
    result = tmp_path / "state.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
           str(ROOT / "tests" / "dist_step_check.py"), str(result), mode, str(groups), impl, str(sources)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    step_case.assert_same_state(torch.load(result, weights_only=True), literal_run(mode, groups, sources))


def fake_step(mode: str) -> torch.Tensor:
    """One iteration where every tensor holds a shape and no values (FakeTensorMode): reading a
    value back to the host (``item``, ``tolist``, ``bool``, ``nonzero``...) raises, just as it
    would stall the host until the GPU has caught up."""
    sizes, classes = step_case.SIZES, step_case.CLASSES
    _, _, per_source = step_case.batch(0)
    with FakeTensorMode(allow_non_fake_inputs=True):
        net = build_model("resnet18", style=UBS()).train()
        memories = [MemoryClassifier(net.num_features, n) for n in classes]
        opt = torch.optim.Adam(net.parameters(), lr=3.5e-4, weight_decay=5e-4, fused=True)
        images, labels = torch.randn(sum(sizes), 3, 64, 32), torch.cat([torch.arange(n) % 4 for n in sizes])
        plan = shuffle_plan(sizes, 1, 0, seed=3, epoch=0, it=0, labels=per_source, shuffle=mode != "fb")
        return train_step(net, memories, images, labels, sizes, opt, build_scaler(torch.device("cpu"), None),
                          None, mode, plan)


@pytest.mark.parametrize("mode", MODES)
def test_the_step_reads_nothing_back_from_the_device(mode):
    """With the global labels planned on the host the whole iteration (grouped forwards, loss,
    fused Adam, memory updates) only queues work; a memory update that plans its own rounds
    reads the labels back, and FakeTensorMode catches it (the check means something)."""
    assert fake_step(mode).shape == ()
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(DataDependentOutputException):
        MemoryClassifier(8, 5).update(torch.randn(4, 8), torch.tensor([0, 1, 1, 2]))

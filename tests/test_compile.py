"""``--compile``: IL iterations of ``engine.step.train_step`` with the network ``torch.compile``d
against the same iterations in eager mode, through the AOT autograd path that ``--compile``
takes (``aot_eager``: AOT graphs run by eager kernels; ``inductor``: what ``--compile`` uses).
Compiled graphs treat an operation whose schema declares no mutation as pure: group 0's running
statistics must still be updated (model/groups.py), and the backward must run. Float64 (the
tests/step_case.py case), so compiled and eager kernels agree to rounding through Adam's steps;
inductor draws UBS's random numbers as eager mode does (``fallback_random``)."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from torch._dynamo.utils import counters

from engine.optim import build_scaler
from engine.step import shuffle_plan, train_step
from tests import step_case

pytestmark = pytest.mark.slow  # torch.compile: 10 to 20 s a case with aot_eager, up to 2 min with inductor


def run(groups: int, impl: str, memory_format: torch.memory_format, backend: str | None):
    """step_case's IL iterations, the network compiled with ``backend`` (None: eager)."""
    model, memories = step_case.build(groups, impl)
    model.to(memory_format=memory_format)
    net = model if backend is None else torch.compile(model, backend=backend)
    opt = torch.optim.Adam(model.parameters(), lr=3.5e-4, weight_decay=5e-4)
    losses = []
    for it in range(step_case.ITERS):
        images, labels, per_source = step_case.batch(it)
        plan = shuffle_plan(step_case.SIZES, 1, 0, seed=3, epoch=0, it=it, labels=per_source)
        torch.manual_seed(10 + it)
        losses.append(train_step(net, memories, images.contiguous(memory_format=memory_format), labels,
                                 step_case.SIZES, opt, build_scaler(torch.device("cpu"), None), None, "il",
                                 plan))
    return step_case.state(model, memories), torch.stack(losses)


@pytest.mark.parametrize("backend, groups, impl, channels_last", [
    ("aot_eager", 4, "group-norm", False), ("aot_eager", 1, "group-norm", True),
    ("inductor", 4, "group-norm", True), ("inductor", 1, "batch-norm", True)])
def test_compiled_iterations_match_eager(backend, groups, impl, channels_last):
    """Loss, weights, running statistics, ``num_batches_tracked`` and memories of two compiled IL
    iterations are the eager ones; the step compiles into two graphs (the first forward, and the
    second without gradients) with no graph break."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    want, want_losses = run(groups, impl, memory_format, None)
    torch._dynamo.reset()
    counters.clear()
    with torch._inductor.config.patch(fallback_random=True):
        got, losses = run(groups, impl, memory_format, backend)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2
    torch.testing.assert_close(losses, want_losses, rtol=1e-9, atol=0)
    step_case.assert_same_state(got, want)

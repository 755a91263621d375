"""Run by tests/test_dist_safety.py under torchrun (gloo): parts of the multi-GPU path that a CPU
holds as NCCL would run them, each rank saving what it saw to OUT/rank<r>.pt.

    torchrun --nproc_per_node N tests/dist_gpu_paths_check.py OUT

1. The process group's timeout is TIMEOUT_S (``init_distributed``'s, --dist-timeout's); rank 0
   works on the host (as when it builds shards) twice as long inside ``checked`` on
   ``host_group``, and every rank leaves the block together.
2. ``broadcast_state``: every rank starts from other weights and buffers (seeded by its rank,
   channels_last) and ends with rank 0's, layout kept.
3. ``train_step`` under DDP (``wrap_network``: gradient_as_bucket_view): the gradients the
   third iteration's backward accumulates into are those the second left (DDP's buckets), not
   new ones.
"""
from __future__ import annotations

import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engine import distributed as du  # noqa: E402
from engine.network import wrap_network  # noqa: E402
from engine.optim import build_scaler  # noqa: E402
from engine.step import shuffle_plan, train_step  # noqa: E402
from engine.errors import checked  # noqa: E402
from model.resnet import build_model  # noqa: E402
from tests import step_case  # noqa: E402

TIMEOUT_S = 4  # short, yet long enough for the ranks' other collectives on a busy CPU


def wait_for_rank0(info: du.DistInfo) -> float:
    """Seconds the block took on this rank, rank 0 sleeping 2 x TIMEOUT_S in it."""
    start = time.monotonic()
    with checked(info.world, du.host_group(timedelta(minutes=2))):
        if info.is_main:
            time.sleep(2 * TIMEOUT_S)
    return time.monotonic() - start


def broadcast(info: du.DistInfo) -> dict:
    torch.manual_seed(info.rank)
    model = build_model("resnet18", bn_groups=1).to(memory_format=torch.channels_last)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(torch.rand(b.shape) if b.is_floating_point() else torch.full_like(b, 7 + info.rank))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    du.broadcast_state(model)
    return {"before": before, "after": model.state_dict(),
            "channels_last": model.conv1.weight.is_contiguous(memory_format=torch.channels_last)}


def bucket_gradients(info: du.DistInfo) -> dict:
    """For each parameter, whether its gradient in the third backward (right after accumulation,
    before DDP's hooks) is the tensor the second iteration left in it."""
    model, memories = step_case.build(4)
    model.rank, model.world = info.rank, info.world
    net = wrap_network(model, info)
    opt = torch.optim.Adam(model.parameters(), lr=3.5e-4, weight_decay=5e-4)
    mine, sizes = step_case.rank_rows(info.rank, info.world), [s // info.world for s in step_case.SIZES]
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    left: dict[str, int] = {}  # each gradient's storage after the first iteration
    same: dict[str, bool] = {}

    def accumulated(p: torch.Tensor, name: str) -> None:
        if left:
            same.setdefault(name, p.grad.data_ptr() == left[name])

    for name, p in params.items():
        p.register_post_accumulate_grad_hook(lambda p, name=name: accumulated(p, name))
    for it in range(3):
        images, labels, per_source = step_case.batch(it)
        plan = shuffle_plan(sizes, info.world, info.rank, seed=3, epoch=0, it=it, shuffle=True,
                            labels=per_source)
        train_step(net, memories, images[mine], labels[mine], sizes, opt,
                   build_scaler(torch.device("cpu"), None), None, "il", plan)
        if it == 1:  # DDP rebuilds its buckets after the first iteration: those of the second stay
            left = {name: p.grad.data_ptr() for name, p in params.items()}
    return {"same_gradient": same}


def main() -> int:
    out = Path(sys.argv[1])
    info = du.init_distributed("cpu", timedelta(seconds=TIMEOUT_S))
    result = {"waited_s": wait_for_rank0(info), **broadcast(info), **bucket_gradients(info)}
    torch.save(result, out / f"rank{info.rank}.pt")
    du.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

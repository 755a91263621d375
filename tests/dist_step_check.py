"""Run by tests/test_step.py under torchrun: tests/step_case.py's iterations with the fast step
on every rank (DDP over gloo, float64), then rank 0 saves the resulting state.

    torchrun --nproc_per_node N tests/dist_step_check.py RESULT.pt MODE BN_GROUPS BN_IMPL [SOURCES]
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from engine import distributed as du  # noqa: E402
from engine.optim import build_scaler  # noqa: E402
from engine.step import shuffle_plan, train_step  # noqa: E402
from tests import step_case  # noqa: E402


def main() -> int:
    result, mode, groups, impl = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    sources = int(sys.argv[5]) if len(sys.argv) > 5 else 3
    info = du.init_distributed("cpu")
    model, memories = step_case.build(groups, impl, sources)
    model.rank, model.world = info.rank, info.world
    net = DistributedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=3.5e-4, weight_decay=5e-4)
    mine = step_case.rank_rows(info.rank, info.world, sources)
    sizes = [s // info.world for s in step_case.sizes(sources)]
    for it in range(step_case.ITERS):
        images, labels, per_source = step_case.batch(it, sources)
        plan = shuffle_plan(sizes, info.world, info.rank, seed=3, epoch=0, it=it, shuffle=mode != "fb",
                            labels=per_source)
        torch.manual_seed(10 + it)
        train_step(net, memories, images[mine], labels[mine], sizes, opt,
                   build_scaler(torch.device("cpu"), None), None, mode, plan)
    if info.rank == 0:
        torch.save(step_case.state(model, memories), result)
    du.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

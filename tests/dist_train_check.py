"""Run by tests/test_train.py under torchrun: a short training run, after which every rank's
weights and memories are gathered and rank 0 writes how far apart they are, and how far the
weights moved from their initial values.

    torchrun --nproc_per_node 2 tests/dist_train_check.py RESULT.json <train.py flags>
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import train  # noqa: E402
from engine import distributed as du  # noqa: E402
from engine.config import RunConfig  # noqa: E402
from engine.flags import configs  # noqa: E402
from model.resnet import build_model  # noqa: E402
from model.style import UBS  # noqa: E402


def initial_weights(args, cfg: RunConfig) -> torch.Tensor:
    """The parameters the run starts from, made as train.py makes them: seeded with --seed,
    then built, before anything else draws random numbers."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, args.pretrained, stem_relu=cfg.stem_relu, style=UBS(rho=cfg.rho),
                        bn_groups=cfg.bn_groups)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def main() -> int:
    result, argv = Path(sys.argv[1]), sys.argv[2:]
    args = train.get_parser().parse_args(argv)
    cfg, ex = configs(args)
    info = du.init_distributed("cpu")
    start = initial_weights(args, cfg)
    res = train.train(cfg, ex, info)
    weights = torch.cat([p.detach().flatten() for p in res.model.parameters()])
    memories = torch.cat([m.centers.flatten() for m in res.memories])
    all_w = du.all_gather_rows(weights[None])
    all_m = du.all_gather_rows(memories[None])
    if info.rank == 0:
        result.write_text(json.dumps({
            "world": info.world, "exit_code": res.exit_code,
            "weights_max_diff": float((all_w - all_w[0]).abs().max()),
            "memories_max_diff": float((all_m - all_m[0]).abs().max()),
            "weights_change": float((weights - start).norm() / start.norm()), "history": res.history}))
    du.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run by tests/test_evaluation.py under torchrun: feature extraction, the target evaluation
(plain, re-ranked, and with flipped images and query expansion) and memory initialisation, each rank
reading its own part of the rows;
rank 0 saves the results and every rank's memory.

    torchrun --nproc_per_node N tests/dist_eval_check.py SHARDS RESULT.pt
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engine import distributed as du  # noqa: E402
from engine.evaluation.targets import EvalOptions, evaluate_target, extract_features  # noqa: E402
from engine.run import init_memories  # noqa: E402
from model.memory import MemoryClassifier  # noqa: E402
from model.resnet import ReIDNet, build_model  # noqa: E402
from pipeline.loader import LoaderConfig, build_eval_loader  # noqa: E402

TARGET, SOURCE = "market1501", "dukemtmc"
# The evaluations compared: the published protocol, and each test-time option.
CASES = {"plain": EvalOptions(), "rerank": EvalOptions(rerank=True),
         "flip_aqe": EvalOptions(flip=True, aqe=4)}


def case_model() -> ReIDNet:
    """An untrained ResNet-18 with non-trivial BatchNorm statistics (seeded), as train.py
    places it: channels_last, evaluated in eval mode."""
    torch.manual_seed(0)
    model = build_model("resnet18", "none", bn_groups=1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return model.to(memory_format=torch.channels_last)


def case_config(rank: int, world: int) -> LoaderConfig:
    """64x32 images in batches of 40: on 2 ranks the parts are uneven and end in partial batches."""
    return LoaderConfig(height=64, width=32, workers=0, loader="torch", test_batch_size=40, rank=rank,
                        world=world)


def run_case(shards: Path, rank: int, world: int) -> dict:
    """What a rank ends with: the target's features, mAP and CMC of each of CASES, and the
    source's memory; tensors and floats only, so the file loads with weights_only."""
    device = torch.device("cpu")
    model, cfg = case_model(), case_config(rank, world)
    target = build_eval_loader(shards, TARGET, "test", cfg)
    mix = build_eval_loader(shards, SOURCE, "mix", cfg)
    memory = MemoryClassifier(model.num_features, int(mix.labels.max()) + 1)
    init_memories(model, mix, [memory], device, None)
    out = {"features": extract_features(model, target, device, None), "centers": memory.centers}
    for name, options in CASES.items():
        res = evaluate_target(model, target, device, None, options)
        out[f"{name}_mAP"], out[f"{name}_cmc"] = res["mAP"], torch.from_numpy(res["cmc"])
    return out


def main() -> int:
    shards, result = Path(sys.argv[1]), Path(sys.argv[2])
    info = du.init_distributed("cpu")
    out = run_case(shards, info.rank, info.world)
    out["all_centers"] = du.all_gather_rows(out["centers"][None])
    if info.rank == 0:
        torch.save(out, result)
    du.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

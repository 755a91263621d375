"""DALI against the PIL/torch loader on the same images: pixel statistics, and the features a
fixed, seeded model gives them.

Both loaders read the same rows of the same shards. The training batch (iteration 0 of epoch 0
of the three sources) carries the same flips and crop shifts in both (the loaders draw them
with ``pipeline.augment.augment_params``); the evaluation batches are the first ``--images``
rows of each ``--eval`` dataset's query + gallery. For each batch this reports both loaders'
per-channel pixel mean and std, their mean and largest absolute pixel difference (in 1/255),
and the cosine similarity, image by image, of the features of a seeded, randomly initialised
ResNet (eval mode, fp32), centred on the torch batch's mean feature: uncentred, such a model
gives nearly the same direction for any image (cosine ~0.98 between unrelated images), while
centred the cosine of unrelated images (reported beside it) is near 0. The two loaders decode and resample
differently (nvJPEG or libjpeg inside DALI, PIL's bicubic), so they agree to a few 1/255; a
wrong channel order, normalisation or crop shows as a large difference and parted features.

Exit status 1 when a batch's mean difference exceeds ``--max-pixel-diff`` or its smallest cosine
is under ``--min-cosine``. Without DALI the JSON holds the reason under "skipped" (exit 0), so a
machine without DALI says so instead of failing.

    python tools/compare_loaders.py --shards shards --device cuda --json parity.json
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.device import DEVICES, DeviceError, resolve_device
from pipeline.loader import LoaderConfig, build_eval_loader, build_train_loader
from pipeline.transforms import MEAN, STD

LOADERS = ("dali", "torch")


@dataclass(frozen=True)
class Check:
    """What to compare, and the agreement required."""

    shards: Path
    device: torch.device
    sources: list[str]
    eval_sets: list[str]
    arch: str
    height: int
    width: int
    num_ids: int
    images: int
    workers: int
    seed: int
    max_pixel_diff: float
    min_cosine: float


def batches(check: Check, kind: str) -> dict[str, torch.Tensor]:
    """The compared batches as one loader delivers them (normalised, NCHW, float32)."""
    cfg = LoaderConfig(height=check.height, width=check.width, num_ids=check.num_ids, num_instances=4,
                       iters=1, seed=check.seed, workers=check.workers, device=check.device, loader=kind,
                       test_batch_size=check.images)
    out = {f"train {'+'.join(check.sources)}": next(iter(build_train_loader(
        check.shards, check.sources, cfg).epoch(0))).images}
    for name in check.eval_sets:
        out[f"test {name}"] = next(iter(build_eval_loader(check.shards, name, "test", cfg)))[0]
    return {k: v.float() for k, v in out.items()}


def features(check: Check, images: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """L2-normalised features of each batch from the same seeded, randomly initialised model."""
    from model.resnet import build_model

    torch.manual_seed(check.seed)
    model = build_model(check.arch, "none").to(check.device).eval()
    with torch.no_grad():
        return {k: model(x) for k, x in images.items()}


def compare(a: torch.Tensor, b: torch.Tensor, fa: torch.Tensor, fb: torch.Tensor) -> dict:
    """Pixel statistics of both loaders' batch and how far apart the two are."""
    mean, std = (torch.tensor(v, device=a.device).view(1, 3, 1, 1) for v in (MEAN, STD))
    pa, pb = a * std + mean, b * std + mean  # pixel values in [0, 1]
    diff = (pa - pb).abs() * 255
    centre = fb.mean(0)
    ca, cb = (torch.nn.functional.normalize(f - centre, dim=1) for f in (fa, fb))
    cosine = (ca * cb).sum(1)
    unrelated = (ca * cb.roll(1, 0)).sum(1)
    return {"images": len(a),
            "pixel_mean_abs_diff": diff.mean().item(), "pixel_max_abs_diff": diff.max().item(),
            "channel_mean": {k: p.mean((0, 2, 3)).tolist() for k, p in zip(LOADERS, (pa, pb))},
            "channel_std": {k: p.std((0, 2, 3)).tolist() for k, p in zip(LOADERS, (pa, pb))},
            "cosine_min": cosine.min().item(), "cosine_mean": cosine.mean().item(),
            "unrelated_cosine_mean": unrelated.mean().item()}


def run(check: Check) -> dict:
    """Every batch's comparison, and whether all of them agree as required."""
    got = {kind: batches(check, kind) for kind in LOADERS}
    feats = {kind: features(check, got[kind]) for kind in LOADERS}
    rows = {name: compare(got["dali"][name], got["torch"][name], feats["dali"][name], feats["torch"][name])
            for name in got["dali"]}
    failed = [name for name, r in rows.items()
              if r["pixel_mean_abs_diff"] > check.max_pixel_diff or r["cosine_min"] < check.min_cosine]
    return {"device": str(check.device), "arch": check.arch, "size": [check.height, check.width],
            "max_pixel_diff": check.max_pixel_diff, "min_cosine": check.min_cosine,
            "batches": rows, "failed": failed}


def dali_missing() -> str | None:
    """Why DALI cannot be used here, or None."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as err:
        return f"NVIDIA DALI is not importable ({err}): only the torch loader can run"
    return None


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, required=True, help="shards folder (tools/make_shards.py --out)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="where both loaders deliver (cuda: DALI's GPU decoder; auto, the default: cuda when "
                        "present)")
    p.add_argument("--sources", default="market1501,dukemtmc,msmt17v1",
                   help="comma-separated sources of the compared training batch")
    p.add_argument("--eval", default="market1501,cuhk03",
                   help="comma-separated datasets whose first test images are compared (cuhk03: PNG)")
    p.add_argument("-a", "--arch", choices=("resnet50", "resnet18"), default="resnet50",
                   help="backbone of the feature check")
    p.add_argument("--height", type=int, default=256, help="input height")
    p.add_argument("--width", type=int, default=128, help="input width")
    p.add_argument("--num-ids", type=int, default=16,
                   help="identities per source in the training batch (4 images each)")
    p.add_argument("--images", type=int, default=64, help="images per evaluation batch")
    p.add_argument("-j", "--workers", type=int, default=2, help="loader worker processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler, the augmentation and the model")
    p.add_argument("--max-pixel-diff", type=float, default=3.0,
                   help="largest mean absolute pixel difference allowed, in 1/255")
    p.add_argument("--min-cosine", type=float, default=0.99,
                   help="smallest cosine allowed between an image's two feature vectors")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
    except DeviceError as e:
        print(f"compare_loaders.py: error: {e}", file=sys.stderr)
        return 2
    missing = dali_missing()
    if missing:
        result = {"skipped": missing}
    else:
        result = run(Check(args.shards, device, args.sources.split(","),
                           [n for n in args.eval.split(",") if n], args.arch, args.height, args.width,
                           args.num_ids, args.images, args.workers, args.seed, args.max_pixel_diff,
                           args.min_cosine))
        for name, r in result["batches"].items():
            print(f"{name:<40} {r['images']:>4} images  pixels |dali - torch| mean "
                  f"{r['pixel_mean_abs_diff']:.2f} max {r['pixel_max_abs_diff']:.0f} (1/255)  "
                  f"feature cosine min {r['cosine_min']:.4f} "
                  f"mean {r['cosine_mean']:.4f} (unrelated images {r['unrelated_cosine_mean']:.4f})")
    print(json.dumps(result, indent=1) if missing else
          f"{'FAILED: ' + ', '.join(result['failed']) if result['failed'] else 'loaders agree'}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 1 if result.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())

"""Training-loader throughput, side by side: DALI, the torch/PIL fallback, and the published way.

"folder" is how the published code loads (``reference.folder_loader``): a per-image dataset
that opens each JPEG from the raw folders with PIL, the same transforms, a DataLoader collating
the three sources' 64-image batches (here one 192-image batch per iteration, same sampler).
All three run with the same worker count; images/s counts training images delivered (decoded,
augmented, normalised) after a warm-up that absorbs worker start-up.

The default sources are all JPEG. ``--cuhk03`` measures every loader a second time on the
sources of the Market-1501 target (dukemtmc, cuhk03, msmt17v1), as three of the four
leave-one-out settings train: CUHK03's images are PNG in the shards, and DALI decodes PNG on
its CPU threads even in "mixed" mode, so only that figure shows what PNG costs. Each result
names the image formats its sources hold.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from pipeline.loader import LoaderConfig, build_train_loader
from pipeline.shards import IMAGE_EXTS, read_index
from reference import FolderUnavailable, folder_loader


CUHK03_SOURCES = ["dukemtmc", "cuhk03", "msmt17v1"]  # the Market-1501 target's sources


def _measure(batches, warmup: int) -> tuple[float, int]:
    """Images/s over the batches after the first ``warmup`` ones."""
    count, start = 0, None
    for i, batch in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        if i >= warmup:
            images = batch.images if hasattr(batch, "images") else batch[0]
            count += len(images)
    return count / (time.perf_counter() - start), count


def source_formats(shards: Path, sources: list[str]) -> dict[str, dict[str, int]]:
    """Per source, how many of its images each format holds (from the shards' indexes)."""
    out = {}
    for name in sources:
        exts = [ext for idx in sorted((Path(shards) / name).glob("*.idx")) for _, comps in read_index(idx)
                for ext in comps if ext in IMAGE_EXTS.values()]
        out[name] = {ext: exts.count(ext) for ext in sorted(set(exts))}
    return out


def measure_loaders(shards: Path, data_dir: Path | None, sources: list[str], kinds: list[str],
                    cfg: LoaderConfig, warmup: int) -> list[dict]:
    """Images/s of each loader kind ("dali", "torch", "folder") with the same configuration; a
    folder baseline that cannot read a source is a row with the reason under "skipped"."""
    results, formats = [], source_formats(shards, sources)
    for kind in kinds:
        cfg.loader = kind if kind != "folder" else "torch"
        row = {"mode": "data", "loader": kind, "sources": sources, "formats": formats}
        if kind == "folder":
            if data_dir is None:
                raise SystemExit("the folder loader needs --data-dir (the raw JPEG folders)")
            try:
                batches = iter(folder_loader(data_dir, sources, cfg)[0])
            except FolderUnavailable as err:
                results.append({**row, "skipped": str(err)})
                print(f"{kind}: skipped: {err}", file=sys.stderr)
                continue
        else:
            batches = build_train_loader(shards, sources, cfg).epoch(0)
        rate, count = _measure(batches, warmup)
        results.append({**row, "images_per_s": round(rate, 1), "images": count,
                        "workers": cfg.workers, "batch": cfg.batch_size * len(sources)})
        print(f"{kind}: {rate:.1f} images/s", file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, required=True, help="shards folder (tools/make_shards.py --out)")
    p.add_argument("--data-dir", type=Path, help="raw datasets folder, for the folder baseline")
    p.add_argument("--sources", default="market1501,dukemtmc,msmt17v1",
                   help="comma-separated source datasets")
    p.add_argument("--cuhk03", action="store_true",
                   help=f"measure again on {','.join(CUHK03_SOURCES)}, whose CUHK03 images are PNG "
                        "(decoded on DALI's CPU threads even on a GPU)")
    p.add_argument("--loaders", default="dali,torch,folder", help="which of dali,torch,folder to measure")
    p.add_argument("--workers", type=int, default=2, help="worker processes for every loader")
    p.add_argument("--iters", type=int, default=20, help="iterations measured per loader")
    p.add_argument("--warmup", type=int, default=3, help="iterations run first, not measured")
    p.add_argument("--num-ids", type=int, default=16, help="identities per source batch")
    p.add_argument("--num-instances", type=int, default=4, help="images per identity")
    p.add_argument("--device", default="cpu", help="where the batches are delivered (cpu or cuda)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = LoaderConfig(iters=args.warmup + args.iters, workers=args.workers, num_ids=args.num_ids,
                       num_instances=args.num_instances, device=torch.device(args.device))
    results = []
    for sources in [args.sources.split(",")] + [CUHK03_SOURCES] * args.cuhk03:
        results += measure_loaders(args.shards, args.data_dir, sources, args.loaders.split(","), cfg,
                                   args.warmup)
    print(f"{'loader':<8} {'workers':>7} {'batch':>6} {'images/s':>10}  sources (formats)")
    for r in results:
        formats = ", ".join(f"{s} {'+'.join(r['formats'][s])}" for s in r["sources"])
        if "skipped" in r:
            print(f"{r['loader']:<8} skipped: {r['skipped']}")
        else:
            print(f"{r['loader']:<8} {r['workers']:>7} {r['batch']:>6} {r['images_per_s']:>10.1f}  {formats}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ranked lists of a trained checkpoint on a target's test set, as pictures: for each chosen query
the query image, then its top-k gallery images by distance, framed green (same identity: a correct
match) or red (a wrong one), with the distance under each.

    python tools/visualize_ranks.py --checkpoint logs/run/best.pth --shards shards -d market1501 \\
        --out ranks/ --num-queries 20 --topk 10

The ranking is evaluation's (engine.evaluation.metrics, Market-1501 protocol): squared Euclidean distances of
the L2-normalised features, ties broken by gallery order, and the gallery images of the query's
identity taken by the query's own camera are left out (junk images are dropped when the shards
are built; distractors stay in the gallery and count as wrong matches). The queries are the first
--num-queries rows of the query split after a shuffle with --seed, so a run can be repeated.

Writes OUT/query_0000.png, OUT/query_0001.png, ... (in the shuffled order) and OUT/index.html
showing them all with their query keys; each file is written under a temporary name and renamed.

Features of a large target can be extracted once with tools/extract.py and given with --features:

    python tools/extract.py --checkpoint CKPT --shards shards -d market1501 --split query --out feats/q
    python tools/extract.py --checkpoint CKPT --shards shards -d market1501 --split gallery --out feats/g
    python tools/visualize_ranks.py --features feats --shards shards -d market1501 --out ranks/

(FEATURES/query/ and FEATURES/gallery/ each hold features.npy, images.txt, pids.npy, camids.npy;
they must list the shard split's samples in order; --checkpoint is then not needed.)
Errors are one line and exit code 2.
"""
from __future__ import annotations

import argparse
import html
import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from engine.errors import UsageError
from engine.flags import Parser
from engine.evaluation.metrics import pairwise_distance
from pipeline.loader import build_eval_loader
from pipeline.plan import decode_rgb
from pipeline.files import write_atomic
from pipeline.shards import SplitReader
from tools.cli import add_extraction_flags, check_out_folder, open_split, run_tool, tool_features

PROG = "visualize_ranks.py"
SPLITS = ("query", "gallery")
FEATURE_FILES = ("features.npy", "images.txt", "pids.npy", "camids.npy")

# Geometry of one picture (pixels). Tile j (0 = the query, 1.. = ranks 1..k) is a frame FRAME
# wide around a cell CELL_W x IMAGE_H holding the image (resized to IMAGE_H high, or narrower
# when it would not fit, centred); the caption lies under the frame. tile_origin(j) is the
# top-left corner of tile j's frame.
MARGIN = 8
TITLE_H = 18
IMAGE_H = 128
CELL_W = 80
FRAME = 4
CAPTION_H = 30
GAP = 6
QUERY_GAP = 24
TILE_W = CELL_W + 2 * FRAME
TILE_H = IMAGE_H + 2 * FRAME

BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
QUERY_COLOUR = (40, 80, 220)
GREEN = (0, 190, 0)
RED = (230, 0, 0)


def tile_origin(j: int) -> tuple[int, int]:
    """Top-left corner (x, y) of tile j's frame: 0 is the query, j >= 1 the rank-j gallery image."""
    y = MARGIN + TITLE_H
    if j == 0:
        return MARGIN, y
    return MARGIN + TILE_W + QUERY_GAP + (j - 1) * (TILE_W + GAP), y


def canvas_size(num_shown: int) -> tuple[int, int]:
    """(width, height) of a picture with ``num_shown`` gallery tiles."""
    x, _ = tile_origin(num_shown) if num_shown else (MARGIN, 0)
    return x + TILE_W + MARGIN, MARGIN + TITLE_H + TILE_H + CAPTION_H + MARGIN


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path,
                   help="a train.py checkpoint (latest.pth or best.pth) to extract the features with "
                        "(read with weights_only: it cannot run code); not needed with --features")
    p.add_argument("--shards", type=Path, required=True,
                   help="a shards folder (tools/make_shards.py); the images come from it")
    p.add_argument("-d", "--dataset", required=True, help="the target dataset (e.g. market1501)")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder (made if needed) for query_XXXX.png and index.html")
    p.add_argument("--num-queries", type=int, default=20,
                   help="queries to draw (default: 20; all of them when the split is smaller)")
    p.add_argument("--topk", type=int, default=10, help="gallery images per query (default: 10)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the shuffle that picks the queries (default: 0)")
    p.add_argument("--features", type=Path, metavar="DIR",
                   help="features extracted earlier with tools/extract.py --shards: DIR/query/ and "
                        "DIR/gallery/ each holding features.npy, images.txt, pids.npy, camids.npy "
                        "(--split query --out DIR/query, --split gallery --out DIR/gallery)")
    add_extraction_flags(p)
    args = p.parse_args(argv)
    if args.checkpoint is None and args.features is None:
        p.error("give --checkpoint (to extract the features) or --features")
    if args.topk < 1:
        p.error(f"--topk must be at least 1, got {args.topk}")
    if args.num_queries < 1:
        p.error(f"--num-queries must be at least 1, got {args.num_queries}")
    return args


def _progress(enabled: bool, desc: str, total: int):
    if not enabled:
        return None
    from tqdm import tqdm
    return lambda it: tqdm(it, total=total, unit="query", desc=desc, file=sys.stderr)


def open_splits(shards: Path, dataset: str) -> dict[str, SplitReader]:
    return {split: open_split(shards, dataset, split) for split in SPLITS}


def _decoder(reader: SplitReader):
    def load(i):
        try:
            return decode_rgb(reader.read(i))
        except Exception as e:  # noqa: BLE001 - say which sample
            raise UsageError(f"{reader.location(i)}: cannot decode the image ({e})") from None
    return load


def extract_splits(args: argparse.Namespace, readers: dict[str, SplitReader]) -> dict[str, torch.Tensor]:
    """Each split's features from the checkpoint, as tools/extract.py computes them (the same
    loaders, so ``--features`` from it draws the same pictures)."""
    def loaders(cfg):
        for split in readers:
            yield build_eval_loader(args.shards, args.dataset, split, cfg)

    feats = tool_features(args, loaders, progress=not args.no_progress)
    return dict(zip(readers, feats))


def load_features(folder: Path, readers: dict[str, SplitReader]) -> dict[str, torch.Tensor]:
    """FOLDER/query and FOLDER/gallery from tools/extract.py, checked against the shard splits."""
    feats = {}
    for split, reader in readers.items():
        d = folder / split
        missing = [name for name in FEATURE_FILES if not (d / name).is_file()]
        if missing:
            raise UsageError(f"--features {folder}: {d} lacks {', '.join(missing)} (write it with "
                            f"tools/extract.py --shards ... --split {split} --out {d})")
        try:
            f = np.load(d / "features.npy")
            pids, camids = np.load(d / "pids.npy"), np.load(d / "camids.npy")
            keys = (d / "images.txt").read_text().splitlines()
        except (OSError, ValueError) as e:
            raise UsageError(f"--features {folder}: cannot read {d}: {e}") from None
        n = len(reader)
        if f.ndim != 2 or len(f) != n or len(keys) != n:
            raise UsageError(f"--features {folder}: {d} holds {len(keys)} keys and features of shape "
                            f"{list(f.shape)}, the {split} split has {n} images")
        if (keys != list(reader.keys) or not np.array_equal(pids, reader.pids)
                or not np.array_equal(camids, reader.camids)):
            raise UsageError(f"--features {folder}: {d} does not list the {split} split of "
                            f"{reader.dataset_dir} in order (extracted from other shards?)")
        feats[split] = torch.from_numpy(np.ascontiguousarray(f, dtype=np.float32))
    if feats["query"].shape[1] != feats["gallery"].shape[1]:
        raise UsageError(f"--features {folder}: query and gallery features differ in size "
                        f"({feats['query'].shape[1]} vs {feats['gallery'].shape[1]})")
    return feats


def choose_queries(num_query: int, num: int, seed: int) -> np.ndarray:
    """Query rows to draw: the first ``num`` of a permutation seeded with ``seed``."""
    return np.random.default_rng(seed).permutation(num_query)[:num]


def rank_gallery(qf: torch.Tensor, gf: torch.Tensor, q_pid: int, q_cam: int, g_pids: np.ndarray,
                 g_cams: np.ndarray, topk: int) -> tuple[np.ndarray, np.ndarray]:
    """Gallery rows of one query's top-k (protocol exclusion applied) and their distances."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        dist = pairwise_distance(qf[None], gf)[0].cpu().numpy()
    finally:
        torch.set_float32_matmul_precision(precision)
    keep = np.flatnonzero(~((g_pids == q_pid) & (g_cams == q_cam)))
    order = keep[np.argsort(dist[keep], kind="stable")][:topk]
    return order, dist[order]


def _fit(image: Image.Image) -> Image.Image:
    w, h = image.size
    nw, nh = max(1, round(w * IMAGE_H / h)), IMAGE_H
    if nw > CELL_W:
        nw, nh = CELL_W, max(1, round(h * CELL_W / w))
    return image.convert("RGB").resize((nw, nh), Image.BICUBIC)


def _tile(canvas: Image.Image, draw: ImageDraw.ImageDraw, font, j: int, image: Image.Image,
          colour: tuple[int, int, int], lines: list[str]) -> None:
    x, y = tile_origin(j)
    draw.rectangle([x, y, x + TILE_W - 1, y + TILE_H - 1], fill=colour)
    draw.rectangle([x + FRAME, y + FRAME, x + FRAME + CELL_W - 1, y + FRAME + IMAGE_H - 1], fill=BACKGROUND)
    im = _fit(image)
    canvas.paste(im, (x + FRAME + (CELL_W - im.width) // 2, y + FRAME + (IMAGE_H - im.height) // 2))
    for n, line in enumerate(lines):
        draw.text((x, y + TILE_H + 2 + 13 * n), line, fill=TEXT, font=font)


def draw_ranks(query_image: Image.Image, query_label: str, title: str, gallery: list[tuple]) -> bytes:
    """PNG bytes: the query tile, then one tile per (image, correct, distance, label) of ``gallery``."""
    canvas = Image.new("RGB", canvas_size(len(gallery)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    draw.text((MARGIN, MARGIN), title, fill=TEXT, font=font)
    _tile(canvas, draw, font, 0, query_image, QUERY_COLOUR, ["query", query_label])
    for j, (image, correct, distance, label) in enumerate(gallery, start=1):
        _tile(canvas, draw, font, j, image, GREEN if correct else RED, [f"{j}: {distance:.4f}", label])
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def index_html(dataset: str, entries: list[tuple[str, str, int, int]]) -> str:
    """index.html showing every (png name, query key, pid, camid)."""
    rows = "".join(
        f'<div class="q"><p>{html.escape(png)}: query <b>{html.escape(key)}</b> (id {pid}, camera {cam})</p>'
        f'<img src="{html.escape(png)}" alt="{html.escape(key)}"></div>\n'
        for png, key, pid, cam in entries)
    name = html.escape(dataset)
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>Ranked lists: {name}</title>"
            "<style>body{font-family:sans-serif} .q{margin-bottom:1em}</style></head><body>\n"
            f"<h1>Ranked lists: {name}</h1>\n<p>Green frame: same identity (correct); red: wrong. "
            "Gallery images of the query's identity from the query's camera are left out.</p>\n"
            f"{rows}</body></html>\n")


def run(args: argparse.Namespace) -> None:
    check_out_folder(args.out)
    readers = open_splits(args.shards, args.dataset)
    feats = (load_features(args.features, readers) if args.features is not None
             else extract_splits(args, readers))
    query, gallery = readers["query"], readers["gallery"]
    qf, gf = feats["query"], feats["gallery"]
    chosen = choose_queries(len(query), args.num_queries, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    load_q, load_g = _decoder(query), _decoder(gallery)
    rows = [(i, int(q)) for i, q in enumerate(chosen)]
    progress = _progress(not args.no_progress and len(rows) > 1, "draw", len(rows))
    entries = []
    for i, q in (progress(rows) if progress else rows):
        q_pid, q_cam = int(query.pids[q]), int(query.camids[q])
        order, dist = rank_gallery(qf[q], gf, q_pid, q_cam, gallery.pids, gallery.camids, args.topk)
        tiles = [(load_g(int(g)), int(gallery.pids[g]) == q_pid, float(d),
                  f"id {int(gallery.pids[g])} c{int(gallery.camids[g])}") for g, d in zip(order, dist)]
        png = f"query_{i:04d}.png"
        title = f"{args.dataset} query {query.keys[q]} (row {q})"
        png_bytes = draw_ranks(load_q(q), f"id {q_pid} c{q_cam}", title, tiles)
        write_atomic(args.out / png, lambda tmp: tmp.write_bytes(png_bytes))
        entries.append((png, query.keys[q], q_pid, q_cam))
    page = index_html(args.dataset, entries)
    write_atomic(args.out / "index.html", lambda tmp: tmp.write_text(page, encoding="utf-8"))
    print(f"{len(entries)} queries -> {args.out}/query_*.png and {args.out / 'index.html'}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    return run_tool(PROG, lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

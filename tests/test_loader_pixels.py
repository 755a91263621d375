"""Images arrive with their own labels. A shard set whose pixels say who they show (a colour per
identity, written as real JPEG and PNG files by PIL and packed by pipeline/shards.py's writer)
goes through both loaders on 1 and 2 ranks: every training image must show the identity of the
label beside it, DALI's pixels must equal PIL's within 2/255 per pixel (not only on average),
and each rank's rows must be its slice of the 1-rank batch. The published torchvision augmentation
is train_pixels for some of its random parts."""
from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import shards
from pipeline.loader import LoaderConfig, SourceSet, build_eval_loader, build_train_loader
from pipeline.records import DatasetSplits, Record
from pipeline.augment import FLIP_P, PAD, augment_params
from pipeline.transforms import MEAN, STD, normalize, train_pixels, train_transform

try:
    import nvidia.dali  # noqa: F401
    LOADERS = ["dali", "torch"]
except ImportError:
    LOADERS = ["torch"]
SOURCES = ["market1501", "dukemtmc", "msmt17v1"]
TRAIN_PIDS, TEST_PIDS = range(1, 7), range(11, 15)
LEVELS = (30, 90, 150, 210)  # 4 x 4 x 4 colours, 60 apart: far beyond resize, JPEG and ramp errors
SIZES = ((128, 64), (96, 40), (70, 34), (160, 72))  # all resized to 64x32: down-scaling paths
TOLERANCE = 2  # DALI against PIL, per pixel, in 1/255 (measured: at most 1)
CFG = LoaderConfig(height=64, width=32, num_ids=4, num_instances=4, iters=2, workers=1, test_batch_size=48)


def code(source: int, pid: int) -> int:
    """The colour index of an identity: unique over the three sources' train and test people."""
    return 20 * source + (pid - 1 if pid in TRAIN_PIDS else pid - 5)


def colour(c: int) -> np.ndarray:
    return np.array([LEVELS[c // 16], LEVELS[c // 4 % 4], LEVELS[c % 4]], np.float64)


def picture(c: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """The identity's colour with a gentle ramp (so a wrong crop, shift or mirror changes pixels)
    and a dark band at a random height (sharp edges for the resize)."""
    h, w = SIZES[n % len(SIZES)]
    y, x = np.mgrid[:h, :w]
    img = colour(c)[None, None] + (12 * (y / h - 0.5) + 8 * (x / w - 0.5))[..., None]
    band = int(rng.integers(0, h - h // 8))
    img[band:band + h // 8] *= 0.6
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def pixel_shards(tmp_path_factory) -> Path:
    """Three sources of 6 train people (3 images each) and 4 test people (1 query, 3 gallery
    images each); the second source's images alternate PNG and JPEG, the others are JPEG."""
    raw, out = tmp_path_factory.mktemp("pixel_raw"), tmp_path_factory.mktemp("pixel_shards")
    rng = np.random.default_rng(0)
    for k, name in enumerate(SOURCES):
        splits, n = DatasetSplits(name), 0
        for split, pids, per_pid in (("train", TRAIN_PIDS, 3), ("query", TEST_PIDS, 1),
                                     ("gallery", TEST_PIDS, 3)):
            for pid in pids:
                for i in range(per_pid):
                    ext = "png" if k == 1 and n % 2 else "jpg"
                    path = raw / name / f"{split}_{pid}_{i}.{ext}"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(picture(code(k, pid), n, rng)).save(path, quality=95)
                    splits.split(split).append(Record(f"{split}_{pid}_{i}", pid, i % 2, name, split,
                                                      path.name, str(path)))
                    n += 1
        shards.write_dataset(splits, out, progress=False)
    return out


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Normalised NCHW -> pixel values in [0, 255], float."""
    return (images.float() * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)) * 255


def shown_codes(pixels: torch.Tensor) -> np.ndarray:
    """Identity shown by each image: the median colour of the centre that no crop shift (at
    most PAD pixels) ever replaces by padding, snapped to the nearest palette colour."""
    centre = pixels[:, :, PAD:-PAD, PAD:-PAD].flatten(2).median(2).values.double()
    palette = torch.from_numpy(np.stack([colour(c) for c in range(64)]))
    dist = torch.cdist(centre, palette)
    assert dist.min(1).values.max() < 20, "an image shows no identity's colour"
    return dist.argmin(1).numpy()


@pytest.fixture(scope="module")
def label_codes(pixel_shards) -> list[dict[int, int]]:
    """Per source, the identity each training label stands for, found through the source's own pids."""
    sets = [SourceSet(pixel_shards / name) for name in SOURCES]
    return [{int(lab): code(k, int(pid)) for lab, pid in zip(s.labels, s.pids)} for k, s in enumerate(sets)]


def expected_codes(label_codes: list[dict[int, int]], labels: np.ndarray, sizes: list[int]) -> np.ndarray:
    parts = np.split(labels, np.cumsum(sizes)[:-1])
    return np.asarray([codes[int(lab)] for codes, part in zip(label_codes, parts) for lab in part])


@pytest.fixture(scope="module")
def batches(pixel_shards) -> dict[tuple[str, int, int], list[tuple[torch.Tensor, np.ndarray, list[int]]]]:
    """(loader, world, rank) -> the (pixels, labels, sizes) of every iteration of epochs 0 and 1."""
    out = {}
    for loader in LOADERS:
        for world in (1, 2):
            for rank in range(world):
                cfg = dataclasses.replace(CFG, loader=loader, rank=rank, world=world)
                train = build_train_loader(pixel_shards, SOURCES, cfg)
                out[loader, world, rank] = [(to_pixels(b.images), b.labels.numpy(), b.sizes)
                                            for epoch in (0, 1) for b in train.epoch(epoch)]
                del train  # its worker processes end here
    return out


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("loader", LOADERS)
def test_every_training_image_shows_its_label(label_codes, batches, loader, world):
    for rank in range(world):
        got = batches[loader, world, rank]
        assert len(got) == 2 * CFG.iters
        for pixels, labels, sizes in got:
            assert sizes == [CFG.batch_size // world] * 3
            np.testing.assert_array_equal(shown_codes(pixels), expected_codes(label_codes, labels, sizes))


@pytest.mark.skipif("dali" not in LOADERS, reason="needs DALI")
@pytest.mark.parametrize("world", [1, 2])
def test_dali_and_pil_training_pixels_agree_per_pixel(batches, world):
    """Same rows, same flips and crops, same pixels within TOLERANCE: decoder and resize
    differences only."""
    for rank in range(world):
        for (dali, dali_labels, _), (pil, pil_labels, _) in zip(batches["dali", world, rank],
                                                                batches["torch", world, rank], strict=True):
            np.testing.assert_array_equal(dali_labels, pil_labels)
            diff = (dali - pil).abs()
            differ = int((diff > TOLERANCE).sum())
            assert diff.max() <= TOLERANCE + 1e-3, f"rank {rank}: {differ} pixels differ"


@pytest.mark.parametrize("loader", LOADERS)
def test_each_rank_holds_its_slice_of_the_one_rank_batch(batches, loader):
    """Per source, rank 0's rows then rank 1's are the 1-rank batch's rows, pixel for pixel."""
    for (whole, whole_labels, sizes), *parts in zip(batches[loader, 1, 0], batches[loader, 2, 0],
                                                    batches[loader, 2, 1], strict=True):
        per_rank = [(p.split(s), np.split(lab, np.cumsum(s)[:-1])) for p, lab, s in parts]
        whole_parts = zip(whole.split(sizes), np.split(whole_labels, np.cumsum(sizes)[:-1]))
        for k, (pixels, labels) in enumerate(whole_parts):
            torch.testing.assert_close(torch.cat([p[k] for p, _ in per_rank]), pixels, rtol=0, atol=1e-3)
            np.testing.assert_array_equal(np.concatenate([lab[k] for _, lab in per_rank]), labels)


def test_evaluation_images_show_their_pids_and_agree_per_pixel(pixel_shards):
    """The test transform: the rows, in order, show their own pid, and DALI's pixels equal PIL's
    within TOLERANCE (how ranks split evaluation rows: tests/test_loaders.py, tests/test_evaluation.py)."""
    got = {}
    for loader in LOADERS:
        ev = build_eval_loader(pixel_shards, SOURCES[0], "test", dataclasses.replace(CFG, loader=loader))
        images, index = zip(*ev)
        np.testing.assert_array_equal(torch.cat(index).numpy(), np.arange(len(ev)))
        got[loader] = to_pixels(torch.cat(images))
        np.testing.assert_array_equal(shown_codes(got[loader]), [code(0, int(p)) for p in ev.pids])
    if len(got) == 2:
        assert (got["dali"] - got["torch"]).abs().max() <= TOLERANCE + 1e-3


def test_train_transform_is_train_pixels_for_some_random_parts():
    """The published composition (flip, then pad and a random crop, torchvision's own draws)
    gives exactly train_pixels' output (resize, pad, crop at a shift, then mirror) for one of
    its 2 x 21 x 21 random parts, and over many draws both cover the same parts at the same
    rates: a fair flip and every shift in [-PAD, PAD]."""
    height, width = 40, 20
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (57, 23, 3), dtype=np.uint8)).save(buf, "PNG")
    image = Image.open(buf).convert("RGB")

    def key(chw: torch.Tensor) -> bytes:
        return chw.contiguous().numpy().tobytes()

    parts = [(m, dy, dx) for m in (0, 1) for dy in range(-PAD, PAD + 1) for dx in range(-PAD, PAD + 1)]
    outputs = {}
    for m, dy, dx in parts:
        pixels = torch.from_numpy(train_pixels(image, m, dy, dx, height, width))
        outputs[key(normalize(pixels).permute(2, 0, 1))] = (m, dy, dx)
    assert len(outputs) == len(parts)  # every random part gives a different image
    transform = train_transform(height, width, pad=PAD)
    found = []
    for seed in range(300):
        torch.manual_seed(seed)
        found.append(outputs[key(transform(image))])  # KeyError: an output train_pixels never gives
    mirror, dy, dx = np.asarray(found).T
    mine_mirror, mine_shift = augment_params(seed=0, epoch=0, it=0, n=300, pad=PAD)
    for flips in (mirror, mine_mirror):
        assert abs(flips.mean() - FLIP_P) < 0.1
    for shifts in (dy, dx, mine_shift[:, 0], mine_shift[:, 1]):
        assert sorted(set(shifts.tolist())) == list(range(-PAD, PAD + 1))

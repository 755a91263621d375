"""Both loaders on real shards and real JPEGs and PNGs: DALI in CPU mode, the torch/PIL fallback."""
from __future__ import annotations

import dataclasses
import io
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import shards, transforms
from pipeline.loader import (LoaderConfig, SourceSet, TrainPlan, build_eval_loader, build_train_loader,
                             select_loader)
from pipeline.sampler import identity_batches, rank_slice
from pipeline.augment import PAD, augment_params
from pipeline.transforms import MEAN, STD, normalize, train_pixels

try:
    import nvidia.dali  # noqa: F401
    LOADERS = ["dali", "torch"]
except ImportError:
    LOADERS = ["torch"]
SOURCES = ["market1501", "dukemtmc", "msmt17v1"]
_MEAN, _STD = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Transforms in this process run on one thread, as in loader workers: on two busy cores a
    second OpenMP thread makes each small tensor op wait for a core (ToTensor 0.1 ms -> 17 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(loader: str, **kw) -> LoaderConfig:
    base = dict(num_ids=4, num_instances=4, iters=2, workers=1, loader=loader, test_batch_size=48)
    return LoaderConfig(**{**base, **kw})


def _pixels(images: torch.Tensor) -> torch.Tensor:
    """Normalised NCHW -> pixel values in [0, 1]."""
    return images.float() * _STD + _MEAN


def _expected_labels(shards_dir, cfg: LoaderConfig, epoch: int, it: int) -> np.ndarray:
    out = []
    for k, name in enumerate(SOURCES):
        s = SourceSet(shards_dir / name)
        b = identity_batches(s.labels, s.camids, num_ids=cfg.num_ids, num_instances=cfg.num_instances,
                             num_batches=cfg.iters, seed=cfg.seed, epoch=epoch, source=k)[it]
        out.append(s.labels[rank_slice(b, cfg.rank, cfg.world)])
    return np.concatenate(out)


def _expected_batch_labels(shards_dir, cfg: LoaderConfig, epoch: int, it: int) -> list[np.ndarray]:
    """Per source, the labels of the GLOBAL batch (all ranks' rows) in sampler order."""
    out = []
    for k, name in enumerate(SOURCES):
        s = SourceSet(shards_dir / name)
        b = identity_batches(s.labels, s.camids, num_ids=cfg.num_ids, num_instances=cfg.num_instances,
                             num_batches=cfg.iters, seed=cfg.seed, epoch=epoch, source=k)[it]
        out.append(s.labels[b])
    return out


@pytest.mark.parametrize("loader,dtype,rank,world", [
    (LOADERS[0], torch.float16, 0, 1), ("torch", torch.bfloat16, 1, 2)])
def test_train_epochs(synthetic_shards, loader, dtype, rank, world):
    cfg = _cfg(loader, dtype=dtype, rank=rank, world=world)
    train = build_train_loader(synthetic_shards, SOURCES, cfg)
    assert train.name == loader
    assert train.num_classes == [SourceSet(synthetic_shards / s).num_classes for s in SOURCES]
    per_rank = cfg.batch_size // world
    for epoch in (0, 1):
        batches = list(train.epoch(epoch))
        assert len(batches) == cfg.iters
        for it, b in enumerate(batches):
            assert b.images.shape == (3 * per_rank, 3, cfg.height, cfg.width) and b.images.dtype == dtype
            assert b.images.is_contiguous(memory_format=torch.channels_last)
            assert b.sizes == [per_rank] * 3 and b.labels.dtype == torch.int64
            expected = _expected_labels(synthetic_shards, cfg, epoch, it)
            np.testing.assert_array_equal(b.labels.numpy(), expected)
            want = _expected_batch_labels(synthetic_shards, cfg, epoch, it)
            assert len(b.batch_labels) == 3
            assert all(np.array_equal(got, y) for got, y in zip(b.batch_labels, want))
            pixels = _pixels(b.images)
            assert -0.01 <= pixels.min() and pixels.max() <= 1.01 and pixels.std() > 0.05
    assert train.replaced == 0


def test_eval_dali_matches_pil(synthetic_shards):
    """Test transform: DALI (CPU) and PIL agree within 2/255 per pixel; order, partial batch, ranks."""
    got = {}
    for loader in LOADERS:
        ev = build_eval_loader(synthetic_shards, "cuhk03", "test", _cfg(loader, workers=1))
        images, index = zip(*ev)
        assert [len(i) for i in index[:-1]] == [48] * (len(index) - 1) and 0 < len(index[-1]) <= 48
        np.testing.assert_array_equal(torch.cat(index).numpy(), np.arange(len(ev)))
        assert ev.is_query.sum() > 0 and not ev.is_query[ev.is_query.sum():].any()
        assert len(ev.pids) == len(ev.camids) == len(ev)
        got[loader] = _pixels(torch.cat(images))
        assert got[loader].is_contiguous(memory_format=torch.channels_last)
    if len(got) == 2:
        assert (got["dali"] - got["torch"]).abs().mean() < 2 / 255
    # Each rank gets its contiguous part; together they cover every row once.
    n = len(ev)
    parts = [torch.cat([i for _, i in build_eval_loader(synthetic_shards, "cuhk03", "mix",
                                                        _cfg("torch", workers=0, rank=r, world=3))])
             for r in range(3)]
    mix = SourceSet(synthetic_shards / "cuhk03")
    np.testing.assert_array_equal(torch.cat(parts).numpy(), np.arange(len(mix)))
    assert n == len(got["torch"])


def _offset_image() -> bytes:
    """256x128 image whose pixels give their own coordinates: R = 2x, G = y, B = 200 (0 = padding)."""
    y, x = np.mgrid[:256, :128]
    rgb = np.stack([2 * x, y, np.full_like(x, 200)], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=100, subsampling=0)
    return buf.getvalue()


def _dali_train_images(data: bytes, mirror: np.ndarray, shift: np.ndarray) -> torch.Tensor:
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    from pipeline import dali

    @pipeline_def
    def graph():
        return dali._images(fn.external_source(name="jpegs", dtype=types.UINT8), LoaderConfig(),
                            shift=fn.external_source(name="shift", dtype=types.INT32),
                            mirror=fn.external_source(name="mirror", dtype=types.INT32))

    n = len(mirror)
    pipe = graph(batch_size=n, num_threads=1, device_id=None, seed=7)
    pipe.build()
    pipe.feed_input("jpegs", [np.frombuffer(data, np.uint8)] * n)
    pipe.feed_input("shift", list(shift))
    pipe.feed_input("mirror", list(mirror))
    return torch.from_numpy(pipe.run()[0].as_array()).permute(0, 3, 1, 2)


def _torch_train_images(data: bytes, mirror: np.ndarray, shift: np.ndarray) -> torch.Tensor:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    pixels = np.stack([train_pixels(image, m, dy, dx) for m, (dy, dx) in zip(mirror, shift)])
    return normalize(torch.from_numpy(pixels)).permute(0, 3, 1, 2)


def test_normalize_is_torchvisions_arithmetic():
    """The torch loader's uint8 pixels, normalised after the copy, equal the published
    to_tensor + Normalize composition bit for bit."""
    image = Image.open(io.BytesIO(_offset_image())).resize((50, 90))
    want = transforms.test_transform(256, 128)(image)
    got = normalize(torch.from_numpy(transforms.test_pixels(image))).permute(2, 0, 1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("loader", LOADERS)
def test_train_augmentation_statistics(loader):
    n = 256
    mirror, shift = augment_params(seed=7, epoch=0, it=0, n=n)
    make = _dali_train_images if loader == "dali" else _torch_train_images
    px = _pixels(make(_offset_image(), mirror, shift)) * 255
    r, g, b = px[:, 0], px[:, 1], px[:, 2]
    rows, cols = torch.arange(256.0).view(256, 1), torch.arange(128.0).view(1, 128)
    centre = (slice(None), slice(100, 156), slice(40, 88))  # never padding: shifts are at most PAD
    flipped = r[:, 128, 88] < r[:, 128, 40]
    assert 0.4 < flipped.float().mean() < 0.6
    np.testing.assert_array_equal(flipped.numpy(), mirror.astype(bool))
    dy = (g - rows)[centre].flatten(1).median(1).values.round()
    x_seen = torch.where(flipped.view(-1, 1, 1), 127 - cols, cols)
    dx = (r / 2 - x_seen)[centre].flatten(1).median(1).values.round()
    for d in (dy, dx):
        assert d.abs().max() <= PAD and d.min() == -PAD and d.max() == PAD
    # The crop starts where the drawn shift says.
    np.testing.assert_array_equal(dy.numpy(), shift[:, 0])
    np.testing.assert_array_equal(dx.numpy(), shift[:, 1])
    # The rows shifted in from outside the image are zero padding, as many as the shift says.
    pad_rows = (b.mean(2) < 50).sum(1)
    np.testing.assert_array_equal(pad_rows.numpy(), dy.abs().numpy())


def test_augmentation_is_fixed_by_seed_epoch_iteration():
    a = augment_params(1, 2, 3, 64)
    assert all(np.array_equal(x, y) for x, y in zip(a, augment_params(1, 2, 3, 64)))
    others = (augment_params(1, 2, 4, 64), augment_params(1, 3, 3, 64), augment_params(2, 2, 3, 64))
    for other in others:
        assert not np.array_equal(a[1], other[1])


def test_each_image_gets_the_same_augmentation_on_any_number_of_ranks(synthetic_shards):
    """Rank r's rows of an iteration are its slice of every source's global batch, and their
    flips and crops are those the same images get on one rank."""
    def plans(world):
        cfg = LoaderConfig(height=64, width=32, num_ids=4, num_instances=4, iters=2, seed=3, world=world)
        sets = [SourceSet(synthetic_shards / s) for s in ("market1501", "dukemtmc")]
        return [TrainPlan(sets, dataclasses.replace(cfg, rank=r)) for r in range(world)]

    whole = plans(1)[0]
    for world in (2, 4):
        split = plans(world)
        for epoch, it in ((0, 0), (1, 1)):
            mirror, shift = whole.augmentation(epoch, it)
            parts = [p.augmentation(epoch, it) for p in split]
            per_source = [np.split(x, 2) for x in (mirror, shift)]
            for k, (m, s) in enumerate(parts):
                want_m = np.concatenate([np.split(src, world)[k] for src in per_source[0]])
                want_s = np.concatenate([np.split(src, world)[k] for src in per_source[1]])
                np.testing.assert_array_equal(m, want_m)
                np.testing.assert_array_equal(s, want_s)
            labels = [p.batch_labels(epoch, it) for p in split]
            assert all(all(np.array_equal(a, b) for a, b in zip(lab, whole.batch_labels(epoch, it)))
                       for lab in labels)


def _corrupt(src, dst, row_key: str, how: str):
    """Copy the dataset's shards and overwrite one sample's JPEG bytes in place (same length)."""
    shutil.copytree(src, dst)
    for idx in sorted(dst.glob("*.idx")):
        for key, comps in shards.read_index(idx):
            if key == row_key:
                offset, size = comps["jpg"][:2]
                tar = idx.with_suffix(".tar")
                blob = bytearray(tar.read_bytes())
                start = offset if how == "header" else offset + size // 2
                blob[start:offset + size] = (b"\0" if how == "header" else b"\xff") * (offset + size - start)
                tar.write_bytes(bytes(blob))
                return tar
    raise AssertionError(f"no key {row_key}")


# "header": not an image at all (DALI: caught by the workers' header check); "tail": a damaged
# entropy stream that only a decoder notices (DALI: a decoder error mapped back to the sample).
# For PIL both are the same decode failure, so only "tail" runs there.
@pytest.mark.parametrize("loader,how", [(k, "tail") for k in LOADERS] + [(k, "header") for k in LOADERS[:-1]])
def test_corrupt_sample(synthetic_shards, tmp_path, loader, how):
    cfg = _cfg(loader, iters=1)
    s = SourceSet(synthetic_shards / SOURCES[0])
    j = identity_batches(s.labels, s.camids, num_ids=4, num_batches=1, seed=0, epoch=0)[0][0]
    key = s.location(j).rsplit(":", 1)[1]
    tar = _corrupt(synthetic_shards / SOURCES[0], tmp_path / SOURCES[0], key, how)
    for name in SOURCES[1:]:
        (tmp_path / name).symlink_to(synthetic_shards / name)
    with pytest.raises(shards.ShardError, match=f"{tar}:{key}"):
        list(build_train_loader(tmp_path, SOURCES, cfg).epoch(0))
    train = build_train_loader(tmp_path, SOURCES, _cfg(loader, iters=1, replace_bad=True))
    (batch,) = train.epoch(0)
    assert batch.replaced >= 1 and train.replaced == batch.replaced
    np.testing.assert_array_equal(batch.labels.numpy(), _expected_labels(synthetic_shards, cfg, 0, 0))


def test_find_bad_looks_past_the_end_of_an_epoch(synthetic_shards, tmp_path):
    """A DALI error near an epoch's end is mapped back to rows of the prefetched iterations, which
    belong to the next epoch: iterations 1, 2, 3 of epoch 0 with 2 per epoch are (0, 1), (1, 0)
    and (1, 1). A damaged row drawn at (1, 1) only must be found there."""
    cfg = _cfg("torch", iters=2)
    plan = TrainPlan([SourceSet(synthetic_shards / name) for name in SOURCES], cfg)
    elsewhere = {int(j) for e, it in ((0, 0), (0, 1), (1, 0), (2, 0), (2, 1)) for j in plan.indices(e)[0][it]}
    j = next(int(j) for j in plan.indices(1)[0][1] if int(j) not in elsewhere)
    key = plan.sets[0].location(j).rsplit(":", 1)[1]
    _corrupt(synthetic_shards / SOURCES[0], tmp_path / SOURCES[0], key, "header")
    damaged = TrainPlan([SourceSet(tmp_path / SOURCES[0])] + plan.sets[1:], cfg)
    assert damaged.find_bad(0, range(1, 4)) == [(0, j)]


def test_missing_shard_and_bad_choice(synthetic_shards, tmp_path, caplog):
    shutil.copytree(synthetic_shards / "market1501", tmp_path / "market1501")
    missing = sorted((tmp_path / "market1501").glob("query-*.tar"))[0]
    missing.unlink()
    with pytest.raises(shards.ShardError, match=missing.name):
        build_eval_loader(tmp_path, "market1501", "test", _cfg("torch"))
    with pytest.raises(ValueError, match="expected one of auto, dali, torch"):
        select_loader("pil")
    with caplog.at_level(logging.INFO, logger="pipeline.loader"):
        assert select_loader("auto") == LOADERS[0]
    assert "data loader" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or "dali" not in LOADERS, reason="needs CUDA and DALI")
def test_dali_on_gpu(synthetic_shards):
    """GPU decode ("mixed") and resize; batches land on the GPU in bf16, channels_last."""
    cfg = _cfg("dali", device=torch.device("cuda"), dtype=torch.bfloat16)
    (b, _) = build_train_loader(synthetic_shards, SOURCES, cfg).epoch(0)
    assert b.images.is_cuda and b.images.dtype == torch.bfloat16 and b.labels.is_cuda
    assert b.images.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(b.labels.cpu().numpy(), _expected_labels(synthetic_shards, cfg, 0, 0))
    evals = [build_eval_loader(synthetic_shards, "cuhk03", "test", c) for c in (cfg, _cfg("torch"))]
    gpu, cpu = (torch.cat([_pixels(x.cpu()) for x, _ in ev]) for ev in evals)
    assert (gpu - cpu).abs().mean() < 3 / 255  # bf16 rounding on top of the decoder differences


def _dali_decode(encoded: list[bytes]) -> list[np.ndarray]:
    """The DALI loaders' own decode step (CPU) on each of ``encoded``: HWC uint8 RGB."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    from pipeline import dali

    @pipeline_def
    def graph():
        return dali._decode(fn.external_source(name="encoded", dtype=types.UINT8), LoaderConfig())

    pipe = graph(batch_size=len(encoded), num_threads=1, device_id=None)
    pipe.build()
    pipe.feed_input("encoded", [np.frombuffer(b, np.uint8) for b in encoded])
    (images,) = pipe.run()
    return [np.array(images[i]) for i in range(len(encoded))]


def test_cuhk03_png_members_decode_to_the_arrays(synthetic_data, synthetic_shards):
    """CUHK03 arrays are stored losslessly: both loaders' decode steps (PIL for the torch loader,
    DALI on the CPU) give back the .mat's arrays bit for bit."""
    import h5py

    from pipeline.datasets import parse
    from pipeline.loader import decode_rgb

    records = parse("cuhk03", synthetic_data).query
    reader = shards.SplitReader(synthetic_shards / "cuhk03", "query")
    assert reader.keys == [r.key for r in records]
    with h5py.File(records[0].path, "r") as f:
        arrays = [f[r.h5_ref][()].T for r in records]
    encoded = [reader.read(i) for i in range(len(reader))]
    assert all(Image.open(io.BytesIO(b)).format == "PNG" for b in encoded)
    decoders = [lambda bs: [np.asarray(decode_rgb(b)) for b in bs]] + [_dali_decode] * ("dali" in LOADERS)
    for decode in decoders:
        for got, array in zip(decode(encoded), arrays, strict=True):
            np.testing.assert_array_equal(got, array)


@pytest.fixture(scope="module")
def mixed_shards(synthetic_data, tmp_path_factory):
    """CUHK03 shards built from CUHK03-NP folders whose files alternate PNG and JPEG (quality 95),
    so its tars hold both members."""
    from pipeline.datasets import image_bytes, parse
    from tools import make_shards

    data, out = tmp_path_factory.mktemp("mixed_data"), tmp_path_factory.mktemp("mixed_shards")
    parsed = parse("cuhk03", synthetic_data)
    folders = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
    for split, sub in folders.items():
        folder = data / "cuhk03" / "cuhk03-np" / "detected" / sub
        folder.mkdir(parents=True)
        for i, r in enumerate(parsed.split(split)):
            name = f"{r.pid:04d}_c{r.camid + 1}_{i:04d}"
            if i % 2:
                Image.open(io.BytesIO(image_bytes(r))).save(folder / f"{name}.jpg", quality=95)
            else:
                (folder / f"{name}.png").write_bytes(image_bytes(r))
    assert make_shards.main(["--data-dir", str(data), "--out", str(out), "--datasets", "cuhk03"]) == 0
    return out


def _format(data: bytes) -> str:
    return Image.open(io.BytesIO(data)).format


@pytest.mark.parametrize("loader", LOADERS)
def test_mixed_jpeg_and_png_shard(mixed_shards, loader):
    """A shard holding .jpg and .png members reads in both loaders: training batches of the
    sampled rows, and evaluation pixels that match the PIL test transform on either format."""
    from pipeline.loader import decode_rgb

    shards_dir = mixed_shards
    for idx in sorted((shards_dir / "cuhk03").glob("*.idx")):  # each member named by its content
        tar = idx.with_suffix(".tar").read_bytes()
        for key, comps in shards.read_index(idx):
            offset, size, name = shards.image_member(comps, key)
            assert name == f"{key}.{shards.IMAGE_EXTS[_format(tar[offset:offset + size])]}"
    cfg = _cfg(loader, workers=1, height=64, width=32)
    train = build_train_loader(shards_dir, ["cuhk03"], cfg)
    src = SourceSet(shards_dir / "cuhk03")
    for it, batch in enumerate(train.epoch(0)):
        rows = identity_batches(src.labels, src.camids, num_ids=cfg.num_ids, num_instances=cfg.num_instances,
                                num_batches=cfg.iters, seed=cfg.seed, epoch=0)[it]
        np.testing.assert_array_equal(batch.labels.numpy(), src.labels[rows])
        assert _pixels(batch.images).std() > 0.05
    ev = build_eval_loader(shards_dir, "cuhk03", "test", cfg)
    got = _pixels(torch.cat([images for images, _ in ev]))
    want = _pixels(normalize(torch.from_numpy(np.stack(
        [transforms.test_pixels(decode_rgb(ev.rows.rows.read(j)), cfg.height, cfg.width)
         for j in range(len(ev))]))).permute(0, 3, 1, 2))
    is_png = np.asarray([_format(ev.rows.rows.read(j)) == "PNG" for j in range(len(ev))])
    for rows in (is_png, ~is_png):
        assert rows.any() and (got[rows] - want[rows]).abs().mean() < 2 / 255

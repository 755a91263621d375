"""Both loaders on real shards and real JPEGs: DALI in CPU mode, the torch/PIL fallback."""
from __future__ import annotations

import io
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import shards, transforms
from pipeline.loader import (LoaderConfig, SourceSet, build_eval_loader, build_train_loader, round_sizes,
                             select_loader)
from pipeline.sampler import identity_batches, rank_slice
from pipeline.transforms import MEAN, PAD, STD, augment_params, normalize, train_pixels

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


def _expected_round_sizes(shards_dir, cfg: LoaderConfig, epoch: int, it: int) -> list[list[int]]:
    """Per source, how many labels occur more than r times in the GLOBAL batch (all ranks' rows)."""
    out = []
    for k, name in enumerate(SOURCES):
        s = SourceSet(shards_dir / name)
        b = identity_batches(s.labels, s.camids, num_ids=cfg.num_ids, num_instances=cfg.num_instances,
                             num_batches=cfg.iters, seed=cfg.seed, epoch=epoch, source=k)[it]
        counts = np.bincount(s.labels[b])
        out.append([int((counts > r).sum()) for r in range(counts.max())])
    return out


def test_round_sizes_count_labels_by_repeats():
    assert round_sizes(np.array([7, 3, 7, 7, 1, 3])) == [3, 2, 1]
    assert round_sizes(np.arange(5)) == [5]


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
            assert b.round_sizes == _expected_round_sizes(synthetic_shards, cfg, epoch, it)
            pixels = _pixels(b.images)
            assert -0.01 <= pixels.min() and pixels.max() <= 1.01 and pixels.std() > 0.05
            parts = b.per_source()
            assert [len(x) for x, _ in parts] == b.sizes
            assert all(x.data_ptr() == b.images[k * per_rank:].data_ptr() for k, (x, _) in enumerate(parts))
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
    mirror, shift = augment_params(seed=7, epoch=0, it=0, rank=0, n=n)
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


def test_augmentation_is_fixed_by_seed_epoch_iteration_rank():
    a = augment_params(1, 2, 3, 0, 64)
    assert all(np.array_equal(x, y) for x, y in zip(a, augment_params(1, 2, 3, 0, 64)))
    others = (augment_params(1, 2, 4, 0, 64), augment_params(1, 3, 3, 0, 64), augment_params(1, 2, 3, 1, 64))
    for other in others:
        assert not np.array_equal(a[1], other[1])


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

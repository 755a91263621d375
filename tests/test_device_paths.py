"""Parts of the GPU paths that a CPU can check, with real parts (DALI's CPU mode, real shards):
the normalisation constants are built once per device, a DALI decoder error that PIL does not
reproduce names its image, and the benchmark refuses more processes than GPUs."""
from __future__ import annotations

import io
import shutil
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline import shards
from pipeline.loader import LoaderConfig, build_eval_loader, build_train_loader
from pipeline.transforms import MEAN, STD, normalize
from tools.benchmark import check_process_counts

SOURCES = ["market1501", "dukemtmc", "msmt17v1"]


class _Created(TorchDispatchMode):
    """Records the operations that bring a tensor in from host data (``torch.tensor(...)`` runs
    ``lift_fresh``; on CUDA that is followed by a synchronous host-to-device copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "lift_fresh" in str(func):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_normalize_builds_its_constants_once_per_device():
    pixels = torch.randint(0, 256, (2, 8, 4, 3), dtype=torch.uint8)
    first = normalize(pixels)
    with _Created() as created:
        again = normalize(pixels)
    assert created.ops == []
    assert torch.equal(first, again)


def _png_with_a_bad_checksum() -> bytes:
    """A PNG whose image data chunk (IDAT) carries a wrong CRC: PIL does not check it and
    decodes the image, libpng (DALI's PNG decoder) refuses it. (A PNG that DALI's own parser
    refuses, e.g. one whose end chunk is damaged, can crash DALI 2.4's pipeline outright.)"""
    buf = io.BytesIO()
    Image.new("RGB", (8, 16), (200, 30, 40)).save(buf, "PNG")
    png = buf.getvalue()
    idat = png.find(b"IDAT")
    (length,) = struct.unpack(">I", png[idat - 4:idat])
    crc = idat + 4 + length
    return png[:crc] + bytes(4) + png[crc + 4:]


def _replace_image(dataset_dir, location: str, data: bytes) -> None:
    """Overwrite one sample's image bytes in its tar, zero-padded to the same length."""
    tar, key = location.rsplit(":", 1)
    idx = tar[:-len(".tar")] + ".idx"
    comps = dict(shards.read_index(idx))[key]
    offset, size, _ = shards.image_member(comps, location)
    assert len(data) <= size
    with open(tar, "r+b") as f:
        f.seek(offset)
        f.write(data + bytes(size - len(data)))


def test_an_image_only_dali_refuses_is_named_or_replaced(synthetic_shards, tmp_path):
    pytest.importorskip("nvidia.dali")
    for name in SOURCES:
        shutil.copytree(synthetic_shards / name, tmp_path / name)
    cfg = LoaderConfig(num_ids=4, iters=1, workers=1, loader="dali")
    plan = build_train_loader(tmp_path, SOURCES, cfg).plan
    location = plan.sets[0].location(int(plan.indices(0)[0][0][0]))  # in the first batch
    _replace_image(tmp_path / SOURCES[0], location, _png_with_a_bad_checksum())
    with pytest.raises(shards.ShardError, match=f"{location}: DALI's decoder cannot decode the image "
                                                "although PIL can"):
        list(build_train_loader(tmp_path, SOURCES, cfg).epoch(0))
    cfg.replace_bad = True
    loader = build_train_loader(tmp_path, SOURCES, cfg)
    (batch,) = loader.epoch(0)
    assert batch.replaced >= 1 and len(loader.plan.bad) == 1
    assert np.isfinite(batch.images.numpy()).all()


def test_dali_hands_over_the_training_dtype(synthetic_shards):
    """DALI's own output (before pipeline.batches.to_device) is fp16 for fp16 runs and fp32 for
    fp32 ones; bf16 is output directly once DALI has it, until then fp32 (not fp16: the values
    would round differently)."""
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import types

    from pipeline import dali
    from pipeline.dali_sources import EvalSource

    for dtype in (torch.float16, torch.float32):
        cfg = LoaderConfig(height=64, width=32, workers=1, loader="dali", dtype=dtype, test_batch_size=8)
        rows = build_eval_loader(synthetic_shards, "cuhk03", "test", cfg).rows
        pipe = dali._pipeline(dali._eval_graph, EvalSource(rows), cfg, rows.batch, 0)
        (images,) = pipe.run()
        assert dali._to_torch(images, cfg.device).dtype == dtype
        del pipe  # its workers end
    bf16 = dali._dali_dtype(LoaderConfig(dtype=torch.bfloat16))
    if hasattr(types.DALIDataType, "BFLOAT16"):
        assert bf16 == types.DALIDataType.BFLOAT16
    else:
        assert bf16 == types.FLOAT
        pixels = (torch.arange(256.0).view(1, -1) - 255 * torch.tensor(MEAN).view(-1, 1)) / (
            255 * torch.tensor(STD).view(-1, 1))
        assert int((pixels.bfloat16() != pixels.half().bfloat16()).sum()) == 49  # of 768


def test_benchmark_refuses_more_processes_than_gpus():
    with pytest.raises(SystemExit, match="asks for 2 processes on one machine, which shows 1 GPU"):
        check_process_counts([1, 2], gpus=1)
    check_process_counts([1], gpus=1)
    check_process_counts([1, 2, 4, 8], gpus=0)  # CPU only: gloo processes share the cores

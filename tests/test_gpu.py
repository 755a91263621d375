"""End to end on a GPU: autocast (bf16 or fp16 + grad scaler), channels_last, fused Adam and the
DALI GPU loader when installed. Skipped on machines without CUDA."""
from __future__ import annotations


import numpy as np
import pytest
import torch

import train
from engine.evaluation.features import FeatureExtractor
from pipeline.plan import decode_rgb
from pipeline.shards import SplitReader
from pipeline.transforms import normalize
from tests.runs import TARGET, history, small_run
from tools import export, extract, visualize_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["torch", "dali"])
@pytest.mark.parametrize("amp", ["auto", "fp16"])
def test_train_on_cuda(synthetic_shards, tmp_path, loader, amp):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    argv = small_run(synthetic_shards, tmp_path, loader=loader, device="cuda")
    assert train.main([*argv, "--amp", amp, "--epochs", "2"]) == 0
    rows = history(tmp_path)
    assert len(rows) == 2 and all(r["loss"] > 0 and 0 <= r["mAP"] <= 1 for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("extra, sources", [
    (["-a", "resnet50_ibn_a"], None), ([], ["cuhk03"]),
    ([], ["dukemtmc", "cuhk03", "msmt17v1", "cuhk_sysu"])],
    ids=["ibn", "one-source", "four-sources"])
def test_other_backbones_and_numbers_of_sources_train_on_cuda(synthetic_shards, tmp_path, extra, sources):
    """IBN-Net (its instance-norm halves under autocast and channels_last) and 1 and 4 sources
    (a memory and identity batches each) train and evaluate on the GPU, as on the CPU
    (tests/test_ibn.py, tests/test_train.py); IBN-Net resumes too. Four short runs, kept few for the
    gpu-tests step's time limit."""
    argv = small_run(synthetic_shards, tmp_path, *extra, "--amp", "auto", sources=sources, device="cuda")
    assert train.main(argv) == 0
    if sources is None:
        assert train.main([*argv, "--epochs", "2", "--resume", str(tmp_path / "latest.pth")]) == 0
    rows = history(tmp_path)
    assert len(rows) == (1 if sources else 2) and all(r["loss"] > 0 and 0 <= r["mAP"] <= 1 for r in rows)


def test_the_step_does_not_synchronise_with_the_host():
    """CUDA's sync debug mode raises at any point where the host would wait for the GPU: a bf16
    iteration (channels_last, fused Adam, memory updates planned from the sampler's labels) must have none."""
    from engine.optim import build_optimizer, build_scaler
    from engine.step import shuffle_plan, train_step
    from model.memory import MemoryClassifier
    from model.resnet import build_model
    from model.style import UBS

    if not torch.cuda.is_bf16_supported():
        pytest.skip("needs a GPU with bf16")
    device, sizes = torch.device("cuda"), [32, 32, 32]
    net = build_model("resnet18", style=UBS()).to(device, memory_format=torch.channels_last).train()
    memories = [MemoryClassifier(net.num_features, 50).to(device) for _ in sizes]
    opt = build_optimizer(net.parameters(), 3.5e-4, 5e-4, device)
    scaler = build_scaler(device, torch.bfloat16)
    images = torch.randn(sum(sizes), 3, 128, 64, device=device).contiguous(memory_format=torch.channels_last)
    labels = (torch.arange(sum(sizes), device=device) // 4) % 50
    batch_labels = [y.cpu().numpy() for y in labels.split(sizes)]

    def step(it: int) -> torch.Tensor:
        plan = shuffle_plan(sizes, 1, 0, seed=0, epoch=0, it=it, labels=batch_labels)
        return train_step(net, memories, images, labels, sizes, opt, scaler, torch.bfloat16, "il", plan)

    step(0)  # lazy initialisation (cuDNN, cuBLAS, allocator) may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [step(it) for it in (1, 2, 3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(x) for x in losses)
    assert int(sum(m.refusals.sum() for m in memories)) == 0


def test_the_loader_hand_over_does_not_synchronise_with_the_host():
    """The torch loader's batch from pinned memory to a normalised device batch (pipeline.loader
    .to_device): queued copies and kernels only, once the normalisation constants exist."""
    from pipeline.loader import LoaderConfig, to_device

    cfg = LoaderConfig(device=torch.device("cuda"), dtype=torch.bfloat16)
    pixels = torch.randint(0, 256, (96, 128, 64, 3), dtype=torch.uint8).pin_memory()
    labels = torch.arange(96).pin_memory()
    to_device(pixels, labels, cfg)  # first batch: builds the constants on the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        images, _ = to_device(pixels, labels, cfg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert images.is_cuda and images.dtype == torch.bfloat16


def test_dali_batches_are_ordered_on_the_current_stream(synthetic_shards):
    """pipe.run(stream) hands DALI's outputs over on PyTorch's current stream: a batch taken on
    a side stream equals the one taken on the default stream."""
    pytest.importorskip("nvidia.dali")
    from pipeline.loader import LoaderConfig, build_train_loader

    cfg = LoaderConfig(num_ids=4, iters=1, workers=1, loader="dali", device=torch.device("cuda"))
    sources = ["market1501", "dukemtmc", "msmt17v1"]
    (want,) = build_train_loader(synthetic_shards, sources, cfg).epoch(0)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        (got,) = build_train_loader(synthetic_shards, sources, cfg).epoch(0)
        got = got.images.clone()
    torch.cuda.synchronize()
    assert torch.allclose(got, want.images, atol=1e-3)


def test_auto_amp_picks_bf16_only_where_the_gpu_computes_in_it():
    from engine.precision import amp_dtype

    native = torch.cuda.get_device_capability() >= (8, 0)
    assert amp_dtype("auto", torch.device("cuda")) == (torch.bfloat16 if native else torch.float16)


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_inference_tools_on_cuda(synthetic_shards, trained_checkpoint, tmp_path, loader):
    """tools/extract.py and tools/visualize_ranks.py with --device cuda (autocast; DALI decodes on
    the GPU) give the CPU's features, and an exported TorchScript file runs on the GPU."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    ckpt = trained_checkpoint
    split = ["--checkpoint", str(ckpt), "--shards", str(synthetic_shards), "-d", TARGET, "--split", "query",
             "--no-progress", "--workers", "2"]
    assert extract.main([*split, "--out", str(tmp_path / "cpu"), "--device", "cpu", "--loader", "torch"]) == 0
    assert extract.main([*split, "--out", str(tmp_path / "gpu"), "--device", "cuda", "--loader", loader]) == 0
    cpu, gpu = (np.load(tmp_path / d / "features.npy") for d in ("cpu", "gpu"))
    assert gpu.shape == cpu.shape and (tmp_path / "gpu" / "images.txt").read_text() == \
        (tmp_path / "cpu" / "images.txt").read_text()
    cosine = (cpu * gpu).sum(1)  # rows of norm 1; bf16/fp16 autocast and another resize kernel
    assert cosine.min() > 0.995, cosine.min()

    assert visualize_ranks.main(["--checkpoint", str(ckpt), "--shards", str(synthetic_shards), "-d", TARGET,
                                 "--out", str(tmp_path / "ranks"), "--num-queries", "2", "--topk", "3",
                                 "--device", "cuda", "--loader", loader, "--no-progress"]) == 0
    assert len(list((tmp_path / "ranks").glob("query_*.png"))) == 2

    reader = SplitReader(synthetic_shards / TARGET, "query")
    pil = [decode_rgb(reader.read(i)) for i in range(8)]
    api = FeatureExtractor.from_checkpoint(ckpt, device="cuda")
    feats = api(pil)
    assert feats.device.type == "cpu" and float((feats.numpy() * cpu[:8]).sum(1).min()) > 0.995

    assert export.main(["--checkpoint", str(ckpt), "--format", "torchscript",
                        "--out", str(tmp_path / "m.pt")]) == 0
    scripted = torch.jit.load(str(tmp_path / "m.pt"), map_location="cuda")
    pixels = torch.from_numpy(np.stack([api.preprocess(im) for im in pil])).cuda()
    out = scripted(normalize(pixels).permute(0, 3, 1, 2)).float().cpu()
    assert out.shape == (8, cpu.shape[1]) and float((out.numpy() * cpu[:8]).sum(1).min()) > 0.995


def test_cudnn_autotunes_the_training_network():
    """The training shapes are fixed: on CUDA, wrap_network lets cuDNN time its algorithms once."""
    from engine.distributed import DistInfo
    from engine.network import wrap_network

    previous, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
    try:
        wrap_network(torch.nn.Conv2d(3, 8, 3).cuda(), DistInfo(0, 1, 0, torch.device("cuda")))
        assert torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = previous

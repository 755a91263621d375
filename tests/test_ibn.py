"""-a resnet50_ibn_a: ResNet-50 with IBN-Net's instance-batch normalisation (Pan et al., ECCV
2018) against its published definition (layout, the public checkpoint's names and shapes), its
weights file through --pretrained, its statistics groups against the literal DataParallel
replicas, and a small run that trains, evaluates, resumes and exports."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import train
from engine.checkpoint import network_from_checkpoint
from engine.optim import build_scaler
from engine.step import shuffle_plan, train_step
from model.groups import BN_IMPLS
from model.resnet import IBN, GroupBatchNorm2d, build_model, input_problem
from model.style import UBS
from reference import reference_step, replica_forward
from tests import step_case
from tests.runs import history, load_checkpoint, small_run
from tools import export

ARCH = "resnet50_ibn_a"
RELEASE = "resnet50_ibn_a-d9d0bb7b.pth"
PLANES, BLOCKS = (64, 128, 256, 512), (3, 4, 6, 3)


def bn_keys(name: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (channels,), f"{name}.bias": (channels,), f"{name}.running_mean": (channels,),
            f"{name}.running_var": (channels,), f"{name}.num_batches_tracked": ()}


def published_keys() -> dict[str, tuple[int, ...]]:
    """Every tensor of the public resnet50_ibn_a checkpoint but ``fc``, written out by hand from
    the published definition: torchvision's ResNet-50 names, and in layer1..3 each bottleneck's
    bn1 an IBN of ``IN`` (the first int(planes * 0.5) channels, affine, no running statistics)
    and ``BN`` (the others)."""
    keys = {"conv1.weight": (64, 3, 7, 7), **bn_keys("bn1", 64)}
    inplanes = 64
    for layer, (planes, blocks) in enumerate(zip(PLANES, BLOCKS), 1):
        for block in range(blocks):
            p = f"layer{layer}.{block}."
            keys[p + "conv1.weight"] = (planes, inplanes, 1, 1)
            if layer < 4:
                half = int(planes * 0.5)
                keys.update({p + "bn1.IN.weight": (half,), p + "bn1.IN.bias": (half,),
                             **bn_keys(p + "bn1.BN", planes - half)})
            else:
                keys.update(bn_keys(p + "bn1", planes))
            keys[p + "conv2.weight"] = (planes, planes, 3, 3)
            keys.update(bn_keys(p + "bn2", planes))
            keys[p + "conv3.weight"] = (4 * planes, planes, 1, 1)
            keys.update(bn_keys(p + "bn3", 4 * planes))
            if block == 0:
                keys[p + "downsample.0.weight"] = (4 * planes, inplanes, 1, 1)
                keys.update(bn_keys(p + "downsample.1", 4 * planes))
            inplanes = 4 * planes
    return keys


def published_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A stand-in for the public file: its names and shapes (``fc`` too), random values."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in published_keys().items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(7)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=g) + 0.5
        else:
            state[name] = torch.randn(shape, generator=g) * 0.05
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 2048, generator=g), torch.zeros(1000)
    return state


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ibn") / RELEASE
    torch.save(published_state(), path)
    return path


def test_layout_is_the_published_one():
    """layer1..3: every bottleneck's bn1 is an IBN splitting its planes as int(planes * 0.5)
    InstanceNorm (affine, no running statistics) + the rest BatchNorm (grouped like every other);
    layer4 and the stem keep BatchNorm; strides on the 3x3 convolutions (layer4's first is 1:
    the re-ID last stride)."""
    m = build_model(ARCH)
    assert isinstance(m.bn1, GroupBatchNorm2d) and m.conv1.kernel_size == (7, 7) and m.conv1.stride == (2, 2)
    for layer, (planes, blocks) in enumerate(zip(PLANES, BLOCKS), 1):
        seq = getattr(m, f"layer{layer}")
        assert len(seq) == blocks
        for k, block in enumerate(seq):
            assert block.conv1.out_channels == planes and block.conv1.stride == (1, 1)
            stride = 2 if k == 0 and layer in (2, 3) else 1
            assert block.conv2.stride == (stride, stride)
            if layer == 4:
                assert type(block.bn1) is GroupBatchNorm2d and block.bn1.num_features == planes
                continue
            ibn = block.bn1
            assert type(ibn) is IBN and ibn.half == planes // 2
            assert type(ibn.IN) is nn.InstanceNorm2d and ibn.IN.num_features == planes // 2
            assert ibn.IN.affine and not ibn.IN.track_running_stats
            assert type(ibn.BN) is GroupBatchNorm2d and ibn.BN.num_features == planes - planes // 2
            assert type(block.bn2) is GroupBatchNorm2d and type(block.bn3) is GroupBatchNorm2d
    assert sum(isinstance(x, IBN) for x in m.modules()) == 3 + 4 + 6


def test_parameter_names_and_shapes_are_the_public_checkpoints():
    own = {k: tuple(v.shape) for k, v in build_model(ARCH).state_dict().items() if not k.startswith("neck.")}
    assert own == published_keys()


def test_ibn_normalises_halves_as_published():
    """The first half per image and channel, the second half as a BatchNorm, in eval too (InstanceNorm
    has no running statistics); channels_last and bf16 kept."""
    ibn = IBN(6).train()
    with torch.no_grad():
        for p in ibn.parameters():
            p.uniform_(0.5, 1.5)
    x = torch.randn(4, 6, 5, 3)
    out = ibn(x)
    torch.testing.assert_close(out[:, :3], F.instance_norm(x[:, :3], weight=ibn.IN.weight, bias=ibn.IN.bias))
    torch.testing.assert_close(out[:, 3:], F.batch_norm(x[:, 3:], None, None, ibn.BN.weight, ibn.BN.bias,
                                                        training=True))
    ibn.eval()
    torch.testing.assert_close(ibn(x)[:, :3], out[:, :3])
    y = ibn.train()(x.bfloat16().to(memory_format=torch.channels_last))
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_bf16_autocast():
    """A grouped training forward under CPU bf16 autocast in channels_last stays finite and
    channels_last through the IBN layers; in evaluation its features are those of fp32 (to bf16
    rounding, which grows through 50 layers)."""
    m = build_model(ARCH, bn_groups=2).to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 64, 32, generator=torch.Generator().manual_seed(0))
    x = x.to(memory_format=torch.channels_last)
    seen = []
    m.layer2[0].bn1.register_forward_hook(lambda mod, i, o: seen.append(o))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.train()(x, sizes=[4, 4])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert seen[0].dtype == torch.bfloat16 and seen[0].is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = m.eval()(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = m(x)
    assert F.cosine_similarity(got, want).min() > 0.99


def test_public_checkpoint_loads(weights_file):
    m = build_model(ARCH, pretrained=str(weights_file))
    got = m.state_dict()
    for name, value in published_state().items():
        if not name.startswith("fc."):
            assert torch.equal(got[name], value), name
    assert torch.all(m.neck.weight == 1)


def test_other_weights_are_refused_naming_the_first_mismatches(tmp_path):
    """A plain ResNet-50 file: the IBN names missing, the BatchNorm ones unexpected."""
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(ValueError) as err:
        build_model(ARCH, pretrained=str(path))
    msg = str(err.value)
    assert str(path) in msg and "missing keys (78)" in msg and "unexpected keys (65)" in msg
    assert "layer1.0.bn1.BN.bias" in msg and "layer1.0.bn1.bias" in msg


def test_imagenet_and_too_small_inputs_are_refused_in_one_line(synthetic_shards, tmp_path, capsys):
    imagenet = (f"--pretrained imagenet: {ARCH} has no torchvision weights: download {RELEASE} from the "
                "XingangPan/IBN-Net GitHub releases (v1.0) and pass it as --pretrained FILE")
    small = f"-a {ARCH} --height 16 --width 16: too small"
    for flags, named in ((["--pretrained", "imagenet"], imagenet),
                         (["--height", "16", "--width", "16"], small)):
        capsys.readouterr()
        assert train.main([*small_run(synthetic_shards, tmp_path / "logs", "-a", ARCH), *flags]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"train.py: error: {named}"), err
    assert input_problem(ARCH, 48, 16) is None and input_problem(ARCH, 32, 32) is None
    assert input_problem(ARCH, 16, 16) is not None and input_problem("resnet50", 16, 16) is None


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, scale: float, name: str) -> None:
    """Equal up to float64 summation-order noise, which the InstanceNorm of few positions and the
    ungrouped network's gradients of order 1e5 magnify: 1e-6 of the tensor's largest value, or of
    ``scale`` for tensors that are zero but for rounding (the stem BatchNorm's bias: every
    later normalisation removes a per-channel shift, so its gradient is zero)."""
    err = (got - want).abs().max().item()
    assert err <= 1e-6 * want.abs().max().item() + 1e-12 * scale, f"{name}: difference {err:.3g}"


@pytest.mark.parametrize("impl", [BN_IMPLS[0], *(pytest.param(i, marks=pytest.mark.slow)
                                                  for i in BN_IMPLS[1:])])
def test_grouped_statistics_equal_the_literal_replicas(impl):
    """Three sources, 4 statistics groups each, against each source through 4 literal
    DataParallel replicas of the whole-batch network: the same features, gradients and running
    statistics (replica 0's); then, as the training step runs it (no gradient), the shuffled
    second forward with the style module after layer1 (UBS against the step-by-step one, the
    same draws) against 4 replicas too. In float64; 48x16: layer3's map has 3 positions."""
    torch.manual_seed(0)
    grouped = build_model(ARCH, bn_groups=4, bn_impl=impl, style=UBS()).double().train()
    ref = step_case.literal(grouped)
    x = torch.randn(48, 3, 48, 16, dtype=torch.float64).to(memory_format=torch.channels_last)
    out = grouped(x, sizes=[16, 16, 16])
    want = torch.cat([replica_forward(ref, part, 4) for part in x.split(16)])
    assert_close_to_scale(out, want, 1.0, "features")
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (want * w).sum().backward()
    scale = max(p.grad.abs().max().item() for p in ref.parameters() if p.requires_grad)
    for (name, a), (_, b) in zip(grouped.named_parameters(), ref.named_parameters()):
        if a.requires_grad:
            assert_close_to_scale(a.grad, b.grad, scale, name)
    with torch.no_grad():
        torch.manual_seed(1)
        out = grouped(x.flip(0), style=True)
        torch.manual_seed(1)
        assert_close_to_scale(out, replica_forward(ref, x.flip(0), 4, style=True), 1.0, "styled features")
    for (name, a), (_, b) in zip(grouped.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=lambda m: f"{name}: {m}")
    assert grouped.layer1[0].bn1.BN.num_batches_tracked.item() == 4


def test_training_step_equals_the_published_one_before_the_optimizer():
    """The whole IL iteration (engine.step.train_step: the grouped forward of the sources, the
    memory loss, the shuffled styled second forward, the planned memory update) against the
    published one (reference_step: literal replicas, the per-sample memory loop) for this
    backbone; two sources of 8 rows in 2 groups of 4 keep it small (tests/test_step.py holds the
    numbers of sources and groups). Plain SGD with lr 1 makes each weight's change its gradient,
    compared as above; Adam would turn the stem BatchNorm bias's rounding-noise gradient into
    steps of lr."""
    torch.manual_seed(0)
    fast = build_model(ARCH, bn_groups=2, style=UBS()).double().train()
    ref = step_case.literal(fast)
    before = {n: p.detach().clone() for n, p in fast.named_parameters()}
    sizes, classes = [8, 8], step_case.CLASSES[:2]
    memories = step_case.memories(fast.num_features, classes)
    initial = [m.centers.clone() for m in memories]
    centers = [c.clone() for c in initial]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(sizes), 3, 48, 16, generator=g, dtype=torch.float64)
    y = torch.cat([torch.randperm(n, generator=g)[:2].repeat_interleave(4) for n in classes])
    plan = shuffle_plan(sizes, 1, 0, 3, 0, 0, [t.numpy() for t in y.split(sizes)])
    torch.manual_seed(2)
    loss = train_step(fast, memories, x, y, sizes, torch.optim.SGD(fast.parameters(), lr=1.0),
                      build_scaler(torch.device("cpu"), None), None, "il", plan)
    torch.manual_seed(2)
    want = reference_step(ref, centers, list(x.split(sizes)), list(y.split(sizes)),
                          torch.optim.SGD(ref.parameters(), lr=1.0), "il", perm=plan.perm, replicas=2)
    assert abs(loss.item() - want) <= 1e-9 * abs(want)
    steps = {n: before[n] - p.detach() for n, p in ref.named_parameters()}
    scale = max(s.abs().max().item() for s in steps.values())
    for name, p in fast.named_parameters():
        assert_close_to_scale(before[name] - p.detach(), steps[name], scale, name)
    for (name, a), (_, b) in zip(fast.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=lambda m: f"{name}: {m}")
    for j, (m, c) in enumerate(zip(memories, centers)):
        assert_close_to_scale(m.centers, c, 1.0, f"memory {j}")
    assert all(not torch.allclose(m.centers, c) for m, c in zip(memories, initial))


@pytest.fixture(scope="module")
def resumed_run(synthetic_shards, weights_file, tmp_path_factory) -> tuple[list[str], Path]:
    """From the public file's names (--pretrained FILE): one epoch, then resumed to a second.
    Its flags and logs folder."""
    logs = tmp_path_factory.mktemp("ibn_run")
    flags = small_run(synthetic_shards, logs, "-a", ARCH, "--pretrained", str(weights_file),
                      "--height", "48", "--width", "16")
    assert train.main(flags) == 0
    assert train.main([*flags, "--epochs", "2", "--resume", str(logs / "latest.pth")]) == 0
    return flags, logs


@pytest.mark.slow
def test_trains_resumes_and_evaluates(resumed_run, capsys):
    """The resumed run's second epoch is recorded, and --evaluate of its checkpoint prints the
    mAP the run logged."""
    flags, logs = resumed_run
    rows = history(logs)
    assert [r["epoch"] for r in rows] == [1, 2]
    ckpt = load_checkpoint(logs / "latest.pth")
    assert ckpt["config"]["arch"] == ARCH and ckpt["epoch"] == 2
    capsys.readouterr()
    assert train.main([*flags, "--evaluate", "--resume", str(logs / "latest.pth")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert float(table[1].split()[1]) == pytest.approx(round(100 * rows[-1]["mAP"], 1), abs=0.051)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exports_the_evaluation_features(resumed_run, tmp_path, fmt):
    _, logs = resumed_run
    model, _ = network_from_checkpoint(logs / "latest.pth")
    assert isinstance(model.layer3[5].bn1, IBN)
    x = torch.randn(3, 3, 48, 16)
    with torch.no_grad():
        want = model(x)
    out = tmp_path / f"reid.{fmt}"
    if fmt == "onnx":
        ort = pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    assert export.main(["--checkpoint", str(logs / "latest.pth"), "--format", fmt, "--out", str(out)]) == 0
    if fmt == "onnx":
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        got = torch.as_tensor(got)
    else:
        with torch.no_grad():
            got = torch.jit.load(str(out))(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

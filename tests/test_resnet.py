"""Backbone: shapes, last stride, stem, per-source BatchNorm, style placement, weight loading
(statistics groups in detail: tests/test_groups.py)."""
import copy
from dataclasses import fields

import pytest
import torch
import torchvision
from torch import nn

from engine.config import RunConfig
from model import resnet
from model.groups import make_layout, resolve_bn_impl
from model.resnet import build_model


def images(n=12, seed=0, channels_last=True, size=(64, 32)):
    x = torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))
    return x.to(memory_format=torch.channels_last) if channels_last else x


def randomise_bn(model, seed=0):
    """Non-trivial affine parameters and running stats, so equality tests mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 2, generator=g)
    return model


def spatial_sizes(model, x):
    sizes = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: sizes.__setitem__(n, o.shape[2:]))
             for n in ("layer3", "layer4")]
    sizes["out"] = model(x)
    for h in hooks:
        h.remove()
    return sizes


def test_resnet18_output_and_neck():
    m = build_model("resnet18")
    assert m.num_features == 512
    assert not m.neck.bias.requires_grad and m.neck.weight.requires_grad
    assert torch.all(m.neck.weight == 1) and torch.all(m.neck.bias == 0)
    for mode in (True, False):
        out = m.train(mode)(images(8))
        assert out.shape == (8, 512) and out.dtype == torch.float32
        torch.testing.assert_close(out.norm(dim=1), torch.ones(8))


def test_resnet50_shape():
    m = build_model("resnet50").eval()
    sizes = spatial_sizes(m, images(2))
    out = sizes["out"]
    assert m.num_features == 2048 and out.shape == (2, 2048)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    assert sizes["layer4"] == sizes["layer3"] == (4, 2)


def test_last_stride():
    x = images(2)
    s1 = spatial_sizes(build_model("resnet18").eval(), x)
    s2 = spatial_sizes(build_model("resnet18", last_stride=2).eval(), x)
    assert s1["layer4"] == s1["layer3"] == (4, 2)
    assert s2["layer4"] == (2, 1)


@pytest.mark.parametrize("stem_relu", [False, True])
def test_stem_relu_flag(stem_relu):
    m = build_model("resnet18", stem_relu=stem_relu).eval()
    assert isinstance(m.stem_relu, nn.ReLU if stem_relu else nn.Identity)
    seen = []
    m.maxpool.register_forward_hook(lambda mod, i, o: seen.append(i[0].min().item()))
    m(images(2))
    assert (seen[0] >= 0) == stem_relu


@pytest.mark.parametrize("sizes, channels_last", [([4, 4, 4], True), ([3, 5, 4], True), ([3, 5, 4], False)])
def test_whole_batch_statistics_equal_separate_forwards(sizes, channels_last):
    """bn_groups=1: each source's rows are normalised as if forwarded alone, running statistics
    updated source after source. In float64: equal sources take one GroupNorm kernel, separate
    forwards BatchNorm's, and fp32 rounding differences grow through the backward."""
    chunked = randomise_bn(build_model("resnet18", bn_groups=1)).double().train()
    separate = copy.deepcopy(chunked)
    x = images(12, channels_last=channels_last, size=(32, 16)).double()
    out = chunked(x, sizes=sizes)
    want = torch.cat([separate(part) for part in x.split(sizes)])
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)
    for (name, a), (_, b) in zip(chunked.named_buffers(), separate.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    # gradients agree too
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (want * w).sum().backward()
    for (name, a), (_, b) in zip(chunked.named_parameters(), separate.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_groups_reset_and_ignored_in_eval():
    m = randomise_bn(build_model("resnet18", bn_groups=2))
    x = images(8, size=(32, 16))
    m.train()(x, sizes=[4, 4])
    assert all(b.layout is None for b in m.modules() if isinstance(b, resnet._GroupBN))
    m.eval()
    torch.testing.assert_close(m(x, sizes=[4, 4]), m(x))
    with pytest.raises(ValueError, match="sum to the batch size"):
        m(x, sizes=[4, 3])


@torch.no_grad()
def _layer_outputs(model, x, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The model's output and the outputs of layer1..layer4, in fp32."""
    seen = []
    hooks = [getattr(model, f"layer{k}").register_forward_hook(lambda mod, i, o: seen.append(o.float()))
             for k in range(1, 5)]
    out = model(x, **kwargs)
    for h in hooks:
        h.remove()
    return out, seen


def test_grouped_forward_under_autocast():
    """bf16 autocast against the same forward in fp32. bf16 rounding (2^-8) grows through the
    layers, most where a statistics group is small: the neck normalises each feature over the
    4 samples of a group, which magnifies it many times over (at 32x16, layer4 too), so in
    training mode the trunk's layers are compared at 64x32 (measured relative errors about 0.7%,
    1.6%, 2.7% and 4% after layer1..4), and the whole output in eval mode (measured row error
    below 0.01). At this size torch 2.14.1's CPU bf16 convolutions gave no NaN/inf in 80 trials
    (they intermittently do at tiny sizes, in plain torchvision models too)."""
    m = randomise_bn(build_model("resnet18", bn_groups=2))
    x = images(8, size=(64, 32))
    want, want_layers = _layer_outputs(m.train(), x, sizes=[4, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, layers = _layer_outputs(m, x, sizes=[4, 4])
    assert out.shape == (8, 512) and out.dtype == torch.float32 and torch.isfinite(out).all()
    for k, (got, ref, bound) in enumerate(zip(layers, want_layers, (0.025, 0.05, 0.08, 0.13)), 1):
        error = float((got - ref).norm() / ref.norm())
        assert error < bound, f"layer{k}: relative error {error:.4f} under bf16 autocast"
    want, _ = _layer_outputs(m.eval(), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = _layer_outputs(m, x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=0, atol=0.01)


def test_whole_batch_bn_bf16_channels_last():
    bn = resnet.GroupBatchNorm2d(16).train()
    ref = copy.deepcopy(bn)
    x = torch.randn(10, 16, 6, 4).bfloat16().to(memory_format=torch.channels_last)
    bn.layout = make_layout([4, 6], groups=1)
    out = bn(x)
    want = torch.cat([ref(x[:4]), ref(x[4:])])
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, want)
    assert torch.equal(bn.running_mean, ref.running_mean) and torch.equal(bn.running_var, ref.running_var)
    assert bn.num_batches_tracked.item() == 2


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        return x


def test_style_only_when_asked_and_training():
    rec = Recorder()
    m = build_model("resnet18", style=rec, bn_groups=1)
    x = images(6, size=(32, 16))
    m.train()(x, sizes=[3, 3])
    m.eval()(x, style=True)
    assert rec.calls == []
    m.train()(x, style=True)
    assert rec.calls == [(6, 64, 8, 4)]       # after layer1, whole batch


def test_style_changes_training_output():
    from model.style import UBS
    m = build_model("resnet18", style=UBS(), bn_groups=2)
    x = images(8, size=(32, 16))
    plain = copy.deepcopy(m).train()(x)
    styled = m.train()(x, style=True)
    assert not torch.allclose(plain, styled)


def test_load_local_state_dict(tmp_path):
    src = torchvision.models.resnet18(weights=None)
    randomise_bn(src, seed=3)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": src.state_dict()}, path)
    m = build_model("resnet18", pretrained=str(path))
    for k, v in src.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(m.state_dict()[k], v), k
    assert torch.all(m.neck.weight == 1)


def test_mismatched_state_dict_names_keys(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    del state["layer2.0.conv1.weight"]
    state["layer9.weight"] = torch.zeros(1)
    state["bn1.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        build_model("resnet18", pretrained=str(path))
    msg = str(err.value)
    assert "layer2.0.conv1.weight" in msg and "layer9.weight" in msg and "bn1.weight (3,)" in msg
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model("resnet18", pretrained=str(tmp_path / "nope.pth"))


def test_imagenet_weights_from_cache_or_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(url, dst, *a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match="pretrained=PATH") as err:
        build_model("resnet18", pretrained="imagenet")
    cached = tmp_path / "hub" / "checkpoints"
    assert str(cached) in str(err.value)
    src = torchvision.models.resnet18(weights=None)
    name = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]
    torch.save(src.state_dict(), cached / name)
    m = build_model("resnet18", pretrained="imagenet")
    assert torch.equal(m.conv1.weight, src.conv1.weight)


def test_bn_impl_choice():
    """--bn-impl auto: group-norm on a CPU, batch-norm on CUDA; a run records the setting but a
    resume does not compare it (it changes how the groups are computed, not what); an unknown
    name is refused."""
    assert resolve_bn_impl("auto", torch.device("cpu")) == "group-norm"
    assert resolve_bn_impl("auto", torch.device("cuda", 0)) == "batch-norm"
    assert resolve_bn_impl("batch-norm", torch.device("cpu")) == "batch-norm"
    assert "bn_impl" in {f.name for f in fields(RunConfig)} and "bn_impl" not in RunConfig.resume_keys()
    with pytest.raises(ValueError, match="bn_impl must be one of group-norm, batch-norm, got 'fused'"):
        build_model("resnet18", bn_impl="fused")

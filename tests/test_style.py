"""UBS against the step-by-step version written from docs/design.md."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model.style import UBS, sample_stats
from reference import LiteralUBS


def literal_ubs(x, rho=3.0, eps=1e-6):
    """Every step as docs/design.md words it (reference/style.py), in fp32, on a plain NCHW copy."""
    return LiteralUBS(rho, eps).train()(x.float().contiguous())


def features(shape=(16, 24, 12, 6), seed=1):
    g = torch.Generator().manual_seed(seed)
    # distinct per-sample styles, as after layer1
    scale = torch.rand(shape[0], shape[1], 1, 1, generator=g) * 2 + 0.2
    shift = torch.randn(shape[0], shape[1], 1, 1, generator=g)
    return torch.randn(shape, generator=g) * scale + shift


@pytest.mark.parametrize("channels_last", [False, True])
def test_fp32_matches_literal(channels_last):
    x = features()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    torch.manual_seed(7)
    want = literal_ubs(x)
    torch.manual_seed(7)
    got = UBS(rho=3.0, eps=1e-6).train()(x)
    assert got.dtype == torch.float32
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_bf16_input_stats_in_fp32():
    x = features().bfloat16().to(memory_format=torch.channels_last)
    torch.manual_seed(3)
    want = literal_ubs(x)
    torch.manual_seed(3)
    got = UBS().train()(x)
    assert got.dtype == torch.bfloat16
    assert got.is_contiguous(memory_format=torch.channels_last)
    # one bf16 rounding of the fp32 result
    torch.testing.assert_close(got.float(), want, rtol=2 ** -8, atol=1e-6)


class LargestFloat32(TorchDispatchMode):
    """Records the most elements any fp32 tensor an operation returns has."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


def test_bf16_sample_stats_without_a_full_fp32_copy():
    """A bf16 batch's per-sample statistics are taken in fp32 a few rows at a time: as exact as
    from a float64 copy, and no fp32 tensor larger than the chunk is created."""
    x = features().bfloat16().to(memory_format=torch.channels_last)
    chunk = 3 * x[0].numel()
    with LargestFloat32() as seen:
        var, mean = sample_stats(x, chunk=chunk)
    assert seen.largest <= chunk
    want_var, want_mean = torch.var_mean(x.double(), dim=(2, 3), correction=1)
    assert var.dtype == mean.dtype == torch.float32
    torch.testing.assert_close(mean.double(), want_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), want_var, rtol=1e-6, atol=1e-6)


def literal_input_gradient(x, w, rho=3.0, eps=1e-6):
    """d sum(w * UBS(x)) / dx with the statistics held constant (model/style.py: no gradient
    flows through them), from the steps of docs/design.md: out = (x - mu) / sig * sig_new + mu_new,
    so the gradient is w * sig_new / sig, per sample and channel. Draws as LiteralUBS takes them
    (means first, then stds); only the stds' draws matter here."""
    B, C = x.shape[:2]
    x = x.double()
    var = x.var(dim=(2, 3))
    std, sig = var.sqrt(), (var + eps).sqrt()
    torch.rand((B, C))  # the means' draws
    r_sig = torch.rand((B, C)).double()
    sig_new = std.mean(0) - rho * std.std(0) + 2 * rho * std.std(0) * r_sig
    return w.double() * (sig_new / sig)[:, :, None, None]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2 ** -7)])
def test_gradient_path(dtype, tol):
    x = features().to(dtype)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(11)
    want = literal_input_gradient(x, w)
    xg = x.clone().requires_grad_()
    torch.manual_seed(11)
    out = UBS().train()(xg)
    assert out.dtype == dtype and out.requires_grad
    (out.float() * w).sum().backward()
    assert xg.grad.dtype == dtype
    torch.testing.assert_close(xg.grad.double(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_identity_in_eval():
    x = features()
    m = UBS().eval()
    assert m(x) is x


def test_restyled_statistics_stay_in_range():
    """Each output sample's channel mean lies within mean +- rho*std of the batch's means."""
    x = features((32, 8, 16, 8))
    mu = x.mean(dim=(2, 3))
    lo = mu.mean(0) - 0.5 * mu.std(0)
    hi = mu.mean(0) + 0.5 * mu.std(0)
    out = UBS(rho=0.5).train()(x).mean(dim=(2, 3))
    assert ((out >= lo - 1e-4) & (out <= hi + 1e-4)).all()


def test_single_sample_refused():
    with pytest.raises(ValueError, match="at least 2 samples"):
        UBS().train()(torch.randn(1, 4, 8, 8))

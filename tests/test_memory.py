"""MemoryClassifier against the published per-sample loop and a plain cross-entropy."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reference
from model.memory import MemoryClassifier, NonFiniteFeatures, update_rounds


def loop_update(centers, features, labels, m):
    """docs/design.md, sample by sample in batch order (reference/memory.py), on a copy."""
    c = centers.clone()
    reference.loop_update(c, features, labels, m)
    return c


def memory(num_classes=100, dim=64, seed=0):
    mem = MemoryClassifier(dim, num_classes, temp=0.05, momentum=0.2)
    g = torch.Generator().manual_seed(seed)
    mem.centers.copy_(F.normalize(torch.randn(num_classes, dim, generator=g), dim=1))
    return mem


def unit(n, dim, seed):
    return F.normalize(randn(n, dim, seed=seed), dim=1)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    """Seeded normal values: a failure repeats with the same numbers."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_update_pk_batch_matches_loop():
    """192 rows, 48 identities x 4 images, shuffled as in the memory-update forward."""
    mem = memory(num_classes=300, dim=256)
    g = torch.Generator().manual_seed(0)
    labels = torch.randperm(300, generator=g)[:48].repeat_interleave(4)[torch.randperm(192, generator=g)]
    f = unit(192, 256, 1)
    want = loop_update(mem.centers, f, labels, 0.2)
    mem.update(f, labels)
    torch.testing.assert_close(mem.centers, want, rtol=0, atol=1e-5)


def test_update_rounds_count_labels_by_repeats():
    """Round r holds each label's (r+1)-th row, in batch order."""
    order, sizes = update_rounds(np.array([7, 3, 7, 7, 1, 3]))
    assert order.tolist() == [0, 1, 4, 2, 5, 3] and sizes == [3, 2, 1]
    assert update_rounds(np.arange(5))[1] == [5]


@pytest.mark.parametrize("planned", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_update_random_repeats_matches_loop(seed, planned):
    """Rounds found by the update itself (labels read back), or planned on the host and the rows
    passed round after round as training does."""
    g = torch.Generator().manual_seed(seed)
    mem = memory(num_classes=40, dim=32, seed=seed)
    counts = torch.randint(1, 9, (25,), generator=g)          # 1..8 repeats per label
    ids = torch.randperm(40, generator=g)[:25]
    labels = ids.repeat_interleave(counts)
    labels = labels[torch.randperm(len(labels), generator=g)].int()
    f = unit(len(labels), 32, seed + 10)
    want = loop_update(mem.centers, f, labels, 0.2)
    if planned:
        order, sizes = update_rounds(labels.numpy())
        assert sizes == [int((counts > r).sum()) for r in range(int(counts.max()))]
        mem.update(f[order], labels[order], round_sizes=sizes)
    else:
        mem.update(f, labels)
    torch.testing.assert_close(mem.centers, want, rtol=0, atol=1e-5)
    assert int(mem.refusals) == 0
    mem.raise_refused()


def test_update_bf16_features_and_empty_batch():
    mem = memory()
    before = mem.centers.clone()
    mem.update(torch.empty(0, 64), torch.empty(0, dtype=torch.long))
    assert torch.equal(mem.centers, before)
    f = unit(8, 64, 3).bfloat16()
    labels = torch.tensor([1, 2, 1, 3, 1, 2, 5, 5])
    want = loop_update(before, f.float(), labels, 0.2)
    mem.update(f, labels)
    torch.testing.assert_close(mem.centers, want, rtol=0, atol=1e-5)


def test_loss_and_gradient_match_cross_entropy():
    mem = memory()
    f = unit(20, 64, 4).requires_grad_()
    y = torch.randint(0, 100, (20,), generator=torch.Generator().manual_seed(0))
    loss = mem(f, y)
    loss.backward()
    f2 = f.detach().clone().requires_grad_()
    c = mem.centers.clone().requires_grad_()
    want = F.cross_entropy(f2 @ c.t() / 0.05, y)
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(f.grad, f2.grad)
    assert not mem.centers.requires_grad and mem.centers.grad is None
    assert [n for n, _ in mem.named_parameters()] == []


def test_logits_fp32_under_autocast():
    mem = memory()
    f = unit(6, 64, 5)
    y = torch.arange(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = mem.logits(f.bfloat16())
        loss = mem(f.bfloat16(), y)
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    torch.testing.assert_close(logits, f.bfloat16().float() @ mem.centers.t() / 0.05)


def test_init_centers_normalised_means():
    mem = memory(num_classes=5, dim=16)
    f = randn(40, 16)
    y = torch.arange(40) % 5
    mem.init_centers(f, y)
    want = F.normalize(torch.stack([f[y == k].mean(0) for k in range(5)]), dim=1)
    torch.testing.assert_close(mem.centers, want)


def test_init_centers_names_missing_classes():
    mem = memory(num_classes=6, dim=16)
    before = mem.centers.clone()
    with pytest.raises(ValueError, match=r"2 of 6 classes.*\[3, 5\]"):
        mem.init_centers(randn(8, 16), torch.tensor([0, 1, 2, 4, 0, 1, 2, 4]))
    assert torch.equal(mem.centers, before)


@pytest.mark.parametrize("features, labels, match", [
    (randn(4, 64), torch.tensor([0, 1, 100, 2]), "outside"),
    (randn(4, 64), torch.tensor([0, -1, 1, 2]), "outside"),
    (randn(4, 63), torch.tensor([0, 1, 2, 3]), r"\[N, 64\]"),
    (randn(4, 64), torch.tensor([0, 1, 2]), "one per feature row"),
    (randn(4, 64), torch.tensor([0., 1., 2., 3.]), "integer"),
    (randn(4, 64).index_fill_(0, torch.tensor([2]), float("nan")), torch.arange(4), "NaN"),
    (randn(4, 64).index_fill_(0, torch.tensor([1]), float("inf")), torch.arange(4), r"rows \[1\]"),
])
def test_bad_input_refused_memory_untouched(features, labels, match):
    mem = memory()
    before = mem.centers.clone()
    with pytest.raises(ValueError, match=match):
        mem.update(features, labels)
    with pytest.raises(ValueError, match=match):
        mem.init_centers(features, labels)
    assert torch.equal(mem.centers, before)


def test_planned_rounds_refusals_are_counted_then_raised():
    """With `round_sizes` given nothing is read back: a batch with a NaN row changes nothing, is
    counted, and raise_refused reports it later (and then starts counting afresh)."""
    mem = memory()
    before = mem.centers.clone()
    features, labels = randn(4, 64).index_fill_(0, torch.tensor([2]), float("nan")), torch.arange(4)
    mem.update(features, labels, round_sizes=[4])
    mem.update(features, labels, round_sizes=[4])
    assert torch.equal(mem.centers, before)
    assert int(mem.refusals) == 2
    with pytest.raises(NonFiniteFeatures, match=r"refused \(2 with NaN/inf feature rows\)"):
        mem.raise_refused()
    mem.raise_refused()
    assert "refusals" not in mem.state_dict()
    with pytest.raises(ValueError, match="add up to the batch size 4"):
        mem.update(features, labels, round_sizes=[2, 1])


def test_forward_rejects_bad_shapes_and_labels():
    mem = memory()
    with pytest.raises(ValueError, match=r"\[N, 64\]"):
        mem(randn(4, 32), torch.arange(4))
    with pytest.raises(IndexError, match="out of bounds"):
        mem(randn(4, 64), torch.tensor([0, 1, 2, 100]))


def test_rows_too_large_to_normalise_are_refused_with_nan():
    """A finite row whose sum overflows float32 would turn its centre into zeros (the norm
    overflows): it is refused like a NaN row, by both update paths."""
    mem = memory()
    before = mem.centers.clone()
    f = torch.zeros(2, 64)
    f[0, :2] = 3e38
    f[1, 0] = 1.0
    with pytest.raises(NonFiniteFeatures, match=r"rows \[0\]"):
        mem.update(f, torch.tensor([0, 1]))
    mem.update(f, torch.tensor([0, 1]), round_sizes=[2])
    assert torch.equal(mem.centers, before) and int(mem.refusals) == 1

"""End to end on a GPU: autocast (bf16 or fp16 + grad scaler), channels_last, fused Adam and the
DALI GPU loader when installed. Skipped on machines without CUDA."""
from __future__ import annotations

import json

import pytest
import torch

import train
from tests.test_train import small_run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("loader", ["torch", "dali"])
@pytest.mark.parametrize("amp", ["auto", "fp16"])
def test_train_on_cuda(synthetic_shards, tmp_path, loader, amp):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    argv = [a if a != "cpu" else "cuda" for a in small_run(synthetic_shards, tmp_path, loader=loader)]
    assert train.main([*argv, "--amp", amp, "--epochs", "2"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["loss"] > 0 and 0 <= r["mAP"] <= 1 for r in rows)

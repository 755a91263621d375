"""tools/compare_loaders.py on a CPU (DALI's CPU-only mode): DALI and PIL agree on the same rows of
the synthetic shards, training and evaluation batches alike, and a bound they cannot meet fails the
check (exit 1), naming the batches."""
from __future__ import annotations

import json

import pytest

from tools import compare_loaders

pytest.importorskip("nvidia.dali")

# The GPU check's quick parity flags (tools/gpu_check.py), with one evaluation set.
FLAGS = ["-a", "resnet18", "--height", "64", "--width", "32", "--num-ids", "2", "--images", "16",
         "--workers", "1", "--eval", "market1501", "--device", "cpu"]


def test_dali_and_pil_agree_and_a_bound_they_cannot_meet_fails(synthetic_shards, tmp_path, capsys):
    out = tmp_path / "parity.json"
    assert compare_loaders.main(["--shards", str(synthetic_shards), *FLAGS, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["failed"] == [] and len(result["batches"]) == 2, result
    for name, r in result["batches"].items():
        assert 0 < r["pixel_mean_abs_diff"] <= 3.0 and r["cosine_min"] >= 0.99, (name, r)
        assert r["unrelated_cosine_mean"] < r["cosine_mean"], (name, r)
    assert "loaders agree" in capsys.readouterr().out
    strict = ["--shards", str(synthetic_shards), *FLAGS, "--max-pixel-diff", "0", "--json", str(out)]
    assert compare_loaders.main(strict) == 1
    assert json.loads(out.read_text())["failed"] == list(result["batches"])
    assert "FAILED: " in capsys.readouterr().out

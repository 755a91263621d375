"""Shared fixtures: the synthetic datasets and their shards, built once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Two cores in CI: keep torch from oversubscribing them when DALI workers run beside it.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """All five raw layouts at the `small` scale (tools/make_synthetic.py, seed 0)."""
    from tools import make_synthetic

    out = tmp_path_factory.mktemp("data")
    make_synthetic.main(["--out", str(out), "--scale", "small", "--seed", "0"])
    return out


@pytest.fixture(scope="session")
def synthetic_shards(synthetic_data, tmp_path_factory) -> Path:
    """Shards of all five synthetic datasets (tools/make_shards.py)."""
    from tools import make_shards

    out = tmp_path_factory.mktemp("shards")
    make_shards.main(["--data-dir", str(synthetic_data), "--out", str(out), "--workers", "2"])
    return out

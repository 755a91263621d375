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


@pytest.fixture(scope="session")
def trained_checkpoint(synthetic_shards, tmp_path_factory) -> Path:
    """latest.pth of a one-iteration train.py run (tests/runs.py's small run), trained once for every
    module that needs a checkpoint (extract, export, visualize_ranks, the GPU tests)."""
    import train
    from tests.runs import small_run

    logs = tmp_path_factory.mktemp("trained")
    assert train.main(small_run(synthetic_shards, logs, "--iters", "1")) == 0
    return logs / "latest.pth"

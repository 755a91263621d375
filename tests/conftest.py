"""Shared fixtures: the synthetic datasets and their shards, built once per test session."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

# Two cores in CI: keep torch from oversubscribing them when DALI workers run beside it.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _no_stale_log_handler():
    """train.main points the root logger at the sys.stderr of its moment (basicConfig(force=True)):
    under capsys a stream that closes with the test. Drop such handlers after each test, so a later
    test's stderr never starts with a 'Logging error' (whichever order the tests run in)."""
    root = logging.getLogger()
    before = set(root.handlers)
    yield
    for handler in [h for h in root.handlers if type(h) is logging.StreamHandler and h not in before]:
        root.removeHandler(handler)


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
    """latest.pth of a finished one-epoch run with tests/runs.py's small_run flags (so a test may resume
    it with them), trained once for every module that needs a checkpoint (extract, export,
    visualize_ranks, run_checks, the GPU tests)."""
    import train
    from tests.runs import small_run

    logs = tmp_path_factory.mktemp("trained")
    assert train.main(small_run(synthetic_shards, logs, workers=0)) == 0
    return logs / "latest.pth"

"""The multi-GPU path's safety, on 2 gloo ranks (tests/dist_gpu_paths_check.py says what each rank
does): a wait for rank 0's host work outlasts the process group's timeout (--dist-timeout), the
state broadcast (one collective per dtype) leaves every rank with rank 0's tensors, and under DDP
the gradients stay DDP's buckets from one iteration to the next."""
from __future__ import annotations

import os
import subprocess
from datetime import timedelta

import pytest
import torch

from engine.flags import train_parser
from engine.errors import UsageError

from tests.dist_gpu_paths_check import TIMEOUT_S
from tests.live import torchrun
from tests.runs import ROOT


@pytest.mark.slow
def test_two_ranks_wait_broadcast_and_keep_their_buckets(tmp_path):
    proc = subprocess.run(torchrun(2, str(ROOT / "tests" / "dist_gpu_paths_check.py"), str(tmp_path)),
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(r["waited_s"] >= 2 * TIMEOUT_S for r in ranks)  # both left the block after rank 0's work
    first, other = ranks
    assert any(not torch.equal(first["before"][k], other["before"][k]) for k in first["before"])
    for k, v in first["before"].items():
        assert torch.equal(first["after"][k], v) and torch.equal(other["after"][k], v), k
    assert first["channels_last"] and other["channels_last"]
    for r in ranks:
        assert r["same_gradient"] and all(r["same_gradient"].values()), \
            [k for k, v in r["same_gradient"].items() if not v]


def test_dist_timeout_takes_minutes_or_a_unit():
    parse = train_parser("").parse_args
    assert parse([]).dist_timeout is None  # torch's default
    assert [parse(["--dist-timeout", t]).dist_timeout for t in ("45", "90s", "2.5m", "2h")] == [
        timedelta(minutes=45), timedelta(seconds=90), timedelta(seconds=150), timedelta(hours=2)]
    for bad in ("soon", "0", "-5m"):
        with pytest.raises(UsageError, match="argument --dist-timeout: expected"):
            parse(["--dist-timeout", bad])

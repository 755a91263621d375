"""tools/demo.py's run folder: a rerun resumes the demo's own interrupted run, starts again over
its own finished one, and never deletes a file it did not make (refused before any work)."""
from __future__ import annotations

import pytest

from tools import demo

FLAGS = ["--shards", "s", "--logs-dir", "r", "-a", "resnet18"]


def _contents(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_folder_holding_anything_else_is_refused_before_any_work(tmp_path, capsys):
    """The probe's case: an existing run folder with a checkpoint and a user's notes was emptied."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "latest.pth").write_bytes(b"a user's checkpoint")
    (run / "notes.txt").write_text("mine")
    before = _contents(run)
    assert demo.main(["--out", str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("demo: error: ") and "notes.txt" in err and len(err.splitlines()) == 1
    assert _contents(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no data written either
    (run / "notes.txt").unlink()  # a run without the demo's mark is not the demo's either
    with pytest.raises(ValueError, match="did not make"):
        demo.plan_run_folder(run, FLAGS)


def test_the_demos_own_run_is_resumed_or_replaced(tmp_path):
    run = tmp_path / "run"
    assert demo.plan_run_folder(run, FLAGS).flags == []  # new
    demo.mark_run_folder(run, FLAGS, finished=False)
    (run / ".lock").write_text("")
    assert demo.plan_run_folder(run, FLAGS).flags == ["--overwrite"]  # stopped before a checkpoint
    for name in ("latest.pth", "metrics.jsonl", ".latest.pth.tmp123", "events.out.tfevents.1"):
        (run / name).write_bytes(b"x")
    folder = demo.plan_run_folder(run, FLAGS)
    assert folder.flags == ["--resume", str(run / "latest.pth")] and "resuming" in folder.says
    other = demo.plan_run_folder(run, [*FLAGS, "--device", "cuda"])
    assert other.flags == ["--overwrite"] and "another configuration" in other.says
    demo.mark_run_folder(run, FLAGS, finished=True)
    folder = demo.plan_run_folder(run, FLAGS)
    assert folder.flags == ["--overwrite"] and "finished" in folder.says
    (run / "best.pth.bak").write_bytes(b"not the demo's")
    with pytest.raises(ValueError, match=r"best\.pth\.bak"):
        demo.plan_run_folder(run, FLAGS)

"""train.py checks what it can before any work and refuses in one line, `train.py: error: ...`,
with exit code 2: flags, the logs dir (another run's files, a live run holding it, a file, a place
it cannot write), weights and checkpoint files, a target that cannot be evaluated. It saves an
epoch's checkpoint before evaluating it and survives a failed evaluation; data that fails during
the run ends it naming the sample (exit code 4); --evaluate needs only the target; `make clean`
keeps results."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from pipeline.files import WriteError, write_atomic
from tests.live import Live, torchrun
from tests.runs import ROOT, load_checkpoint, small_run


def refusal(capsys, argv: list[str]) -> str:
    """The one line train.main refuses ``argv`` with (exit code 2), before any work."""
    capsys.readouterr()
    assert train.main(argv) == 2
    out = capsys.readouterr()
    text = out.out + out.err
    lines = [line for line in text.splitlines() if line.startswith("train.py: error: ")]
    assert len(lines) == 1, text
    assert "Traceback" not in text and "initialising memories" not in text, text
    return lines[0]


@pytest.mark.parametrize("flags, named", [
    (["--num-instances", "0"], "argument --num-instances: expected an integer >= 1, got 0"),
    (["-b", "0"], "argument -b/--batch-size: expected an integer >= 1, got 0"),
    (["--iters", "0"], "argument --iters"),
    (["--height", "0"], "argument --height"),
    (["--epochs", "0"], "argument --epochs"),
    (["--log-every", "0"], "argument --log-every"),
    (["--temp", "0"], "argument --temp"),
    (["--pretrained", "imagenett"], "--pretrained 'imagenett': expected 'imagenet', 'none' or a weights"),
    (["--evaluate"], "--evaluate needs --resume"),
    (["-b", "18"], "multiple of --num-instances"),
])
def test_bad_flags_are_refused_in_one_line(synthetic_shards, tmp_path, capsys, flags, named):
    line = refusal(capsys, small_run(synthetic_shards, tmp_path / "logs", *flags))
    assert named in line
    assert not (tmp_path / "logs").exists()


def test_apex_and_cuda_are_checked_before_any_work(synthetic_shards, tmp_path, capsys):
    argv = small_run(synthetic_shards, tmp_path / "logs")
    if not torch.cuda.is_available():
        assert "--device cuda: torch sees no CUDA device" in refusal(capsys, [*argv, "--device", "cuda"])
    try:
        import apex  # noqa: F401
    except ImportError:
        assert "--apex: NVIDIA apex is not installed" in refusal(capsys, [*argv, "--apex"])


def test_unusable_files_are_refused_naming_them(synthetic_shards, trained_checkpoint, tmp_path, capsys):
    garbage = tmp_path / "weights.pth"
    garbage.write_bytes(os.urandom(4096))
    line = refusal(capsys, small_run(synthetic_shards, tmp_path / "a", "--pretrained", str(garbage)))
    assert f"--pretrained {garbage} cannot be read as weights" in line and "weights_only=False" not in line

    ckpt = load_checkpoint(trained_checkpoint)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(trained_checkpoint.read_bytes()[: trained_checkpoint.stat().st_size // 2])
    cases = {cut: "truncated or damaged", tmp_path: "is a folder, expected a checkpoint file"}
    more_classes = [torch.zeros(len(m) + 1, m.shape[1]) for m in ckpt["memories"]]
    for name, state, why in [("no_config.pth", {"model": ckpt["model"]}, "it lacks config"),
                             ("list.pth", [1, 2, 3], "it holds a list, expected a dict"),
                             ("classes.pth", {**ckpt, "memories": more_classes}, "memories have shapes"),
                             ("two.pth", {**ckpt, "memories": ckpt["memories"][:2]}, "memories have shapes")]:
        torch.save(state, tmp_path / name)
        cases[tmp_path / name] = why
    for path, why in cases.items():
        line = refusal(capsys, small_run(synthetic_shards, tmp_path / "b", "--epochs", "2",
                                        "--resume", str(path)))
        assert f"--resume {path}" in line and why in line, line


def test_nothing_to_train_and_sizes_too_small_are_refused_before_any_work(
        synthetic_shards, trained_checkpoint, tmp_path, capsys):
    """A checkpoint past --epochs would train nothing; a size the style module cannot take is
    refused before --overwrite deletes the folder's run."""
    ckpt = load_checkpoint(trained_checkpoint)
    for epoch, iteration, at in [(2, 0, "the end of epoch 2"), (1, 2, "epoch 2, iteration 2")]:
        path = tmp_path / f"at_{epoch}_{iteration}.pth"
        torch.save({**ckpt, "epoch": epoch, "iteration": iteration}, path)
        line = refusal(capsys, small_run(synthetic_shards, tmp_path / "a", "--resume", str(path)))
        assert f"--resume {path} is at {at}, past --epochs 1: nothing would be trained" in line, line
    logs = tmp_path / "run"
    logs.mkdir()
    shutil.copy(trained_checkpoint, logs / "latest.pth")
    line = refusal(capsys, small_run(synthetic_shards, logs, "--height", "4", "--width", "2", "--overwrite"))
    assert "--height 4 --width 2: too small for --update-style" in line
    assert (logs / "latest.pth").read_bytes() == trained_checkpoint.read_bytes()


def test_logs_dir_must_be_a_writable_folder(synthetic_shards, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert f"--logs-dir {a_file} is a file" in refusal(capsys, small_run(synthetic_shards, a_file))
    assert "cannot create or write" in refusal(capsys, small_run(synthetic_shards, a_file / "logs"))
    assert "cannot create or write" in refusal(capsys, small_run(synthetic_shards, Path("/proc/il-logs")))


def test_a_path_component_too_long_for_any_file_system_is_refused(synthetic_shards, tmp_path, capsys):
    long = tmp_path / ("x" * 256)
    for flag, argv in (("--logs-dir", small_run(synthetic_shards, long / "logs")),
                       ("--shards", small_run(long, tmp_path / "logs")),
                       ("--resume", small_run(synthetic_shards, tmp_path / "logs", "--resume", str(long))),
                       ("--resume", small_run(synthetic_shards, tmp_path / "logs", "--evaluate", "--resume",
                                             str(long / "latest.pth")))):
        line = refusal(capsys, argv)
        assert line.startswith(f"train.py: error: {flag} {long}") and "256 bytes long" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(mib)``: a folder on a tmpfs of that size, a real full file system once written
    to; skipped where this process may not mount one (mounting needs root)."""
    mounted = []

    def mount(mib: int) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(folder)],
                                  capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip("no mount command")
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_write_atomic_names_a_full_disk_and_keeps_the_old_file(small_disk):
    disk = small_disk(1)
    (disk / "a.bin").write_bytes(b"old")
    with pytest.raises(WriteError) as e:
        write_atomic(disk / "a.bin", lambda tmp: tmp.write_bytes(bytes(2 * 2 ** 20)))
    assert str(e.value) == (f"cannot write {disk / 'a.bin'}: no space left on device; the previous a.bin "
                            "is kept")
    assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError)
    assert [p.name for p in disk.iterdir()] == ["a.bin"] and (disk / "a.bin").read_bytes() == b"old"


@pytest.mark.slow
def test_a_full_disk_while_saving_ends_in_one_line_and_keeps_the_checkpoint(synthetic_shards,
                                                                             trained_checkpoint, small_disk):
    """--logs-dir on a 200 MiB tmpfs holding a one-epoch run's latest.pth (about 135 MB: resnet18
    with Adam's moments), resumed for a second epoch, whose checkpoint does not fit: exit 4, one
    line naming latest.pth and "no space left", no traceback (the data workers' either), the first
    checkpoint intact."""
    logs = small_disk(200) / "logs"
    logs.mkdir()
    shutil.copyfile(trained_checkpoint, logs / "latest.pth")
    argv = small_run(synthetic_shards, logs, "--epochs", "2", "--eval-every", "0", "--resume",
                    str(logs / "latest.pth"))
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 4, out
    assert "Traceback" not in out, out
    line = f"train.py: error: cannot write {logs / 'latest.pth'}: no space left on device; the previous " \
           "latest.pth is kept"
    assert out.count(line) == 1, out
    assert load_checkpoint(logs / "latest.pth")["epoch"] == 1
    assert not [p.name for p in logs.iterdir() if ".tmp" in p.name]


@pytest.mark.slow
def test_a_logs_dir_holds_one_run(synthetic_shards, tmp_path, capsys):
    """While a run writes into a logs dir, a second run there is refused; a stopped run's folder
    is refused without --resume or --overwrite; --overwrite starts afresh."""
    logs = tmp_path / "logs"
    first = Live([sys.executable, str(ROOT / "train.py"), *small_run(synthetic_shards, logs, "--iters", "200",
                                                                    workers=0)])
    try:
        first.wait_for("first iteration done")
        line = refusal(capsys, small_run(synthetic_shards, logs))
        assert f"is in use by another process (pid {first.proc.pid})" in line
        first.proc.send_signal(signal.SIGTERM)
        assert first.finish(120) == 128 + signal.SIGTERM, first.output
    finally:
        first.close()
    before = (logs / "latest.pth").read_bytes()
    line = refusal(capsys, small_run(synthetic_shards, logs))
    assert "holds another run (latest.pth)" in line and f"--resume {logs / 'latest.pth'}" in line
    assert (logs / "latest.pth").read_bytes() == before

    assert train.main(small_run(synthetic_shards, logs, "--overwrite", workers=0)) == 0
    rows = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1] and load_checkpoint(logs / "latest.pth")["epoch"] == 1


def test_a_target_that_cannot_be_evaluated_is_refused_before_any_work(synthetic_data, synthetic_shards,
                                                                      tmp_path, capsys):
    from tools import make_shards

    raw = tmp_path / "raw"
    market = raw / "market1501" / "Market-1501-v15.09.15"
    shutil.copytree(synthetic_data / "market1501", raw / "market1501")
    query_ids = {p.name[:4] for p in (market / "query").iterdir()}
    for p in (market / "bounding_box_test").iterdir():
        if p.name[:4] in query_ids:
            p.unlink()
    shards = tmp_path / "shards"
    assert make_shards.main(["--data-dir", str(raw), "--out", str(shards)]) == 0
    for name in ("dukemtmc", "cuhk03", "msmt17v1"):
        (shards / name).symlink_to(synthetic_shards / name)
    line = refusal(capsys, small_run(shards, tmp_path / "logs"))
    assert "-d market1501: no query image has a gallery image of its identity" in line


@pytest.mark.slow
def test_a_failed_evaluation_is_reported_and_the_run_goes_on(synthetic_shards, trained_checkpoint, tmp_path,
                                                              capsys):
    """Non-finite running statistics give NaN evaluation features: the epoch's checkpoint is
    saved before the evaluation, the failure is logged and recorded, and training continues."""
    logs = tmp_path / "logs"
    logs.mkdir()
    ckpt = load_checkpoint(trained_checkpoint)
    ckpt["model"]["neck.running_var"][:] = float("nan")
    torch.save(ckpt, logs / "latest.pth")
    assert train.main(small_run(synthetic_shards, logs, "--epochs", "2", "--resume", str(logs / "latest.pth"),
                               workers=0)) == 0
    log = capsys.readouterr().err
    assert "epoch 2: evaluation on market1501 failed" in log and "not finite" in log, log
    rows = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and "eval_error" in rows[1] and "mAP" not in rows[1]
    assert load_checkpoint(logs / "latest.pth")["epoch"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("loader,dataset", [("torch", "dukemtmc"), ("dali", "dukemtmc"),
                                            ("torch", "market1501")])
def test_a_shard_truncated_during_the_run_ends_it_naming_the_shard(synthetic_shards, tmp_path, loader,
                                                                  dataset):
    """Whatever the loader, a source's shards (read every iteration) or the target's (read by the
    epoch's evaluation) cut short while the run reads them end it with exit code 4 and one line
    naming a sample (tar:key), not with a worker killed by SIGBUS or an evaluation skipped."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    shards = tmp_path / "shards"
    shutil.copytree(synthetic_shards / dataset, shards / dataset)
    for name in {"cuhk03", "msmt17v1", "market1501", "dukemtmc"} - {dataset}:
        (shards / name).symlink_to(synthetic_shards / name)
    iters = "200" if dataset == "dukemtmc" else "20"
    run = Live([sys.executable, str(ROOT / "train.py"),
                *small_run(shards, tmp_path / "logs", "--iters", iters, loader=loader)])
    try:
        run.wait_for("first iteration done")
        for tar in (shards / dataset).glob("*.tar"):
            os.truncate(tar, 1024)  # what a disk or a copy that failed can leave
        assert run.finish(240) == 4, run.output
    finally:
        run.close()
    last = run.output.strip().splitlines()[-1]
    assert re.fullmatch(rf"train\.py: error: {shards / dataset}/\S+\.tar:\S+: .*", last), run.output
    assert "Traceback" not in run.output and "Bus error" not in run.output, run.output


def test_evaluate_needs_only_the_target(synthetic_shards, trained_checkpoint, tmp_path, capsys):
    only = ["--shards", str(synthetic_shards), "--evaluate", "--resume", str(trained_checkpoint),
            "--device", "cpu", "--workers", "0", "--loader", "torch", "--test-batch-size", "64"]
    assert train.main([*only, "-d", "market1501"]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[1].split()[0] == "market1501" and "was a source" not in out.err
    assert train.main([*only, "-d", "dukemtmc"]) == 0
    assert "-d dukemtmc was a source of this checkpoint" in capsys.readouterr().err
    line = refusal(capsys, [*only, "-d", "market1501", "-a", "resnet50"])
    assert "arch: checkpoint 'resnet18', now 'resnet50'" in line


@pytest.mark.slow
def test_the_default_workers_fit_the_cores_and_say_so_once(synthetic_shards, trained_checkpoint):
    """On a machine with fewer cores than the default -j 4 (here one, by CPU affinity), the
    default is the core count, said once; torch's warning about more workers than cores (printed
    by every loader) does not appear."""
    code = ("import os, runpy, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    argv = ["--shards", str(synthetic_shards), "--evaluate", "--resume", str(trained_checkpoint),
            "-d", "market1501", "--device", "cpu", "--loader", "torch", "--test-batch-size", "64"]
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "train.py"), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert out.count("-j/--workers 1: the default 4 data workers per rank, capped at the 1 cores") == 1, out
    assert "worker processes in total" not in out, out


@pytest.mark.slow
def test_a_refusal_under_torchrun_is_one_line_and_heads_its_report(tmp_path):
    proc = subprocess.run(torchrun(2, str(ROOT / "train.py"), "--iters", "0"), cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = "train.py: error: argument --iters: expected an integer >= 1, got 0"
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count(f"\n{line}\n") + out.startswith(line) == 1, out  # printed once, by rank 0
    root_cause = out[out.index("Root Cause"):]
    assert f"traceback : {line}" in root_cause, out


def test_make_clean_keeps_results(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path)
    kept = [tmp_path / "logs" / "il" / "best.pth", tmp_path / "shards" / "market1501" / "manifest.json"]
    removed = [tmp_path / ".venv" / "bin" / "python", tmp_path / "pipeline" / "__pycache__" / "a.pyc"]
    for path in kept + removed:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    subprocess.run(["make", "clean"], cwd=tmp_path, check=True, capture_output=True)
    assert all(p.is_file() for p in kept)
    assert not any(p.parent.exists() for p in removed)

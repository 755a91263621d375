"""train.py end to end on the synthetic shards: 2-process gloo DDP, stop/resume, the three
training paths, refusals of bad configurations, and a non-finite loss."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import train
from engine.evaluation.metrics import METRICS
from tests.runs import ROOT, history, load_checkpoint, small_run


@pytest.fixture(scope="module")
def two_ranks(synthetic_shards, tmp_path_factory) -> dict:
    """tests/dist_train_check.py's result of a 4-iteration run on 2 gloo ranks."""
    tmp = tmp_path_factory.mktemp("two_ranks")
    result = tmp / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "dist_train_check.py"), str(result),
           *small_run(synthetic_shards, tmp / "logs", "--iters", "4")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(result.read_text())


@pytest.mark.slow
def test_two_process_gloo_run_keeps_ranks_identical(two_ranks):
    res = two_ranks
    assert res["world"] == 2 and res["exit_code"] == 0
    assert res["weights_max_diff"] == 0.0
    assert res["memories_max_diff"] == 0.0
    # 4 Adam steps at the warm-up learning rate move the weights, but only a little (a change of
    # order 1 would mean the start was not train.py's initialisation).
    assert 1e-5 < res["weights_change"] < 0.05, res["weights_change"]
    assert 0.0 <= res["history"][-1]["mAP"] <= 1.0


@pytest.mark.slow
def test_the_logged_loss_is_the_whole_batchs_on_any_number_of_ranks(two_ranks, synthetic_shards, tmp_path):
    """Each rank's loss is that of its half of the batch; the epoch's logged loss is the whole
    batch's, as one process logs it (equal up to the rounding of 4 fp32 Adam steps)."""
    assert train.main(small_run(synthetic_shards, tmp_path, "--iters", "4")) == 0
    assert two_ranks["history"][0]["loss"] == pytest.approx(history(tmp_path)[0]["loss"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["--baseline", "fb"]], ids=["fbf", "fb"])
def test_baselines_run(synthetic_shards, tmp_path, mode):
    argv = [a for a in small_run(synthetic_shards, tmp_path, *mode) if a != "--update-style"]
    assert train.main(argv) == 0
    assert len(history(tmp_path)) == 1


@pytest.mark.slow
@pytest.mark.parametrize("sources", [["cuhk03"], ["dukemtmc", "cuhk03"], ["dukemtmc", "cuhk03", "msmt17v1"],
                                     ["dukemtmc", "cuhk03", "msmt17v1", "cuhk_sysu"]], ids=len)
def test_any_number_of_sources_trains(synthetic_shards, tmp_path, capsys, sources):
    """--sources with 1 (single-source transfer), 2, 3 and 4 sources: a memory per source with a
    centre per identity of its mix set, the iteration's images counted over the sources; a
    resume with other sources is refused, naming them."""
    assert train.main(small_run(synthetic_shards, tmp_path, sources=sources)) == 0
    ckpt = load_checkpoint(tmp_path / "latest.pth")
    assert ckpt["config"]["sources"] == sources
    classes = [json.loads((synthetic_shards / s / "manifest.json").read_text())["mix"]["ids"]
               for s in sources]
    assert [tuple(m.shape) for m in ckpt["memories"]] == [(n, 512) for n in classes]
    row = history(tmp_path)[0]
    assert row["loss"] > 0 and 0 <= row["mAP"] <= 1
    other = sources[1:] or ["msmt17v1"]
    capsys.readouterr()
    assert train.main(small_run(synthetic_shards, tmp_path, "--epochs", "2", "--resume",
                                str(tmp_path / "latest.pth"), sources=other)) == 2
    assert f"sources: checkpoint {sources}, now {other}" in capsys.readouterr().err


@pytest.mark.slow
def test_one_source_on_two_ranks_keeps_ranks_identical(synthetic_shards, tmp_path):
    """The single-source setting on 2 gloo ranks: each rank's half of the one source's batch,
    the shuffled second forward exchanged, the memory updated alike on both ranks."""
    result = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "dist_train_check.py"), str(result),
           *small_run(synthetic_shards, tmp_path / "logs", "--iters", "2", sources=["cuhk03"])]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(result.read_text())
    assert res["exit_code"] == 0 and res["weights_max_diff"] == 0.0 and res["memories_max_diff"] == 0.0
    assert 1e-6 < res["weights_change"] < 0.05, res["weights_change"]


@pytest.mark.slow
def test_dali_loader_trains(synthetic_shards, tmp_path):
    pytest.importorskip("nvidia.dali")
    assert train.main(small_run(synthetic_shards, tmp_path, loader="dali")) == 0
    assert history(tmp_path)[0]["loss"] > 0


@pytest.mark.slow
def test_several_targets_and_evaluate_a_checkpoint(synthetic_shards, tmp_path, capsys):
    """-d a,b evaluates both targets at every evaluation (a column per target), the run's own
    mAP is their mean with --best-by mean and best.pth is the epoch where it peaked; --evaluate
    of that checkpoint on both targets prints the same figures."""
    targets = ["--dataset_src3", "cuhk_sysu", "-d", "market1501,msmt17v1", "--best-by", "mean"]
    assert train.main(small_run(synthetic_shards, tmp_path, *targets, "--epochs", "2")) == 0
    rows = history(tmp_path)
    for row in rows:
        mean = (row["market1501/mAP"] + row["msmt17v1/mAP"]) / 2
        assert row["mAP"] == pytest.approx(mean, abs=1e-12)
    best = max(rows, key=lambda r: r["mAP"])
    assert load_checkpoint(tmp_path / "best.pth")["history"][-1] == best
    capsys.readouterr()
    assert train.main(small_run(synthetic_shards, tmp_path, "--evaluate", "-d", "msmt17v1,market1501",
                                "--resume", str(tmp_path / "best.pth"))) == 0
    table = {line.split()[0]: [float(v) for v in line.split()[1:]]
             for line in capsys.readouterr().out.splitlines()[1:]}
    assert list(table) == ["msmt17v1", "market1501", "mean"]
    for name in ("msmt17v1", "market1501"):
        assert table[name] == pytest.approx([round(100 * best[f"{name}/{m}"], 1) for m in METRICS], abs=0.051)


@pytest.mark.slow
@pytest.mark.parametrize("poison, message", [
    ("memory", "non-finite loss at epoch 2, iteration 1"),  # a NaN centre: NaN loss, finite features
    ("model", r"iteration 1; epoch 2, iterations 1-3: memory updates refused \(.*3 with NaN"),
])
def test_nonfinite_values_stop_and_keep_the_checkpoint(synthetic_shards, tmp_path, capsys, poison, message):
    assert train.main(small_run(synthetic_shards, tmp_path)) == 0
    ckpt_path = tmp_path / "latest.pth"
    ckpt = load_checkpoint(ckpt_path)
    if poison == "memory":
        ckpt["memories"][0][0] = float("nan")
    else:
        ckpt["model"]["neck.weight"][0] = float("nan")
    torch.save(ckpt, ckpt_path)
    before = ckpt_path.read_bytes()
    capsys.readouterr()
    assert train.main(small_run(synthetic_shards, tmp_path, "--epochs", "2", "--resume", str(ckpt_path))) == 3
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the run's log lines
    assert last.startswith("train.py: error: ") and re.search(message, last), last
    assert ckpt_path.read_bytes() == before


@pytest.mark.parametrize("flags, message", [
    (["-d", "dukemtmc"], "the target is also a source"),
    (["-d", "viper"], "unknown dataset"),
    (["-d", "cuhk_sysu"], "can only be a source"),
    (["-b", "18"], "multiple of --num-instances"),
])
def test_bad_configurations_are_refused(synthetic_shards, tmp_path, capsys, flags, message):
    assert train.main(small_run(synthetic_shards, tmp_path, *flags)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "latest.pth").exists()


def test_shards_of_another_format_are_refused(synthetic_shards, tmp_path, capsys):
    shards = tmp_path / "shards"
    for name in ("dukemtmc", "cuhk03", "msmt17v1"):
        (shards / name).parent.mkdir(exist_ok=True)
        (shards / name).symlink_to(synthetic_shards / name)
    (shards / "market1501").mkdir()
    for f in (synthetic_shards / "market1501").iterdir():
        if f.name != "manifest.json":
            (shards / "market1501" / f.name).symlink_to(f)
    manifest = json.loads((synthetic_shards / "market1501" / "manifest.json").read_text())
    manifest["format"] = 0
    (shards / "market1501" / "manifest.json").write_text(json.dumps(manifest))
    assert train.main(small_run(shards, tmp_path / "logs")) == 2
    assert "format" in capsys.readouterr().err
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_resume_from_another_configuration_names_the_settings(synthetic_shards, tmp_path, capsys):
    assert train.main(small_run(synthetic_shards, tmp_path)) == 0
    assert train.main(small_run(synthetic_shards, tmp_path, "--seed", "7", "--epochs", "2",
                                "--resume", str(tmp_path / "latest.pth"))) == 2
    assert "seed: checkpoint 1, now 7" in capsys.readouterr().err

"""tools/benchmark.py on CPU: every mode runs (gloo processes for the multi-process counts),
the table, JSON and plot are written, and the fast and reference implementations are compared."""
from __future__ import annotations

import json

from tools import benchmark

TINY = ["-a", "resnet18", "--height", "64", "--width", "32", "-b", "8", "--warmup", "1", "--window", "2",
        "--repeats", "2", "--workers", "1", "--test-batch-size", "16"]


def test_step_mode_across_process_counts(tmp_path, capsys):
    argv = ["--mode", "step", "--impl", "both", "--gpus", "1,2", *TINY, "--out", str(tmp_path)]
    assert benchmark.main(argv) == 0
    res = json.loads((tmp_path / "benchmark.json").read_text())["results"]
    got = {(r["impl"], r["world"]) for r in res}
    assert got == {("fast", 1), ("reference", 1), ("fast", 2)}
    assert all(r["images_per_s"] > 0 and len(r["windows_s_per_iter"]) == 2 for r in res)
    assert (tmp_path / "benchmark.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "vs ref" in out and "step" in out


def test_train_data_and_eval_modes(synthetic_data, synthetic_shards, tmp_path, capsys):
    argv = ["--impl", "both", "--gpus", "1", *TINY, "--shards", str(synthetic_shards),
            "--data-dir", str(synthetic_data), "--eval-size", "300,2000,64", "--out", str(tmp_path)]
    for mode in ("train", "data", "eval"):
        assert benchmark.main(["--mode", mode, *argv]) == 0
        res = json.loads((tmp_path / "benchmark.json").read_text())["results"]
        if mode == "train":
            assert {r["impl"] for r in res} == {"fast", "reference"}
            assert {r["loader"] for r in res} >= {"folder"}
            assert "projected 14,000 iterations" in capsys.readouterr().out
        elif mode == "data":
            assert {r["loader"] for r in res} >= {"torch", "folder"}
        else:
            assert res[0]["num_query"] == 300 and res[0]["seconds"] > 0
            assert res[0]["extract_images_per_s"] > 0
        assert all(r.get("images_per_s", 1) > 0 for r in res)


def test_full_run_projection_adds_an_evaluation_per_epoch(capsys):
    results = [{"mode": "train", "impl": "fast", "world": 1, "s_per_iter": 0.05},
               {"mode": "eval", "impl": "fast", "world": 1, "num_query": 1000, "num_gallery": 9000,
                "seconds": 2.0, "extract_images_per_s": 5000.0}]
    benchmark.projection(results)
    out = capsys.readouterr().out
    # 14,000 x 0.05 s = 700 s of training; each evaluation 10,000 / 5,000 + 2 = 4 s
    assert "(11.7 min) of training" in out
    assert "4.0 s each" in out and f"{(700 + 70 * 4) / 60:.1f} min for the full run" in out

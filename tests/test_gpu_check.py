"""tools/gpu_check.py --device cpu --quick, as CI runs it: the sequence `make gpu-check` runs on a
GPU machine, in a tiny configuration on the CPU, so it cannot break unnoticed between the rare
loans of a GPU machine. Every step ends ok, or skipped with its reason; results.json and
summary.md hold every figure with its command; no process of the run is left behind."""
from __future__ import annotations

import json
import math

from tools import gpu_check

TABLES = (
    "Data preparation: synthetic set",
    "Data preparation: shards",
    "DALI against PIL on the same images",
    "Loaders: images/s delivered (bench-data)",
    "Loaders: images/s delivered (loaders-png)",
    "Training iteration: step",
    *(f"Training iteration: step ({name})" for name in gpu_check.BN_STEPS),
    "Training iteration: train",
    "Evaluation",
    "Model parts",
    "ATen operations of one IL iteration (resnet18)",
    "From two steps: step bound and full-run projection",
)


def test_the_quick_gpu_check_runs_every_step_on_a_cpu(tmp_path):
    out = (tmp_path / "check").resolve()
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    machine = results["machine"]
    assert {"date", "device", "cpu_count", "python", "torch", "cuda_runtime", "dali"} <= machine.keys()

    steps = {s["name"]: s for s in results["steps"]}
    assert tuple(steps) == gpu_check.STEPS
    for s in steps.values():
        explained = s["status"] == "ok" or (s["status"] == "skipped" and s["reason"])
        assert explained, (s["name"], s["status"], s["reason"], s["tail"])
        assert s["command"].startswith("python ") and (out / "logs" / f"{s['name']}.log").is_file()
    dali = not machine["dali"].startswith("not importable")
    assert {n for n, s in steps.items() if s["status"] == "skipped"} == {"gpu-tests"} | (
        set() if dali else {"loader-parity"})
    gpu_tests = steps["gpu-tests"]["details"]["tests"]  # on a CPU each says why it skipped
    assert gpu_tests and all(t["outcome"] == "skipped" and t["message"] for t in gpu_tests)
    assert any(t["outcome"] == "passed" for t in steps["sync-free"]["details"]["tests"])
    png = steps["loaders-png"]["details"]["result"]
    assert any("cuhk03" in r["sources"] and "images_per_s" in r for r in png)

    figures = results["figures"]
    assert {f["table"] for f in figures} == set(TABLES) - (set() if dali else {TABLES[2]})
    assert all(f["command"].startswith("python ") and math.isfinite(f["value"]) for f in figures)
    summary = (out / "summary.md").read_text()
    assert all(f"`{f['command']}`" in summary and f"## {f['table']}" in summary for f in figures)
    assert all(f"| {name} | {s['status']} |" in summary for name, s in steps.items())
    for name in gpu_check.STEPS:  # every process of every step has ended
        assert not gpu_check.marked(f"{gpu_check.MARKER}={out}:{name}")

"""tools/gpu_check.py --device cpu --quick, as CI runs it: the sequence `make gpu-check` runs on a
GPU machine, in a tiny configuration on the CPU, so it cannot break unnoticed between the rare
loans of a GPU machine. Every step ends ok, or skipped with its reason; results.json and
summary.md hold every figure with its command, summary.md tools/benchmark.py's own tables; no
process of the run is left behind. Run twice:
here, and as on the GPU machine's bare image (no webdataset, no DALI: tests/bare_image)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.runs import ROOT
from tools import gpu_check
from tools.processes import marked

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


@pytest.mark.slow
def test_the_quick_gpu_check_runs_every_step_on_a_cpu(tmp_path):
    out = (tmp_path / "check").resolve()
    assert gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)]) == 0
    check_results(out)


@pytest.mark.slow
def test_the_quick_gpu_check_runs_on_the_bare_image(tmp_path):
    """As `make gpu-check` runs on the GPU machine as it is: no install (PYTHONPATH), no webdataset,
    no DALI. No step fails; those that would use DALI say that it is missing."""
    out = (tmp_path / "check").resolve()
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests' / 'bare_image'}{os.pathsep}{ROOT}"}
    argv = ["--device", "cpu", "--quick", "--out", str(out), "--wheels", str(tmp_path / "no-wheels")]
    done = subprocess.run([sys.executable, "tools/gpu_check.py", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = check_results(out)
    machine, steps = results["machine"], {s["name"]: s for s in results["steps"]}
    assert "hidden by tests/bare_image" in machine["dali"] and machine["packages"]["webdataset"] == "missing"
    assert "NVIDIA DALI is not importable" in steps["loader-parity"]["reason"]
    assert all("DALI cannot be imported" in steps[n]["note"] for n in ("bench-data", "bench-train",
                                                                        "loaders-png"))


def check_results(out: Path) -> dict:
    """What every quick run must leave in ``out``; returns its results.json."""
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
    for name in (n for n in gpu_check.BENCHMARKS if steps[n]["status"] == "ok"):  # benchmark.md's tables
        md = (gpu_check.REPO / steps[name]["result"]).with_suffix(".md").read_text()
        tables = md[md.index("\n## "):].splitlines()
        assert f"`{steps[name]['command']}`" in tables and any(line.startswith("| ---") for line in tables)
        assert all(line in summary for line in tables if line.startswith("|")), name
    for name in gpu_check.STEPS:  # every process of every step has ended
        assert not marked(f"{gpu_check.MARKER}={out}:{name}")
    return results


def test_wheels_are_installed_whole_or_not_at_all(tmp_path):
    """What the GPU check does with tools/fetch_dali.sh's folder, with real pip and a small wheel."""
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "probe-0.1-py3-none-any.whl", "w") as whl:
        files = {"probe/__init__.py": "VERSION = '0.1'\n",
                 "probe-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: probe\nVersion: 0.1\n",
                 "probe-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                              "Tag: py3-none-any\n"}
        record = [*files, "probe-0.1.dist-info/RECORD"]
        files["probe-0.1.dist-info/RECORD"] = "".join(f"{n},,\n" for n in record)
        for name, text in files.items():
            whl.writestr(name, text)
    assert gpu_check.install_wheels(wheels, target) == ""
    assert (target / "probe" / "__init__.py").read_text() == "VERSION = '0.1'\n"
    (wheels / "broken-0.1-py3-none-any.whl").write_bytes(b"not a zip")
    assert gpu_check.install_wheels(wheels, tmp_path / "other")
    assert not (tmp_path / "other").exists() and not (tmp_path / "other.part").exists()

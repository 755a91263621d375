"""Every GPU path of the project in one command (`make gpu-check`), for the short, rare loans of a
GPU machine: no network there, the machine's own torch, DALI present or not.

    python tools/gpu_check.py --out logs/gpu-check             # on the GPU machine, within 8 minutes
    python tools/gpu_check.py --device cpu --quick --out DIR   # the same sequence, tiny, on a CPU (CI)

(with the project installed, or with ``PYTHONPATH=.`` in front, as `make gpu-check` sets it).

Steps, in the order they run, each a subprocess with its own time limit and its log in
OUT/logs/<step>.log:

  synthetic      tools/make_synthetic.py: the medium synthetic set (--quick: small)
  shards         tools/make_shards.py --workers N: its shards (not CUHK-SYSU: nothing here reads it)
  gpu-tests      pytest -m gpu, with which GPU tests passed, failed or were skipped, and why
  sync-free      the checks that a training iteration never waits for the device: CUDA's sync
                 debug mode (tests/test_gpu.py) and FakeTensorMode (tests/test_step.py)
  loader-parity  tools/compare_loaders.py: DALI against PIL on the same images
  bench-step, bench-train, bench-eval
                 tools/benchmark.py step|train|eval --impl both: this project against the published way
  bench-step-group-norm, bench-step-batch-norm
                 tools/benchmark.py step --impl fast --bn-impl X: the step time of each implementation
                 of the statistics groups (what --bn-impl auto should pick on this device)
  bench-data     tools/benchmark.py loaders: DALI, the torch loader and the published folder loader
  model-parts    tools/benchmark.py ops: fused UBS and vectorised memory update against the literal ones
  loaders-png    tools/benchmark.py loaders --cuhk03: the loaders on sources with CUHK03's PNG images
  ops            tools/benchmark.py ops --count: ATen operations one training iteration dispatches

A failing step does not stop the others; a step whose input step failed is skipped, saying so.
The data steps run beside gpu-tests and sync-free, which need no data and time nothing; every
timing step runs alone (with --quick two steps at a time: its timings only show that the tools
work). ``--budget`` (450 s) bounds the whole run: a step that cannot start in time is skipped,
saying so. Without DALI the torch loader runs alone and the DALI comparison is skipped with the
import error.

OUT/results.json holds the machine (GPU, driver, CUDA, torch, DALI, Python, CPUs, date), every
step (command, status ok / failed / skipped, reason, seconds, log tail, details) and every figure
with the command that produced it; OUT/summary.md has the figures as the tables of
docs/benchmarks.md, tools/benchmark.py's rendered by its own tools/bench/report.py. The exit
status is 1 when a step failed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tools.bench import report
from tools.processes import stop_marked

REPO = Path(__file__).resolve().parents[1]
# tools/fetch_dali.sh's folder, and where its wheels are installed (not .dali/, which holds the parts
# of an offline_wheels.sh transfer where one was made)
WHEELS, DALI_TARGET = REPO / ".whl", REPO / ".dali-site"

# In the order they run, the most wanted figures first (a spent --budget skips the last ones).
BN_IMPLS = ("group-norm", "batch-norm")  # model.groups.BN_IMPLS (this tool imports no torch)
BN_STEPS = tuple(f"bench-step-{impl}" for impl in BN_IMPLS)
STEPS = ("synthetic", "shards", "gpu-tests", "sync-free", "loader-parity", "bench-step", *BN_STEPS,
         "bench-train", "bench-data", "bench-eval", "model-parts", "loaders-png", "ops")
DATA = ("synthetic", "shards")
BENCHMARKS = ("bench-step", *BN_STEPS, "bench-train", "bench-data", "bench-eval", "model-parts",
              "loaders-png", "ops")
BESIDE_DATA = ("gpu-tests", "sync-free")  # need no data and time nothing: they run beside the data steps
SYNC_TESTS = "nothing_back_from_the_device or not_synchronise_with_the_host"
TAIL_LINES = 40
NOT_SELECTED = "not selected (--only): uses what OUT holds"
GRACE_S = 10  # between SIGTERM and SIGKILL of a step that ran out of time
MARKER = "GPU_CHECK_STEP"  # environment variable naming the run and step of each process


@dataclass(frozen=True)
class Profile:
    """The sizes of a run: the full check for a GPU, or the tiny ``--quick`` one."""

    scale: str  # tools/make_synthetic.py --scale
    network: tuple[str, ...]  # tools/benchmark.py step, train and eval: the backbone
    images: tuple[str, ...]  # ... and loaders: the input size
    batch: tuple[str, ...]  # step, train and loaders: the batch
    timing: tuple[str, ...]  # step, train, eval and loaders: warm-up, window and repeats
    eval_size: tuple[str, ...]  # eval only: its test batch and metrics size
    loaders: tuple[str, ...]  # loaders-png (tools/benchmark.py loaders --cuhk03)
    loader_kinds: str  # its --loaders when DALI can be imported (else torch alone)
    parity: tuple[str, ...]  # tools/compare_loaders.py flags
    model: tuple[str, ...]  # tools/benchmark.py ops (the model parts' timings)
    ops: tuple[str, ...]  # tools/benchmark.py ops --count
    lanes: int  # steps after the data steps running at once (1: every timing alone)
    limit_s: int  # time limit of each step
    budget_s: int  # default --budget


def profile(quick: bool, workers: int) -> Profile:
    """The full sizes are the published ones (ResNet-50, 256x128, 64 images per source); the quick
    ones keep every code path (DALI, both implementations, PNG, every benchmark mode) at the
    smallest size that still runs it."""
    w = str(workers)
    if quick:
        return Profile(
            scale="small", network=("-a", "resnet18"), images=("--height", "64", "--width", "32"),
            batch=("-b", "8"),
            timing=("--warmup", "1", "--window", "2", "--repeats", "2"),
            eval_size=("--test-batch-size", "16", "--eval-size", "300,2000,64"),
            loaders=("--workers", w, "--window", "2", "--repeats", "1", "--warmup", "1", "-b", "8",
                     "--cuhk03"),
            loader_kinds="dali",
            parity=("-a", "resnet18", "--height", "64", "--width", "32", "--num-ids", "2", "--workers", w,
                    "--sources", "dukemtmc,cuhk03,msmt17v1", "--eval", ""),
            model=("--repeats", "3", "--warmup", "1", "--style-shape", "8", "16", "16", "8", "--batch", "32",
                   "--features", "128", "--classes", "200", "-a", "resnet18", "--bn-groups", "4", "--bn-rows",
                   "24", "--bn-size", "32", "32"),
            ops=("--arch", "resnet18", "--bn-groups", "4"),
            lanes=2, limit_s=150, budget_s=360)
    return Profile(
        scale="medium", network=("-a", "resnet50"), images=("--height", "256", "--width", "128"),
        batch=("-b", "64"),
        timing=("--warmup", "5", "--window", "10", "--repeats", "3"),
        eval_size=("--test-batch-size", "256"),
        loaders=("--workers", w, "--window", "20", "--repeats", "1", "--warmup", "3", "--cuhk03"),
        loader_kinds="dali,torch",
        parity=("-a", "resnet50", "--height", "256", "--width", "128", "--num-ids", "16", "--images", "64",
                "--workers", w),
        model=("--repeats", "9"),
        ops=("--arch", "resnet50", "--bn-groups", "1", "4"),
        lanes=1, limit_s=240, budget_s=450)


@dataclass
class Step:
    """One subprocess of the check and, once run, what came of it."""

    name: str
    argv: list[str]
    needs: tuple[str, ...] = ()
    result: Path | None = None  # the file the step writes its figures to (shards: the folder)
    status: str = "pending"  # ok | failed | skipped
    reason: str = ""
    note: str = ""  # what the step leaves out on this machine (DALI missing)
    seconds: float = 0.0
    returncode: int | None = None
    log: str = ""
    tail: str = ""
    details: dict = field(default_factory=dict)

    @property
    def command(self) -> str:
        return display(self.argv)


def display(argv: list[str]) -> str:
    """The command as a person would type it in the repository root."""
    return shlex.join(["python" if a == sys.executable else a for a in argv])


def rel(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (the steps run there)."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def plan(out: Path, device: str, prof: Profile, workers: int, dali: bool) -> list[Step]:
    """The steps, in STEPS order, with their commands and the files they write."""
    py, data, shards, res = sys.executable, rel(out / "data"), rel(out / "shards"), out / "results"
    pytest = [py, "-m", "pytest", "-p", "no:cacheprovider", "-rA", "-q"]
    bench, on = [py, "tools/benchmark.py"], ("--device", device)
    data_flags = ("--shards", shards, "--data-dir", data, "--workers", str(workers))
    both = ("--impl", "both", "--gpus", "1", *prof.network, *prof.images, *prof.batch, *prof.timing)
    commands = {"eval": ["eval", *prof.network, *prof.images, *prof.timing, *prof.eval_size],
                "step": ["step", *both],
                "train": ["train", *both, *data_flags],
                "data": ["loaders", *prof.images, *prof.batch, *prof.timing, *data_flags, "--loaders",
                         "dali,torch,folder" if dali else "torch,folder"]}
    steps = [
        Step("synthetic", [py, "tools/make_synthetic.py", "--out", data, "--scale", prof.scale,
                           "--no-progress"]),
        Step("shards", [py, "tools/make_shards.py", "--data-dir", data, "--out", shards, "--workers",
                        str(workers), "--datasets", "market1501,dukemtmc,msmt17v1,cuhk03"],
             needs=("synthetic",), result=out / "shards"),
        Step("gpu-tests", [*pytest, "-m", "gpu", "--junitxml", rel(res / "gpu-tests.xml"), "tests"],
             result=res / "gpu-tests.xml"),
        Step("sync-free", [*pytest, "--junitxml", rel(res / "sync-free.xml"), "-k", SYNC_TESTS,
                           "tests/test_gpu.py", "tests/test_step.py"], result=res / "sync-free.xml"),
        Step("loader-parity", [py, "tools/compare_loaders.py", "--shards", shards, *on, *prof.parity,
                               "--json", rel(res / "loader-parity.json")],
             needs=("shards",), result=res / "loader-parity.json"),
        Step("model-parts", [*bench, "ops", *on, *prof.model, "--out", rel(out / "bench" / "model-parts")],
             result=out / "bench" / "model-parts" / "benchmark.json"),
        Step("ops", [*bench, "ops", "--count", *prof.ops, "--out", rel(out / "bench" / "ops")],
             result=out / "bench" / "ops" / "benchmark.json"),
    ]
    for mode, command in commands.items():
        folder = out / "bench" / mode
        steps.append(Step(f"bench-{mode}", [*bench, *command, *on, "--out", rel(folder)],
                          needs=() if mode in ("eval", "step") else ("shards",),
                          result=folder / "benchmark.json"))
    for impl, name in zip(BN_IMPLS, BN_STEPS):
        folder = out / "bench" / name
        steps.append(Step(name, [*bench, "step", "--impl", "fast", *both[2:], "--bn-impl", impl, *on, "--out",
                                 rel(folder)], result=folder / "benchmark.json"))
    steps.append(Step("loaders-png", [*bench, "loaders", "--shards", shards, "--data-dir", data, *on,
                                      *prof.loaders, "--loaders", prof.loader_kinds if dali else "torch",
                                      "--out", rel(out / "bench" / "loaders-png")],
                      needs=("shards",), result=out / "bench" / "loaders-png" / "benchmark.json"))
    if not dali:
        for step in steps:
            if step.name in ("bench-data", "bench-train", "loaders-png"):
                step.note = "DALI cannot be imported: the torch loader alone"
    return sorted(steps, key=lambda s: STEPS.index(s.name))


# ---------------------------------------------------------------- running the steps

@dataclass
class Run:
    """What every step of one invocation shares."""

    out: Path
    env: dict[str, str]
    limit_s: int
    deadline: float
    only: set[str]
    steps: dict[str, Step]
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)  # interrupted: stop and skip


def run_all(run: Run, lanes: int) -> bool:
    """The data steps beside the untimed ones, then the others, ``lanes`` at a time. Ctrl-C or
    SIGTERM stops the running steps and skips the rest; returns whether that happened."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        with ThreadPoolExecutor(2) as pool:
            _wait(run, [pool.submit(run_steps, run, list(lane)) for lane in (DATA, BESIDE_DATA)])
        with ThreadPoolExecutor(lanes) as pool:
            rest = [name for name in STEPS if name not in DATA + BESIDE_DATA]
            _wait(run, [pool.submit(run_steps, run, [name]) for name in rest])
    except KeyboardInterrupt:
        for step in run.steps.values():
            if step.status == "pending":
                step.status, step.reason = "skipped", "interrupted before it started"
        return True
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return False


def _wait(run: Run, futures: list) -> None:
    """Wait for the steps' lanes; on an interrupt, tell them to stop before the pool waits on."""
    try:
        for f in futures:
            f.result()
    except BaseException:
        run.stopping.set()
        raise


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_steps(run: Run, names: list[str]) -> None:
    for name in names:
        step = run.steps[name]
        why = skip_reason(run, step)
        if why:
            step.status, step.reason = "skipped", why
        else:
            execute(run, step)
            judge(step)
        with run.lock:
            print(f"[gpu-check] {step.name:<14} {step.status:<8} {step.seconds:6.1f} s  "
                  f"{_why(step.reason, step.note)}", flush=True)


def skip_reason(run: Run, step: Step) -> str:
    """Why the step is not run, or "" when it is."""
    if run.stopping.is_set():
        return "interrupted before it started"
    if run.only and step.name not in run.only:
        return NOT_SELECTED
    for need in (run.steps[n] for n in step.needs):
        if need.status == "failed" or (need.status == "skipped" and need.reason != NOT_SELECTED):
            return f"needs {need.name}, which {'failed' if need.status == 'failed' else 'was skipped'}"
    if run.deadline - time.monotonic() < 5:
        return "the time budget (--budget) was spent before it could start"
    return ""


def execute(run: Run, step: Step) -> None:
    """Run the step under its time limit, its processes marked by MARKER; leave none behind."""
    log = run.out / "logs" / f"{step.name}.log"
    step.log = rel(log)
    if step.result is not None and step.result.is_file():
        step.result.unlink()  # a figure must come from this run
    limit = min(run.limit_s, run.deadline - time.monotonic())
    start = time.monotonic()
    with open(log, "w") as f:
        f.write(f"$ {step.command}\n")
        f.flush()
        tag = f"{run.out}:{step.name}"
        proc = subprocess.Popen(step.argv, cwd=REPO, env={**run.env, MARKER: tag}, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            step.returncode = wait(proc, start + limit, run.stopping)
            if step.returncode is None:
                step.reason = "interrupted" if run.stopping.is_set() else f"timed out after {limit:.0f} s"
        finally:  # whatever happens, the step's processes end with it
            killed = stop_marked(proc, f"{MARKER}={tag}", GRACE_S)
            step.details["killed_processes"] = killed
            if killed:
                f.write(f"\n[gpu-check] killed {killed} process(es) of this step still running at its end\n")
    step.seconds = time.monotonic() - start
    lines = log.read_text(errors="replace").splitlines()
    step.tail = "\n".join(lines[-TAIL_LINES:])


def wait(proc: subprocess.Popen, deadline: float, stopping: threading.Event) -> int | None:
    """The step's exit status, or None when the deadline passed or the run was interrupted first."""
    while time.monotonic() < deadline and not stopping.is_set():
        try:
            return proc.wait(timeout=min(0.5, max(0.01, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


def judge(step: Step) -> None:
    """Status, reason and details of a step that ran, from its exit status and its result file."""
    if step.returncode is None:  # timed out or interrupted
        step.status = "failed"
        return
    try:
        read_result(step)
    except (OSError, ValueError, KeyError, ET.ParseError) as err:
        step.status = "failed"  # its figures are missing, whatever its exit status
        step.reason = f"exit status {step.returncode}; no result: {type(err).__name__}: {err}"
    if step.status == "pending":
        step.status = "ok" if step.returncode == 0 else "failed"
    if step.status == "failed" and not step.reason:
        step.reason = f"exit status {step.returncode}"


def read_result(step: Step) -> None:
    """Fill in the details a step's result file holds; some decide the status themselves."""
    if step.name in ("gpu-tests", "sync-free"):
        tests = pytest_outcomes(step.result)
        step.details["tests"] = tests
        judge_tests(step, tests)
    elif step.name == "shards":
        step.details["images"] = {m.parent.name: sum(split["images"] for split in
                                                     json.loads(m.read_text())["splits"].values())
                                  for m in sorted(step.result.glob("*/manifest.json"))}
    elif step.result is not None:
        data = json.loads(step.result.read_text())
        # tools/benchmark.py's JSON: the machine is results.json's own, the rows are the result
        step.details["result"] = data["results"] if step.name in BENCHMARKS else data
        if isinstance(data, dict) and "skipped" in data and step.returncode == 0:
            step.status, step.reason = "skipped", data["skipped"]
        elif isinstance(data, dict) and data.get("failed"):
            step.reason = "outside the agreement required: " + ", ".join(data["failed"])


def pytest_outcomes(xml: Path) -> list[dict]:
    """Each test of a pytest junit XML file: its id, outcome and the reason for a skip or failure."""
    out = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        test = {"test": f"{module}.py::{case.get('name')}", "outcome": "passed", "message": ""}
        for tag, outcome in (("skipped", "skipped"), ("failure", "failed"), ("error", "error")):
            found = case.find(tag)
            if found is not None:
                test["outcome"], test["message"] = outcome, (found.get("message") or "").strip()
        out.append(test)
    return out


def judge_tests(step: Step, tests: list[dict]) -> None:
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    step.details["counts"] = counts
    reasons = sorted({t["message"] for t in tests if t["outcome"] == "skipped"})
    if step.returncode == 0 and tests and counts["passed"] == 0:
        step.status, step.reason = "skipped", f"all {len(tests)} tests skipped: " + "; ".join(reasons)
    elif step.returncode == 0:
        step.reason = f"{counts['passed']} passed, {counts['skipped']} skipped" + (
            f" ({'; '.join(reasons)})" if reasons else "")
    elif not tests:
        step.reason = f"exit status {step.returncode}: no test ran (see the log)"
    else:
        bad = [t["test"] for t in tests if t["outcome"] in ("failed", "error")]
        step.reason = f"{len(bad)} failed: {', '.join(bad)}"


# ---------------------------------------------------------------- the machine and the figures

def machine(device: str) -> dict:
    """What ran the check: hardware, driver and versions."""
    import torch

    info = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "device": device, "cpu": platform.processor() or
            platform.machine(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda_runtime": torch.version.cuda, "dali": dali_version(),
            "packages": {m: module_version(m) for m in ("torchvision", "numpy", "PIL", "h5py", "scipy",
                                                          "matplotlib", "webdataset", "pytest")}}
    if device == "cuda":
        from engine.precision import amp_dtype

        info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    bf16_native=torch.cuda.is_bf16_supported(including_emulation=False),
                    amp_auto=str(amp_dtype("auto", torch.device("cuda"))).replace("torch.", ""),
                    cudnn=torch.backends.cudnn.version(), driver=driver_version())
    return info


def bring_dali(wheels: Path, env: dict[str, str]) -> str:
    """DALI from the wheels tools/fetch_dali.sh downloaded, when this Python cannot import it:
    installed once into DALI_TARGET (:func:`install_wheels`), which goes first on ``sys.path`` and
    on the steps' PYTHONPATH. Returns what was done, for the log and results.json ("" when
    nothing)."""
    if not dali_version().startswith("not importable") or not any(wheels.glob("nvidia_dali*.whl")):
        return ""
    if not (DALI_TARGET / "nvidia" / "dali").is_dir():
        failed = install_wheels(wheels, DALI_TARGET)
        if failed:
            return f"installing DALI from {rel(wheels)} failed: {failed}"
    sys.path.insert(0, str(DALI_TARGET))
    env["PYTHONPATH"] = os.pathsep.join((str(DALI_TARGET), env["PYTHONPATH"]))
    return f"DALI from {rel(DALI_TARGET)} (installed from {rel(wheels)})"


def install_wheels(wheels: Path, target: Path) -> str:
    """``pip install --no-index --no-deps --target`` of every wheel in ``wheels``, into a folder
    renamed to ``target`` when complete (nothing half-installed); "" or pip's last line."""
    part = target.with_name(target.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                           "--no-compile", "--target", str(part), *map(str, sorted(wheels.glob("*.whl")))],
                          capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(part, ignore_errors=True)
        return ((done.stderr or done.stdout).strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    shutil.rmtree(target, ignore_errors=True)
    part.rename(target)
    return ""


def dali_version() -> str:
    try:
        import nvidia.dali as dali
    except ImportError as err:
        return f"not importable ({err})"
    return dali.__version__


def module_version(name: str) -> str:
    try:
        module = __import__(name)
    except ImportError:
        return "missing"
    return getattr(module, "__version__", "installed")


def driver_version() -> str:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "unknown (no nvidia-smi)"
    done = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                          text=True, timeout=30)
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else "unknown"


def _why(reason: str, note: str) -> str:
    return "; ".join(x for x in (reason, note) if x)


def parity(result: dict) -> report.Table:
    """tools/compare_loaders.py's agreement of DALI with PIL, per batch."""
    t = report.Table("DALI against PIL on the same images",
                     ["batch", "images", "pixel diff mean (1/255)", "max", "feature cosine min", "mean",
                      "unrelated images"])
    for batch, r in result["batches"].items():
        t.rows.append([batch, r["images"], r["pixel_mean_abs_diff"], r["pixel_max_abs_diff"], r["cosine_min"],
                       r["cosine_mean"], r["unrelated_cosine_mean"]])
        t.figures += [(f"{batch}: pixel diff mean", round(r["pixel_mean_abs_diff"], 3), "1/255"),
                      (f"{batch}: feature cosine min", round(r["cosine_min"], 5), "cosine")]
    return t


def tables(steps: dict[str, dict]) -> list[tuple[str, report.Table]]:
    """The tables of the figures of the steps that ended ok, each with the command that produced
    it: the data steps' and the loader parity's, tools/benchmark.py's own (tools/bench/report.py;
    the step named in the title where two steps give the same kind of table), and the projection
    from bench-step, bench-train and bench-eval together."""
    ok = {name: s for name, s in steps.items() if s["status"] == "ok"}
    out = []
    if "synthetic" in ok:
        wall = round(ok["synthetic"]["seconds"], 1)
        out.append((ok["synthetic"]["command"], report.listing("Data preparation: synthetic set", [
            ("make_synthetic wall time (beside gpu-tests and sync-free)", wall, "s")])))
    if "shards" in ok:
        images, seconds = ok["shards"]["details"]["images"], ok["shards"]["seconds"]
        total = sum(images.values())
        out.append((ok["shards"]["command"], report.Table(
            "Data preparation: shards", ["dataset", "images"],
            [*map(list, images.items()), [f"all, {seconds:.1f} s (beside gpu-tests and sync-free)", total]],
            [("make_shards wall time", round(seconds, 1), "s"),
             ("make_shards images/s", round(total / seconds, 1), "images/s")])))
    if "loader-parity" in ok:
        out.append((ok["loader-parity"]["command"], parity(ok["loader-parity"]["details"]["result"])))
    for name in (n for n in BENCHMARKS if n in ok):
        for t in report.tables(ok[name]["details"]["result"]):
            t.title += f" ({name})" if name in ("bench-data", "loaders-png", *BN_STEPS) else ""
            out.append((ok[name]["command"], t))
    three = [ok[n] for n in ("bench-step", "bench-train", "bench-eval") if n in ok]
    derived = report.projection([r for s in three for r in s["details"]["result"]])
    derived.title = "From two steps: step bound and full-run projection"
    out.append((" ; ".join(s["command"] for s in three), derived))
    return [(command, t) for command, t in out if t.rows]


def summary(results: dict) -> str:
    """summary.md: the machine, the steps, the tests, and every figure in a table under its command."""
    m, steps = results["machine"], {s["name"]: s for s in results["steps"]}
    hardware = m.get("gpu", f"no GPU ({m['cpu']})") + f", {m['cpu_count']} CPUs"
    software = (f"Python {m['python']}, torch {m['torch']} (CUDA {m['cuda_runtime']}), DALI {m['dali']}"
                + (f", driver {m['driver']}, cuDNN {m['cudnn']}" if "driver" in m else ""))
    lines = [f"# GPU check: {m.get('gpu', 'CPU')}, {m['date']}", "",
             f"`{results['command']}` ({results['profile']} configuration, device {m['device']}, "
             f"{results['seconds']:.0f} s). Every figure with its command: `results.json`; logs: `logs/`.",
             "", report.line(["name", "hardware", "software", "date"]), "|" + " --- |" * 4,
             report.line([m["device"], hardware, software, m["date"]])]
    if "gpu" in m:
        lines += ["", f"Compute capability {m['capability']}, native bf16: {m['bf16_native']}, "
                      f"`--amp auto` picks {m['amp_auto']}."]
    if results["profile"] == "quick":
        lines += ["", "Quick configuration: tiny sizes, steps two at a time. Its timings show that the tools "
                      "work; they measure nothing."]
    lines += report.Table("Steps", ["step", "status", "seconds", "reason, note"],
                   [[s["name"], s["status"], f"{s['seconds']:.1f}", _why(s["reason"], s["note"])]
                    for s in results["steps"]]).markdown(results["command"])
    for name in ("gpu-tests", "sync-free"):
        tests = steps[name]["details"].get("tests")
        if tests:
            outcomes = report.Table(f"Tests: {name}", ["test", "outcome", "message"],
                             [[t["test"], t["outcome"], t["message"]] for t in tests])
            lines += outcomes.markdown(steps[name]["command"])
    for command, t in tables(steps):
        lines += t.markdown(command)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main

def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("logs/gpu-check"),
                   help="folder for the data, shards, logs, results.json and summary.md "
                        "(default logs/gpu-check)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="cuda: the GPU check (refused without CUDA); cpu: every step on the CPU, CUDA hidden "
                        "from the steps; auto (default): cuda when there is a GPU")
    p.add_argument("--quick", action="store_true",
                   help="tiny configuration (small synthetic set, ResNet-18 at 64x32, a few iterations), "
                        "as CI runs it on a CPU")
    p.add_argument("--workers", type=int, default=None,
                   help="loader and shard-writing worker processes "
                        "(default: 1 with --quick, else min(8, CPUs))")
    p.add_argument("--budget", type=int, default=None,
                   help="seconds for the whole run; steps that cannot start within it are skipped "
                        "(default: 450, 360 with --quick)")
    p.add_argument("--wheels", type=Path, default=WHEELS,
                   help="folder of the DALI wheels tools/fetch_dali.sh downloads, installed from when DALI "
                        "cannot be imported (default: .whl in the repository)")
    p.add_argument("--only", default="",
                   help=f"comma-separated steps to run, using what OUT already holds for the others "
                        f"(default: all of {', '.join(STEPS)})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    from engine.device import DeviceError, resolve_device

    try:
        device = resolve_device(args.device).type
    except DeviceError as e:
        print(f"gpu_check.py: error: {e}", file=sys.stderr)
        return 2
    only = {s for s in args.only.split(",") if s}
    if only - set(STEPS):
        raise SystemExit(f"--only: unknown step(s) {', '.join(sorted(only - set(STEPS)))}; "
                         f"steps: {', '.join(STEPS)}")
    workers = args.workers or (1 if args.quick else min(8, os.cpu_count() or 1))
    prof = profile(args.quick, workers)
    out = args.out.resolve()
    for sub in ("logs", "results"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    # The steps run tools/*.py as scripts: the repository on PYTHONPATH finds the packages
    # whether or not the project is installed (a bare GPU machine's Python has no install).
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if device == "cpu" and args.quick:
        # The tiny configuration's operations gain nothing from a second thread, and on a busy
        # 2-core machine OpenMP waiting for a descheduled thread made them 5-10x slower.
        env.setdefault("OMP_NUM_THREADS", "1")
    start = time.monotonic()
    brought = bring_dali(args.wheels, env)
    dali = not dali_version().startswith("not importable")
    steps = {s.name: s for s in plan(out, device, prof, workers, dali)}
    run = Run(out, env, prof.limit_s, start + (args.budget or prof.budget_s), only, steps)
    print(f"[gpu-check] {device}, {'quick' if args.quick else 'full'} configuration, {workers} workers, "
          f"budget {args.budget or prof.budget_s} s, logs in {out / 'logs'}"
          + (f"; {brought}" if brought else ""), flush=True)
    interrupted = run_all(run, prof.lanes)
    given = sys.argv[1:] if argv is None else argv
    results = {"command": display([sys.executable, "tools/gpu_check.py", *given]),
               "profile": "quick" if args.quick else "full", "seconds": round(time.monotonic() - start, 1),
               "machine": {**machine(device), "dali_wheels": brought},
               "steps": [asdict(s) for s in steps.values()]}
    for s in results["steps"]:
        s["command"] = display(s["argv"])
        s["result"] = rel(Path(s["result"])) if s["result"] else None
    results["figures"] = [{"table": t.title, "name": name, "value": value, "unit": unit, "command": command}
                          for command, t in tables({s["name"]: s for s in results["steps"]})
                          for name, value, unit in t.figures if math.isfinite(value)]
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "summary.md").write_text(summary(results))
    failed = [s.name for s in steps.values() if s.status == "failed"]
    print(f"[gpu-check] {'interrupted; ' if interrupted else ''}{len(failed)} failed"
          f"{': ' + ', '.join(failed) if failed else ''}; wrote {out / 'results.json'} and "
          f"{out / 'summary.md'} in {results['seconds']:.0f} s", flush=True)
    return 130 if interrupted else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

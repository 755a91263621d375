r"""The published leave-one-out table, and two other protocols, in one command.

    python tools/leave_one_out.py --shards shards --out logs/loo --update-style [train.py flags]

--protocol leave-one-out (the default, the published table) trains each of Market-1501,
DukeMTMC-reID, CUHK03-NP and MSMT17_V1 as the unseen target of a run on the other three (the
published runs' sources, in their order); --protocol no-duke leaves DukeMTMC-reID out: each of
Market-1501, CUHK03-NP and MSMT17_V1 is the target of a run on the other two and CUHK-SYSU (a
source only); --protocol single trains on one of the four datasets at a time and evaluates each
run on the other three. One run after another, each as

    python -m torch.distributed.run --standalone --nproc-per-node N train.py --shards SHARDS \
        --sources A,B,C -d TARGET --logs-dir OUT/<run> ...

then writes OUT/table.md and OUT/table.json: mAP and rank-1 of each target, and for the
leave-one-out protocol the published figures (Tan et al., IEEE TMM 2023) and the difference, with
each run's wall time. The figures are the final epoch's evaluation, as the published runs report
them (the best epoch's mAP is given beside them, labelled, for reference only).

--seeds 0,1,2 trains every run once per seed (train.py --seed, each seed in its own folder
OUT/<run>_seed<N>) and the table gives the mean and standard deviation over the seeds of each
target's mAP and rank-1, with each seed's figures in table.json.

With --update-style the runs are IL and compare with the published IL row; without it they are
the baseline of --baseline (FBF by default, FB with --baseline fb) and compare with its
published row; --both runs IL and the baseline side by side (8 runs).

Every other flag goes to train.py unchanged (e.g. -a, -b, --epochs, --iters, --workers,
--pretrained, --device, --data-dir; `python train.py --help` lists them) and is checked by
train.py's parser before any run starts; the flags this tool sets per run (-d, --sources,
--dataset_src1/2/3, --logs-dir, --resume, --overwrite, and --seed with --seeds) and --evaluate are
refused.

Resumable: a run that finished (train.py exited 0) has OUT/<run>/done.json and is skipped by a
later call; a run that was interrupted continues from its OUT/<run>/latest.pth. SIGINT or SIGTERM
to this tool is forwarded to the running torchrun, whose trainers save latest.pth and stop; the
tool then exits with 128 + the signal number, and the same command resumes. The table is
rewritten after every finished run, so it always shows the runs done so far.

Exit codes: 0 every run finished; 1 a training failed (train.py's message is above; the same
command retries it); 2 a refusal (one line, `leave_one_out.py: error: ...`); 128 + signal when
stopped by a signal.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from engine.flags import Parser, at_least, train_parser
from engine.errors import UsageError
from pipeline.files import write_atomic
from pipeline.runlock import FolderBusy, hold_folder
from pipeline.workers import die_with_parent
from pipeline.shards import load_manifest
from tools.processes import signal_group

PROG = "leave_one_out.py"
ROOT = Path(__file__).resolve().parents[1]

TARGETS = ("market1501", "dukemtmc", "cuhk03", "msmt17v1")  # the table's order: ->M, ->D, ->C3, ->MS
SOURCES = {  # the published runs' sources, in their order (README, "Training on the real datasets")
    "market1501": ("dukemtmc", "cuhk03", "msmt17v1"),
    "dukemtmc": ("market1501", "cuhk03", "msmt17v1"),
    "cuhk03": ("market1501", "dukemtmc", "msmt17v1"),
    "msmt17v1": ("market1501", "dukemtmc", "cuhk03"),
}
NO_DUKE_SOURCES = {  # without DukeMTMC-reID: the other two targets and CUHK-SYSU (a source only)
    "market1501": ("msmt17v1", "cuhk_sysu", "cuhk03"),
    "cuhk03": ("market1501", "msmt17v1", "cuhk_sysu"),
    "msmt17v1": ("market1501", "cuhk_sysu", "cuhk03"),
}
PROTOCOLS = {  # name -> (title, what a run is)
    "leave-one-out": ("Leave-one-out", "each target is unseen: trained on the other three datasets (the "
                                       "published runs' sources), evaluated on it"),
    "no-duke": ("Leave-one-out without DukeMTMC-reID", "each target is unseen: trained on the other two of "
                "Market-1501, CUHK03-NP and MSMT17_V1 and on CUHK-SYSU (a source only), evaluated on it"),
    "single": ("Single source", "each run trains on one dataset and is evaluated on each of the other "
               "three (a row per pair)"),
}
TITLES = {"market1501": "Market-1501", "dukemtmc": "DukeMTMC-reID", "cuhk03": "CUHK03-NP",
          "msmt17v1": "MSMT17_V1", "cuhk_sysu": "CUHK-SYSU"}
MODES = {"il": "IL", "fbf": "FBF baseline", "fb": "FB baseline"}
# (mAP, rank-1) in %, Tan et al., "Style Interleaved Learning for Generalizable Person
# Re-identification", IEEE TMM 2023: IL and its two baselines, ResNet-50, leave-one-out.
PUBLISHED = {
    "il": {"market1501": (65.4, 86.5), "dukemtmc": (57.1, 76.0), "cuhk03": (38.2, 40.7),
           "msmt17v1": (20.0, 45.3)},
    "fb": {"market1501": (59.3, 81.2), "dukemtmc": (54.3, 70.9), "cuhk03": (36.1, 37.4),
           "msmt17v1": (14.7, 35.2)},
    "fbf": {"market1501": (59.7, 81.5), "dukemtmc": (53.6, 73.0), "cuhk03": (35.3, 35.9),
            "msmt17v1": (13.7, 33.4)},
}
# train.py flags this tool sets per run (argparse dest -> spelling in messages).
OWN_PER_RUN = {"dataset": "-d", "sources": "--sources", "dataset_src1": "--dataset_src1",
               "dataset_src2": "--dataset_src2",
               "dataset_src3": "--dataset_src3", "logs_dir": "--logs-dir", "resume": "--resume",
               "overwrite": "--overwrite", "evaluate": "--evaluate"}
# train.py flags this tool takes itself; an abbreviation of them would reach train.py unseen.
OWN_SHARED = {"shards": "--shards", "update_style": "--update-style", "baseline": "--baseline"}
TOOL_FILES = {"sessions.jsonl", "done.json", ".lock"}  # what this tool keeps in a run's folder


@dataclass(frozen=True)
class Job:
    """One training of a protocol: ``mode`` (il, fbf or fb) on ``sources``, evaluated on
    ``targets``, with train.py's --seed ``seed`` (None: the flags' seed, one run per setting)."""

    protocol: str
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    mode: str
    seed: int | None = None

    @property
    def name(self) -> str:
        """The run's folder: ``<mode>_to_<target>`` (leave-one-out), ``<mode>_noduke_to_<target>``,
        ``<mode>_from_<source>`` (single), each with ``_seed<N>`` under --seeds."""
        if self.protocol == "single":
            base = f"{self.mode}_from_{self.sources[0]}"
        else:
            base = f"{self.mode}{'_noduke' if self.protocol == 'no-duke' else ''}_to_{self.targets[0]}"
        return base if self.seed is None else f"{base}_seed{self.seed}"

    def title(self) -> str:
        seed = "" if self.seed is None else f" (seed {self.seed})"
        return f"{MODES[self.mode]}: {' + '.join(self.sources)} -> {', '.join(self.targets)}{seed}"


def published(protocol: str, mode: str, target: str) -> dict | None:
    """The published (mAP, rank-1) of a table row: the leave-one-out protocol's only."""
    if protocol != "leave-one-out":
        return None
    pub = PUBLISHED[mode][target]
    return {"mAP": pub[0], "rank1": pub[1]}


# ------------------------------------------------------------------------------------- flags
def get_parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__, allow_abbrev=False,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, default=Path("shards"),
                   help="folder of shards written by tools/make_shards.py, holding the protocol's "
                        "datasets (passed to every run; default: shards)")
    p.add_argument("--out", type=Path, required=True,
                   help="folder of the runs (OUT/<run>/, e.g. il_to_market1501: train.py's --logs-dir, plus "
                        "done.json and sessions.jsonl) and of table.md and table.json")
    p.add_argument("--nproc-per-node", "--nproc_per_node", type=at_least(1), default=1, metavar="N",
                   help="processes (GPUs) per run; every run is started by torchrun, with N=1 too "
                        "(default: 1)")
    p.add_argument("--update-style", "--updateStyle", action="store_true",
                   help="train IL and compare with the published IL row (without it: the --baseline row)")
    p.add_argument("--baseline", choices=("fbf", "fb"), default="fbf",
                   help="the baseline run without --update-style, and beside IL with --both (default: fbf)")
    p.add_argument("--both", action="store_true",
                   help="run IL and the --baseline side by side for every run of the protocol")
    p.add_argument("--protocol", choices=tuple(PROTOCOLS), default="leave-one-out",
                   help="leave-one-out: the published table (each of the four targets trained on the other "
                        "three); no-duke: Market-1501, CUHK03-NP, MSMT17_V1 as targets, each trained on the "
                        "other two and CUHK-SYSU; single: a run per dataset of the four, evaluated on the "
                        "other three (default: leave-one-out)")
    p.add_argument("--targets", type=target_list, default=None, metavar="T[,T...]",
                   help=f"only these targets, comma-separated, of {', '.join(TARGETS)} (default: all the "
                        "protocol's; no-duke has no DukeMTMC-reID target; with single, the targets each run "
                        "is evaluated on)")
    p.add_argument("--seeds", type=seed_list, default=None, metavar="S[,S...]",
                   help="train every run once per seed (train.py --seed, each in its own folder) and give "
                        "the mean and standard deviation over them (default: one run, train.py's --seed)")
    p.add_argument("--shutdown-timeout", type=at_least(1), default=300, metavar="S",
                   help="seconds torchrun waits for its trainers after a stop signal before killing them: "
                        "long enough for the evaluation that may be running (default: 300)")
    return p


def target_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    unknown = [n for n in names if n not in TARGETS]
    if unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct names of {', '.join(TARGETS)}, got {text!r}")
    return [t for t in TARGETS if t in names]  # the table's order


def seed_list(text: str) -> list[int]:
    seeds = [at_least(0)(n.strip()) for n in text.split(",")]
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"a seed is given twice in {text!r}")
    return seeds


def check_train_flags(extra: list[str]) -> set[str]:
    """The flags for train.py must be train.py's, with valid values, and none this tool sets;
    returns the names (argparse dests) of those given."""
    try:
        given = train_parser("").parse_args(extra).given
    except UsageError as e:
        raise UsageError(f"{e} (flags this tool does not know go to train.py)") from None
    for dest, flag in OWN_PER_RUN.items():
        if dest in given:
            raise UsageError(f"{flag} is set by this tool for each run (targets, their sources, --logs-dir "
                             f"OUT/<run>, --resume of an interrupted run): leave it out")
    for dest, flag in OWN_SHARED.items():
        if dest in given:
            raise UsageError(f"write this tool's {flag} in full (an abbreviation would reach train.py "
                             "unseen)")
    return given


def jobs_of(args) -> list[Job]:
    """The protocol's runs, in the table's order: per run of the protocol, each mode, each seed."""
    modes = ["il", args.baseline] if args.both else ["il"] if args.update_style else [args.baseline]
    targets = args.targets or [t for t in TARGETS if args.protocol != "no-duke" or t in NO_DUKE_SOURCES]
    if args.protocol == "single":
        runs = [((s,), tuple(t for t in targets if t != s)) for s in TARGETS]
        runs = [(s, t) for s, t in runs if t]
    else:
        table = NO_DUKE_SOURCES if args.protocol == "no-duke" else SOURCES
        if unknown := [t for t in targets if t not in table]:
            raise UsageError(f"--targets {','.join(unknown)}: not a target of --protocol {args.protocol} "
                          f"(its targets: {', '.join(table)})")
        runs = [(table[t], (t,)) for t in targets]
    seeds = args.seeds or [None]
    return [Job(args.protocol, s, t, m, seed) for s, t in runs for m in modes for seed in seeds]


def check_shards(shards: Path, jobs: list[Job]) -> None:
    """Complete shards of every dataset the runs train or evaluate on."""
    used = {n for job in jobs for n in job.sources + job.targets}
    missing = []
    for name in [n for n in TITLES if n in used]:
        try:
            load_manifest(shards / name)
        except (OSError, ValueError):
            missing.append(name)
    if missing:
        raise UsageError(f"--shards {shards} lacks complete shards of {', '.join(missing)} (build them: "
                         f"python tools/make_shards.py --data-dir DATA --out {shards} --datasets "
                         f"{','.join(missing)}; or pass --data-dir DATA and train.py builds them)")


# ------------------------------------------------------------------------------------- one run
class Stopper:
    """SIGINT and SIGTERM, while the runs go on: forwarded to the running torchrun (its own
    process group), remembered so that no further run starts."""

    def __init__(self):
        self.signum: int | None = None
        self.proc: subprocess.Popen | None = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame) -> None:
        self.signum = signum
        self.forward()

    def forward(self) -> None:
        if self.signum is not None and self.proc is not None and self.proc.poll() is None:
            signal_group(self.proc.pid, self.signum)

    def close(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


def end_with_parent(parent: int) -> None:
    """In torchrun's process, before it starts: SIGTERM when this tool dies (SIGKILL included), so its
    trainers still save latest.pth and stop instead of training on with nobody waiting."""
    die_with_parent(signal.SIGTERM)
    if os.getppid() != parent:  # the tool died before prctl
        os._exit(128 + signal.SIGTERM)


def train_command(job: Job, args, extra: list[str]) -> list[str]:
    logs = args.out / job.name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(args.nproc_per_node), "--shutdown-timeout", str(args.shutdown_timeout), str(ROOT / "train.py"),
           "--shards", str(args.shards), "--sources", ",".join(job.sources), "-d", ",".join(job.targets),
           "--logs-dir", str(logs), *(["--update-style"] if job.mode == "il" else ["--baseline", job.mode]),
           *([] if job.seed is None else ["--seed", str(job.seed)]), *extra]
    if (logs / "latest.pth").is_file():
        cmd += ["--resume", str(logs / "latest.pth")]
    elif any(p.name not in TOOL_FILES for p in logs.iterdir()):
        cmd += ["--overwrite"]  # files of a run killed before its first checkpoint: nothing to resume
    return cmd


def run_job(job: Job, cmd: list[str], stopper: Stopper) -> int:
    """torchrun in its own session; its exit code. Each attempt is a line of sessions.jsonl."""
    logs = Path(cmd[cmd.index("--logs-dir") + 1])
    start, t0 = time.time(), time.monotonic()
    parent = os.getpid()
    proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=lambda: end_with_parent(parent))
    stopper.proc = proc
    stopper.forward()  # a signal that came while it started
    try:
        code = proc.wait()
    finally:
        stopper.proc = None
    session = {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(start)),
               "wall_s": round(time.monotonic() - t0, 3), "exit_code": code, "command": cmd}
    if stopper.signum is not None:
        session["stopped_by"] = signal.Signals(stopper.signum).name
    with open(logs / "sessions.jsonl", "a") as f:
        f.write(json.dumps(session) + "\n")
    return code


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def scores(row: dict, target: str) -> tuple[float, float] | None:
    """(mAP, rank-1) in % on ``target`` from one metrics.jsonl row; None when it was not evaluated."""
    for m, r in ((f"{target}/mAP", f"{target}/rank1"), ("mAP", "rank1")):
        if m in row and r in row:
            return round(100 * row[m], 4), round(100 * row[r], 4)
    return None


def finish_job(job: Job, logs: Path, nproc: int, extra: list[str]) -> dict:
    """done.json of a run whose training exited 0: per target its final and best evaluations; wall
    time, commands."""
    history, sessions = read_jsonl(logs / "metrics.jsonl"), read_jsonl(logs / "sessions.jsonl")
    results = {}
    for target in job.targets:
        final = scores(history[-1], target) if history else None
        evaluated = [(h["epoch"], s) for h in history if (s := scores(h, target)) is not None]
        best = max(evaluated, key=lambda e: e[1][0]) if evaluated else None
        results[target] = {
            "final": final and {"epoch": history[-1]["epoch"], "mAP": final[0], "rank1": final[1]},
            "best": best and {"epoch": best[0], "mAP": best[1][0], "rank1": best[1][1]}}
    done = {
        "run": job.name, "protocol": job.protocol, "targets": list(job.targets), "sources": list(job.sources),
        "mode": job.mode, "seed": job.seed, "results": results,
        "eval_error": history[-1].get("eval_error") if history else None,
        "epochs_run": history[-1]["epoch"] if history else 0,
        "wall_s": round(sum(s["wall_s"] for s in sessions), 3), "sessions": len(sessions),
        "nproc_per_node": nproc, "train_flags": extra, "command": sessions[-1]["command"],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_atomic(logs / "done.json", lambda tmp: tmp.write_text(json.dumps(done, indent=1) + "\n"))
    return done


def read_done(logs: Path) -> dict | None:
    path = logs / "done.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise UsageError(f"{path} is not valid JSON ({e}): delete it to train that run again") from None


def summary(done: dict) -> str:
    parts = []
    for target, res in done["results"].items():
        final = res["final"]
        got = f"mAP {final['mAP']:.1f} rank-1 {final['rank1']:.1f}" if final else "no final evaluation"
        pub = published(done["protocol"], done["mode"], target)
        parts.append(("" if len(done["results"]) == 1 else f"{target}: ") + got
                     + (f" (published {pub['mAP']:.1f} / {pub['rank1']:.1f})" if pub else ""))
    n = done["epochs_run"]
    return f"{'; '.join(parts)}, {n} epoch{'' if n == 1 else 's'}, {clock(done['wall_s'])}"


def clock(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s // 60 % 60:02d}m"


# ------------------------------------------------------------------------------------- the table
def run_row(job: Job, target: str, out: Path) -> dict:
    """One run's figures on one target (one seed's, under --seeds)."""
    done = read_done(out / job.name)
    pub = published(job.protocol, job.mode, target)
    row = {"run": job.name, "target": target, "sources": list(job.sources), "mode": job.mode,
           "finished": done is not None, "published": pub}
    if job.seed is not None:
        row["seed"] = job.seed
    if done is not None:
        res = done["results"].get(target) or {"final": None, "best": None}
        final = res["final"] or {}
        row.update({
            "mAP": final.get("mAP"), "rank1": final.get("rank1"), "epoch": final.get("epoch"),
            "diff": None if not (final and pub) else {"mAP": round(final["mAP"] - pub["mAP"], 4),
                                                      "rank1": round(final["rank1"] - pub["rank1"], 4)},
            "best": res["best"], "eval_error": done["eval_error"], "epochs_run": done["epochs_run"],
            "wall_s": done["wall_s"], "sessions": done["sessions"],
            "nproc_per_node": done["nproc_per_node"], "train_flags": done["train_flags"],
            "command": done["command"],
        })
    return row


def over_seeds(runs: list[dict]) -> dict:
    """A table row of one setting trained once per seed: mean and sample standard deviation (None
    below two seeds) of mAP and rank-1 over the seeds with a final evaluation; each seed's row."""
    first = runs[0]
    row = {k: first[k] for k in ("target", "sources", "mode", "published")}
    row["finished"] = all(r["finished"] for r in runs)
    scored = [r for r in runs if r.get("mAP") is not None]
    for key in ("mAP", "rank1"):
        values = [r[key] for r in scored]
        row[key] = round(statistics.fmean(values), 4) if values else None
        row[f"{key}_std"] = round(statistics.stdev(values), 4) if len(values) > 1 else None
    pub = row["published"]
    row["diff"] = None if not (scored and pub) else {k: round(row[k] - pub[k], 4) for k in ("mAP", "rank1")}
    row["seeds"] = runs
    return row


def table_rows(jobs: list[Job], out: Path) -> list[dict]:
    """A row per (mode, sources, target), by target and then in the jobs' order: one run's, or
    under --seeds the statistics over its seeds' runs."""
    settings: dict[tuple, list[dict]] = {}
    for job in jobs:
        for target in job.targets:
            settings.setdefault((job.mode, job.sources, target), []).append(run_row(job, target, out))
    by_target = sorted(settings.items(), key=lambda kv: TARGETS.index(kv[0][2]))
    return [over_seeds(runs) if "seed" in runs[0] else runs[0] for _, runs in by_target]


def write_table(jobs: list[Job], out: Path) -> list[dict]:
    rows = table_rows(jobs, out)
    protocol = jobs[0].protocol
    seeds = sorted({job.seed for job in jobs if job.seed is not None})
    doc = {
        "protocol": protocol,
        "reported": "final epoch's evaluation (as the published runs); best: the highest mAP of any epoch",
        "units": "percent",
        **({"seeds": seeds, "over_seeds": "mean and sample standard deviation of the seeds' final "
                                          "evaluations; each seed's run in 'seeds'"} if seeds else {}),
        "published_by": "Tan et al., Style Interleaved Learning for Generalizable Person Re-identification, "
                        "IEEE TMM 2023 (ResNet-50)" if protocol == "leave-one-out" else None,
        "runs": rows,
    }
    write_atomic(out / "table.json", lambda tmp: tmp.write_text(json.dumps(doc, indent=1) + "\n"))
    write_atomic(out / "table.md", lambda tmp: tmp.write_text(markdown(rows, protocol)))
    return rows


def markdown(rows: list[dict], protocol: str) -> str:
    def num(v):
        return "-" if v is None else f"{v:.1f}"

    def diff(v):
        return "-" if v is None else f"{v:+.1f}"

    def spread(r, key):
        return num(r[key]) if r.get(f"{key}_std") is None else f"{r[key]:.1f} ± {r[f'{key}_std']:.1f}"

    title, what = PROTOCOLS[protocol]
    has_published = protocol == "leave-one-out"
    seeded = any("seeds" in r for r in rows)
    text = (f"{what[0].upper()}{what[1:]}. Ours: the final epoch's evaluation, as the published runs "
            "report it" + ("; mean ± standard deviation (sample) over the seeds, each seed's figures in "
                           "table.json" if seeded else "; best: the highest mAP of any epoch (its epoch in "
                           "brackets), for reference only")
            + (". Published: Tan et al., IEEE TMM 2023 (ResNet-50)." if has_published
               else ". No published figures exist for this protocol."))
    head = ["target", "method", "sources", *(["seeds"] * seeded)]
    for metric in ("mAP", "rank-1"):
        head += [metric, *(["published", "diff"] * has_published)]
    head += [*(["best mAP (epoch)"] * (not seeded)), "epochs", "wall"]
    lines = [f"# {title}: ours{' vs published' if has_published else ''} (mAP / rank-1, %)", "", text, "",
             "| " + " | ".join(head) + " |",
             "| " + " | ".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + " |"]
    for r in rows:
        pub, d = r["published"] or {}, r.get("diff") or {}
        runs = r.get("seeds", [r])
        done = [x for x in runs if x["finished"]]
        cells = [TITLES[r["target"]], MODES[r["mode"]], " + ".join(TITLES[s] for s in r["sources"])]
        if seeded:
            cells.append(", ".join(str(x["seed"]) for x in done)
                         + (f" ({len(runs) - len(done)} not finished)" if len(done) < len(runs) else ""))
        for key in ("mAP", "rank1"):
            cells.append(spread(r, key) if done else "not finished" if key == "mAP" else "")
            if has_published:
                cells += [num(pub.get(key)), diff(d.get(key)) if done else ""]
        if not seeded:
            best = r.get("best")
            cells.append("" if not done else f"{num(best['mAP'])} ({best['epoch']})" if best else "-")
        cells += [str(max(x["epochs_run"] for x in done)), clock(sum(x["wall_s"] for x in done))] if done \
            else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if has_published and any(r["target"] == "msmt17v1" and r["mode"] == "il" for r in rows):
        lines += ["The published MSMT17_V1 IL figure is the evaluation after epoch 36 of a run whose log "
                  "stops there.", ""]
    runs = [x for r in rows for x in r.get("seeds", [r])]
    failed = sorted({x["run"] for x in runs if x["finished"] and x["mAP"] is None})
    if failed:
        lines += [f"No final evaluation (see eval_error in table.json): {', '.join(failed)}.", ""]
    setups = {(x["nproc_per_node"], tuple(x["train_flags"])) for x in runs if x["finished"]}
    if len(setups) == 1:
        nproc, flags = setups.pop()
        lines += [f"train.py flags besides the sources, target{', seed' if seeded else ''} and mode: "
                  f"`{shlex.join(flags) or '(none)'}`; {nproc} process{'es' if nproc > 1 else ''} per run. "
                  "Commands: table.json.", ""]
    elif setups:
        lines += ["The runs were trained with different train.py flags or process counts: see each "
                  "run's command in table.json.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    try:
        args, extra = get_parser().parse_known_args(argv)
        given = check_train_flags(extra)
        if args.seeds is not None and "seed" in given:
            raise UsageError("--seed is set by this tool for each run with --seeds: leave it out, or leave "
                          "--seeds out to train once with --seed")
        jobs = jobs_of(args)
        if args.out.exists() and not args.out.is_dir():
            raise UsageError(f"--out {args.out} is a file, expected a folder")
        if "data_dir" not in given:  # with --data-dir, train.py builds the missing shards
            check_shards(args.shards, jobs)
        try:
            args.out.mkdir(parents=True, exist_ok=True)
            lock = hold_folder(args.out)
        except FolderBusy as e:
            raise UsageError(f"--out {e}: another leave_one_out.py is running into it") from None
        except OSError as e:
            raise UsageError(f"--out {args.out}: cannot create or write this folder "
                             f"({e.strerror or e})") from None
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        for job in jobs:
            read_done(args.out / job.name)  # an unreadable done.json is refused now, not after hours
        return run_all(jobs, args, extra)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        lock.close()


def run_all(jobs: list[Job], args, extra: list[str]) -> int:
    stopper = Stopper()
    try:
        for i, job in enumerate(jobs, 1):
            logs = args.out / job.name
            done = read_done(logs)
            if done is not None:
                print(f"[{i}/{len(jobs)}] {job.name}: finished earlier, skipped: {summary(done)}", flush=True)
                if done["train_flags"] != extra or done["nproc_per_node"] != args.nproc_per_node:
                    print(f"[{i}/{len(jobs)}] note: {job.name} was trained with other flags: "
                          f"{shlex.join(done['train_flags'])} on {done['nproc_per_node']} process(es); "
                          f"delete {logs} to train it again with these", flush=True)
                continue
            if stopper.signum is not None:
                break
            logs.mkdir(parents=True, exist_ok=True)
            cmd = train_command(job, args, extra)
            how = f"resuming from {logs / 'latest.pth'}" if "--resume" in cmd else "starting"
            print(f"[{i}/{len(jobs)}] {job.title()}: {how}\n  {shlex.join(cmd)}", flush=True)
            code = run_job(job, cmd, stopper)
            if code == 0:  # finished, even when a stop signal came as it ended
                done = finish_job(job, logs, args.nproc_per_node, extra)
                write_table(jobs, args.out)
                print(f"[{i}/{len(jobs)}] {job.name} finished: {summary(done)}", flush=True)
                continue
            write_table(jobs, args.out)
            if stopper.signum is not None:
                print(f"{PROG}: stopped by {signal.Signals(stopper.signum).name} during run {i}/{len(jobs)} "
                      f"({job.name}; torchrun exit {code}): rerun the same command to resume it from "
                      f"{logs / 'latest.pth'}; finished runs are kept", file=sys.stderr, flush=True)
                return 128 + stopper.signum
            print(f"{PROG}: run {i}/{len(jobs)} ({job.name}) failed: torchrun exit {code} (train.py's "
                  f"own message is above); the same command retries it, from {logs / 'latest.pth'} "
                  f"when it exists; finished runs are kept", file=sys.stderr, flush=True)
            return 1
        if stopper.signum is not None:
            write_table(jobs, args.out)
            print(f"{PROG}: stopped by {signal.Signals(stopper.signum).name}: rerun the same command to go "
                  "on", file=sys.stderr, flush=True)
            return 128 + stopper.signum
        write_table(jobs, args.out)
        print(f"table: {args.out / 'table.md'}  {args.out / 'table.json'}", flush=True)
        print((args.out / "table.md").read_text(), flush=True)
        return 0
    finally:
        stopper.close()


if __name__ == "__main__":
    sys.exit(main())

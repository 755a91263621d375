r"""The published leave-one-out table in one command.

    python tools/leave_one_out.py --shards shards --out logs/loo --update-style [train.py flags]

Trains each of Market-1501, DukeMTMC-reID, CUHK03-NP and MSMT17_V1 as the unseen target of a run
on the other three (the published runs' sources, in their order), one run after another, each as

    python -m torch.distributed.run --standalone --nproc-per-node N train.py --shards SHARDS \
        --dataset_src1 A --dataset_src2 B --dataset_src3 C -d TARGET --logs-dir OUT/<run> ...

then writes OUT/table.md and OUT/table.json: mAP and rank-1 of each target next to the published
figures (Tan et al., IEEE TMM 2023), the difference, and each run's wall time. The figures are
the final epoch's evaluation, as the published runs report them (the best epoch's mAP is given
beside them, labelled, for reference only).

With --update-style the runs are IL and compare with the published IL row; without it they are
the baseline of --baseline (FBF by default, FB with --baseline fb) and compare with its
published row; --both runs IL and the baseline side by side (8 runs).

Every other flag goes to train.py unchanged (e.g. -a, -b, --epochs, --iters, --workers,
--pretrained, --device, --data-dir; `python train.py --help` lists them) and is checked by
train.py's parser before any run starts; the flags this tool sets per run (-d,
--dataset_src1/2/3, --logs-dir, --resume, --overwrite) and --evaluate are refused.

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
TITLES = {"market1501": "Market-1501", "dukemtmc": "DukeMTMC-reID", "cuhk03": "CUHK03-NP",
          "msmt17v1": "MSMT17_V1"}
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
OWN_PER_RUN = {"dataset": "-d", "dataset_src1": "--dataset_src1", "dataset_src2": "--dataset_src2",
               "dataset_src3": "--dataset_src3", "logs_dir": "--logs-dir", "resume": "--resume",
               "overwrite": "--overwrite", "evaluate": "--evaluate"}
# train.py flags this tool takes itself; an abbreviation of them would reach train.py unseen.
OWN_SHARED = {"shards": "--shards", "update_style": "--update-style", "baseline": "--baseline"}
TOOL_FILES = {"sessions.jsonl", "done.json", ".lock"}  # what this tool keeps in a run's folder


@dataclass(frozen=True)
class Job:
    """One training: ``mode`` (il, fbf or fb) on ``target`` from its published sources."""

    target: str
    mode: str

    @property
    def name(self) -> str:
        return f"{self.mode}_to_{self.target}"

    @property
    def sources(self) -> tuple[str, ...]:
        return SOURCES[self.target]

    def title(self) -> str:
        return f"{MODES[self.mode]}: {' + '.join(self.sources)} -> {self.target}"


# ------------------------------------------------------------------------------------- flags
def get_parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__, allow_abbrev=False,
                   formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, default=Path("shards"),
                   help="folder of shards written by tools/make_shards.py, holding the four datasets "
                        "(passed to every run; default: shards)")
    p.add_argument("--out", type=Path, required=True,
                   help="folder of the runs (OUT/<mode>_to_<target>/: train.py's --logs-dir, plus done.json "
                        "and sessions.jsonl) and of table.md and table.json")
    p.add_argument("--nproc-per-node", "--nproc_per_node", type=at_least(1), default=1, metavar="N",
                   help="processes (GPUs) per run; every run is started by torchrun, with N=1 too "
                        "(default: 1)")
    p.add_argument("--update-style", "--updateStyle", action="store_true",
                   help="train IL and compare with the published IL row (without it: the --baseline row)")
    p.add_argument("--baseline", choices=("fbf", "fb"), default="fbf",
                   help="the baseline run without --update-style, and beside IL with --both (default: fbf)")
    p.add_argument("--both", action="store_true",
                   help="run IL and the --baseline side by side for every target (8 runs)")
    p.add_argument("--targets", type=target_list, default=list(TARGETS), metavar="T[,T...]",
                   help=f"only these targets, comma-separated, of {', '.join(TARGETS)} (default: all four)")
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
    modes = ["il", args.baseline] if args.both else ["il"] if args.update_style else [args.baseline]
    return [Job(t, m) for t in args.targets for m in modes]


def check_shards(shards: Path) -> None:
    """Complete shards of the four datasets (any run needs all four: its target and the others)."""
    missing = []
    for name in TARGETS:
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
           "--shards", str(args.shards), "--dataset_src1", job.sources[0], "--dataset_src2", job.sources[1],
           "--dataset_src3", job.sources[2], "-d", job.target, "--logs-dir", str(logs),
           *(["--update-style"] if job.mode == "il" else ["--baseline", job.mode]), *extra]
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
    """done.json of a run whose training exited 0: its final and best evaluations, wall time, commands."""
    history, sessions = read_jsonl(logs / "metrics.jsonl"), read_jsonl(logs / "sessions.jsonl")
    final = scores(history[-1], job.target) if history else None
    evaluated = [(h["epoch"], s) for h in history if (s := scores(h, job.target)) is not None]
    best = max(evaluated, key=lambda e: e[1][0]) if evaluated else None
    done = {
        "run": job.name, "target": job.target, "sources": list(job.sources), "mode": job.mode,
        "final": final and {"epoch": history[-1]["epoch"], "mAP": final[0], "rank1": final[1]},
        "best": best and {"epoch": best[0], "mAP": best[1][0], "rank1": best[1][1]},
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
    pub = PUBLISHED[done["mode"]][done["target"]]
    got = (f"mAP {done['final']['mAP']:.1f} rank-1 {done['final']['rank1']:.1f}" if done["final"]
           else "no final evaluation")
    n = done["epochs_run"]
    return (f"{got} (published {pub[0]:.1f} / {pub[1]:.1f}), {n} epoch{'' if n == 1 else 's'}, "
            f"{clock(done['wall_s'])}")


def clock(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s // 60 % 60:02d}m"


# ------------------------------------------------------------------------------------- the table
def table_rows(jobs: list[Job], out: Path) -> list[dict]:
    rows = []
    for job in jobs:
        done = read_done(out / job.name)
        pub = PUBLISHED[job.mode][job.target]
        row = {"run": job.name, "target": job.target, "sources": list(job.sources), "mode": job.mode,
               "finished": done is not None, "published": {"mAP": pub[0], "rank1": pub[1]}}
        if done is not None:
            final = done["final"] or {}
            row.update({
                "mAP": final.get("mAP"), "rank1": final.get("rank1"), "epoch": final.get("epoch"),
                "diff": None if not final else {"mAP": round(final["mAP"] - pub[0], 4),
                                                "rank1": round(final["rank1"] - pub[1], 4)},
                "best": done["best"], "eval_error": done["eval_error"], "epochs_run": done["epochs_run"],
                "wall_s": done["wall_s"], "sessions": done["sessions"],
                "nproc_per_node": done["nproc_per_node"], "train_flags": done["train_flags"],
                "command": done["command"],
            })
        rows.append(row)
    return rows


def write_table(jobs: list[Job], out: Path) -> list[dict]:
    rows = table_rows(jobs, out)
    doc = {
        "reported": "final epoch's evaluation (as the published runs); best: the highest mAP of any epoch",
        "units": "percent",
        "published_by": "Tan et al., Style Interleaved Learning for Generalizable Person Re-identification, "
                        "IEEE TMM 2023 (ResNet-50)",
        "runs": rows,
    }
    write_atomic(out / "table.json", lambda tmp: tmp.write_text(json.dumps(doc, indent=1) + "\n"))
    write_atomic(out / "table.md", lambda tmp: tmp.write_text(markdown(rows)))
    return rows


def markdown(rows: list[dict]) -> str:
    def num(v):
        return "-" if v is None else f"{v:.1f}"

    def diff(v):
        return "-" if v is None else f"{v:+.1f}"

    lines = [
        "# Leave-one-out: ours vs published (mAP / rank-1, %)", "",
        "Each target is unseen: trained on the other three datasets, evaluated on it. Ours: the final "
        "epoch's evaluation, as the published runs report it; best: the highest mAP of any epoch (its "
        "epoch in brackets), for reference only. Published: Tan et al., IEEE TMM 2023 (ResNet-50).", "",
        "| target | method | sources | mAP | published | diff | rank-1 | published | diff | best mAP (epoch) "
        "| epochs | wall |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        sources = " + ".join(TITLES[s] for s in r["sources"])
        head = f"| {TITLES[r['target']]} | {MODES[r['mode']]} | {sources} "
        pub = r["published"]
        if not r["finished"]:
            lines.append(head + f"| not finished | {num(pub['mAP'])} | | | {num(pub['rank1'])} | | | | |")
            continue
        d = r["diff"] or {}
        best = f"{num(r['best']['mAP'])} ({r['best']['epoch']})" if r["best"] else "-"
        lines.append(head + f"| {num(r['mAP'])} | {num(pub['mAP'])} | {diff(d.get('mAP'))} "
                            f"| {num(r['rank1'])} | {num(pub['rank1'])} | {diff(d.get('rank1'))} "
                            f"| {best} | {r['epochs_run']} | {clock(r['wall_s'])} |")
    lines.append("")
    if any(r["target"] == "msmt17v1" and r["mode"] == "il" for r in rows):
        lines += ["The published MSMT17_V1 IL figure is the evaluation after epoch 36 of a run whose log "
                  "stops there.", ""]
    failed = [r["run"] for r in rows if r["finished"] and r["mAP"] is None]
    if failed:
        lines += [f"No final evaluation (see eval_error in table.json): {', '.join(failed)}.", ""]
    finished = [r for r in rows if r["finished"]]
    setups = {(r["nproc_per_node"], tuple(r["train_flags"])) for r in finished}
    if len(setups) == 1:
        nproc, flags = setups.pop()
        lines += [f"train.py flags besides the sources, target and mode: `{shlex.join(flags) or '(none)'}`; "
                  f"{nproc} process{'es' if nproc > 1 else ''} per run. Commands: table.json.", ""]
    elif setups:
        lines += ["The runs were trained with different train.py flags or process counts: see each "
                  "run's command in table.json.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    try:
        args, extra = get_parser().parse_known_args(argv)
        given = check_train_flags(extra)
        jobs = jobs_of(args)
        if args.out.exists() and not args.out.is_dir():
            raise UsageError(f"--out {args.out} is a file, expected a folder")
        if "data_dir" not in given:  # with --data-dir, train.py builds the missing shards
            check_shards(args.shards)
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

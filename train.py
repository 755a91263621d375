r"""Train Style Interleaved Learning (Tan et al., IEEE TMM 2023) on source datasets (three in
the published runs, 1 to 5 here: --sources) and evaluate on an unseen target.

    torchrun --nproc_per_node 4 train.py --update-style \
        --dataset_src1 market1501 --dataset_src2 dukemtmc --dataset_src3 cuhk03 -d msmt17v1
    python train.py --update-style --sources market1501 -d dukemtmc     # single-source transfer

One process per GPU (NCCL; gloo on CPU). `-b` is the global batch per source: every rank takes
its slice of each sampled batch, so 1 and N GPUs train on the same global batches.

Everything that can be checked is checked before any work (flags, the logs dir, shards,
weights and checkpoint files); a refusal is one line, `train.py: error: ...`, and exit code 2.
SIGTERM or SIGINT (Ctrl-C), sent to torchrun or to a trainer, stops every rank within two
iterations: latest.pth is saved at the last finished iteration and one line says how to resume
(exit code 128 + the signal); a second Ctrl-C stops at once, keeping the last checkpoint.
Trainers whose torchrun died stop as on SIGTERM (engine.stopping.follow_launcher).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from contextlib import ExitStack

from engine import distributed as du
from engine.config import ExecConfig, RunConfig
from engine.flags import configs, train_parser
from engine.loop import NonFiniteLoss, train_one_epoch
from engine.preflight import check_flags
from engine.run import Run, RunResult, evaluate_only
from engine.stopping import StopRequest, follow_launcher
from engine.errors import DataError, OutputError, RunError, UsageError, refuse
from pipeline.files import WriteError
from pipeline.shards import ShardError

__all__ = ["NonFiniteLoss", "RunError", "UsageError", "get_parser", "main", "train"]


def get_parser():
    """train.py's parser (engine/flags.py), with this file's docstring as its description."""
    return train_parser(__doc__)


def main(argv: list[str] | None = None) -> int:
    """Run train.py; returns the exit code: 0, or the :class:`engine.errors.RunError` kind's (2 a
    refusal, 3 non-finite values, 4 data that failed during the run), printed as one line."""
    follow_launcher()
    is_main = os.environ.get("RANK", "0") == "0"
    try:
        cfg, ex = configs(get_parser().parse_args(argv))
        check_flags(cfg, ex, int(os.environ.get("WORLD_SIZE", "1")))
    except UsageError as e:
        refuse(f"train.py: error: {e}", is_main)
        return e.exit_code
    dist_info = du.init_distributed(ex.device, ex.dist_timeout)
    logging.basicConfig(level=logging.INFO if dist_info.is_main else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)
    try:
        return train(cfg, ex, dist_info).exit_code
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint now
        if dist_info.is_main:
            latest = ex.logs_dir / "latest.pth"
            kept = (f"{latest} holds the last saved checkpoint" if latest.is_file()
                    else "no checkpoint was saved")
            print(f"train.py: interrupted twice: stopped at once; {kept}", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    except ShardError as e:  # a shard or image that failed while training
        error: RunError = DataError(str(e))
    except WriteError as e:  # a checkpoint or log the disk had no room for
        error = OutputError(str(e))
    except RunError as e:
        error = e
    finally:
        du.cleanup()
    refuse(f"train.py: error: {error}", dist_info.is_main)
    return error.exit_code


def train(cfg: RunConfig, ex: ExecConfig, dist_info: du.DistInfo) -> RunResult:
    """The run after its flags passed: every other check (files, folders, shards: a
    :class:`UsageError` on every rank), the set-up, the epochs."""
    with ExitStack() as stack:
        stop = StopRequest()  # from the start: a signal during set-up stops at the first iteration
        stack.callback(stop.close)
        if ex.evaluate:
            return evaluate_only(cfg, ex, dist_info)
        run = Run(cfg, ex, dist_info, stack)
        run.preflight()
        run.set_up()
        stop.attach(dist_info.world)
        first_epoch, first_iter = run.state.epoch, run.state.iteration
        for epoch in range(first_epoch, cfg.epochs):
            first = epoch == first_epoch
            res = train_one_epoch(run.trainer, run.train_loader, epoch, first_iter if first else 0, stop=stop,
                                  runlog=run.runlog, log_every=ex.log_every,
                                  resumed_losses=run.state.epoch_losses if first else [],
                                  checkpoint_path=run.logs.path / "latest.pth",
                                  started=run.started if first else None,
                                  resumed_seconds=run.state.epoch_seconds if first else None)
            if res.stop_signal:
                return run.stopped(epoch, res)
            run.end_epoch(epoch, res)
        return run.finish()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before the run could take a stop signal: nothing was saved
        if os.environ.get("RANK", "0") == "0":
            print("train.py: interrupted: stopped at once", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)

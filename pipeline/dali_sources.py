"""The batch callbacks DALI's parallel external source runs in its worker processes.

They live apart from ``pipeline.dali`` so that a worker, which unpickles them, imports only
what reading bytes needs (numpy, PIL, the shard reader; no torch, no DALI graph code): about
60 MB per worker instead of about 400 MB. Unpickling one in a worker also makes that process a
well-behaved worker (``pipeline.workers.become_worker``): it ends with the trainer and leaves
stop signals sent to the trainer's process group to the trainer.
"""
from __future__ import annotations

import os

import numpy as np

from pipeline.plan import EvalRows, TrainPlan, check_header
from pipeline.shards import ShardError
from pipeline.workers import become_worker


class _WorkerCallback:
    """Remembers the process that made it; unpickled in another process (a DALI worker), it
    runs :func:`become_worker` there first."""

    def __init__(self) -> None:
        self.parent = os.getpid()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if os.getpid() != self.parent:
            become_worker(self.parent)


class TrainSource(_WorkerCallback):
    """Iteration k of the stream starting at global iteration ``first``: the encoded images,
    labels, replaced flags, mirror flags and crop shifts of this rank's rows."""

    def __init__(self, plan: TrainPlan, first: int):
        super().__init__()
        self.plan, self.first = plan, first

    def __call__(self, info):
        epoch, it = divmod(self.first + info.iteration, self.plan.iters)
        items, labels, replaced = self.plan.iteration(epoch, it, check_header)
        mirror, shift = self.plan.augmentation(epoch, it)
        return [np.frombuffer(b, dtype=np.uint8) for b in items], labels, replaced, mirror, shift


class EvalSource(_WorkerCallback):
    """Batch k of this rank's evaluation rows, encoded; StopIteration after the last one."""

    def __init__(self, rows: EvalRows):
        super().__init__()
        self.rows = rows

    def __call__(self, info):
        if info.iteration >= self.rows.num_batches():
            raise StopIteration
        out = []
        for j in self.rows.batch_rows(info.iteration):
            data = self.rows.rows.read(int(j))  # a shard that cannot be read: ShardError
            try:
                out.append(np.frombuffer(check_header(data), dtype=np.uint8))
            except Exception as err:
                where = self.rows.rows.location(int(j))
                raise ShardError(f"{where}: cannot decode the image ({err})") from err
        return out

"""The published procedure's way of computing, written literally from docs/design.md.

Two users: the tests hold the fast code (``model.style.UBS``, ``MemoryClassifier.update``, the
grouped training step) against these step-by-step versions, and the benchmarks
(``tools/benchmark.py --impl reference``) run a training iteration the way the published code runs
it (fp32, NCHW, one forward per source through DataParallel replicas, a Python loop over every
sample to update the memories, the unfused style module, PIL decoding of the raw folders), so
every speed claim is a ratio measured side by side on the same machine.

- ``reference.style``: :class:`LiteralUBS`, the style module step by step;
- ``reference.memory``: :func:`loop_update` (the per-sample memory loop), :func:`memory_loss`;
- ``reference.step``: :func:`replica_forward` (``nn.DataParallel`` literally), :func:`reference_step`;
- ``reference.folder_loader``: :func:`folder_loader` (PIL decoding of the raw folders),
  :class:`FolderUnavailable`.

Dependencies point down only: this package uses ``model`` and ``pipeline``; nothing in
``model``, ``pipeline`` or ``engine`` imports it.
"""
from reference.folder_loader import FolderUnavailable, folder_loader
from reference.memory import loop_update, memory_loss
from reference.step import reference_step, replica_forward
from reference.style import LiteralUBS

__all__ = ["FolderUnavailable", "LiteralUBS", "folder_loader", "loop_update", "memory_loss", "reference_step",
           "replica_forward"]

"""A synthetic copy of the five raw re-ID datasets (``tools/make_synthetic.py`` is its command).

- ``planning``: who appears where: every dataset's files with pid, camera and split (no pixels),
  the scales, and :func:`expected_counts` (the ground truth for tests);
- ``drawing``: the pictures: identity looks, cameras, each dataset's style;
- ``writers``: one writer per raw layout (market1501, dukemtmc, msmt17v1, cuhk03 with its
  ``.mat`` files, cuhk_sysu scenes) and :func:`generate`, which runs them all;
- ``matlab``: MATLAB v5 and v7.3 files with fixed headers.

The output is byte-identical for the same scale and seed.
"""
from pipeline.records import MARKER
from tools.synthetic.planning import NAMES, SCALES, Scale, Shot, expected_counts, plan
from tools.synthetic.writers import generate

__all__ = ["MARKER", "NAMES", "SCALES", "Scale", "Shot", "expected_counts", "generate", "plan"]

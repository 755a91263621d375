"""What ``tools/benchmark.py`` shares with its modes (which stay in that file) and with
``tools/gpu_check.py``:

- ``timing``: the timed windows (:func:`measure`), the device synchronisation that ends each, and
  the machine a figure was measured on;
- ``report``: the rows as the markdown tables of docs/benchmarks.md, with the figures each holds,
  the full-run projection and the scaling plot (no torch: the GPU check imports it).
"""

"""The GPU machine's bare image, imitated: with this folder first on ``PYTHONPATH``, every Python
process (and every process it starts, which inherits ``PYTHONPATH``) fails to import the optional
packages that image lacks, as if they were not installed. tests/test_gpu_check.py runs the GPU
check's quick mode this way, so that what runs on that machine as it is stays held by CI:

    PYTHONPATH=tests/bare_image:. python tools/gpu_check.py --device cpu --quick --out logs/bare

``BARE_IMAGE_HIDES`` (comma-separated top-level or dotted module names) overrides the default.
"""
import os
import sys

HIDDEN = tuple(n for n in os.environ.get("BARE_IMAGE_HIDES", "webdataset,nvidia.dali").split(",") if n)


class _Hide:
    """A meta-path finder ahead of every other one: a hidden module and its submodules are not found."""

    def find_spec(self, name, path=None, target=None):
        if any(name == h or name.startswith(h + ".") for h in HIDDEN):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by tests/bare_image)", name=name)
        return None


sys.meta_path.insert(0, _Hide())

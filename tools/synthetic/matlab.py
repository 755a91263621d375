"""MATLAB files as MATLAB writes them, with fixed header texts so the bytes repeat: v5 files
(scipy's writer) and the header of a v7.3 file (HDF5 with a 512-byte user block)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import scipy.io


def ref_name(i: int) -> str:
    """MATLAB's names for referenced objects: a, b, ..., z, ba, bb, ..."""
    name = ""
    while True:
        name = chr(ord("a") + i % 26) + name
        i //= 26
        if not i:
            return name


def cell(strings: list[str]) -> np.ndarray:
    """A column cell array of strings, as scipy writes MATLAB cells."""
    out = np.empty((len(strings), 1), dtype=object)
    out[:, 0] = strings
    return out


def savemat(path: Path, variables: dict) -> None:
    """scipy's MATLAB v5 writer with a fixed header text (it stamps the time), so the bytes repeat."""
    buf = io.BytesIO()
    scipy.io.savemat(buf, variables, format="5", oned_as="column")
    data = bytearray(buf.getvalue())
    data[:116] = b"MATLAB 5.0 MAT-file, Platform: posix, Created on: Thu Jan  1 00:00:00 1970".ljust(116)
    path.write_bytes(bytes(data))


def stamp_v73_header(path: Path) -> None:
    """Write MATLAB 7.3's header into the 512-byte user block of the HDF5 file at ``path``
    (opened by h5py with ``userblock_size=512``), with a fixed creation time."""
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Thu Jan  1 00:00:00 1970 " \
        b"HDF5 schema 1.00 ."
    with open(path, "r+b") as fh:
        fh.write(header.ljust(116) + bytes(8) + b"\x00\x02IM" + bytes(512 - 128))

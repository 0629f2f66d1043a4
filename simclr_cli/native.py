"""The float16 search kernels of half.c, compiled with the system's C compiler on first use.

numpy has no vectorised float16 arithmetic: its best float16 scoring (index.py) is three integer passes
and a dot product per chunk, 2.5-3x the time to read the index once. half.c reads each row once, converting
with F16C, like faiss's or PyTorch's kernels, without their size or import time. The shared library
is built once per source, compiler and machine kind into $XDG_CACHE_HOME/simclr/native (~/.cache when
unset), written atomically, and loaded with ctypes, whose calls release the GIL.

Search never depends on it: `half_kernels()` is None (and search uses numpy) on a CPU that is not x86-64
with AVX2, FMA and F16C, without a C compiler, where the cache cannot be written, or with SIMCLR_NATIVE=0.
A failed build is remembered beside the library, with the compiler's output, and not tried again.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).with_name("half.c")
NATIVE_ENV = "SIMCLR_NATIVE"
X86_64 = ("x86_64", "amd64")
FLAGS = ["-O3", "-shared", "-fPIC"]
BUILD_SECONDS = 120


class HalfKernels:
    """Float16 rows (C, D), C-contiguous, scored against float32 queries without a float32 copy of the rows."""

    def __init__(self, library: ctypes.CDLL):
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        self._dot = library.simclr_half_dot
        self._dot.argtypes = [pointer, size, size, pointer, size, pointer, pointer]
        self._dot.restype = None
        self._to_float = library.simclr_half_to_float
        self._to_float.argtypes = [pointer, size, pointer]
        self._to_float.restype = None

    def dot(self, rows: np.ndarray, queries: np.ndarray, norms: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(scores (C, Q) float32 = rows (C, D) @ queries (Q, D).T, each row's squared length (C,) if `norms`)."""
        rows, queries = _contiguous(rows, np.float16), _contiguous(queries, np.float32)
        assert rows.shape[1] == queries.shape[1], (rows.shape, queries.shape)
        scores = np.empty((rows.shape[0], queries.shape[0]), dtype=np.float32)  # (C, Q)
        lengths = np.empty(rows.shape[0], dtype=np.float32) if norms else None  # (C,)
        self._dot(rows.ctypes.data, rows.shape[0], rows.shape[1], queries.ctypes.data, queries.shape[0],
                  scores.ctypes.data, None if lengths is None else lengths.ctypes.data)
        return scores, lengths

    def to_float(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """`out` (C, D) float32, C-contiguous, filled with the values of float16 `rows` (C, D)."""
        rows = _contiguous(rows, np.float16)
        assert out.dtype == np.float32 and out.flags.c_contiguous and out.shape == rows.shape, (out.shape, rows.shape)
        self._to_float(rows.ctypes.data, rows.size, out.ctypes.data)
        return out


def _contiguous(array: np.ndarray, dtype: type) -> np.ndarray:
    assert array.dtype == dtype and array.ndim == 2, (array.dtype, array.shape)
    return np.ascontiguousarray(array)


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "simclr" / "native"


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC") or "cc")


@functools.cache
def half_kernels() -> HalfKernels | None:
    """The compiled kernels, built on first use; None where they cannot be had (search then uses numpy)."""
    if os.environ.get(NATIVE_ENV, "1") == "0" or platform.machine().lower() not in X86_64:
        return None
    library = build(SOURCE)
    if library is None:
        return None
    try:
        loaded = ctypes.CDLL(str(library))
        return HalfKernels(loaded) if loaded.simclr_half_supported() else None
    except (OSError, AttributeError):  # a damaged or foreign file in the cache
        return None


def build(source: Path) -> Path | None:
    """The shared library of `source`, compiled unless the cache has it; None if it cannot be built."""
    cc = compiler()
    if cc is None:
        return None
    try:
        code = source.read_bytes()
        key = hashlib.sha256(b"\0".join([code, cc.encode(), " ".join(FLAGS).encode(), platform.machine().encode(),
                                         sys.platform.encode()])).hexdigest()[:16]
        folder = cache_dir()
        library, failed = folder / f"{source.stem}-{key}.so", folder / f"{source.stem}-{key}.failed"
        if library.exists():
            return library
        if failed.exists():
            return None
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            built = Path(scratch) / library.name
            result = subprocess.run([cc, *FLAGS, str(source), "-o", str(built)], capture_output=True, text=True,
                                    timeout=BUILD_SECONDS)
            if result.returncode != 0:
                (Path(scratch) / failed.name).write_text(f"{cc} {' '.join(FLAGS)}\n{result.stdout}{result.stderr}")
                os.replace(Path(scratch) / failed.name, failed)
                return None
            os.replace(built, library)  # atomic: another process loads the whole file or none
        return library
    except (OSError, subprocess.SubprocessError):  # an unwritable cache, a compiler that hangs
        return None

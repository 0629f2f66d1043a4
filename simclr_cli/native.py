"""The search kernels of search.c, compiled with the system's C compiler on first use.

numpy has no vectorised float16 arithmetic: its best float16 scoring (index.py) is three integer passes
and a dot product per chunk, 3.5-5x the time to read the index once. search.c reads each row once, converting
with F16C, like faiss's or PyTorch's kernels, without their size or import time, and keeps the top k of
float16 or float32 rows itself, so that the threads of a search need not take the GIL. The shared library
is built once per source, compiler and machine kind into $XDG_CACHE_HOME/simclr/native (~/.cache when
unset), written atomically with its SHA-256 beside it, and loaded with ctypes, whose calls release the GIL.

Search does not need it: `search_kernels()` is None, and search uses another kernel (index.search_kernel),
on a CPU that is not x86-64 with AVX2, FMA and F16C, without a C compiler, where the cache cannot be
written, or with SIMCLR_NATIVE=0.
A failed build (or one stopped after BUILD_SECONDS) is remembered beside the library with the compiler's
output, and not tried again for a day.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from simclr_cli.files import sha256_file, write_text, xdg_home

SOURCE = Path(__file__).with_name("search.c")
NATIVE_ENV = "SIMCLR_NATIVE"
X86_64 = ("x86_64", "amd64")
FLAGS = ["-O3", "-shared", "-fPIC", "-fno-fast-math"]  # after $CC's own flags: fast maths would drop the NaN test
BUILD_SECONDS = 60
RETRY_SECONDS = 24 * 3600  # a failed build is tried again after this long


class SearchKernels:
    """Float16 and float32 rows (C, D) scored against float32 queries, without a float32 copy of the rows."""

    def __init__(self, library: ctypes.CDLL):
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        self._top_k = {np.dtype(np.float16): library.simclr_half_top_k,
                       np.dtype(np.float32): library.simclr_float_top_k}  # by the rows' dtype
        for function in self._top_k.values():
            function.argtypes = [pointer, size, size, size, pointer, size, size, pointer, ctypes.c_int, pointer,
                                 pointer, pointer]
            function.restype = size
        self._to_float = library.simclr_half_to_float
        self._to_float.argtypes = [pointer, size, pointer]
        self._to_float.restype = None

    def top_k(self, rows: np.ndarray, queries: np.ndarray, heaps: "Heaps", first_row: int = 0,
              exclude: np.ndarray | None = None, divide_by_length: bool = False) -> int | None:
        """Offers float16 or float32 rows (C, D), numbered from `first_row`, to `heaps`, the best so far of each
        of the queries (Q, D) by dot product (by cosine if `divide_by_length`); `exclude` (Q,) int64: a row each
        query must not return (-1: none), which scores -inf. Gives the first row that scored NaN, which no heap
        takes."""
        rows = _contiguous(rows, np.float16 if rows.dtype == np.float16 else np.float32, "rows")
        queries = _contiguous(queries, np.float32, "queries")
        if rows.shape[1] != queries.shape[1]:
            raise ValueError(f"rows {rows.shape} and queries {queries.shape} differ in width")
        if heaps.scores.shape[0] != queries.shape[0]:
            raise ValueError(f"{heaps.scores.shape[0]} heaps for {queries.shape[0]} queries")
        if exclude is not None and (exclude.dtype != np.int64 or exclude.shape != (queries.shape[0],)):
            raise ValueError(f"exclude: an int64 array of a row per query is needed, not {exclude.dtype} "
                             f"{exclude.shape}")
        exclude = None if exclude is None else np.ascontiguousarray(exclude)  # a strided view: copied
        excluded = None if exclude is None else exclude.ctypes.data
        nan_row = self._top_k[rows.dtype](rows.ctypes.data, rows.shape[0], rows.shape[1], first_row,
                                          queries.ctypes.data, queries.shape[0], heaps.scores.shape[1], excluded,
                                          divide_by_length, heaps.scores.ctypes.data, heaps.rows.ctypes.data,
                                          heaps.held.ctypes.data)
        return None if nan_row < 0 else nan_row

    def to_float(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """`out` (C, D) float32, C-contiguous, filled with the values of float16 `rows` (C, D)."""
        rows = _contiguous(rows, np.float16, "rows")
        if out.dtype != np.float32 or not out.flags.c_contiguous or out.shape != rows.shape:
            raise ValueError(f"out: a C-contiguous float32 array of {rows.shape} is needed, not {out.dtype} {out.shape}")
        self._to_float(rows.ctypes.data, rows.size, out.ctypes.data)
        return out


class Heaps:
    """The best k (score, row) pairs so far of each of `num_queries` queries, for SearchKernels.top_k."""

    def __init__(self, num_queries: int, k: int):
        if k < 1:
            raise ValueError(f"k = {k}: heaps of at least one pair are needed")
        self.scores = np.empty((num_queries, k), dtype=np.float32)  # (Q, k): a heap each, the lowest first
        self.rows = np.empty((num_queries, k), dtype=np.int64)  # (Q, k)
        self.held = np.zeros(num_queries, dtype=np.int64)  # (Q,): how much of each heap is filled

    def best(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores (k', Q), rows (k', Q)), in no particular order: k' the fewest any heap holds."""
        count = int(self.held.min())
        return self.scores[:, :count].T, self.rows[:, :count].T


def _contiguous(array: np.ndarray, dtype: type, name: str) -> np.ndarray:
    if array.dtype != dtype or array.ndim != 2:
        raise ValueError(f"{name}: a 2-d {np.dtype(dtype).name} array is needed, not {array.ndim}-d {array.dtype}")
    return np.ascontiguousarray(array)


def cache_dir() -> Path:
    return xdg_home("XDG_CACHE_HOME", ".cache") / "simclr" / "native"


def compiler() -> list[str] | None:
    """The C compiler's command ($CC, which may carry flags or a wrapper such as ccache, else cc), if found."""
    try:
        command = shlex.split(os.environ.get("CC") or "") or ["cc"]
    except ValueError:  # unbalanced quotes: no compiler, as for one that is not installed
        return None
    found = shutil.which(command[0])
    return [found, *command[1:]] if found else None


@functools.cache
def search_kernels() -> SearchKernels | None:
    """The compiled kernels, built on first use; None where they cannot be had (search uses another kernel)."""
    if os.environ.get(NATIVE_ENV, "1") == "0" or platform.machine().lower() not in X86_64:
        return None
    library = build(SOURCE)
    if library is None:
        return None
    try:
        loaded = ctypes.CDLL(str(library))
        return SearchKernels(loaded) if loaded.simclr_search_supported() else None
    except (OSError, AttributeError):  # not a library of this machine's, or without the kernels
        return None


def build(source: Path) -> Path | None:
    """The shared library of `source`: the cache's, if its SHA-256 is the one recorded beside it when it was
    built (a truncated library would crash the process that loads it), else compiled now; None if it cannot
    be built, or its build failed less than RETRY_SECONDS ago."""
    command = compiler()
    if command is None:
        return None
    try:
        parts = [source.read_bytes(), *(part.encode() for part in [*command, *FLAGS, platform.machine(), sys.platform])]
        key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
        stem = cache_dir() / f"{source.stem}-{key}"
        library, digest, failed = (stem.with_suffix(suffix) for suffix in (".so", ".sha256", ".failed"))
        if library.exists() and digest.exists() and digest.read_text().strip() == sha256_file(library):
            return library
        if failed.exists() and time.time() - failed.stat().st_mtime < RETRY_SECONDS:
            return None
        stem.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=stem.parent) as scratch:
            built = Path(scratch) / library.name
            error = _compile(command, source, built)
            if error is not None:
                write_text(failed, error)
                return None
            os.replace(built, library)  # atomic: another process loads the whole file or none
        write_text(digest, sha256_file(library) + "\n")
        failed.unlink(missing_ok=True)
        return library
    except (OSError, subprocess.SubprocessError):  # an unwritable cache, a compiler that cannot be run
        return None


def _compile(command: list[str], source: Path, out: Path) -> str | None:
    """None once `source` is compiled into `out`; else why not: the command and the compiler's output."""
    arguments = [*command, *FLAGS, str(source), "-o", str(out)]
    # A session of its own, so that a compiler that hangs is stopped with all it started.
    process = subprocess.Popen(arguments, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               errors="replace", start_new_session=True)  # a compiler may speak any encoding
    try:
        output, _ = process.communicate(timeout=BUILD_SECONDS)
    except subprocess.TimeoutExpired:
        if hasattr(os, "killpg"):
            os.killpg(process.pid, signal.SIGKILL)
        else:  # Windows: no sessions
            process.kill()
        process.communicate()
        return f"{shlex.join(arguments)}\nstopped after {BUILD_SECONDS} s\n"
    if process.returncode != 0:
        return f"{shlex.join(arguments)}\n{output}"
    return None if out.is_file() else f"{shlex.join(arguments)}\nexited 0 but wrote no {out.name}\n{output}"

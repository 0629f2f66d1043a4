"""Embedding indexes on disk and exact cosine search over them.

An index is two files with one stem: `NAME.npy`, a plain (rows, dim) float32 or float16 array, and
`NAME.json`, its manifest: the image of every row (in row order), the model and its SHA-256, the
preprocessing, and the files skipped as unreadable. Search reads the array memory-mapped, in
chunks, so an index never has to fit in RAM.
"""

from __future__ import annotations

import contextlib
import functools
import json
import mmap
import operator
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from simclr_cli.config import cpu_cores
from simclr_cli.errors import ConfigError, DataError, ModelFileError
from simclr_cli.files import (check_output_path, file_id, in_use, read_json, read_json_bytes, sha256_file,
                              write_json, xdg_home)
from simclr_cli.native import Heaps, search_kernels

INDEX_FORMAT = "simclr-index"
DTYPES = ("float32", "float16")
MANIFEST_PRECISIONS = ("", "fp32", "bf16", "fp16")  # "": written before the precision was recorded
INDEX_ENV = "SIMCLR_INDEX"
CHUNK_ROWS = 4096  # rows scored at a time: 8 MiB of float32 at 512 dims, small enough to stay in cache
# For torch's float16 kernel of one or two queries: 16 MiB at 512 dims, 1.25x faster than 4096
FLOAT16_CHUNK_ROWS = 16384
SPLIT_QUERIES = 8  # fewer queries than this split the rows among threads (but float32 in numpy: one); more, BLAS
FLOAT16_KERNELS = ("native", "torch", "numpy")
FLOAT32_KERNELS = ("native", "numpy")
NATIVE_DTYPES = (np.float16, np.float32)  # the rows search.c scores
NATIVE_CHUNK_BYTES = 16 << 20  # rows handed to search.c at a time: 16,384 float16 or 8,192 float32 rows at 512 dims
DECODE_BYTES = 4 << 20  # the float32 buffer float16 rows are converted into: 2,048 rows at 512 dims
FLOAT16_BITS_MASK = np.int32(-0x70000001)  # 0x8FFFFFFF: every bit but 28-30
# How far a score computed in float16 (query rounded to float16, products summed in float32, the
# sum rounded to float16) can be from the float32 score of a unit query and a unit row: 2^-11 from
# the query's rounding, 2^-12 from the result's; 1e-4 measured. Four times the bound, for safety.
FLOAT16_SCORE_ERROR = 3e-3
CANDIDATE_SLACK = 64  # float16 candidates beyond the top k looked for in one top-k: ample for random rows
# write_manifest's layout (json.dumps, indent=2): the paths come last, one a line, between these two.
PATHS_START, PATHS_END = b'\n  "paths": [\n', b'\n  ]\n}\n'
LINE_BLOCK = 1 << 20  # manifest bytes whose lines are counted (and found, when a path is asked for) at once
FIND_QUERIES = 16  # --exclude-self: up to this many queries are looked for in a manifest's text, more parse it


def manifest_path(index_path: str | Path) -> Path:
    """The manifest beside an index: out.npy -> out.json."""
    return Path(index_path).with_suffix(".json")


class ManifestPaths(Sequence[str]):
    """The paths of a manifest, one JSON string a line in `data[begin:end]`, each decoded when asked for.

    The paths are nearly all of a manifest (680 MB at 10M rows of photo-library paths), and a search
    needs only its hits': json.loads of all of them took 3.4 s and 1.8 GB there. The lines are counted
    a block of bytes at a time (0.08 s at 10M rows); a block's line ends are found when one of its paths
    is first asked for. Iterating parses the whole file, as before.
    """

    def __init__(self, data: mmap.mmap, begin: int, end: int, source: Path):
        self._data, self._begin, self._end, self._source = data, begin, end, source
        text = np.frombuffer(data, dtype=np.uint8, count=end - begin, offset=begin)
        counts = [np.count_nonzero(text[start:start + LINE_BLOCK] == 10) for start in range(0, len(text), LINE_BLOCK)]
        self._lines_before = np.cumsum([0] + counts)  # (blocks + 1,): lines ending before each block
        self._line_ends: dict[int, np.ndarray] = {}  # block -> offsets in data of its newlines
        self._all: list[str] | None = None

    def __len__(self) -> int:
        return int(self._lines_before[-1])

    def __getitem__(self, row):  # type: ignore[override]
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(len(self)))]
        row = operator.index(row)
        row += len(self) if row < 0 else 0
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} of {len(self)}")
        if self._all is not None:
            return self._all[row]
        block = int(np.searchsorted(self._lines_before, row, side="right")) - 1
        if block not in self._line_ends:
            start = self._begin + block * LINE_BLOCK
            text = np.frombuffer(self._data, dtype=np.uint8, count=min(LINE_BLOCK, self._end - start), offset=start)
            self._line_ends[block] = start + np.flatnonzero(text == 10)
        end = int(self._line_ends[block][row - self._lines_before[block]])
        line = self._data[max(self._begin, self._data.rfind(b"\n", self._begin, end) + 1):end]
        try:
            path = json.loads(line.rstrip(b","))
        except (json.JSONDecodeError, UnicodeDecodeError):
            path = None
        if not isinstance(path, str):
            raise ModelFileError(f"{self._source}: index manifest is damaged (the path of row {row}); "
                                 f"run `simclr embed` again")
        return path

    def __iter__(self) -> Iterator[str]:
        if self._all is None:
            paths = read_json_bytes(self._data[:], self._source, "index manifest")["paths"]
            if len(paths) != len(self) or not all(isinstance(path, str) for path in paths):
                raise ModelFileError(f"{self._source}: index manifest is damaged (its paths); run `simclr embed` "
                                     f"again")
            self._all = paths
        return iter(self._all)

    def find(self, path: str) -> int | None:
        """The row of `path` where it is spelt as write_manifest spells it (a line of its own), or None.

        One search of the text: up to 0.12 s at 10M rows, where parsing every path takes 3.4 s. Its JSON
        string ends at its closing quote, so it cannot match the start of a longer path.
        """
        at = self._data.find(b"\n    " + json.dumps(path).encode(), self._begin - 1, self._end)
        if at < 0:
            return None
        offset = at + 1 - self._begin  # where its line starts, in the paths' text
        block = offset // LINE_BLOCK
        text = np.frombuffer(self._data, dtype=np.uint8, count=offset - block * LINE_BLOCK,
                             offset=self._begin + block * LINE_BLOCK)
        return int(self._lines_before[block]) + int(np.count_nonzero(text == 10))

    def may_hold_dots(self) -> bool:
        """Whether the paths may hold "/./" or "/../": an index written before paths were normalised kept
        them as IMAGES was spelt. All its paths begin with that folder, and scans skip hidden names, so
        the first path tells (searching the text for "/." took 0.8 s at 10M rows)."""
        if len(self) == 0:
            return False
        first = self[0]  # "/." alone is any hidden folder above the images (~/.local/share/photos)
        return "/./" in first or "/../" in first

    def __deepcopy__(self, memo: dict) -> list[str]:  # dataclasses.asdict, as in Manifest.to_json
        return list(self)


@dataclass
class Manifest:
    """What an index holds: `paths[i]` is the image of row i."""

    paths: Sequence[str]
    model: str  # absolute path of the encoder file
    model_sha256: str
    preprocessing: dict[str, Any]
    dim: int
    dtype: str
    normalized: bool
    precision: str = ""  # fp32, bf16 or fp16: how the rows were computed ("" before it was recorded)
    images: str = ""  # the folder that was embedded
    skipped: list[dict[str, str]] = field(default_factory=list)
    complete: bool = True
    simclr_version: str = ""
    format: str = INDEX_FORMAT

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["rows"] = len(self.paths)
        data["paths"] = data.pop("paths")  # last: read_manifest parses what comes before, and finds rows by line
        return data

    @classmethod
    def from_json(cls, data: Any, path: Path) -> "Manifest":
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            raise ModelFileError(f"{path}: not a simclr index manifest; pass the .npy that `simclr embed` wrote")
        try:
            manifest = cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})
        except TypeError as error:
            raise ModelFileError(f"{path}: index manifest is incomplete ({error}); run `simclr embed` again") from None
        problem = manifest._damage()
        if problem:
            raise ModelFileError(f"{path}: index manifest is damaged ({problem}); run `simclr embed` again")
        return manifest

    def _damage(self) -> str | None:
        """What no manifest `simclr embed` writes would hold, or None."""
        if self.dtype not in DTYPES:
            return f"dtype {self.dtype!r}"
        if self.precision not in MANIFEST_PRECISIONS:
            return f"precision {self.precision!r}"
        if not isinstance(self.paths, (list, ManifestPaths)):
            return "paths is not a list"
        if isinstance(self.paths, list) and not all(isinstance(path, str) for path in self.paths):
            return "a path that is not a string"  # ManifestPaths checks each path as it is read
        if not (isinstance(self.model, str) and isinstance(self.model_sha256, str)):
            return "model and model_sha256 must be strings"
        if not isinstance(self.dim, int):
            return f"dim {self.dim!r}"
        if not isinstance(self.normalized, bool):
            return f"normalized {self.normalized!r}"
        return None


def write_manifest(index_path: str | Path, manifest: Manifest) -> None:
    write_json(manifest_path(index_path), manifest.to_json())


def read_manifest(path: Path) -> Manifest:
    """An index manifest, its paths read lazily (ManifestPaths) where it has write_manifest's layout and
    its row count agrees; any other valid JSON manifest is parsed whole."""
    try:
        with open(path, "rb") as handle:
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such index manifest; if `simclr embed` was stopped as it finished, run the "
                             f"same command with --resume, else embed again") from None
    except (ValueError, OSError):  # empty, or not a file mmap can map
        return Manifest.from_json(read_json(path, "index manifest"), path)
    start = data.find(PATHS_START)
    if start > 0 and data[-len(PATHS_END):] == PATHS_END:
        try:
            fields = json.loads(data[:start].rstrip(b",") + b"\n}")  # every field but the paths
        except (json.JSONDecodeError, UnicodeDecodeError):
            fields = None  # not write_manifest's layout after all
        if isinstance(fields, dict) and "paths" not in fields:
            paths = ManifestPaths(data, start + len(PATHS_START), len(data) - len(PATHS_END) + 1, path)
            if fields.get("rows") == len(paths):
                return Manifest.from_json({**fields, "paths": paths}, path)
    return Manifest.from_json(read_json(path, "index manifest"), path)


def work_dir(out: Path) -> Path:
    """Where `simclr embed` keeps the work of OUT until it has finished."""
    return out.with_name(out.name + ".partial")


def open_index(index_path: str | Path, source: str = "--index") -> tuple[np.ndarray, Manifest]:
    """The rows (memory-mapped) and manifest of an index, checked against each other; `source` names where the
    path came from (choose_index), for the messages."""
    index_path = Path(index_path)
    if index_path.suffix != ".npy":
        raise ConfigError(f"{index_path} (from {source}): not a .npy file; pass the OUT.npy that `simclr embed` "
                          f"wrote")
    if not index_path.is_file():
        where = "" if source == "--index" else f" (from {source})"
        if index_path.exists():  # a folder named *.npy, a pipe
            raise ModelFileError(f"{index_path}{where}: {'a folder' if index_path.is_dir() else 'not a file'}, not "
                                 f"an index; pass the OUT.npy file that `simclr embed` wrote")
        if in_use(work_dir(index_path)):  # a running embed holds its work folder: a --resume would be refused
            from simclr_cli.embed import embedded_so_far  # not at the top: embed imports this module

            counts = embedded_so_far(work_dir(index_path))
            so_far = f" ({counts[0]:,} of {counts[1]:,} images embedded so far)" if counts else ""
            raise ModelFileError(f"{index_path}{where}: still being written by a running `simclr embed`{so_far}; "
                                 f"wait for it to finish, then search")
        if work_dir(index_path).is_dir():
            raise ModelFileError(f"{index_path}{where}: not written yet, its embed was interrupted "
                                 f"({work_dir(index_path)}); finish it with `simclr embed MODEL IMAGES {index_path} "
                                 f"--resume`, then search")
        raise ModelFileError(f"{index_path}{where}: no such index; run `simclr embed MODEL IMAGES {index_path}` first")
    manifest = read_manifest(manifest_path(index_path))
    try:
        # Copy-on-write: the file is never written, and torch.from_numpy gets the writable array it wants.
        rows = np.load(index_path, mmap_mode="c", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:  # EOFError: an empty file (uncaught, click reads it as Ctrl-D)
        raise ModelFileError(f"{index_path}: not a readable .npy file ({error}); run `simclr embed` again") from None
    expected = (len(manifest.paths), manifest.dim)
    if rows.shape != expected or rows.dtype != np.dtype(manifest.dtype):
        raise ModelFileError(f"{index_path}: holds {rows.shape} {rows.dtype} but its manifest says {expected} "
                             f"{manifest.dtype}; the two files do not belong together, run `simclr embed` again")
    return rows, manifest


# -- the last index -------------------------------------------------------------------------

def state_dir() -> Path:
    """Where simclr remembers things between commands: $XDG_STATE_HOME/simclr or ~/.local/state/simclr."""
    return xdg_home("XDG_STATE_HOME", ".local/state") / "simclr"


def remember_index(index_path: str | Path) -> str | None:
    """Record the index for `simclr similar` without --index; the warning to print if it cannot be (a read-only
    home must not fail an embed that succeeded, but `similar` would then say there is no index)."""
    try:
        write_json(state_dir() / "last_index.json", {"index": str(Path(index_path).absolute())})
    except OSError as error:
        return (f"could not remember {index_path} as the last index in {state_dir()} ({error.strerror or error}); "
                f"pass --index {index_path} to `simclr similar`")
    return None


def choose_index(explicit: str | Path | None) -> tuple[Path, str]:
    """The index to search and where that choice came from: --index, $SIMCLR_INDEX, or the last embed."""
    if explicit is not None:
        return Path(explicit), "--index"
    if os.environ.get(INDEX_ENV):
        return Path(os.environ[INDEX_ENV]), f"${INDEX_ENV}"
    state = state_dir() / "last_index.json"
    if state.is_file():
        try:
            remembered = read_json(state, "state file")["index"]
        except (ModelFileError, KeyError, TypeError):
            remembered = None
        if isinstance(remembered, str) and remembered:
            return Path(remembered), "the last `simclr embed`"
    raise ConfigError("no index to search: run `simclr embed MODEL IMAGES OUT.npy` first, or pass --index OUT.npy")


# -- search ---------------------------------------------------------------------------------

class NaNRow(ValueError):
    """A row of the index scored NaN (the index is damaged): `row`, the first one the search came upon."""

    def __init__(self, row: int):
        super().__init__(f"row {row} of the index scores NaN")
        self.row = row


def top_k(rows: np.ndarray, queries: np.ndarray, k: int, normalized: bool = True,
          exclude: Sequence[int | None] | None = None, chunk_rows: int | None = None,
          kernel: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k of unit `queries` (Q, D) against `rows` (N, D): (scores (Q, k), row indices (Q, k)).

    Rows are read in chunks, scored in float32 and merged into a running top-k, so memory stays at
    one chunk whatever N (plus 2 bytes a row for one or two queries against float16 rows with PyTorch). A
    few queries split the rows among threads. `exclude[j]` is a row that query j must not return (itself):
    it scores -inf, so when k reaches N it comes last, at -inf. Hits of equal score are listed by row. A row
    that scores NaN (a damaged index) raises NaNRow, wherever it ranks; numpy's float16 kernel alone cannot
    tell, as it turns NaN finite.

    Rows are scored by `kernel`: "native", search.c's kernels (native.py), for float16 (F16C) and float32
    rows, which read each row once, and for fewer than SPLIT_QUERIES queries keep the top k as well;
    "torch", for float16 rows only, PyTorch's matrix-vector product for one or two unit queries, slower
    (1M x 512 rows: 1.6-2x the time to read them, against 1.0-1.3x), and importing PyTorch takes longer
    than searching a million rows; "numpy", for float16 rows three integer passes a chunk
    (`_float16_scorer`), 3.5-5x, for float32 rows `np.vecdot` or BLAS (`_float32_scorer`). None: the first
    of these that this machine has for the rows' dtype (`search_kernel`).
    """
    if rows.ndim != 2 or queries.ndim != 2 or rows.shape[1] != queries.shape[1]:
        raise ValueError(f"rows {rows.shape} and queries {queries.shape}: two 2-d arrays of one width are needed")
    if not np.isfinite(queries).all():
        raise ValueError("queries hold NaN or infinite values, whose scores would be NaN for every row")
    count, num_queries = rows.shape[0], queries.shape[0]
    k = min(k, count)
    if num_queries == 0 or k == 0:
        return np.empty((num_queries, k), dtype=np.float32), np.empty((num_queries, k), dtype=np.int64)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    kernel = kernel or search_kernel(rows.dtype)
    if kernel not in (FLOAT16_KERNELS if rows.dtype == np.float16 else FLOAT32_KERNELS) or (
            kernel == "native" and (search_kernels() is None or rows.dtype not in NATIVE_DTYPES)):
        raise ValueError(f"no {rows.dtype} kernel {kernel!r} here; search_kernel() picks one that is")
    if kernel == "torch" and normalized and num_queries <= 2:
        # torch's float16 matrix-vector product reads the rows as they are, without a float32 copy.
        # It does not batch queries, so it serves one or two.
        found = [_top_k_float16(rows, query, k, exclude[j] if exclude else None, chunk_rows or FLOAT16_CHUNK_ROWS)
                 for j, query in enumerate(queries)]
        return np.stack([f[0] for f in found]), np.stack([f[1] for f in found])
    queries_t = np.ascontiguousarray(queries.T)  # (D, Q)
    if kernel == "native" and num_queries < SPLIT_QUERIES:
        chunk_rows = chunk_rows or max(1, NATIVE_CHUNK_BYTES // (rows.itemsize * max(1, rows.shape[1])))
        split_rows = True
        scan = partial(_scan_native, rows, queries, k, exclude, normalized, chunk_rows)
    else:
        if rows.dtype == np.float16 and kernel == "native":  # many queries: converted, then scored by BLAS
            split_rows = False
            chunk_rows = chunk_rows or max(1, DECODE_BYTES // (4 * max(1, rows.shape[1])))
            make_scorer = partial(_native_float16_scorer, queries_t, min(chunk_rows, count), normalized)
        elif rows.dtype == np.float16:
            split_rows = num_queries < SPLIT_QUERIES
            chunk_rows = chunk_rows or max(1, DECODE_BYTES // (4 * max(1, rows.shape[1])))
            make_scorer = partial(_float16_scorer, queries_t, min(chunk_rows, count), split_rows, normalized)
        else:  # numpy, float32 rows (and any other dtype)
            chunk_rows = chunk_rows or CHUNK_ROWS
            # One query against rows of up to 1,024 values: the rows split among threads. Longer rows (2,048-d:
            # resnet50 and up) go faster through BLAS, which threads itself: on 1M x 2048 rows, 2-core AVX2
            # EPYC, 0.26-0.41 s against the split einsum's 0.41-0.48 s (at 512-d 0.12 s against 0.10-0.12 s;
            # the split rows are now scored by np.vecdot, 70 against the einsum's 76 ms).
            split_rows = num_queries == 1 and rows.shape[1] <= 1024
            make_scorer = partial(_float32_scorer, queries_t, split_rows, normalized)

        def scan(span: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
            return _scan(rows, span, make_scorer(), num_queries, k, exclude, chunk_rows)

    if split_rows:
        # A few queries, a share of the rows to each thread (numpy's float32 loop: 1.1-1.5x the time to read
        # the rows once on 2 cores, where BLAS's own threads took 1.8-2.4x).
        threads = max(1, min(cpu_cores(), -(-count // chunk_rows)))
        bounds = [count * part // threads for part in range(threads + 1)]  # equal shares, chunks or not
        spans = zip(bounds[:-1], bounds[1:])
        best_scores, best_rows = _merge(list(_pool(os.getpid(), threads).map(scan, spans)), k)
    else:
        best_scores, best_rows = scan((0, count))
    order = np.lexsort((best_rows, -best_scores), axis=0)  # (k, Q): by score, then by row
    return np.take_along_axis(best_scores, order, 0).T, np.take_along_axis(best_rows, order, 0).T  # (Q, k)


@functools.cache
def _pool(pid: int, threads: int) -> ThreadPoolExecutor:
    """`threads` threads kept for the searches of process `pid` (a forked child starts its own): starting
    two afresh made each search of 100k rows 2-4 ms slower, a third of its time."""
    return ThreadPoolExecutor(threads, thread_name_prefix="simclr-search")


def _float32_scorer(queries_t: np.ndarray, one_thread: bool, normalized: bool) -> Callable[[np.ndarray], np.ndarray]:
    """Cosine scores of float32 chunks (C, D) against unit queries (D, Q): (C, Q) float32.

    `one_thread`: numpy's own dot products, row by row, not BLAS, which threads itself and would fight
    the other threads' scans.
    """
    query_rows = np.ascontiguousarray(queries_t.T)[None]  # (1, Q, D)

    def score(chunk: np.ndarray) -> np.ndarray:
        scores = np.vecdot(chunk[:, None, :], query_rows) if one_thread else chunk @ queries_t  # (C, Q)
        if not normalized:
            scores /= np.maximum(np.sqrt(np.vecdot(chunk, chunk)), 1e-12)[:, None]
        return scores
    return score


def _float16_scorer(queries_t: np.ndarray, buffer_rows: int, one_thread: bool,
                    normalized: bool) -> Callable[[np.ndarray], np.ndarray]:
    """Cosine scores of float16 chunks (C, D) against unit queries (D, Q), computed on the chunk in float32.

    numpy's float16-to-float32 conversion is scalar (16 ms for 16 MiB here), so the chunk is converted
    with three integer passes, 8x faster, into a buffer that stays in cache: a float16's bits shifted left
    by 13, its sign put back at bit 31, are the float32 of its value times 2^-112 (subnormals and zero
    included). Unit rows are scored against the queries scaled by 2^112 to match, so the products are
    the float32 ones; other rows are scaled back first (one more pass), as their squares would underflow.
    (Infinities and NaNs, which no unit row holds, come out finite.)
    """
    buffer = np.empty((buffer_rows, queries_t.shape[0]), dtype=np.int32)
    # Exact: multiplying by a power of two, far from overflow for unit queries.
    score_float32 = _float32_scorer(queries_t * np.float32(2.0 ** 112) if normalized else queries_t, one_thread,
                                    normalized)

    def score(chunk: np.ndarray) -> np.ndarray:  # (C, D) -> (C, Q) float32
        bits = buffer[:len(chunk)]
        np.copyto(bits, chunk.view(np.int16))  # sign-extended: the sign fills bits 15-31
        np.left_shift(bits, 13, out=bits)  # exponent and mantissa at float32's places, sign at bits 28-31
        np.bitwise_and(bits, FLOAT16_BITS_MASK, out=bits)  # clear bits 28-30: a float32 exponent of 0-30
        values = bits.view(np.float32)  # (C, D)
        if not normalized:
            values *= np.float32(2.0 ** 112)
        return score_float32(values)
    return score


def _native_float16_scorer(queries_t: np.ndarray, buffer_rows: int,
                           normalized: bool) -> Callable[[np.ndarray], np.ndarray]:
    """Cosine scores of float16 chunks (C, D) against many unit queries (D, Q): (C, Q) float32, by BLAS, which
    threads itself, from a float32 buffer search.c converts each chunk into."""
    kernels = search_kernels()
    buffer = np.empty((buffer_rows, queries_t.shape[0]), dtype=np.float32)
    score_float32 = _float32_scorer(queries_t, False, normalized)
    return lambda chunk: score_float32(kernels.to_float(chunk, buffer[:len(chunk)]))


def _scan_native(rows: np.ndarray, queries: np.ndarray, k: int, exclude: Sequence[int | None] | None,
                 normalized: bool, chunk_rows: int, span: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of float16 or float32 rows[begin:end] for a few queries (Q, D) by search.c, which keeps a heap of
    the best each and reads each row once: (scores (k', Q), row indices (k', Q)), k' <= k, unsorted.

    Each call holds the GIL for its set-up only. On 100k x 512 rows, 2-core AVX2 EPYC, one query, 40 runs
    each in turns with the floor (bench_similar.py): 6.2 ms at best, 10.9 median, where scoring each chunk
    in C and merging a top-k in numpy took 8.7-9.3 and 14.3-15.5 ms.
    """
    kernels, heaps = search_kernels(), Heaps(len(queries), k)
    excluded = None if exclude is None else np.array([-1 if row is None else row for row in exclude], dtype=np.int64)
    for start in range(span[0], span[1], chunk_rows):
        chunk = np.asarray(rows[start:min(start + chunk_rows, span[1])])  # (C, D), read from the memory map
        nan_row = kernels.top_k(chunk, queries, heaps, start, excluded, divide_by_length=not normalized)
        if nan_row is not None:
            raise NaNRow(nan_row)
    return heaps.best()


def _scan(rows: np.ndarray, span: tuple[int, int], score: Callable[[np.ndarray], np.ndarray], num_queries: int,
          k: int, exclude: Sequence[int | None] | None, chunk_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of rows[begin:end], a chunk at a time: (scores (k', Q), row indices (k', Q)), k' <= k, unsorted."""
    begin, end = span
    best = np.empty((0, num_queries), dtype=np.float32), np.empty((0, num_queries), dtype=np.int64)
    bar = None  # (Q,): each query's k-th best score so far, once k rows are held
    for start in range(begin, end, chunk_rows):
        chunk = np.asarray(rows[start:min(start + chunk_rows, end)])  # (C, D), read from the memory map
        scores = score(chunk)  # (C, Q) cosines
        if np.isnan(scores).any():
            raise NaNRow(start + int(np.flatnonzero(np.isnan(scores).any(axis=1))[0]))
        for j, row in enumerate(exclude or ()):
            if row is not None and start <= row < start + len(chunk):
                scores[row - start, j] = -np.inf
        positions = np.arange(start, start + len(chunk))  # (C,)
        if bar is not None:
            # Only a row scoring at least some query's k-th best so far can enter: after the first chunks few
            # do, and one comparison skips the merge (whose sort and copies hold the GIL from other threads).
            enter = np.flatnonzero((scores >= bar).any(axis=1))  # (c,)
            if len(enter) == 0:
                continue
            scores, positions = scores[enter], positions[enter]
        best = _merge([best, (scores, np.broadcast_to(positions[:, None], scores.shape))], k)  # (k', Q) each
        if len(best[0]) == k:
            bar = best[0].min(axis=0)
    return best


def _merge(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best k of several (scores (k', Q), row indices (k', Q)) pairs, in no particular order."""
    scores, rows = np.concatenate([part[0] for part in parts]), np.concatenate([part[1] for part in parts])
    if len(scores) <= k:
        return scores, rows
    keep = np.argpartition(-scores, k - 1, axis=0)[:k]  # (k, Q)
    best, best_rows = np.take_along_axis(scores, keep, 0), np.take_along_axis(rows, keep, 0)
    # argpartition keeps any of the rows tied at the k-th score: where one it left out ties with it, the
    # lowest rows of the tie are kept instead (by a full sort of that query's scores: rare).
    kth = best.min(axis=0)  # (Q,)
    for j in np.flatnonzero((scores == kth).sum(axis=0) > (best == kth).sum(axis=0)):
        order = np.lexsort((rows[:, j], -scores[:, j]))[:k]
        best[:, j], best_rows[:, j] = scores[order, j], rows[order, j]
    return best, best_rows


def _top_k_float16(rows: np.ndarray, query: np.ndarray, k: int, exclude: int | None,
                   chunk_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of one unit query (D,) against unit float16 rows: (scores (k,), row indices (k,)).

    Float16 scores find the candidates: every row within twice FLOAT16_SCORE_ERROR of the k-th best
    float16 score, which must include the true top k. Only those are scored again in float32. The
    float16 scores of all rows are kept until the end (2 MB for a million rows): one pass of
    matrix-vector products, then one top-k, costs less than a running top-k chunk by chunk.
    """
    import torch

    query_half = torch.from_numpy(query).half()
    approx = torch.empty(rows.shape[0], dtype=torch.float16)  # (N,): 2 bytes a row, 1/D of the index
    for start in range(0, rows.shape[0], chunk_rows):
        block = torch.from_numpy(np.asarray(rows[start:start + chunk_rows]))  # (C, D) float16
        torch.mv(block, query_half, out=approx[start:start + len(block)])
    approx = approx.float()
    if approx.isnan().any():
        raise NaNRow(int(approx.isnan().nonzero()[0, 0]))
    if exclude is not None:
        approx[exclude] = -float("inf")
    # The best k + CANDIDATE_SLACK usually hold every candidate, and then one top-k finds them: a pass
    # over all N scores to compare and gather costs 0.5 ms per 100k rows. A crowd of near-ties
    # (near-duplicate images) overflows it, and then every score is compared.
    values, best = approx.topk(min(k + CANDIDATE_SLACK, len(approx)))  # (m,), sorted
    threshold = values[k - 1] - 2 * FLOAT16_SCORE_ERROR
    if len(values) == len(approx) or values[-1] < threshold:
        rows_found = best[values >= threshold].numpy()  # (c,)
    else:
        rows_found = (approx >= threshold).nonzero().flatten().numpy()  # (c,)
    exact = np.asarray(rows[rows_found], dtype=np.float32) @ query  # (c,)
    if exclude is not None:  # a candidate only when k reaches N and the threshold is -inf
        exact[rows_found == exclude] = -np.inf
    order = np.lexsort((rows_found, -exact))[:k]  # by score, then by row
    return exact[order], rows_found[order]


def search_kernel(dtype: np.dtype) -> str:
    """The fastest kernel this machine has for rows of `dtype`: "native" where search.c builds and runs;
    else, for float16 rows, "torch" where PyTorch is already imported; else "numpy"."""
    if search_kernels() is not None and dtype in NATIVE_DTYPES:
        return "native"
    return "torch" if dtype == np.float16 and "torch" in sys.modules else "numpy"


@dataclass
class Hit:
    rank: int
    score: float
    path: str
    row: int


@dataclass
class SearchResult:
    """The index searched (and why that one), one list of hits per readable query, the queries skipped."""

    index: Path
    source: str
    size: int  # rows in the index
    queries: list[str]
    hits: list[list[Hit]]
    skipped: list[Any]


def query_paths(queries: Sequence[str | Path]) -> tuple[list[str], list[Any]]:
    """Image files named on the command line, and the images under any folder among them."""
    from simclr_cli.images import UnreadableImage, load_rgb, require_images, scan_images

    paths, skipped = [], []
    for query in map(Path, queries):
        if query.is_dir():
            scan = require_images(scan_images(query, label="QUERY", instead="pass image files or folders of images "
                                                                             "to look up (the index is --index)"))
            paths.extend(os.path.abspath(p) for p in scan.paths)
            skipped.extend(scan.skipped)
        elif query.is_file():
            try:
                load_rgb(query)
            except UnreadableImage as error:
                raise DataError(f"QUERY {query}: {error}; pass an image file or a folder of images") from None
            paths.append(os.path.abspath(query))
        else:
            what = "not a regular file" if query.exists() else "no such file or folder"  # a pipe, a device
            raise DataError(f"QUERY {query}: {what}; pass an image file or a folder of images")
    return paths, skipped


def _spellings(path: str | Path, images: str) -> list[str]:
    """The ways an index's manifest may spell the file that writing `path` would replace, the file's real path
    last: absolute as given (manifests keep absolute paths), through the links to its folder (the rename replaces a
    link named `path` itself, not its target), and the real path as seen from `images`, the folder embedded,
    which may have been given through a link."""
    real = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(path))), os.path.basename(path))
    spellings = [os.path.abspath(path)]
    images_real = os.path.realpath(images) if images else ""
    if images_real and real.startswith(images_real.rstrip(os.sep) + os.sep):
        spellings.append(os.path.join(images, os.path.relpath(real, images_real)))
    return list(dict.fromkeys([*spellings, real]))


def search(queries: Sequence[str | Path], index: str | Path | None = None, k: int = 10,
           exclude_self: bool = False, device: str = "cpu", grid: str | Path | None = None) -> SearchResult:
    """Embed the query images with the index's own model and return their exact cosine top-k; `grid`, where the
    contact sheet will go, must not be one of the images searched."""
    if k < 1:
        raise ConfigError(f"-k {k} must be at least 1")
    index_path, source = choose_index(index)
    rows, manifest = open_index(index_path, source)
    if not Path(manifest.model).is_file():
        raise ModelFileError(f"{manifest.model}: the model this index was built with is gone; restore it, or run "
                             f"`simclr embed` again with another model")
    if sha256_file(manifest.model) != manifest.model_sha256:
        raise ModelFileError(f"{manifest.model} changed since {index_path} was built (SHA-256 differs), so its "
                             f"embeddings would not match; restore the file, or run `simclr embed` again")
    paths, skipped = query_paths(queries)
    if grid is not None:
        spellings = _spellings(grid, manifest.images)
        searched = {os.path.realpath(path) for path in paths}
        if spellings[-1] in searched or any(row is not None for row in find_rows(manifest.paths, spellings)):
            raise ConfigError(f"--grid {grid} is one of the images searched (a query, or a row of the index): the "
                              f"contact sheet would replace it; pass another file name")
    features = None
    if device == "cpu" and manifest.precision == "fp32":
        # Rows computed in fp32 (where the CPU has no bf16, the default): numpy gives the same features
        # without importing PyTorch, which takes longer than everything else here.
        from simclr_cli.numpy_encoder import NotInNumpy, embed_queries as embed_on_cpu

        with contextlib.suppress(NotInNumpy):  # weights numpy cannot read (float8): PyTorch embeds them
            features, positions, unreadable = embed_on_cpu(manifest.model, paths)  # (M, D)
    if features is None:
        from simclr_cli.embed import embed_queries
        from simclr_cli.runtime import resolve_device

        features, positions, unreadable = embed_queries(manifest.model, paths, resolve_device(device),
                                                        manifest.precision or "auto")  # (M, D)
    kept = [paths[i] for i in positions]
    if not kept:  # every query failed to decode (query_paths only opened them)
        first = unreadable[0]
        others = f" (and the other {len(paths) - 1} queries)" if len(paths) > 1 else ""
        raise DataError(f"QUERY {first.path}: {first.reason}{others}; pass readable image files or folders")
    exclude = find_rows(manifest.paths, kept) if exclude_self else None
    unusable = np.flatnonzero(~np.isfinite(features).all(axis=1))  # NaN would score every row NaN
    if len(unusable):
        raise DataError(f"QUERY {kept[unusable[0]]}: {manifest.model} gives it features that are not finite, which "
                        f"match nothing; search with another image")
    # A query the manifest does not spell as it is spelt here (reached through a symbolic link) may still be
    # in the index: one more hit is asked for, so that leaving its file out still leaves k.
    wanted = k + any(row is None for row in exclude or ())
    hits: list[list[Hit]] = [[] for _ in kept]
    pending, file_ids = list(range(len(kept))), {}  # file_ids: for _own_file_once
    while pending:
        found = _best_hits(index_path, rows, manifest, features[pending], wanted,
                           [exclude[j] for j in pending] if exclude else None)
        for j, line in zip(pending, found):
            hits[j] = _own_file_once(line, kept[j], exclude_self, file_ids)
        # The index holds a query's file by several paths (a link beside it) and those hits were dropped: more
        # are asked for, until k remain or the index runs out. Never where nothing was dropped (nearly always).
        pending = [j for j in pending if len(hits[j]) < k and wanted < len(rows)]
        wanted *= 2
    hits = [line[:k] for line in hits]
    return SearchResult(index_path, source, len(rows), kept, hits, skipped + unreadable)


def _best_hits(index_path: Path, rows: np.ndarray, manifest: Manifest, features: np.ndarray, wanted: int,
               exclude: list[int | None] | None) -> list[list[Hit]]:
    """The best `wanted` hits of each query (M, D), best first, with any excluded row left out; an error where a
    damaged row would be among them."""
    try:
        scores, found = top_k(rows, features, wanted, manifest.normalized, exclude)  # (M, k'), (M, k')
    except NaNRow as damaged:  # neither ranked nor left out silently
        raise ModelFileError(_damaged(index_path, manifest, damaged.row, "NaN")) from None
    # No cosine exceeds 1 (unit float16 rows, rounded: by 1e-3 at most). A damaged row that a kernel scores as
    # a number (numpy's float16 one turns NaN and infinity into finite values) must not be in the table: its score
    # can be past a cosine's 1 or -1, or (rows scaled to unit length) any cosine, so the hits' rows are read too.
    beyond = np.argwhere((np.abs(scores) > 1.01) & (scores > -np.inf)) if manifest.normalized else []
    if len(beyond):
        at = tuple(beyond[0])
        raise ModelFileError(_damaged(index_path, manifest, int(found[at]), f"{scores[at]:.4g}, beyond a cosine's 1"))
    for row in np.unique(found[scores > -np.inf]):  # (at most k' per query)
        if not np.isfinite(rows[row]).all():
            raise ModelFileError(_damaged(index_path, manifest, int(row), "a number, but holds NaN or infinity"))
    return [[Hit(rank + 1, score, manifest.paths[row], row)
             for rank, (score, row) in enumerate(zip(line_scores, line_rows)) if score > -float("inf")]
            for line_scores, line_rows in zip(scores.tolist(), found.tolist())]


def _own_file_once(hits: list[Hit], query: str, exclude_self: bool,
                   file_ids: dict[str, tuple[int, int] | None]) -> list[Hit]:
    """`hits` ranked again, with the query's own file left out (`exclude_self`) or kept once: an index may hold
    it by several paths (a symbolic link to it in the folder embedded), each at score 1. The path spelt as the
    query is the one kept, else the best ranked. `file_ids` keeps the files looked up, for the other queries."""
    own = _file_id(query, file_ids)
    copies = [hit for hit in hits if own is not None and _file_id(hit.path, file_ids) == own]
    if copies and not exclude_self:
        copies.remove(next((hit for hit in copies if hit.path == query), copies[0]))
    dropped = {hit.row for hit in copies}
    others = [hit for hit in hits if hit.row not in dropped]
    return [Hit(rank + 1, hit.score, hit.path, hit.row) for rank, hit in enumerate(others)]


def _damaged(index_path: Path, manifest: Manifest, row: int, score: str) -> str:
    return (f"{index_path}: row {row} ({manifest.paths[row]}) scores {score}; the index is damaged, run `simclr "
            f"embed` again")


def _file_id(path: str, known: dict[str, tuple[int, int] | None]) -> tuple[int, int] | None:
    """files.file_id, remembered in `known` for the other queries."""
    if path not in known:
        known[path] = file_id(path)
    return known[path]


def find_rows(paths: Sequence[str], wanted: Sequence[str]) -> list[int | None]:
    """The row of each of the `wanted` paths (absolute and normalised) in an index's `paths`, or None."""
    if isinstance(paths, ManifestPaths) and len(wanted) <= FIND_QUERIES:
        rows = [paths.find(path) for path in wanted]
        if None not in rows or not paths.may_hold_dots():
            return rows
    # Paths are stored absolute; indexes written before they were also normalised may hold "/../".
    row_of = {(os.path.normpath(path) if "/." in path else path): row for row, path in enumerate(paths)}
    return [row_of.get(path) for path in wanted]


# -- contact sheets -------------------------------------------------------------------------

# The formats a contact sheet can be written in (Pillow reads many more than it writes), and the most pixels
# a side some of them hold.
GRID_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".gif": "GIF",
                ".tif": "TIFF", ".tiff": "TIFF"}
GRID_MAX_SIDE = {"JPEG": 65500, "WEBP": 16383, "GIF": 65535}
SHEET_THUMB, SHEET_LABEL, SHEET_GAP = 128, 18, 4  # pixels: a thumbnail's side, its label's height, the gaps


def contact_sheet(blocks: Sequence[tuple[str, Sequence[tuple[str, float]]]], out: str | Path) -> None:
    """Write a grid image: one line per query, the query first, then its hits with their scores."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    from simclr_cli.files import atomic_path
    from simclr_cli.images import UnreadableImage, load_rgb

    thumb, gap = SHEET_THUMB, SHEET_GAP
    cell_w, cell_h = thumb + gap, thumb + SHEET_LABEL + gap
    sheet = Image.new("RGB", sheet_size(len(blocks), max((len(hits) for _, hits in blocks), default=0)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for line, (query, hits) in enumerate(blocks):
        cells = [(query, "query")] + [(path, f"#{rank}  {score:.3f}") for rank, (path, score) in enumerate(hits, 1)]
        for column, (path, label) in enumerate(cells):
            x, y = gap + column * cell_w, gap + line * cell_h
            try:
                image = ImageOps.contain(load_rgb(path), (thumb, thumb))  # scaled up or down to fit
                sheet.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
            except UnreadableImage:
                draw.rectangle((x, y, x + thumb - 1, y + thumb - 1), fill=(200, 200, 200))
            draw.text((x + 2, y + thumb + 2), label, fill=(200, 0, 0) if column == 0 else "black", font=font)
    try:
        with atomic_path(out) as tmp:
            sheet.save(tmp, format=GRID_FORMATS[Path(out).suffix.lower()])
    except (OSError, ValueError) as error:  # Pillow's encoders raise either
        raise ConfigError(f"--grid {out}: cannot write it ({error}); pass a path in a writable folder, or write "
                          f"a .png") from None


def sheet_size(lines: int, hits: int) -> tuple[int, int]:
    """(width, height) in pixels of a contact sheet of `lines` queries, each with up to `hits` hits."""
    return ((1 + hits) * (SHEET_THUMB + SHEET_GAP) + SHEET_GAP,
            lines * (SHEET_THUMB + SHEET_LABEL + SHEET_GAP) + SHEET_GAP)


def check_grid_path(out: str | Path, lines: int = 1, hits: int = 0) -> None:
    """Refuse a --grid path simclr cannot write, or a sheet of `lines` x `hits` too large for its format."""
    image_format = GRID_FORMATS.get(Path(out).suffix.lower())
    if image_format is None:
        raise ConfigError(f"--grid {out}: {Path(out).suffix or 'no extension'} is not an image type simclr "
                          f"writes; end the name in .png or .jpg")
    check_output_path(out, "--grid")
    width, height = sheet_size(lines, hits)
    if max(width, height) > GRID_MAX_SIDE.get(image_format, width + height):
        raise ConfigError(f"--grid {out}: the sheet would be {width:,} x {height:,} pixels, more than "
                          f"{image_format} holds ({GRID_MAX_SIDE[image_format]:,} a side); write a .png, or ask "
                          f"for fewer queries or hits")

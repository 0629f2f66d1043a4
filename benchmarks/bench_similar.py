"""Search latency of `simclr similar` against plain numpy, and the memory-read floor, on random indexes.

For each size and dtype it writes a random unit-row index (rows x dim) and times, page cache warm, best
of --repeats (the floor and the kernels in turns), one query:
  floor      reading every byte of the index once (an int64 sum over it, in chunks)
  simclr     index.top_k: chunked exact cosine top-k over the memory-mapped rows, with each kernel:
             native (search.c, what `simclr similar` runs where the machine builds it), torch (float16
             only: PyTorch's, used without it where PyTorch is imported anyway) and numpy (the rest)
  plain      numpy the plain way: `scores = rows @ query`, then argpartition and a sort of the top k
and prints the ratios. With --end-to-end it also times the whole command, `simclr similar QUERY --index
BIG.npy` in a fresh process (start-up, model load and hash check, manifest, query embedding, search,
output) on the largest index, with an untrained --arch encoder (resnet18 by default; resnet50 is
pretrain's default, with --dim 2048) at --image-size: one first run, reported apart, then best and
worst of --repeats. The index records the --precision its rows were computed at, as `simclr embed`
would on this CPU unless told: at fp32 the command embeds the query in numpy and never imports PyTorch
(numpy_encoder.py), at bf16 it embeds it with PyTorch (--precision fp32 and bf16 time both).

    .venv/bin/python benchmarks/bench_similar.py                       # 100k rows, float16 and float32
    .venv/bin/python benchmarks/bench_similar.py --rows 100000 1000000 --end-to-end
    .venv/bin/python benchmarks/bench_similar.py --rows 1000000 --dim 2048 --arch resnet50 --end-to-end
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from numpy.lib import format as npy_format

from simclr_cli.config import cpu_cores
from simclr_cli.index import Manifest, manifest_path, open_index, sha256_file, top_k, write_manifest
from simclr_cli.native import search_kernels


def best_of(repeats: int, function) -> float:
    return best_of_turns(repeats, {"": function})[""]


def best_of_turns(repeats: int, functions: dict) -> dict:
    """The best time of each function, run in turns: all of them once, `repeats` times over.

    Each starts 50 ms after the one before: PyTorch's OpenMP threads spin for some milliseconds after each
    parallel loop (the floor's sum, torch's kernel), and took the cores from the next function's threads.
    """
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            time.sleep(0.05)
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: min(spent) for name, spent in times.items()}


def write_index(path: Path, rows: int, dim: int, dtype: str, model: Path, precision: str, seed: int = 0) -> None:
    """Random unit rows, written in chunks (bounded memory), and a manifest naming `model` and the `precision`
    the rows were computed at (`simclr similar` embeds its queries at that one)."""
    generator = np.random.default_rng(seed)
    array = npy_format.open_memmap(path, mode="w+", dtype=dtype, shape=(rows, dim))
    for start in range(0, rows, 65536):
        block = generator.standard_normal((min(65536, rows - start), dim), dtype=np.float32)
        array[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    array.flush()
    del array
    # Paths as long as a photo library's (the manifest of 1M rows: 68 MB), written as `simclr embed` writes them.
    paths = [f"/home/someone/Pictures/holidays/2019-summer/IMG_{i:08d}.jpg" for i in range(rows)]
    write_manifest(path, Manifest(paths=paths, model=str(model), model_sha256=sha256_file(model), preprocessing={},
                                  dim=dim, dtype=dtype, normalized=True, precision=precision))


def read_floor(rows: np.ndarray, chunk: int = 65536) -> None:
    """Read every byte of `rows` as int64 words, `chunk` rows' worth at a time. Words of the whole array, not
    of each row: a row of float16 is not a whole number of words unless --dim is a multiple of 4 (the few bytes
    past the last whole word, at most 7, are left out)."""
    as_bytes = rows.reshape(-1).view(np.uint8)
    as_words = as_bytes[:len(as_bytes) // 8 * 8].view(np.int64)
    words = max(1, chunk * rows.shape[1] * rows.itemsize // 8)
    for start in range(0, len(as_words), words):
        torch.from_numpy(as_words[start:start + words]).sum()


def numpy_search(rows: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    scores = rows @ query  # (N,)
    top = np.argpartition(-scores, k)[:k]
    return top[np.argsort(-scores[top])]


def make_encoder(folder: Path, arch: str, image_size: int) -> tuple[Path, Path, int]:
    """An untrained encoder file, one query JPEG (the weights do not change the timing), the encoder's width."""
    from PIL import Image

    from simclr_cli.augment import IMAGENET_MEAN, IMAGENET_STD
    from simclr_cli.export import save_encoder
    from simclr_cli.files import EncoderInfo
    from simclr_cli.models import build_backbone

    backbone = build_backbone(arch, "imagenet")
    info = EncoderInfo(arch, "imagenet", backbone.feature_dim, image_size, IMAGENET_MEAN, IMAGENET_STD, "bench",
                       {})
    save_encoder(folder / "encoder.safetensors", backbone, info)
    pixels = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "query.jpg", quality=90)
    return folder / "encoder.safetensors", folder / "query.jpg", backbone.feature_dim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000], help="index sizes")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--dtypes", nargs="+", default=["float16", "float32"])
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--end-to-end", action="store_true", help="also time `simclr similar` on the largest index")
    parser.add_argument("--image-size", type=int, default=224, help="encoder input size for --end-to-end")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="the precision the index records, which --end-to-end embeds the query at: fp32 in "
                             "numpy, bf16 with PyTorch (auto: what `simclr embed` on this CPU would record)")
    parser.add_argument("--arch", default="resnet18", help="encoder for --end-to-end; its features must be --dim "
                                                           "wide (512 for resnet18 and 34, 2048 for resnet50 and up)")
    parser.add_argument("--threads", type=int, default=None,
                        help="run on this many cores, each library with one thread a core: simclr's search "
                             "threads, numpy's BLAS, PyTorch (default: every core this process may use)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the indexes (default: a temp dir)")
    args = parser.parse_args()
    if args.dir is not None and not args.dir.is_dir():
        parser.error(f"--dir {args.dir}: no such folder; make it first, or leave --dir out for a temporary one")
    if args.threads is not None and not (hasattr(os, "sched_setaffinity") and 1 <= args.threads <= cpu_cores()):
        parser.error(f"--threads {args.threads}: this process may run on 1 to {cpu_cores()} cores, and the flag needs "
                     f"Linux (it sets the cores with sched_setaffinity)")
    if args.threads and (cpu_cores() != args.threads or os.environ.get("OPENBLAS_NUM_THREADS") != str(args.threads)):
        # numpy's BLAS and PyTorch took their thread counts when they loaded, before the flags were read: start
        # again with them in the environment, on that many cores (simclr's search has one thread a core, and
        # `simclr similar` in --end-to-end inherits both)
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
        threads = {name: str(args.threads) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **threads})

    precision = args.precision
    if precision == "auto":
        from simclr_cli.runtime import resolve_precision

        precision = resolve_precision("auto", torch.device("cpu")).name
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), {cpu_cores()} for this "
          f"run (simclr's search threads), torch {torch.__version__} with {torch.get_num_threads()} threads; one "
          f"query, k={args.k}, best of {args.repeats}, page cache warm")
    print(f"{'rows':>9} {'dtype':>8} {'kernel':>7} {'MiB':>6} {'floor ms':>9} {'simclr ms':>10} {'plain ms':>9} "
          f"{'simclr/floor':>13} {'plain/simclr':>13}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        model, query_image, width = make_encoder(folder, args.arch, args.image_size)
        if args.end_to_end and width != args.dim:
            sys.exit(f"error: --arch {args.arch} gives {width}-d features, not --dim {args.dim}; pass --dim {width}")
        query = np.random.default_rng(1).standard_normal(args.dim).astype(np.float32)
        query /= np.linalg.norm(query)
        largest, largest_rows = None, 0
        for count in args.rows:
            for dtype in args.dtypes:
                path = folder / f"index_{count}_{dtype}.npy"
                write_index(path, count, args.dim, dtype, model, precision)
                rows, _ = open_index(path)
                read_floor(rows)  # warm the page cache
                # `simclr similar` scores rows with the native kernel where this machine builds it.
                kernels = ["native"] * (search_kernels() is not None) + ["torch"] * (dtype == "float16") + ["numpy"]
                searches = {kernel: partial(top_k, rows, query[None], args.k, kernel=kernel) for kernel in kernels}
                # The floor and the kernels take turns, so that a drift of the machine meets them all alike;
                # the plain search comes after (a second of float16 products on one core slowed the next
                # search at 100k rows by a third).
                timed = best_of_turns(args.repeats, {"floor": lambda: read_floor(rows), **searches})
                plain = best_of(args.repeats, lambda: numpy_search(rows, query, args.k))
                expected = numpy_search(rows, query, args.k).tolist()
                floor = timed.pop("floor")
                for kernel, ours in timed.items():
                    assert searches[kernel]()[1][0].tolist() == expected, f"{kernel}: results differ from numpy"
                    print(f"{count:>9,} {dtype:>8} {kernel:>7} {rows.nbytes / 2**20:>6.0f} "
                          f"{floor * 1e3:>9.1f} {ours * 1e3:>10.1f} {plain * 1e3:>9.1f} {ours / floor:>12.2f}x "
                          f"{plain / ours:>12.2f}x")
                rows = None  # unmapped before the file is deleted
                # Only the index --end-to-end runs on is kept: the one of the most rows (of those, the last written).
                if count >= largest_rows:
                    spare, largest, largest_rows = largest, path, count
                else:
                    spare = path
                if spare is not None and spare != largest:  # --rows 2000 2000 writes the same file twice
                    spare.unlink()
                    manifest_path(spare).unlink()
        if args.end_to_end and largest is not None:
            simclr = Path(sys.executable).with_name("simclr")
            command = [str(simclr), "similar", str(query_image), "--index", str(largest), "-k", str(args.k)]

            def wall() -> float:
                start = time.perf_counter()
                subprocess.run(command, check=True, capture_output=True)
                return time.perf_counter() - start

            # The first run after writing gigabytes of indexes may find PyTorch's libraries pushed out of
            # the page cache, and read them from disk again: reported apart, as a cold start.
            first = wall()
            walls = [wall() for _ in range(args.repeats)]
            startup = best_of(args.repeats, lambda: subprocess.run([str(simclr), "--version"], check=True,
                                                                   capture_output=True))
            print(f"end to end: `simclr similar` on {largest.name} ({args.image_size} px {args.arch}, queries at "
                  f"{precision}), {args.repeats} "
                  f"runs: best {min(walls):.2f} s, worst {max(walls):.2f} s (target < 3 s); the first run before "
                  f"them {first:.2f} s; `simclr --version` alone {startup:.2f} s")


if __name__ == "__main__":
    main()

"""search.c's float16 kernels against numpy, and how native.py builds, caches and gives them up."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from simclr_cli import index as index_module
from simclr_cli import native
from simclr_cli.native import Heaps, build, search_kernels

needs_kernels = pytest.mark.skipif(search_kernels() is None, reason="no C compiler, or not an AVX2/FMA/F16C CPU")


@needs_kernels
def test_every_float16_value_converts_as_numpy_converts_it():
    values = np.arange(2**16, dtype=np.uint16).view(np.float16)  # every bit pattern: NaNs, infinities, -0
    converted = search_kernels().to_float(values.reshape(-1, 16), np.full((2**12, 16), 7.0, dtype=np.float32))
    expected = values.astype(np.float32).reshape(-1, 16)
    assert np.array_equal(converted, expected, equal_nan=True)
    assert np.array_equal(np.signbit(converted), np.signbit(expected))
    odd = search_kernels().to_float(values[:21].reshape(3, 7), np.empty((3, 7), dtype=np.float32))  # no 8 to a step
    assert np.array_equal(odd, values[:21].astype(np.float32).reshape(3, 7))


@needs_kernels
@pytest.mark.parametrize("dim", [1, 7, 8, 15, 16, 17, 40, 512])  # the 8-wide loop, its tail, and both
@pytest.mark.parametrize("num_queries", [1, 3])
@pytest.mark.parametrize("k", [1, 5, 50, 80])  # up to all 50 rows, and more
@pytest.mark.parametrize("divide_by_length", [False, True])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_heaps_hold_the_top_k_of_a_float64_reference(dim, num_queries, k, divide_by_length, dtype):
    """Rows offered in two calls (numbered on from the first) leave in each query's heap rows that no other
    row outscores, with their scores, by dot product or by cosine."""
    generator = np.random.default_rng(dim)
    rows = (generator.standard_normal((50, dim)) * 3).astype(dtype)
    queries = generator.standard_normal((num_queries, dim)).astype(np.float32)
    heaps = Heaps(num_queries, k)
    assert search_kernels().top_k(rows[:20], queries, heaps, divide_by_length=divide_by_length) is None
    assert search_kernels().top_k(rows[20:], queries, heaps, 20, divide_by_length=divide_by_length) is None
    scores, found = heaps.best()  # (k', Q) each
    exact = rows.astype(np.float64) @ queries.T.astype(np.float64)  # (N, Q)
    if divide_by_length:
        exact /= np.linalg.norm(rows.astype(np.float64), axis=1, keepdims=True)
    assert scores.shape == found.shape == (min(k, 50), num_queries)
    np.testing.assert_allclose(scores, np.take_along_axis(exact, found, 0), rtol=1e-5, atol=1e-5)
    for j in range(num_queries):
        left_out = np.setdiff1d(np.arange(50), found[:, j])
        assert len(set(found[:, j].tolist())) == len(found) and len(left_out) == 50 - len(found)
        assert len(left_out) == 0 or exact[found[:, j], j].min() >= exact[left_out, j].max() - 1e-4


@needs_kernels
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_excluded_rows_score_minus_infinity_and_nan_rows_are_reported_not_held(dtype):
    rows = np.eye(6, 8, dtype=dtype)
    rows[[2, 4]] = np.nan
    queries = np.ones((2, 8), dtype=np.float32)
    heaps = Heaps(2, 6)
    assert search_kernels().top_k(rows[:3], queries, heaps, 10, np.array([10, 11])) == 12  # rows 10 to 12
    assert search_kernels().top_k(rows[3:], queries, heaps, 13, np.array([14, -1])) == 14  # excluded, still NaN
    scores, found = heaps.best()
    held = [dict(zip(found[:, j].tolist(), scores[:, j].tolist())) for j in range(2)]  # row: score, per query
    assert held == [{10: -np.inf, 11: 1.0, 13: 1.0, 15: 1.0}, {10: 1.0, 11: -np.inf, 13: 1.0, 15: 1.0}]
    heaps = Heaps(3, 3)  # an exclude that is a strided view is read as its values, not its memory
    search_kernels().top_k(rows[[0, 1, 3]], np.ones((3, 8), dtype=np.float32), heaps,
                           exclude=np.array([0, 9, 1, 9, 2, 9])[::2])
    scores, found = heaps.best()
    assert [found[scores[:, j] == -np.inf, j].tolist() for j in range(3)] == [[0], [1], [2]]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty kernel cache, and a compiler whose every run is counted: the list of their commands."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    runs = []
    real_compile = native._compile
    monkeypatch.setattr(native, "_compile", lambda command, *args: runs.append(command) or real_compile(command, *args))
    search_kernels.cache_clear()
    yield runs
    search_kernels.cache_clear()


@needs_kernels
def test_the_kernels_are_built_once_then_loaded_from_the_cache(cache):
    assert search_kernels() is not None and len(cache) == 1
    search_kernels.cache_clear()  # a new process
    assert search_kernels() is not None and len(cache) == 1
    assert sorted(path.suffix for path in native.cache_dir().iterdir()) == [".sha256", ".so"]  # nothing half-written


@needs_kernels
@pytest.mark.parametrize("damage", ["truncated", "no digest", "another digest"])
def test_a_damaged_library_is_built_again_not_loaded(cache, damage):
    """A truncated library would crash the process that loads it (SIGBUS), so it is never loaded."""
    library = build(native.SOURCE)
    whole = library.read_bytes()
    if damage == "truncated":  # as a crash between the write and the disk could leave it
        library.write_bytes(whole[:4096])
    elif damage == "no digest":
        library.with_suffix(".sha256").unlink()
    else:
        library.with_suffix(".sha256").write_text("0" * 64 + "\n")
    assert build(native.SOURCE) == library and len(cache) == 2
    assert library.read_bytes() == whole
    assert build(native.SOURCE) == library and len(cache) == 2


@pytest.mark.skipif(native.compiler() is None, reason="no C compiler")
def test_a_failed_build_is_remembered_with_the_compiler_output_and_tried_again_a_day_later(cache, tmp_path):
    source = tmp_path / "broken.c"
    source.write_bytes(b"this is not C \xff\xfe\n")  # quoted back in the compiler's output, not UTF-8
    assert build(source) is None and build(source) is None
    assert len(cache) == 1
    [failed] = native.cache_dir().iterdir()
    assert failed.suffix == ".failed" and "error" in failed.read_text()
    day_ago = time.time() - native.RETRY_SECONDS - 1
    os.utime(failed, (day_ago, day_ago))
    assert build(source) is None and len(cache) == 2
    source.write_text("int simclr_answer(void) { return 42; }\n")  # a new source is a new build
    assert build(source) is not None and len(cache) == 3


def test_a_compiler_that_hangs_is_stopped_with_what_it_started_and_remembered(cache, monkeypatch, tmp_path):
    children = tmp_path / "children"
    script = tmp_path / "hanging-cc"
    script.write_text(f"#!/bin/sh\nsleep 60 &\necho $! > {children}\nwait\n")
    script.chmod(0o755)
    monkeypatch.setenv("CC", str(script))
    monkeypatch.setattr(native, "BUILD_SECONDS", 1)
    started = time.monotonic()
    assert build(native.SOURCE) is None and time.monotonic() - started < 30
    [failed] = native.cache_dir().iterdir()
    assert failed.suffix == ".failed" and "stopped after 1 s" in failed.read_text()
    status = Path(f"/proc/{children.read_text().strip()}/status")
    assert not status.exists() or "zombie" in status.read_text()  # the sleep was killed too
    assert build(native.SOURCE) is None and len(cache) == 1


def test_a_compiler_that_succeeds_without_output_is_remembered_as_failed(cache, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "true")
    assert build(native.SOURCE) is None and build(native.SOURCE) is None and len(cache) == 1
    [failed] = native.cache_dir().iterdir()
    assert failed.suffix == ".failed" and "exited 0 but wrote no" in failed.read_text()


def test_a_cc_that_cannot_be_parsed_is_no_compiler(cache, monkeypatch):
    monkeypatch.setenv("CC", 'gcc "')
    assert native.compiler() is None and search_kernels() is None and cache == []


@pytest.mark.skipif(native.compiler() is None, reason="no C compiler")
def test_cc_may_carry_flags_and_a_relative_cache_home_is_ignored(cache, monkeypatch, tmp_path):
    monkeypatch.setenv("CC", f"{native.compiler()[0]} -Wall")
    source = tmp_path / "answer.c"
    source.write_text("int simclr_answer(void) { return 42; }\n")
    assert build(source) is not None and cache[0][1:] == ["-Wall"]
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert native.cache_dir() == Path.home() / ".cache" / "simclr" / "native"


@needs_kernels
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_nan_rows_are_reported_even_when_cc_asks_for_fast_maths(cache, monkeypatch, dtype):
    """-ffast-math lets the compiler assume no NaN, and fold the kernel's NaN test to false: damaged rows were
    dropped without a word."""
    monkeypatch.setenv("CC", f"{native.compiler()[0]} -ffast-math")
    rows = np.eye(4, 8, dtype=dtype)
    rows[2] = np.nan
    assert search_kernels().top_k(rows, np.ones((1, 8), dtype=np.float32), Heaps(1, 4)) == 2
    assert cache[0][1:] == ["-ffast-math"], "built with $CC's flags"


@needs_kernels
def test_arrays_of_the_wrong_shape_or_type_are_refused_before_the_c_code_sees_them():
    rows = np.zeros((40, 512), dtype=np.float16)
    with pytest.raises(ValueError, match="width"):
        search_kernels().top_k(rows, np.zeros((1, 16), dtype=np.float32), Heaps(1, 3))
    with pytest.raises(ValueError, match="float32"):
        search_kernels().top_k(rows, np.zeros((1, 512), dtype=np.float64), Heaps(1, 3))
    with pytest.raises(ValueError, match="rows: a 2-d float32 array is needed, not 2-d float64"):
        search_kernels().top_k(rows.astype(np.float64), np.zeros((1, 512), dtype=np.float32), Heaps(1, 3))
    with pytest.raises(ValueError, match="2 heaps for 1 queries"):
        search_kernels().top_k(rows, np.zeros((1, 512), dtype=np.float32), Heaps(2, 3))
    with pytest.raises(ValueError, match="exclude"):
        search_kernels().top_k(rows, np.zeros((1, 512), dtype=np.float32), Heaps(1, 3), exclude=np.zeros(1, np.int32))
    with pytest.raises(ValueError, match="at least one"):
        Heaps(1, 0)
    with pytest.raises(ValueError, match="out"):
        search_kernels().to_float(rows, np.empty((40, 16), dtype=np.float32))
    for kernel in ("native", "numpy"):
        with pytest.raises(ValueError, match="one width"):
            index_module.top_k(rows, np.zeros((9, 16), dtype=np.float32), 3, kernel=kernel)


@pytest.mark.parametrize("setting", ["native off", "no compiler", "cache is a file", "not x86-64"])
def test_search_falls_back_to_numpy_without_the_kernels(cache, monkeypatch, tmp_path, setting):
    if setting == "native off":
        monkeypatch.setenv("SIMCLR_NATIVE", "0")
    elif setting == "no compiler":
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    elif setting == "cache is a file":
        (tmp_path / "cache").write_text("")
    else:
        monkeypatch.setattr(native.platform, "machine", lambda: "aarch64")
    assert search_kernels() is None and cache == []
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert index_module.search_kernel(np.float16) == index_module.search_kernel(np.float32) == "numpy"
    rows = np.eye(4, dtype=np.float16)
    scores, found = index_module.top_k(rows, np.eye(4, dtype=np.float32)[2:3], 2)
    assert found.tolist() == [[2, 0]] and scores.tolist() == [[1.0, 0.0]]
    with pytest.raises(ValueError, match="native"):
        index_module.top_k(rows, np.eye(4, dtype=np.float32)[:1], 2, kernel="native")


@needs_kernels
def test_the_native_kernel_is_preferred_even_where_torch_is_imported(monkeypatch):
    import torch

    assert "torch" in sys.modules and torch.__version__
    calls = []
    monkeypatch.setattr(index_module, "_top_k_float16", lambda *args: calls.append(args))
    assert index_module.search_kernel(np.float16) == "native"
    _, found = index_module.top_k(np.eye(4, dtype=np.float16), np.eye(4, dtype=np.float32)[1:2], 2)
    assert found.tolist() == [[1, 0]] and calls == []


@needs_kernels
def test_float32_rows_are_scored_natively_by_default_and_other_dtypes_by_numpy(monkeypatch):
    scanned = []
    real_scan = index_module._scan_native
    monkeypatch.setattr(index_module, "_scan_native", lambda rows, *args: scanned.append(rows.dtype) or
                        real_scan(rows, *args))
    for dtype in (np.float32, np.float64):
        _, found = index_module.top_k(np.eye(4, dtype=dtype), np.eye(4, dtype=np.float32)[1:2], 2)
        assert found.tolist() == [[1, 0]]
    assert scanned == [np.float32]
    with pytest.raises(ValueError, match="no float64 kernel 'native' here"):
        index_module.top_k(np.eye(4), np.eye(4, dtype=np.float32)[1:2], 2, kernel="native")
    with pytest.raises(ValueError, match="no float32 kernel 'torch' here"):
        index_module.top_k(np.eye(4, dtype=np.float32), np.eye(4, dtype=np.float32)[1:2], 2, kernel="torch")


@needs_kernels
@pytest.mark.parametrize("count", [30001, 49148, 100000])
def test_every_thread_gets_a_share_of_a_small_index(monkeypatch, count):
    """Equal shares: when they started at chunk boundaries, an index of 30k rows in 16,384-row chunks went
    to one thread."""
    monkeypatch.setattr(index_module, "cpu_cores", lambda: 2)
    spans = []
    real_scan = index_module._scan_native
    monkeypatch.setattr(index_module, "_scan_native", lambda *args: spans.append(args[-1]) or real_scan(*args))
    rows = np.random.default_rng(count).standard_normal((count, 8)).astype(np.float16)
    query = np.ones((1, 8), dtype=np.float32)
    _, found = index_module.top_k(rows, query, 5, normalized=False, chunk_rows=16384)
    assert sorted(spans) == [(0, count // 2), (count // 2, count)]
    exact = rows.astype(np.float64).sum(axis=1) / np.linalg.norm(rows.astype(np.float64), axis=1)
    assert found[0].tolist() == list(np.argsort(-exact, kind="stable")[:5])

"""half.c's float16 kernels against numpy, and how native.py builds, caches and gives them up."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from simclr_cli import index as index_module
from simclr_cli import native
from simclr_cli.native import build, half_kernels

needs_kernels = pytest.mark.skipif(half_kernels() is None, reason="no C compiler, or not an AVX2/FMA/F16C CPU")


@needs_kernels
def test_every_float16_value_converts_as_numpy_converts_it():
    values = np.arange(2**16, dtype=np.uint16).view(np.float16)  # every bit pattern: NaNs, infinities, -0
    converted = half_kernels().to_float(values.reshape(-1, 16), np.full((2**12, 16), 7.0, dtype=np.float32))
    expected = values.astype(np.float32).reshape(-1, 16)
    assert np.array_equal(converted, expected, equal_nan=True)
    assert np.array_equal(np.signbit(converted), np.signbit(expected))
    odd = half_kernels().to_float(values[:21].reshape(3, 7), np.empty((3, 7), dtype=np.float32))  # no 8 to a step
    assert np.array_equal(odd, values[:21].astype(np.float32).reshape(3, 7))


@needs_kernels
@pytest.mark.parametrize("dim", [1, 7, 8, 15, 16, 17, 40, 512])  # the 16-wide loop, its tail, and both
@pytest.mark.parametrize("num_queries", [1, 3])
def test_dot_products_and_lengths_match_a_float64_reference(dim, num_queries):
    generator = np.random.default_rng(dim)
    rows = (generator.standard_normal((50, dim)) * 3).astype(np.float16)
    queries = generator.standard_normal((num_queries, dim)).astype(np.float32)
    scores, norms = half_kernels().dot(rows, queries, norms=True)
    exact = rows.astype(np.float64)
    np.testing.assert_allclose(scores, exact @ queries.T.astype(np.float64), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(norms, (exact ** 2).sum(axis=1), rtol=1e-5)
    assert half_kernels().dot(rows, queries)[1] is None
    strided = np.asarray(rows[::2])  # not contiguous: copied, not read with the wrong stride
    np.testing.assert_allclose(half_kernels().dot(strided, queries)[0], scores[::2], rtol=1e-6)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty kernel cache, and a compiler whose every run is counted."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    runs = []
    real_run = subprocess.run
    monkeypatch.setattr(native.subprocess, "run", lambda *args, **kw: runs.append(args) or real_run(*args, **kw))
    half_kernels.cache_clear()
    yield runs
    half_kernels.cache_clear()


@needs_kernels
def test_the_kernels_are_built_once_then_loaded_from_the_cache(cache):
    assert half_kernels() is not None and len(cache) == 1
    half_kernels.cache_clear()  # a new process
    assert half_kernels() is not None and len(cache) == 1
    built = list(native.cache_dir().iterdir())
    assert [path.suffix for path in built] == [".so"]  # nothing half-written left beside it


@pytest.mark.skipif(native.compiler() is None, reason="no C compiler")
def test_a_failed_build_is_remembered_with_the_compiler_output_and_not_tried_again(cache, tmp_path):
    source = tmp_path / "broken.c"
    source.write_text("this is not C\n")
    assert build(source) is None and build(source) is None
    assert len(cache) == 1
    [failed] = native.cache_dir().iterdir()
    assert failed.suffix == ".failed" and "error" in failed.read_text()
    source.write_text("int simclr_answer(void) { return 42; }\n")  # a new source is a new build
    assert build(source) is not None and len(cache) == 2


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
    assert half_kernels() is None and cache == []
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert index_module.float16_kernel() == "numpy"
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
    assert index_module.float16_kernel() == "native"
    _, found = index_module.top_k(np.eye(4, dtype=np.float16), np.eye(4, dtype=np.float32)[1:2], 2)
    assert found.tolist() == [[1, 0]] and calls == []

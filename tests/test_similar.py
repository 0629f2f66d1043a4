"""`simclr similar`: exact top-k against a brute-force reference, near-duplicates, the last index, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from simclr_cli.cli import _shown, app
from simclr_cli.embed import EmbedConfig, embed_folder
from simclr_cli.export import load_encoder, save_encoder
from simclr_cli.files import held, read_metadata
import simclr_cli.index as index_module
from simclr_cli.index import (Manifest, ManifestPaths, NaNRow, choose_index, find_rows, manifest_path, open_index,
                              read_manifest, remember_index, top_k, work_dir, write_manifest)
from simclr_cli.native import search_kernels

runner = CliRunner()
# search.c's kernels, where this machine builds them (an x86-64 CPU with AVX2, FMA and F16C, and a C compiler).
NATIVE_BUILT = pytest.mark.skipif(search_kernels() is None, reason="no native search kernels")
NATIVE = pytest.param("native", marks=NATIVE_BUILT)
EVERY_KERNEL = [(np.float32, "numpy"), pytest.param(np.float32, "native", marks=NATIVE_BUILT),  # (dtype, kernel)
                (np.float16, "numpy"), (np.float16, "torch"), pytest.param(np.float16, "native", marks=NATIVE_BUILT)]
ORIGINALS = ["photo03.png", "photo07.png", "photo11.png"]


def _photo(seed: int, size: int = 64) -> Image.Image:
    """A smooth random RGB picture: stripes of random frequency plus a few coloured discs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    image = np.stack([128 + 100 * np.sin(rng.uniform(2, 14) * x + rng.uniform(2, 14) * y + rng.uniform(0, 6))
                      for _ in range(3)], axis=-1)
    for _ in range(3):
        cx, cy, r = rng.uniform(0, 1, 2).tolist() + [rng.uniform(0.1, 0.3)]
        image[(x - cx) ** 2 + (y - cy) ** 2 < r**2] = rng.uniform(0, 255, 3)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """16 unrelated pictures, and for three of them a smaller copy (24 px, under the encoder's 32) and a
    re-encoded JPEG copy."""
    root = tmp_path_factory.mktemp("photos") / "photos"
    (root / "copies").mkdir(parents=True)
    for seed in range(16):
        _photo(seed).save(root / f"photo{seed:02d}.png")
    for name in ORIGINALS:
        original = Image.open(root / name)
        original.resize((24, 24), Image.Resampling.BICUBIC).save(root / "copies" / f"{Path(name).stem}_small.png")
        original.save(root / "copies" / f"{Path(name).stem}.jpg", quality=80)
    return root


@pytest.fixture(scope="module")
def indexes(tiny_encoder, photos, tmp_path_factory) -> dict[str, Path]:
    """The photos embedded twice, as float32 and as float16, at fp32 (auto is bf16 on CPUs with bf16)."""
    out = tmp_path_factory.mktemp("indexes")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_STATE_HOME", str(out / "state"))
        for dtype in ("float32", "float16"):
            embed_folder(EmbedConfig(model=str(tiny_encoder), images=str(photos), out=str(out / f"{dtype}.npy"),
                                     dtype=dtype, device="cpu", precision="fp32", workers=0))
    return {dtype: out / f"{dtype}.npy" for dtype in ("float32", "float16")}


def similar_json(*args: str | Path) -> dict:
    result = runner.invoke(app, ["similar", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# -- the maths --------------------------------------------------------------------------------

def brute_force(rows: np.ndarray, queries: np.ndarray, k: int, exclude: list[int | None]) -> list[list[int]]:
    """The obviously correct cosine top-k: every score, one full sort per query."""
    rows = rows.astype(np.float64)
    scores = queries.astype(np.float64) @ rows.T / np.linalg.norm(rows, axis=1)  # (Q, N)
    for j, row in enumerate(exclude):
        if row is not None:
            scores[j, row] = -np.inf
    return [list(np.argsort(-line, kind="stable")[:k]) for line in scores]


@pytest.mark.parametrize("count, dim, k, chunk_rows", [(1, 4, 1, 1), (50, 8, 5, 7), (300, 16, 10, 64), (40, 8, 60, 9),
                                                     (200, 1100, 7, 64)])  # long rows: BLAS for one query too
@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("num_queries", [3, 1])  # one query: the rows are shared among threads
@pytest.mark.parametrize("kernel", ["numpy", NATIVE])
def test_top_k_matches_brute_force(count, dim, k, chunk_rows, normalized, num_queries, kernel):
    generator = np.random.default_rng(count + dim)
    rows = generator.standard_normal((count, dim)).astype(np.float32)
    if normalized:
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    queries = generator.standard_normal((num_queries, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exclude = ([None, 0, count - 1] if count > 1 else [None, None, None])[-num_queries:]
    scores, found = top_k(rows, queries, k, normalized, exclude, chunk_rows=chunk_rows, kernel=kernel)
    assert found.tolist() == brute_force(rows, queries, scores.shape[1], exclude)
    assert scores.shape[1] == min(k, count)
    expected = queries @ rows.T / np.linalg.norm(rows, axis=1)  # (Q, N)
    for j, row in enumerate(exclude):
        if row is not None:
            expected[j, row] = -np.inf  # last, when k reaches N
    np.testing.assert_allclose(scores, np.take_along_axis(expected, found, 1), atol=1e-5)


def test_unnormalized_float16_rows_of_large_norm_are_ranked_by_cosine():
    """--no-normalize float16 rows whose squares sum past float16's 65504: their norms are taken in float32."""
    generator = np.random.default_rng(4)
    rows = (np.abs(generator.standard_normal((100, 512))) * 12).astype(np.float16)  # norms about 270
    queries = generator.standard_normal((3, 512)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    scores, found = top_k(rows, queries, 5, normalized=False)
    assert found.tolist() == brute_force(rows, queries, 5, [None] * 3)
    expected = queries @ rows.T.astype(np.float32) / np.linalg.norm(rows.astype(np.float32), axis=1)  # (Q, N)
    np.testing.assert_allclose(scores, np.take_along_axis(expected, found, 1), atol=1e-5)


@pytest.mark.parametrize("dtype, kernel", EVERY_KERNEL)
@pytest.mark.parametrize("num_queries", [1, 3])
@pytest.mark.parametrize("cores", [1, 2, 5])
def test_ties_at_the_kth_score_keep_the_lowest_rows(monkeypatch, dtype, kernel, num_queries, cores):
    """Rows with a few distinct values give exact ties across the k-th score: the top k are the lowest rows
    among them, whatever the chunks and however many threads share the rows."""
    from simclr_cli import index as index_module

    monkeypatch.setattr(index_module, "cpu_cores", lambda: cores)
    generator = np.random.default_rng(3)
    rows = generator.integers(1, 3, (300, 4)).astype(dtype)  # 16 distinct rows, none zero
    queries = generator.integers(1, 3, (num_queries, 4)).astype(np.float32)
    for normalized in (True, False):
        scores = queries.astype(np.float64) @ rows.T.astype(np.float64)  # (Q, N), exact: small integers
        if not normalized:
            scores /= np.linalg.norm(rows.astype(np.float64), axis=1)
        for chunk_rows in (7, 64, 4096):
            for k in (1, 5, 29):
                _, found = top_k(rows, queries, k, normalized, chunk_rows=chunk_rows, kernel=kernel)
                expected = [list(np.argsort(-line, kind="stable")[:k]) for line in scores]
                assert found.tolist() == expected, (normalized, chunk_rows, k)


@pytest.mark.parametrize("dtype, kernel", EVERY_KERNEL)
def test_a_query_excluding_itself_leaves_the_others_alone(dtype, kernel):
    """k beyond the index: the query that excludes its row gets it last at -inf, the other every row."""
    rows = np.eye(3, dtype=dtype)
    scores, found = top_k(rows, np.eye(3, dtype=np.float32)[:2], 10, exclude=[0, None], kernel=kernel)
    assert scores.shape == (2, 3)
    assert found[0, 2] == 0 and scores[0, 2] == -np.inf and sorted(found[0, :2].tolist()) == [1, 2]
    assert found[1, 0] == 1 and sorted(found[1].tolist()) == [0, 1, 2] and np.isfinite(scores[1]).all()


@pytest.mark.parametrize("exclude", [None, 3])
@pytest.mark.parametrize("crowd", [40, 150])  # near-ties within one top-k of candidates, and too many for it
@pytest.mark.parametrize("kernel", ["torch", "numpy", NATIVE])
def test_float16_rows_are_ranked_exactly_despite_near_ties(exclude, crowd, kernel):
    """With PyTorch, one query against float16 rows takes float16 scores only to find candidates; numpy and
    the native kernel score in float32. Either way the ranking must be the float32 one, even among rows
    whose scores differ by less than float16 can resolve."""
    generator = np.random.default_rng(0)
    query = generator.standard_normal(64).astype(np.float32)
    query /= np.linalg.norm(query)
    near = query + 2e-3 * generator.standard_normal((crowd, 64)).astype(np.float32)  # scores within ~1e-4
    rows = np.concatenate([generator.standard_normal((5000, 64)).astype(np.float32), near])
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16)
    generator.shuffle(rows)
    scores, found = top_k(rows, query[None], 12, exclude=[exclude], chunk_rows=1000, kernel=kernel)
    exact = rows.astype(np.float64) @ query.astype(np.float64)  # (N,): the rows as stored, unit or not
    if exclude is not None:
        exact[exclude] = -np.inf
    assert found[0].tolist() == list(np.argsort(-exact, kind="stable")[:12])
    np.testing.assert_allclose(scores[0], exact[found[0]], rtol=1e-6)


@pytest.mark.parametrize("kernel", ["numpy", NATIVE])
def test_float16_rows_are_converted_exactly_whatever_their_value(kernel):
    """numpy's float16 kernel converts rows with integer operations, the native one with F16C: every finite
    float16 value, zeros, subnormals and 65504 included, must score exactly as the row converted by numpy
    would."""
    values = np.arange(2**16, dtype=np.uint16).view(np.float16)
    values = values[np.isfinite(values)]  # 63,488 values of either sign
    for query in (1.0, -1.0, 0.5):
        scores, found = top_k(values[:, None], np.array([[query]], dtype=np.float32), len(values), kernel=kernel)
        assert np.array_equal(scores[0], (values.astype(np.float32) * np.float32(query))[found[0]])
    rows = values[:(len(values) // 64) * 64].reshape(-1, 64)[::-1].copy()  # (992, 64): signs and sizes mixed
    queries = np.random.default_rng(7).standard_normal((3, 64)).astype(np.float32)
    expected = rows.astype(np.float64) @ queries.T.astype(np.float64) / np.linalg.norm(rows.astype(np.float64), axis=1,
                                                                                        keepdims=True)  # (N, Q)
    for num_queries in (1, 3):
        scores, found = top_k(rows, queries[:num_queries], 20, normalized=False, kernel=kernel)
        assert found.tolist() == [list(np.argsort(-line, kind="stable")[:20]) for line in expected.T[:num_queries]]
        np.testing.assert_allclose(scores, np.take_along_axis(expected.T[:num_queries], found, 1), rtol=1e-5)


@pytest.mark.parametrize("num_queries", [1, 2, 9])  # split among threads, and more than SPLIT_QUERIES: BLAS
@pytest.mark.parametrize("normalized", [True, False])
@pytest.mark.parametrize("chunk_rows", [None, 37])
@pytest.mark.parametrize("kernel", ["numpy", NATIVE])
def test_float16_rows_score_as_float32_without_torch(num_queries, normalized, chunk_rows, kernel):
    """numpy's and the native float16 kernels give the scores of the rows converted to float32, so the exact
    ranking."""
    generator = np.random.default_rng(num_queries)
    rows = np.maximum(generator.standard_normal((3000, 96)), 0)  # ReLU features: many exact zeros
    if normalized:
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    rows = rows.astype(np.float16)
    queries = generator.standard_normal((num_queries, 96)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    empty_scores, _ = top_k(rows[:, :0], queries[:, :0], 3, kernel=kernel)  # rows of no values score 0
    assert empty_scores.tolist() == [[0.0] * 3] * num_queries
    exclude = [5] + [None] * (num_queries - 1)
    scores, found = top_k(rows, queries, 15, normalized, exclude, chunk_rows=chunk_rows, kernel=kernel)
    expected = queries.astype(np.float64) @ rows.T.astype(np.float64)  # (Q, N): unit rows are taken as unit
    if not normalized:
        expected /= np.linalg.norm(rows.astype(np.float64), axis=1)
    expected[0, 5] = -np.inf
    assert found.tolist() == [list(np.argsort(-line, kind="stable")[:15]) for line in expected]
    np.testing.assert_allclose(scores, np.take_along_axis(expected, found, 1), rtol=1e-6)


def test_float16_rows_use_torch_only_where_it_is_imported(monkeypatch):
    """Without the native kernels, PyTorch scores float16 rows by default only if something imported it
    already: its import costs more than the search it would speed up."""
    from simclr_cli import index as index_module

    monkeypatch.setattr(index_module, "search_kernels", lambda: None)
    calls = []
    monkeypatch.setattr(index_module, "_top_k_float16", lambda *args: calls.append(args) or ([0.0], [0]))
    rows = np.eye(4, dtype=np.float16)
    top_k(rows, np.eye(4, dtype=np.float32)[:1], 2)
    assert len(calls) == 1  # this test module imports torch
    monkeypatch.delitem(sys.modules, "torch")
    _, found = top_k(rows, np.eye(4, dtype=np.float32)[:1], 2)
    assert len(calls) == 1 and found[0].tolist() == [0, 1]


def test_float16_index_gives_the_same_top_k(indexes):
    rows32, manifest = open_index(indexes["float32"])
    rows16, _ = open_index(indexes["float16"])
    queries = np.array(rows32)  # every image as a query
    k, resolution = 5, 2e-3  # float16 rows carry about three decimal digits
    scores32, found32 = top_k(rows32, queries, k + 1)
    _, found16 = top_k(rows16, queries, k)
    exact = queries @ queries.T  # (N, N) float32 cosine scores
    np.testing.assert_allclose(np.take_along_axis(exact, found16, 1), scores32[:, :k], atol=resolution)
    # Rank by rank the same rows, except where two scores are closer than float16 can tell apart.
    gaps = scores32[:, :-1] - scores32[:, 1:]  # (N, k): rank r minus rank r + 1
    clear = (gaps > resolution) & np.concatenate([np.ones((len(gaps), 1), dtype=bool), gaps[:, :-1] > resolution], 1)
    assert np.array_equal(found16[clear], found32[:, :k][clear]) and clear.sum() > len(clear)
    originals = [manifest.paths.index(path) for path in manifest.paths if Path(path).name in ORIGINALS]
    assert found16[originals, :3].tolist() == found32[originals, :3].tolist()  # itself, then its two copies


# -- through the command line ---------------------------------------------------------------------

def test_query_finds_itself_then_its_near_duplicates(indexes, photos):
    for name in ORIGINALS:
        hits = similar_json(photos / name, "--index", indexes["float32"], "-k", "5")["results"][0]["hits"]
        assert Path(hits[0]["path"]) == (photos / name).absolute() and hits[0]["score"] > 0.999
        copies = {Path(hit["path"]).name for hit in hits[1:3]}
        assert copies == {f"{Path(name).stem}_small.png", f"{Path(name).stem}.jpg"}, hits
        assert hits[2]["score"] > hits[3]["score"]
        without_self = similar_json(photos / name, "--index", indexes["float32"], "-k", "2", "--exclude-self")
        assert [hit["path"] for hit in without_self["results"][0]["hits"]] == [hit["path"] for hit in hits[1:3]]


def test_weights_numpy_cannot_read_are_embedded_by_torch_and_the_head_is_never_read(tiny_encoder, photos, tmp_path):
    """Weights PyTorch loads but numpy lacks a dtype for (float8), and a head numpy would refuse (NaN, float8):
    `similar` on the CPU used to stop with a traceback, or refuse a file that `embed` had taken."""
    model = tmp_path / "model.safetensors"
    backbone, info = load_encoder(tiny_encoder / "encoder.safetensors")
    save_encoder(model, backbone, info)
    tensors, metadata = load_file(str(model)), read_metadata(model, "encoder")
    tensors["layer4.1.bn2.bias"] = tensors["layer4.1.bn2.bias"].to(torch.float8_e4m3fn)
    tensors["head.layers.0.weight"] = torch.full((4, 512), float("nan"))
    tensors["head.layers.1.weight"] = torch.ones(4, 4).to(torch.float8_e5m2)
    save_file(tensors, str(model), metadata=metadata)
    index = tmp_path / "index.npy"
    embed_folder(EmbedConfig(model=str(model), images=str(photos), out=str(index), device="cpu", precision="fp32",
                             workers=0))
    hits = similar_json(photos / ORIGINALS[0], "--index", index, "-k", "1")["results"][0]["hits"]
    assert Path(hits[0]["path"]) == (photos / ORIGINALS[0]).absolute() and hits[0]["score"] > 0.9999


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_queries_are_embedded_at_the_index_precision(tiny_encoder, photos, tmp_path, precision):
    """An image in the index must find its own row at score 1, whatever precision built the index."""
    out = tmp_path / "index.npy"
    embed_folder(EmbedConfig(model=str(tiny_encoder), images=str(photos), out=str(out), precision=precision,
                             device="cpu", workers=0))
    assert json.loads(out.with_suffix(".json").read_text())["precision"] == precision
    hits = similar_json(photos / ORIGINALS[0], "--index", out, "-k", "1")["results"][0]["hits"]
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-6)


def test_folder_of_queries_gives_one_block_each_and_a_grid(indexes, photos, tmp_path):
    queries = tmp_path / "queries"
    queries.mkdir()
    for name in ORIGINALS[:2]:
        shutil.copy(photos / name, queries / name)
    (queries / "broken.png").write_text("not a picture")
    grid = tmp_path / "results.png"
    result = runner.invoke(app, ["similar", str(queries), str(photos / ORIGINALS[2]), "--index",
                                 str(indexes["float16"]), "-k", "3", "--grid", str(grid)])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert output.count("nearest to") == 3 and "skipped query" in output and "broken.png" in output
    with Image.open(grid) as sheet:
        assert sheet.size == (4 + 4 * 132, 4 + 3 * 150)  # 1 + k cells a line, one line per query
        sheet = np.asarray(sheet.convert("RGB"))
    assert sheet[4:132, 4:132].std() > 10  # the query's thumbnail is drawn


def test_uses_the_last_index_unless_told_otherwise(tiny_encoder, photos, indexes, tmp_path, monkeypatch):
    last = tmp_path / "last.npy"
    result = runner.invoke(app, ["embed", str(tiny_encoder), str(photos), str(last), "--device", "cpu",
                                 "--workers", "0"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["similar", str(photos / ORIGINALS[0]), "-k", "1"])
    assert result.exit_code == 0, result.output
    assert str(last) in result.stderr and "the last `simclr embed`" in result.stderr
    monkeypatch.setenv("SIMCLR_INDEX", str(indexes["float16"]))
    result = runner.invoke(app, ["similar", str(photos / ORIGINALS[0]), "-k", "1"])
    assert result.exit_code == 0, result.output
    assert str(indexes["float16"]) in result.stderr and "$SIMCLR_INDEX" in result.stderr


def test_an_index_from_the_environment_or_the_state_is_named_so_in_errors(photos, tmp_path, monkeypatch):
    """They blamed --index, which was not given; a remembered index of "" was searched as the folder "."."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    query = str(photos / ORIGINALS[0])
    monkeypatch.setenv("SIMCLR_INDEX", str(tmp_path / "index.json"))
    result = runner.invoke(app, ["similar", query])
    assert result.exit_code == 1 and f"{tmp_path / 'index.json'} (from $SIMCLR_INDEX): not a .npy" in result.output
    monkeypatch.setenv("SIMCLR_INDEX", str(tmp_path / "gone.npy"))
    result = runner.invoke(app, ["similar", query])
    assert result.exit_code == 1 and "gone.npy (from $SIMCLR_INDEX): no such index" in result.output, result.output
    monkeypatch.delenv("SIMCLR_INDEX")
    remember_index(tmp_path / "index.txt")
    result = runner.invoke(app, ["similar", query])
    assert result.exit_code == 1 and "(from the last `simclr embed`): not a .npy" in result.output, result.output
    (tmp_path / "state" / "simclr" / "last_index.json").write_text('{"index": ""}')
    result = runner.invoke(app, ["similar", query])
    assert result.exit_code == 1 and "no index to search: run `simclr embed" in result.output, result.output
    np.save(tmp_path / "rows.npy", np.zeros((1, 4), dtype=np.float32))  # the manifest never written
    result = runner.invoke(app, ["similar", query, "--index", str(tmp_path / "rows.npy")])
    assert result.exit_code == 1 and "no such index manifest; if `simclr embed` was stopped as it finished, run the " \
        "same command with --resume" in " ".join(result.output.split()), result.output


def test_an_index_that_cannot_be_remembered_is_a_warning_naming_the_state_folder(tiny_encoder, photos, tmp_path,
                                                                                  monkeypatch):
    """A state home that cannot be written (a file, a read-only home) was passed over in silence: the embed
    succeeded, and `similar` without --index then said there was no index."""
    (tmp_path / "state").write_text("a file")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    result = runner.invoke(app, ["embed", str(tiny_encoder), str(photos), str(tmp_path / "out.npy"), "--device", "cpu",
                                 "--workers", "0"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"could not remember {tmp_path / 'out.npy'} as the last index in {tmp_path / 'state' / 'simclr'}" in text
    assert "pass --index" in text


@pytest.mark.parametrize("value", ["relative/state", ""])
def test_the_last_index_lives_in_an_absolute_state_home(monkeypatch, tmp_path, value):
    """A relative (or empty) $XDG_STATE_HOME is ignored, as XDG says: the last index must not depend on the
    directory a command runs in."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_STATE_HOME", value)
    monkeypatch.chdir(tmp_path)
    remember_index(tmp_path / "out.npy")
    assert (tmp_path / "home" / ".local" / "state" / "simclr" / "last_index.json").is_file()
    monkeypatch.chdir(tmp_path / "home")
    assert choose_index(None) == (tmp_path / "out.npy", "the last `simclr embed`")


def test_a_changed_model_is_an_error(tiny_encoder, photos, tmp_path):
    model = tmp_path / "model.safetensors"
    shutil.copy(tiny_encoder / "encoder.safetensors", model)
    index = tmp_path / "index.npy"
    embed_folder(EmbedConfig(model=str(model), images=str(photos), out=str(index), device="cpu", workers=0))
    backbone, info = load_encoder(model)
    with torch.no_grad():
        backbone.conv1.weight.mul_(2)
    save_encoder(model, backbone, info)
    result = runner.invoke(app, ["similar", str(photos / ORIGINALS[0]), "--index", str(index)])
    assert result.exit_code == 1
    assert "changed since" in result.output and "SHA-256 differs" in result.output
    model.unlink()
    result = runner.invoke(app, ["similar", str(photos / ORIGINALS[0]), "--index", str(index)])
    assert result.exit_code == 1 and "is gone" in result.output


def test_user_errors_exit_1_with_a_message(indexes, photos, tmp_path):
    query = str(photos / ORIGINALS[0])
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    mismatched = tmp_path / "mismatched.npy"
    np.save(mismatched, np.zeros((3, 512), dtype=np.float32))
    shutil.copy(indexes["float32"].with_suffix(".json"), mismatched.with_suffix(".json"))
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    shutil.copy(indexes["float32"].with_suffix(".json"), empty.with_suffix(".json"))
    orphan = tmp_path / "orphan.npy"
    np.save(orphan, np.zeros((3, 512), dtype=np.float32))
    index = str(indexes["float32"])
    (tmp_path / "folder.npy").mkdir()
    (tmp_path / "stopped.npy.partial").mkdir()  # an embed interrupted before it wrote stopped.npy
    os.mkfifo(tmp_path / "pipe.png")
    cases = [
        ([query], "no index to search"),
        ([query, "--index", str(tmp_path / "folder.npy")], "folder.npy: a folder, not an index; pass the OUT.npy"),
        ([query, "--index", str(tmp_path / "stopped.npy")], "stopped.npy: not written yet, its embed was interrupted"),
        ([str(tmp_path / "pipe.png"), "--index", index], "pipe.png: not a regular file; pass an image file"),
        ([query, "--index", str(tmp_path / "missing.npy")], "no such index"),
        ([query, "--index", str(tmp_path / "index.txt")], "not a .npy file"),
        ([query, "--index", str(mismatched)], "do not belong together"),
        ([query, "--index", str(orphan)], "no such index manifest"),
        ([query, "--index", str(empty)], "empty.npy: not a readable .npy file"),
        ([str(tmp_path / "nothing.png"), "--index", index], "no such file or folder"),
        ([str(not_an_image), "--index", index], "notes.png: unreadable"),
        ([query, "--index", index, "-k", "0"], "-k 0 must be at least 1"),
        ([query, "--index", index, "--grid", str(tmp_path / "grid.txt")], ".txt is not an image type"),
        ([query, "--index", index, "--grid", str(tmp_path / "grid.psd")], ".psd is not an image type"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["similar", *args])
        assert result.exit_code == 1, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)
        assert "Traceback" not in result.output


def test_an_index_still_being_written_says_to_wait_not_to_resume(tiny_encoder, photos, tmp_path):
    """While `simclr embed` wrote the index, `similar` said its embed was interrupted and to finish it with
    `--resume`, which the running embed refused. The embed holds its work folder while it runs: that says wait."""
    out = tmp_path / "big.npy"
    config = EmbedConfig(model=str(tiny_encoder), images=str(photos), out=str(out), batch_size=4, device="cpu",
                         workers=0)
    assert embed_folder(config, stop_after_batches=1).interrupted  # as a running embed is after its first batch
    query = ["similar", str(photos / ORIGINALS[0]), "--index", str(out)]
    with held(work_dir(out), "OUT"):  # as the running embed holds it
        result = runner.invoke(app, query)
    assert result.exit_code == 1, result.output
    assert " ".join(result.output.split()) == (f"error: {out}: still being written by a running `simclr embed` (4 of "
                                               f"22 images embedded so far); wait for it to finish, then search")
    result = runner.invoke(app, query)  # the embed stopped: it can be resumed
    assert result.exit_code == 1 and "not written yet, its embed was interrupted" in result.output, result.output


@pytest.mark.parametrize("field, value, message", [
    ("precision", "xx", "precision 'xx'"),
    ("dtype", "int8", "dtype 'int8'"),
    ("paths", "photo.png", "paths is not a list"),
    ("model", 3, "model and model_sha256 must be strings"),
    ("normalized", "yes", "normalized 'yes'"),
    ("dim", "512", "dim '512'"),
])
@pytest.mark.parametrize("indent", [2, None])  # as `simclr embed` writes it (its paths read lazily), or not
def test_a_damaged_manifest_is_a_one_line_error(indexes, photos, tmp_path, field, value, message, indent):
    index = tmp_path / "index.npy"
    shutil.copy(indexes["float32"], index)
    manifest = json.loads(indexes["float32"].with_suffix(".json").read_text())
    index.with_suffix(".json").write_text(json.dumps({**manifest, field: value}, indent=indent) + "\n")
    result = runner.invoke(app, ["similar", str(photos / ORIGINALS[0]), "--index", str(index)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"index manifest is damaged ({message})" in " ".join(result.output.split())


@pytest.mark.parametrize("bad", [0, None])
def test_a_manifest_with_a_path_that_is_not_a_string_is_a_one_line_error(indexes, photos, tmp_path, bad):
    """Re-saved in another layout (parsed whole), with a number or a null for a path: a traceback in the table
    or in --exclude-self's lookup, before."""
    index = tmp_path / "index.npy"
    shutil.copy(indexes["float32"], index)
    manifest = json.loads(indexes["float32"].with_suffix(".json").read_text())
    manifest["paths"][-1] = bad
    index.with_suffix(".json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["similar", str(photos / ORIGINALS[0]), "--index", str(index), "--exclude-self"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "index manifest is damaged (a path that is not a string)" in " ".join(result.output.split())


# Paths a file system allows, each awkward in JSON: quotes, commas, backslashes, brackets, non-ASCII, an
# undecodable byte (a surrogate escape), a newline, and text that looks like the manifest's own layout.
AWKWARD_PATHS = ['/p/a "quoted", name.png', "/p/back\\slash,", "/p/[x]/ünï cødé.png", "/p/bad\udcff.png",
                 "/p/new\nline.png", '/p/x\n  "paths": [\n.png', "/p/,", "/p/plain.png"]


def _manifest(paths: list[str], skipped: list[dict[str, str]] | None = None) -> Manifest:
    return Manifest(paths=paths, model="/m/encoder.safetensors", model_sha256="0" * 64, preprocessing={"resize": 36},
                    dim=8, dtype="float32", normalized=True, precision="fp32", skipped=skipped or [])


@pytest.mark.parametrize("block", [2, 7, 64, 1 << 20])  # lines across blocks, blocks that start lines
def test_manifest_paths_are_read_by_line_as_json_reads_them(tmp_path, monkeypatch, block):
    """write_manifest's layout is read lazily: each row's path, found by its line, is the one json.loads
    gives, wherever the lines fall across the blocks they are counted in."""
    monkeypatch.setattr(index_module, "LINE_BLOCK", block)
    paths = [f"{AWKWARD_PATHS[i % len(AWKWARD_PATHS)]}{i}" for i in range(200)]
    written = _manifest(paths, skipped=[{"path": '/p/x\n  "paths": [\n', "reason": "unreadable"}])
    write_manifest(tmp_path / "index.npy", written)
    manifest = read_manifest(manifest_path(tmp_path / "index.npy"))
    assert isinstance(manifest.paths, ManifestPaths), "write_manifest's layout is read without parsing the paths"
    expected = json.loads(manifest_path(tmp_path / "index.npy").read_bytes())
    assert len(manifest.paths) == expected["rows"] == 200
    assert [manifest.paths[row] for row in np.random.default_rng(0).permutation(200)] == [
        expected["paths"][row] for row in np.random.default_rng(0).permutation(200)]
    assert manifest.paths[-1] == paths[-1] and manifest.paths[3:6] == paths[3:6]
    with pytest.raises(IndexError):
        manifest.paths[200]
    assert {**asdict(manifest), "paths": None} == {**asdict(written), "paths": None}
    assert list(manifest.paths) == paths and manifest.paths.index(paths[77]) == 77


@pytest.mark.parametrize("block", [2, 7, 64, 1 << 20])  # lines across blocks, blocks that start lines
def test_manifest_paths_find_each_row_by_its_text(tmp_path, monkeypatch, block):
    """--exclude-self looks a few queries up in the manifest's text: each path is found at its row, and a
    path that begins another (or is not there) is not mistaken for it."""
    monkeypatch.setattr(index_module, "LINE_BLOCK", block)
    paths = [f"{AWKWARD_PATHS[i % len(AWKWARD_PATHS)]}{i}" for i in range(200)]
    write_manifest(tmp_path / "index.npy", _manifest(paths))
    manifest = read_manifest(manifest_path(tmp_path / "index.npy"))
    assert [manifest.paths.find(path) for path in paths] == list(range(200))
    assert manifest.paths.find(paths[10][:-1]) is None  # "...1" begins "...10"
    assert manifest.paths.find("/p/elsewhere.png") is None
    wanted = [paths[150], "/p/elsewhere.png", paths[0]]
    assert find_rows(manifest.paths, wanted) == find_rows(paths, wanted) == [150, None, 0]


@pytest.mark.parametrize("folder, dots", [("/home/u/.local/share/photos", False), ("/data/./photos", True),
                                          ("/data/x/../photos", True)])
def test_only_paths_spelt_with_dots_are_looked_up_by_parsing_every_row(tmp_path, folder, dots):
    """A hidden folder above the images ("/." in every path) sent each lookup of a path not in the index (every
    --grid) through a dictionary of all the rows: 3.9 s and 100 MB more at 2M rows."""
    write_manifest(tmp_path / "index.npy", _manifest([f"{folder}/{i}.png" for i in range(3)]))
    assert read_manifest(manifest_path(tmp_path / "index.npy")).paths.may_hold_dots() == dots


def test_a_manifest_in_another_layout_is_parsed_whole(tmp_path):
    paths = AWKWARD_PATHS
    manifest_file = manifest_path(tmp_path / "index.npy")
    layouts = {
        "compact": json.dumps(_manifest(paths).to_json()),
        "rows left out": json.dumps({k: v for k, v in _manifest(paths).to_json().items() if k != "rows"}, indent=2),
        "paths not last": json.dumps({"paths": paths, **_manifest(paths).to_json()}, indent=2),
        "no newline at the end": json.dumps(_manifest(paths).to_json(), indent=2),
    }
    for layout, text in layouts.items():
        manifest_file.write_text(text + ("" if layout == "no newline at the end" else "\n"))
        manifest = read_manifest(manifest_file)
        assert isinstance(manifest.paths, list) and manifest.paths == paths, layout


def test_a_path_line_that_is_not_a_path_is_a_one_line_error(indexes, photos, tmp_path):
    """A hand-edited manifest whose rows still count right but one line holds no path: the search finds
    the row among its hits and says the manifest is damaged, instead of failing in JSON."""
    index = tmp_path / "index.npy"
    shutil.copy(indexes["float32"], index)
    manifest_file = index.with_suffix(".json")
    text = indexes["float32"].with_suffix(".json").read_text()
    manifest_file.write_text(text.replace(f'"{photos / ORIGINALS[0]}",', "42,"))
    assert manifest_file.read_text() != text
    result = runner.invoke(app, ["similar", str(photos / ORIGINALS[0]), "--index", str(index)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "index manifest is damaged (the path of row" in " ".join(result.output.split())
    # A manifest whose rows no longer count right is parsed whole, and disagrees with the array.
    manifest_file.write_text(text.replace(f'\n    "{photos / ORIGINALS[0]}",', ""))
    assert len(manifest_file.read_text().splitlines()) == len(text.splitlines()) - 1
    result = runner.invoke(app, ["similar", str(photos / ORIGINALS[0]), "--index", str(index)])
    assert result.exit_code == 1 and "do not belong together" in " ".join(result.output.split()), result.output


# Run as the `simclr` script runs: an atexit handler that prints without flushing, and an object whose
# __del__ only runs in the interpreter's teardown.
QUICK_EXIT_SCRIPT = """
import atexit, sys
from simclr_cli.cli import main

class Teardown:
    def __del__(self):
        print("teardown ran", file=sys.stderr, flush=True)

keep = Teardown()
atexit.register(lambda: sys.stderr.write(f"atexit ran, torch imported: {'torch' in sys.modules}\\n"))
sys.argv = ["simclr", *sys.argv[1:]]
main()
"""


def test_similar_exits_without_the_interpreter_teardown(indexes, photos):
    """`simclr similar` skips Python's teardown (about 1 s once PyTorch is imported), yet keeps its exit
    code, its output and the atexit handlers; other commands exit as usual."""
    def run(*args: str | Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", QUICK_EXIT_SCRIPT, *map(str, args)], capture_output=True,
                              text=True, timeout=300)

    for dtype in ("float32", "float16"):
        found = run("similar", photos / ORIGINALS[0], "--index", indexes[dtype], "-k", "2", "--json")
        assert found.returncode == 0, found.stderr
        assert Path(json.loads(found.stdout)["results"][0]["hits"][0]["path"]) == (photos / ORIGINALS[0]).absolute()
        assert "atexit ran" in found.stderr and "teardown ran" not in found.stderr
        # An fp32 index: numpy_encoder embeds the query, and numpy searches float32 or float16 rows.
        assert "torch imported: False" in found.stderr, dtype
    failed = run("similar", photos / "missing.png", "--index", indexes["float32"])
    assert failed.returncode == 1 and "missing.png: no such file or folder" in failed.stderr
    assert "atexit ran" in failed.stderr and "teardown ran" not in failed.stderr
    version = run("--version")
    assert version.returncode == 0 and "simclr" in version.stdout
    assert "atexit ran" in version.stderr and "teardown ran" in version.stderr


def test_queries_embedded_by_numpy_or_by_torch_find_the_same_hits(indexes, photos):
    """--device cpu on an fp32 index embeds the queries with numpy_encoder, --device auto with PyTorch: the
    same hits in the same order, the same scores to float32 rounding, for a folder of more than one batch."""
    by_numpy = similar_json(photos, "--index", indexes["float32"], "-k", "6")["results"]
    by_torch = similar_json(photos, "--index", indexes["float32"], "-k", "6", "--device", "auto")["results"]
    assert len(by_numpy) == len(by_torch) > 16
    for numpy_result, torch_result in zip(by_numpy, by_torch):
        assert numpy_result["query"] == torch_result["query"]
        assert [hit["path"] for hit in numpy_result["hits"]] == [hit["path"] for hit in torch_result["hits"]]
        np.testing.assert_allclose([hit["score"] for hit in numpy_result["hits"]],
                                   [hit["score"] for hit in torch_result["hits"]], atol=1e-5)


@pytest.mark.parametrize("indent", [2, None])  # the manifest searched as text, or parsed
def test_a_query_excluding_itself_is_found_whatever_the_spelling_of_its_path(tiny_encoder, photos, tmp_path, indent):
    """IMAGES given as "photos/copies/.." still names the query's row, and so does an index written before
    paths were normalised, which stored them with the "..": --exclude-self leaves the query out."""
    index = tmp_path / "dotdot.npy"
    embed_folder(EmbedConfig(model=str(tiny_encoder), images=str(photos / "copies" / ".."), out=str(index),
                             device="cpu", workers=0))
    manifest = json.loads(index.with_suffix(".json").read_text())
    assert str((photos / ORIGINALS[0]).absolute()) in manifest["paths"]
    query = photos / ORIGINALS[0]
    first = similar_json(query, "--index", index, "-k", "1", "--exclude-self")["results"][0]["hits"][0]
    assert Path(first["path"]).name != ORIGINALS[0] and first["score"] < 0.999
    manifest["paths"] = [path.replace(str(photos), str(photos / "copies" / "..")) for path in manifest["paths"]]
    index.with_suffix(".json").write_text(json.dumps(manifest, indent=indent) + "\n")
    again = similar_json(query, "--index", index, "-k", "1", "--exclude-self")["results"][0]["hits"][0]
    assert (again["row"], again["score"]) == (first["row"], first["score"])


def test_a_query_excluding_itself_through_a_symbolic_link_is_left_out(tiny_encoder, photos, indexes, tmp_path):
    """The query spelt through a link to the indexed folder, and an index built through such a link queried
    by the real path: the query's own file is not a hit, and the next hits are those of the plain query."""
    link = tmp_path / "linked"
    link.symlink_to(photos, target_is_directory=True)
    plain = similar_json(photos / ORIGINALS[0], "--index", indexes["float32"], "-k", "3", "--exclude-self")
    expected = [Path(hit["path"]).name for hit in plain["results"][0]["hits"]]
    assert ORIGINALS[0] not in expected and len(expected) == 3
    linked_index = tmp_path / "linked.npy"
    embed_folder(EmbedConfig(model=str(tiny_encoder), images=str(link), out=str(linked_index), device="cpu",
                             precision="fp32", workers=0))
    for query, index in [(link / ORIGINALS[0], indexes["float32"]), (photos / ORIGINALS[0], linked_index)]:
        hits = similar_json(query, "--index", index, "-k", "3", "--exclude-self")["results"][0]["hits"]
        assert [Path(hit["path"]).name for hit in hits] == expected, (query, index)
        assert [hit["rank"] for hit in hits] == [1, 2, 3]
        kept = similar_json(query, "--index", index, "-k", "3")["results"][0]["hits"]
        assert Path(kept[0]["path"]).name == ORIGINALS[0] and len(kept) == 3


@pytest.mark.parametrize("hard", [False, True], ids=["symbolic-link", "hard-link"])
def test_a_file_the_index_holds_twice_through_a_link_is_one_hit_or_none(tiny_encoder, photos, tmp_path, hard):
    """An index of a file and a link to it, the query spelt as either or through a link from outside:
    --exclude-self leaves both rows out and still gives k hits where the index has them; without it the file is
    one hit, spelt as the query where the index spells it so, then the same hits."""
    folder, own = tmp_path / "twice", {ORIGINALS[0], "zlink.png"}
    folder.mkdir()
    for name in [ORIGINALS[0], "photo00.png", "photo01.png", "photo02.png", "photo04.png", "photo05.png"]:
        shutil.copy(photos / name, folder / name)
    if hard:  # one file under two names
        os.link(folder / ORIGINALS[0], folder / "zlink.png")
    else:
        (folder / "zlink.png").symlink_to(ORIGINALS[0])  # after the file, by name: the search must look past it
    (tmp_path / "outside.png").symlink_to(folder / ORIGINALS[0])
    index = tmp_path / "twice.npy"
    embed_folder(EmbedConfig(model=str(tiny_encoder), images=str(folder), out=str(index), device="cpu",
                             precision="fp32", workers=0))
    assert len(json.loads(index.with_suffix(".json").read_text())["paths"]) == 7
    for query in (folder / ORIGINALS[0], folder / "zlink.png", tmp_path / "outside.png"):
        hits = similar_json(query, "--index", index, "-k", "3", "--exclude-self")["results"][0]["hits"]
        names = [Path(hit["path"]).name for hit in hits]
        assert len(names) == 3 and not own & set(names), (query, names)
        assert [hit["rank"] for hit in hits] == [1, 2, 3]
        every = similar_json(query, "--index", index, "-k", "10", "--exclude-self")["results"][0]["hits"]
        assert len(every) == 5 and not own & {Path(hit["path"]).name for hit in every}, query
        kept = similar_json(query, "--index", index, "-k", "3")["results"][0]["hits"]
        assert Path(kept[0]["path"]).name in ({query.name} if query.parent == folder else own), query
        assert [Path(hit["path"]).name for hit in kept[1:]] == names[:2] and kept[0]["score"] > 0.999, query
        assert [hit["rank"] for hit in kept] == [1, 2, 3]


def test_an_index_of_one_row_and_exclude_self(tiny_encoder, photos, tmp_path):
    """The query in the index gets no hit; a query not in it gets the one row."""
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(photos / ORIGINALS[0], one / "only.png")
    embed_folder(EmbedConfig(model=str(tiny_encoder), images=str(one), out=str(tmp_path / "one.npy"), device="cpu",
                             workers=0))
    results = similar_json(one / "only.png", photos / ORIGINALS[1], "--index", tmp_path / "one.npy",
                           "--exclude-self")["results"]
    assert [len(result["hits"]) for result in results] == [0, 1]
    assert Path(results[1]["hits"][0]["path"]).name == "only.png"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_no_readable_query_is_a_one_line_error(indexes, tmp_path, dtype, cut_image):
    """A folder whose only image opens but does not decode (a JPEG cut in half)."""
    queries = tmp_path / "queries"
    queries.mkdir()
    cut_image(queries / "cut.jpg", 5, (128, 128))
    result = runner.invoke(app, ["similar", str(queries), "--index", str(indexes[dtype])])
    assert result.exit_code == 1, result.output
    assert "cut.jpg: unreadable" in " ".join(result.output.split()) and "Traceback" not in result.output
    (queries / "b.png").write_bytes(b"\x00garbage")  # a folder of files whose headers do not read
    (queries / "cut.jpg").unlink()
    result = runner.invoke(app, ["similar", str(queries), "--index", str(indexes[dtype])])
    assert result.exit_code == 1, result.output
    assert (f"QUERY {queries}: 1 unreadable file(s), no readable image, the first {queries}/b.png: unreadable: "
            f"UnidentifiedImageError: cannot identify image file; replace or remove the damaged files") in \
        " ".join(result.output.split()), result.output


def test_a_run_folder_as_query_is_refused_not_searched_with_its_plot(indexes, tiny_encoder):
    result = runner.invoke(app, ["similar", str(tiny_encoder), "--index", str(indexes["float32"])])
    assert result.exit_code == 1, result.output
    assert (f"QUERY {tiny_encoder}: a simclr run folder, not a folder of images; pass image files or folders of "
            f"images to look up (the index is --index)") in " ".join(result.output.split())
    assert "curves.png" not in result.output and "Traceback" not in result.output


def test_paths_with_square_brackets_print_as_they_are(indexes, photos, tmp_path):
    """Rich would read "[edited]" or "[/x]" as markup: dropped from the output, or a traceback."""
    edited = tmp_path / "photo [edited].png"
    shutil.copy(photos / ORIGINALS[0], edited)
    odd = tmp_path / "odd[/x]" / "a.png"
    odd.parent.mkdir(parents=True)  # "odd[" then "x]"
    shutil.copy(photos / ORIGINALS[0], odd)
    result = runner.invoke(app, ["similar", str(edited), str(odd), "--index", str(indexes["float32"]), "-k", "1"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "nearest to " + str(edited) in output and "nearest to " + str(odd) in output
    result = runner.invoke(app, ["similar", str(tmp_path / "nothing[/x].png"), "--index", str(indexes["float32"])])
    assert result.exit_code == 1 and str(tmp_path / "nothing[/x].png") + ": no such file" in result.output


@pytest.mark.parametrize("where", ["file/grid.png", "/proc/grid.png", "folder.png"])  # through a file; no real
def test_a_grid_that_cannot_be_written_is_a_one_line_error(indexes, photos, tmp_path, where):  # folder; a folder
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "folder.png").mkdir()
    result = runner.invoke(app, ["similar", str(photos / ORIGINALS[0]), "--index", str(indexes["float32"]),
                                 "--grid", str(tmp_path / where), "--json"])
    assert result.exit_code == 1 and "cannot write it" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output  # before the search, not after it


@pytest.mark.parametrize("image", ["query", "indexed", "indexed, through a link", "indexed through a link"])
def test_a_grid_over_an_image_searched_is_refused(indexes, photos, tmp_path, tiny_encoder, image):
    """`--grid` naming the query (or another image of the index, however either path is spelt) replaced the
    photo with the contact sheet."""
    target = photos / (ORIGINALS[0] if image == "query" else ORIGINALS[1])
    before = target.read_bytes()
    (tmp_path / "link").symlink_to(photos)
    grid = tmp_path / "link" / target.name if image == "indexed, through a link" else target
    index = indexes["float32"]
    if image == "indexed through a link":  # the manifest spells the images through the link, the grid does not
        index = tmp_path / "linked.npy"
        embed_folder(EmbedConfig(model=str(tiny_encoder), images=str(tmp_path / "link"), out=str(index),
                                 device="cpu", precision="fp32", workers=0))
    result = runner.invoke(app, ["similar", str(photos / ORIGINALS[0]), "--index", str(index), "--grid", str(grid)])
    assert result.exit_code == 1 and "is one of the images searched" in result.output, result.output
    assert target.read_bytes() == before


def test_a_grid_too_large_for_its_format_is_refused_before_the_results(indexes, photos, tmp_path, monkeypatch):
    """WebP holds 16,383 pixels a side, so a folder of ~110 queries did not fit, and Pillow's ValueError
    came out as a traceback. Checked once the number of queries and hits is known, before any output."""
    monkeypatch.setitem(index_module.GRID_MAX_SIDE, "WEBP", 900)  # the 6 queries' lines take 904 pixels
    grid = tmp_path / "grid.webp"
    result = runner.invoke(app, ["similar", str(photos / "copies"), "--index", str(indexes["float32"]), "-k", "2",
                                 "--grid", str(grid)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "more than WEBP holds (900 a side); write a .png" in " ".join(result.output.split())
    assert "nearest to" not in result.output and not grid.exists()
    result = runner.invoke(app, ["similar", str(photos / "copies"), "--index", str(indexes["float32"]), "-k", "2",
                                 "--grid", str(tmp_path / "grid.png")])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "grid.png").size == index_module.sheet_size(6, 2) == (400, 904)


def test_a_manifest_that_cannot_be_read_is_a_one_line_error(indexes, photos, tmp_path):
    index = tmp_path / "index.npy"
    shutil.copy(indexes["float32"], index)
    index.with_suffix(".json").mkdir()
    result = runner.invoke(app, ["similar", str(photos / ORIGINALS[0]), "--index", str(index)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "index.json: cannot read the index manifest" in " ".join(result.output.split())


def test_paths_that_are_not_utf8_print_escaped():
    """A file name whose bytes are not UTF-8 reaches Python with surrogates, which a strict UTF-8 stdout
    refuses: the table shows the byte as \\xe9."""
    shown = _shown("/photos/caf\udce9.png")
    assert shown.encode("utf-8") == b"/photos/caf\\xe9.png"
    assert _shown("/photos/caf\u00e9.png") == "/photos/caf\u00e9.png"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("nan_rows, first, k", [(slice(None), 0, "10"), (slice(0, 1), 0, "100"),  # k reaching N
                                                (slice(-2, None), -2, "1")])  # far from the top
def test_an_index_with_nan_rows_is_a_one_line_error(indexes, photos, tmp_path, dtype, nan_rows, first, k):
    """NaN rows (a damaged file) were dropped from the table without a word: an empty table, exit 0. Rows
    outside the top k were not noticed at all."""
    index = tmp_path / "nan.npy"
    rows = np.load(indexes[dtype])
    rows[nan_rows] = np.nan
    np.save(index, rows)
    shutil.copy(indexes[dtype].with_suffix(".json"), index.with_suffix(".json"))
    paths = json.loads(index.with_suffix(".json").read_text())["paths"]
    query = photos / Path(paths[0]).relative_to(photos)
    result = runner.invoke(app, ["similar", str(query), "--index", str(index), "-k", k])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    row = first % len(rows)
    assert f"{index}: row {row} ({paths[row]}) scores NaN" in " ".join(result.output.split())


def test_nan_rows_scored_as_numbers_by_numpys_float16_kernel_are_a_one_line_error(indexes, photos, tmp_path,
                                                                                  monkeypatch):
    """numpy's float16 kernel (no C compiler, or PyTorch imported and three queries) turns a NaN row into large
    values: with a query of nonnegative features it came first, at a score of about 10^5."""
    index = tmp_path / "nan.npy"
    rows = np.load(indexes["float16"])
    rows[5] = np.nan
    np.save(index, rows)
    shutil.copy(indexes["float16"].with_suffix(".json"), index.with_suffix(".json"))
    paths = json.loads(index.with_suffix(".json").read_text())["paths"]
    monkeypatch.setattr(index_module, "search_kernel", lambda dtype: "numpy")
    result = runner.invoke(app, ["similar", str(photos / Path(paths[0]).relative_to(photos)), "--index", str(index)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"{index}: row 5 ({paths[5]}) scores " in " ".join(result.output.split())
    assert "beyond a cosine's 1; the index is damaged" in " ".join(result.output.split())


@pytest.mark.parametrize("normalize, value", [(True, -np.inf), (False, np.nan), (False, np.inf)])
def test_damaged_rows_that_numpys_float16_kernel_ranks_as_hits_are_a_one_line_error(photos, tiny_encoder, tmp_path,
                                                                                     monkeypatch, normalize, value):
    """A -inf row of a unit index scored about -10^6, and a NaN or infinite row of an unnormalised one (scaled to
    unit length) a plausible cosine: with k reaching it, either was listed as a hit."""
    index = tmp_path / "index.npy"
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    embed_folder(EmbedConfig(model=str(tiny_encoder), images=str(photos), out=str(index), dtype="float16",
                             normalize=normalize, device="cpu", precision="fp32", workers=0))
    rows = np.load(index)
    rows[3] = value
    np.save(index, rows)
    paths = json.loads(index.with_suffix(".json").read_text())["paths"]
    monkeypatch.setattr(index_module, "search_kernel", lambda dtype: "numpy")
    result = runner.invoke(app, ["similar", paths[0], "--index", str(index), "-k", str(len(rows))])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"{index}: row 3 ({paths[3]}) scores " in " ".join(result.output.split())


def test_a_query_whose_features_are_not_finite_is_a_one_line_error_not_a_damaged_index(indexes, photos, monkeypatch):
    """Every row scored NaN against it, and the first row of a sound index was named as damaged."""
    from simclr_cli import numpy_encoder

    real_embed = numpy_encoder.embed_queries

    def embed_nan(model, paths):
        features, positions, unreadable = real_embed(model, paths)
        features[-1, 0] = np.nan
        return features, positions, unreadable

    monkeypatch.setattr(numpy_encoder, "embed_queries", embed_nan)
    queries = sorted(str(path) for path in photos.glob("photo0[12].png"))
    result = runner.invoke(app, ["similar", *queries, "--index", str(indexes["float32"])])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"QUERY {queries[-1]}: " in result.output and "not finite" in result.output
    with pytest.raises(ValueError, match="NaN or infinite"):
        top_k(np.eye(3, dtype=np.float32), np.array([[np.inf, 0, 0]], dtype=np.float32), 1)


@pytest.mark.parametrize("dtype, kernel", [kernel for kernel in EVERY_KERNEL if kernel != (np.float16, "numpy")])
def test_a_nan_row_anywhere_is_reported_by_every_kernel_that_can_tell(dtype, kernel):
    """numpy's float16 kernel (which PyTorch's hands more than two queries to) turns NaN finite; the others
    report the first NaN row they come upon, even one that would rank last, even the row a query excludes."""
    generator = np.random.default_rng(0)
    rows = generator.standard_normal((300, 16)).astype(np.float32)
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(dtype)
    rows[[150, 250]] = np.nan
    for num_queries in (1, 2) if kernel == "torch" else (1, 2, 9):  # 9: float16 rows converted for BLAS
        queries = generator.standard_normal((num_queries, 16)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        for exclude in (None, [150] * num_queries):
            with pytest.raises(NaNRow, match="row 150 of the index scores NaN"):
                top_k(rows, queries, 2, exclude=exclude, chunk_rows=64, kernel=kernel)

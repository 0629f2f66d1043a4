"""benchmarks/quality.py end to end on a tiny Fashion-MNIST stand-in: idx files written here, not the real data."""

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality  # noqa: E402


def write_idx(path: Path, array: np.ndarray) -> None:
    """The idx format: two zero bytes, the type (0x08: uint8), the number of dims, each dim as a big-endian u32."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def bars(labels: np.ndarray, seed: int) -> np.ndarray:
    """28 px grey images, class c a bright bar at rows 2c+4..2c+6 over noise: the raw pixels separate them."""
    images = np.random.default_rng(seed).integers(0, 60, size=(len(labels), 28, 28))
    for image, label in zip(images, labels):
        image[2 * label + 4: 2 * label + 7] = 230
    return images.astype(np.uint8)


@pytest.fixture
def package(tmp_path, monkeypatch):
    folder = tmp_path / "package"
    folder.mkdir()
    for split, count, seed in (("train", 200, 0), ("test", 60, 1)):
        labels = np.arange(count) % 10
        images_name, labels_name = quality.IDX_FILES[split]
        write_idx(folder / images_name, bars(labels, seed))
        write_idx(folder / labels_name, labels)
    monkeypatch.setattr(quality, "PACKAGE_DIR", folder)
    return folder


def run(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["quality.py", *args])
    quality.main()


def test_idx_round_trip(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28)).astype(np.uint8)
    write_idx(tmp_path / "x.gz", array)
    np.testing.assert_array_equal(quality.read_idx(tmp_path / "x.gz"), array)


@pytest.mark.slow
def test_quality_benchmark_measures_simclr_and_every_baseline(package, tmp_path, monkeypatch):
    data, out = tmp_path / "data", tmp_path / "out"
    common = ["--subset", "200", "--data", str(data), "--monitor-size", "40", "--workers", "0"]
    run(monkeypatch, "--budget", "5s", "--arch", "resnet18", "--image-size", "32", "--batch-size", "32",
        "--out", str(out), *common)

    train = data / "subset-200" / "train"
    assert sorted(p.name for p in train.iterdir() if p.is_dir()) == list(quality.CLASSES)
    assert all(len(list((train / name).glob("*.png"))) == 20 for name in quality.CLASSES)
    first = np.asarray(Image.open(train / quality.CLASSES[0] / "00000.png"))
    np.testing.assert_array_equal(first, quality.read_idx(package / quality.IDX_FILES["train"][0])[0])
    assert len(list((data / "subset-200" / "test").rglob("*.png"))) == 60
    assert len(list((data / "subset-200" / "monitor-40").rglob("*.png"))) == 40

    results = json.loads((out / "results.json").read_text())
    rows = {row["name"].split(" (")[0]: row for row in results["rows"]}
    assert list(rows) == ["SimCLR", "raw pixels", "same encoder, random weights", "same encoder, supervised"]
    for row in rows.values():
        assert 0.0 <= row["linear_top1"] <= 1.0 and 0.0 <= row["knn_top1"] <= 1.0
    assert rows["raw pixels"]["linear_top1"] >= 0.9, "labels line up with their images"
    assert rows["SimCLR"]["images_seen"] == 32 * rows["SimCLR"]["steps"] >= 32
    assert rows["same encoder, supervised"]["images_seen"] == 32 * rows["same encoder, supervised"]["steps"] >= 32
    assert "resnet18" in results["rows"][0]["name"] and results["budget_s"] == 5.0
    assert (out / "simclr" / "curves.png").is_file()
    report = (out / "results.md").read_text()
    assert "| same encoder, supervised (labels, same time) | 5s |" in report

    # An earlier run is measured again only against the same budget.
    with pytest.raises(SystemExit, match="pass the same budget"):
        run(monkeypatch, "--budget", "6s", "--simclr-run", str(out / "simclr"), "--out", str(tmp_path / "again"),
            "--skip", "raw,random,supervised", *common)

    # With the same budget and data it is measured again: model files name the data folder by its last name
    # only, so the check reads the run's config.json, which holds the full path.
    again = tmp_path / "again"
    run(monkeypatch, "--budget", "5s", "--simclr-run", str(out / "simclr"), "--out", str(again),
        "--skip", "raw,random,supervised", *common)
    rows = json.loads((again / "results.json").read_text())["rows"]
    assert [row["name"].split(" (")[0] for row in rows] == ["SimCLR"]
    assert rows[0]["images_seen"] == results["rows"][0]["images_seen"]
    with pytest.raises(SystemExit, match="pass the same --subset and --data"):
        run(monkeypatch, "--budget", "5s", "--simclr-run", str(out / "simclr"), "--out", str(tmp_path / "other"),
            "--skip", "raw,random,supervised", *common[:2], "--data", str(tmp_path / "other-data"), *common[4:])

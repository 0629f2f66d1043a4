"""curves.png and the per-epoch kNN monitor (`simclr pretrain --monitor DIR`)."""

import json
import math
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.curves import CURVES_FILE, CURVES_SIZE, MONITOR_K, KnnMonitor, draw_curves, read_metrics
from simclr_cli.errors import DataError
from simclr_cli.export import load_encoder
from simclr_cli.features import compute_features
from simclr_cli.runtime import resolve_precision

runner = CliRunner()
FAST = ["--image-size", "32", "--stem", "imagenet", "--workers", "0", "--device", "cpu", "--arch", "resnet18"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == CURVES_SIZE
        return np.asarray(image.convert("L"))


def test_draw_curves_from_a_log_with_and_without_knn(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    steps = [{"step": s, "epoch": 1 + s // 10, "loss": 5 - math.log(s), "lr": 0.1 * s / 30, "images_per_s": 9.0,
              "time": s * 0.5} for s in range(1, 31)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in steps))
    plain = _assert_png(draw_curves(metrics, tmp_path / "plain.png"))
    with open(metrics, "a") as log:
        for epoch in (1, 2, 3):
            log.write(json.dumps({"step": 10 * epoch, "epoch": epoch, "knn_top1": 0.2 * epoch}) + "\n")
    monitored = _assert_png(draw_curves(metrics, tmp_path / "monitored.png"))
    third = slice(2 * CURVES_SIZE[0] // 3, None)
    assert not np.array_equal(plain[:, third], monitored[:, third]), "the kNN panel shows the epoch records"
    step_records, epoch_records = read_metrics(metrics)
    assert len(step_records) == 30 and [r["knn_top1"] for r in epoch_records] == [0.2, 0.4, 0.6000000000000001]


def test_knn_monitor_matches_a_slow_reference(tiny_encoder, small_digits_folder):
    """Weighted kNN written from its definition (Wu et al. 2018): each of the k most cosine-similar
    reference images votes exp(similarity / 0.07) for its class."""
    backbone, info = load_encoder(tiny_encoder)
    device = torch.device("cpu")
    monitor = KnnMonitor(small_digits_folder, device, resolve_precision("fp32", device), seed=0)
    accuracy = monitor.measure(backbone, info)

    data = monitor.data
    features, kept, _ = compute_features(backbone, info, monitor.paths, device, resolve_precision("fp32", device))
    assert kept.tolist() == list(range(len(monitor.paths)))
    features = features.double().numpy()
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    reference, queries = features[: len(data.train)], features[len(data.train):]
    correct = 0
    for query, label in zip(queries, data.val.labels):
        similarity = reference @ query
        votes = np.zeros(len(data.classes))
        for index in np.argsort(-similarity)[:MONITOR_K]:
            votes[data.train.labels[index]] += np.exp(similarity[index] / 0.07)
        correct += int(np.argmax(votes) == label)
    assert accuracy == pytest.approx(correct / len(data.val))
    assert accuracy > 0.5, "the briefly trained encoder separates the digits far above chance (0.1)"
    assert not backbone.training, "the monitor leaves the backbone in the mode it found it in"


@pytest.mark.slow
def test_pretrain_with_monitor_logs_knn_per_epoch_and_draws_curves(tmp_path, small_digits_folder):
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(small_digits_folder), "--out", str(out), "--epochs", "2",
                                 "--batch-size", "64", "--monitor", str(small_digits_folder), *FAST])
    assert result.exit_code == 0, result.output
    assert "kNN monitor: 10 classes" in result.output and "epoch 2: kNN top-1" in result.output
    records = _records(out)
    epoch_records = [r for r in records if "knn_top1" in r]
    step_records = [r for r in records if "loss" in r]
    assert [r["epoch"] for r in epoch_records] == [1, 2]
    assert all(0.0 <= r["knn_top1"] <= 1.0 for r in epoch_records)
    steps_per_epoch = 200 // 64
    assert [r["step"] for r in epoch_records] == [steps_per_epoch, 2 * steps_per_epoch]
    assert len(step_records) == 2 * steps_per_epoch and all(math.isfinite(r["loss"]) for r in step_records)
    _assert_png(out / CURVES_FILE)
    assert json.loads((out / "config.json").read_text())["monitor"] == str(small_digits_folder)


def test_pretrain_without_monitor_draws_curves_too(tiny_encoder):
    _assert_png(tiny_encoder / CURVES_FILE)
    assert all("loss" in r for r in _records(tiny_encoder)), "no epoch records without --monitor"


def test_monitor_folder_that_does_not_exist_is_one_line_and_exit_1(tmp_path, small_digits_folder):
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(small_digits_folder), "--out", str(out),
                                 "--monitor", str(tmp_path / "missing"), *FAST])
    assert result.exit_code == 1, result.output
    assert f"--monitor {tmp_path / 'missing'}: no such folder" in result.output.replace("\n", "")
    assert "Traceback" not in result.output


def test_monitor_folder_without_classes_fails_before_training(tmp_path, small_digits_folder):
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (32, 32)).save(flat / "a.png")
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(small_digits_folder), "--out", str(out), "--monitor", str(flat),
                                 *FAST])
    assert result.exit_code == 1, result.output
    assert "no class subfolders" in result.output
    assert f"--monitor {flat}" in result.output and "--labels" not in result.output  # the flag the user gave
    assert not (out / "metrics.jsonl").exists()


def test_a_refused_monitor_folder_leaves_out_free_for_the_corrected_command(tmp_path, small_digits_folder):
    """With --cache, the decoded cache went into --out before the --monitor folder was read: once refused,
    the same --out was refused too ("already holds files")."""
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (32, 32)).save(flat / "a.png")
    out = tmp_path / "run"
    command = ["pretrain", str(small_digits_folder), "--out", str(out), "--cache", "--epochs", "1", *FAST]
    refused = runner.invoke(app, [*command, "--monitor", str(flat)])
    assert refused.exit_code == 1 and "no class subfolders" in refused.output, refused.output
    corrected = runner.invoke(app, command)
    assert corrected.exit_code == 0, corrected.output
    assert (out / "encoder.safetensors").is_file()


def test_a_run_inside_its_monitor_folder_is_no_class_of_it(tmp_path, small_digits_folder, monkeypatch):
    """`simclr pretrain . --monitor .` in a folder of classes: the run's new runs/pretrain-<time>, not yet
    looking like a run's folder, was a class with no images, and every try failed."""
    folder = tmp_path / "digits"
    shutil.copytree(small_digits_folder, folder)
    monkeypatch.chdir(folder)
    result = runner.invoke(app, ["pretrain", ".", "--monitor", ".", "--epochs", "1", "--batch-size", "64", *FAST])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "kNN monitor: 10 classes" in text and "passed over" not in text, text
    (run,) = (folder / "runs").iterdir()
    assert [r["epoch"] for r in _records(run) if "knn_top1" in r] == [1]


def test_a_monitor_folder_that_gives_nothing_to_measure_costs_the_run_nothing(tmp_path, small_digits_folder,
                                                                              cut_image):
    """Truncated files pass the scan (it reads headers only) and failed when first decoded, at the end of epoch
    1: the run stopped there with a misleading error, before its checkpoint, leaving no encoder."""
    monitor = tmp_path / "monitor"
    for name in ("a", "b"):
        (monitor / name).mkdir(parents=True)
        for seed in range(3):
            cut_image(monitor / name / f"{seed}.png", seed)
    (monitor / "loose.png").write_bytes((monitor / "a" / "0.png").read_bytes())
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(small_digits_folder), "--out", str(out), "--epochs", "2",
                                 "--batch-size", "64", "--monitor", str(monitor), *FAST])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "kNN monitor: 1 image(s) directly in" in text, "the folder's notes are reported"
    assert text.count("kNN monitor: skipped") == 6 and "the run goes on without it" in text
    assert text.count("the run goes on without it") == 1, "not tried again every epoch"
    assert "no readable reference image" in text, "the monitor's halves named as its other messages name them"
    assert (out / "encoder.safetensors").is_file() and not any("knn_top1" in r for r in _records(out))


def test_a_killed_monitor_loader_worker_costs_the_run_nothing(tmp_path, small_digits_folder, monkeypatch):
    """A monitor's loader worker killed (out of memory) at the end of epoch 1 ended the run with PyTorch's traceback,
    before the epoch's checkpoint; as any monitor failure, it now costs a warning and the monitor."""
    from simclr_cli import curves
    from simclr_cli.data import ImageDataset

    monkeypatch.setattr(curves, "MONITOR_WORKERS_ABOVE", 0)
    real = ImageDataset.__getitem__

    def getitem(dataset, index):
        if dataset.seed is None and torch.utils.data.get_worker_info() is not None:  # the monitor's, not training's
            os.kill(os.getpid(), signal.SIGKILL)
        return real(dataset, index)

    monkeypatch.setattr(ImageDataset, "__getitem__", getitem)
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(small_digits_folder), "--out", str(out), "--epochs", "2",
                                 "--batch-size", "64", "--monitor", str(small_digits_folder), *FAST, "--workers", "1"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert text.count("kNN monitor: a loader worker died (killed by signal: Killed), perhaps out of memory; the run "
                      "goes on without the monitor") == 1
    assert (out / "encoder.safetensors").is_file() and not any("knn_top1" in r for r in _records(out))


def test_curves_of_a_monitored_run_before_its_first_epoch_say_so(tmp_path, monkeypatch):
    """A monitored run stopped within its first epoch was told to pass --monitor DIR; a single step was no line."""
    from matplotlib.axes import Axes

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "epoch": 1, "loss": 5.0, "lr": 0.1, "time": 1.0}) + "\n")
    texts, markers = [], []
    real_text, real_plot = Axes.text, Axes.plot
    monkeypatch.setattr(Axes, "text", lambda self, x, y, s, **kw: texts.append(s) or real_text(self, x, y, s, **kw))
    monkeypatch.setattr(Axes, "plot",
                        lambda self, *a, **kw: markers.append(kw.get("marker")) or real_plot(self, *a, **kw))
    draw_curves(metrics, tmp_path / "monitored.png", monitored=True)
    draw_curves(metrics, tmp_path / "plain.png")
    assert texts == ["no epoch measured yet", "pass --monitor DIR\n(a small labelled folder)"]
    assert markers == ["o", "o", "o", "o"], "a step drawn as a point"


def test_a_monitor_folder_of_one_image_a_class_is_refused_naming_the_flag(tmp_path, small_digits_folder):
    for label in range(3):
        (tmp_path / "one" / str(label)).mkdir(parents=True)
        shutil.copy(next((small_digits_folder / str(label)).iterdir()), tmp_path / "one" / str(label))
    with pytest.raises(DataError, match=r"^--monitor .*one: too few images .* add images$"):
        KnnMonitor(tmp_path / "one", torch.device("cpu"), resolve_precision("fp32", torch.device("cpu")))

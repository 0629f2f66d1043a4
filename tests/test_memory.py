"""memory.py: activation bytes measured from autograd, and the gradient-caching chunk a CPU run needs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from simclr_cli import memory
from simclr_cli.cli import app
from simclr_cli.data import in_flight_bytes
from simclr_cli.memory import MEMORY_SHARE, STATE_COPIES, TRANSIENT, activation_bytes, fitting_chunk
from simclr_cli.models import SimCLR
from simclr_cli.runtime import resolve_precision

FP32 = resolve_precision("fp32", torch.device("cpu"))
runner = CliRunner()


def test_activation_bytes_counts_what_backward_keeps_and_not_the_weights():
    """A linear layer keeps its input for the backward pass (3 x 8 x 8 float32 a view), and its 4 MB of
    weights, which are not activations."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 1000))
    assert activation_bytes(model, 8, FP32) == 3 * 8 * 8 * 4


def test_activation_bytes_per_view_leave_out_autocasts_copies_of_the_weights():
    """Under bf16 autocast each layer keeps a bf16 copy of its weights for the backward pass, once per step: per
    view, they made a resnet18's estimate 3.8x larger measured on 2 views than on 8 (and 8-19x a step's use)."""
    model = SimCLR("resnet18", "imagenet")
    bf16 = resolve_precision("bf16", torch.device("cpu"))
    two, four = activation_bytes(model, 32, bf16, views=2), activation_bytes(model, 32, bf16, views=4)
    assert two == pytest.approx(four, rel=0.05)
    assert two < 0.75 * activation_bytes(model, 32, FP32), "bf16 activations take half of fp32's, weights left out"


@pytest.mark.parametrize("version", [2, 1])
def test_free_memory_is_what_the_tightest_cgroup_limit_leaves(tmp_path, monkeypatch, version):
    """MemAvailable is the machine's: under a 1 GiB limit (a container's, a Slurm job's on its parent cgroup) it
    said 23 GB, and a batch planned on it would get the process killed. The tightest limit less the usage
    counts, the file cache the kernel drops not used."""
    where, limit_file, usage_file, inactive_key = memory.CGROUP_FILES[0 if version == 2 else 1]
    root = tmp_path / where
    job = root / "slurm" / "job_7" / "step_0"  # the process's cgroup: no limit of its own, its parent's applies
    job.mkdir(parents=True)
    (tmp_path / "cgroup").write_text("0::/slurm/job_7/step_0\n" if version == 2 else
                                     "12:pids:/slurm\n5:memory:/slurm/job_7/step_0\n")
    for folder, limit, usage in ((job, "max" if version == 2 else f"{(1 << 63) - 4096}", 1),
                                 (job.parent, f"{1 << 30}", 600 << 20), (root / "slurm", f"{4 << 30}", 700 << 20)):
        (folder / limit_file).write_text(limit + "\n")
        (folder / usage_file).write_text(f"{usage}\n")
        (folder / "memory.stat").write_text(f"anon 1\n{inactive_key} {100 << 20}\nfile 2\n")
    monkeypatch.setattr(memory, "CGROUP", tmp_path)
    monkeypatch.setattr(memory, "PROC_CGROUP", tmp_path / "cgroup")
    monkeypatch.setattr(memory, "_meminfo_available", lambda: 20 << 30)
    assert memory.available_memory() == (1 << 30) - (500 << 20)
    (tmp_path / "cgroup").write_text("0::/elsewhere\n5:memory:/elsewhere\n")  # a container's view: its root only
    assert memory.available_memory() == 20 << 30
    (tmp_path / "cgroup").write_text("0::/slurm/../slurm/job_7\n5:memory:/slurm/../slurm/job_7\n")
    assert memory.available_memory() == 20 << 30, "a path outside the namespace's root: the root alone is read"


def test_activation_bytes_grow_with_the_pixels_and_leave_batchnorm_statistics_alone():
    model = SimCLR("resnet18", "imagenet")
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    small, large = activation_bytes(model, 64, FP32), activation_bytes(model, 128, FP32)
    assert 3.5 < large / small < 4.1  # four times the pixels; the head's share does not grow
    assert activation_bytes(model, 64, FP32, views=4) == pytest.approx(small, rel=0.03)  # per view
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name


def test_activation_bytes_measure_training_mode_and_restore_each_modules_mode():
    """Fine-tuning's classifier holds an encoder loaded in eval mode: BatchNorm keeps more in training mode,
    so that is measured; afterwards every module is back in its own mode."""
    model = SimCLR("resnet18", "imagenet")
    model.backbone.eval()
    modes = {name: module.training for name, module in model.named_modules()}
    mixed = activation_bytes(model, 32, FP32)
    assert {name: module.training for name, module in model.named_modules()} == modes
    assert mixed == activation_bytes(model.train(), 32, FP32)


def test_fitting_chunk_is_the_most_images_that_fit_beside_the_state():
    per_view, state = 1000, 500
    per_image = 2 * per_view * TRANSIENT
    fits = (100 * per_image + STATE_COPIES * state) / MEMORY_SHARE
    assert fitting_chunk(per_view, state, 100, available=fits + 10) is None
    assert fitting_chunk(per_view, state, 101, available=fits + 10) == 100
    assert fitting_chunk(per_view, state, 256, available=fits / 4) < 25
    assert fitting_chunk(per_view, state, 256, available=1) == 1  # the smallest chunk, whatever is free


def test_the_batches_the_loader_holds_ready_count_against_the_budget():
    """Each worker holds data.PREFETCH batches ready, in shared memory the activations' budget did not count."""
    per_view, state = 1000, 500
    fits = (100 * 2 * per_view * TRANSIENT + STATE_COPIES * state) / MEMORY_SHARE
    assert fitting_chunk(per_view, state, 100, available=fits + 10) is None
    assert fitting_chunk(per_view, state, 100, available=fits + 10, loader_bytes=2 * per_view * TRANSIENT) == 99


@pytest.fixture
def images(tmp_path, small_digits_folder):
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted(small_digits_folder.rglob("*.png"))[:16]:
        shutil.copy(path, folder / f"{path.parent.name}_{path.name}")
    return folder


def test_loader_workers_are_capped_where_their_ready_batches_would_take_the_memory(monkeypatch):
    """Counted against the batch alone, 16 workers' ready batches of float32 224 px views (9.2 GiB) took all of
    12 GiB's share and left chunks of one image, which free none of it."""
    said = []

    def report(kind, **fields):
        said.append(fields["text"])

    monkeypatch.setattr(memory, "available_memory", lambda: 12 * 2**30)
    worker = in_flight_bytes(1, 256 * 2 * 3 * 224 * 224 * 4)  # batch 256, two float32 views an image
    assert memory.fitting_workers(16, worker, report) == 4  # a quarter of 80% of 12 GiB: 2.4 GiB, 0.57 GiB each
    assert said == ["16 loader workers would hold 9.2 GiB of batches ready, and 12.0 GiB is free: using 4 "
                    "(--workers sets it)"]
    said.clear()
    assert memory.fitting_workers(4, worker, report) == 4 and not said
    monkeypatch.setattr(memory, "available_memory", lambda: None)
    assert memory.fitting_workers(16, worker, report) == 16 and not said


def _squeezed_memory(monkeypatch, images: int) -> None:
    """Make the free memory what a resnet18's state and `images` images of 32 px activations need, in float32: the
    runs pass --precision fp32 (auto's bf16, on a CPU that has it, needs less, and the batch fitted)."""
    model = SimCLR("resnet18", "imagenet", zero_init_residual=True, proj_out_bn=True)
    per_view = activation_bytes(model, 32, FP32)
    state = sum(p.numel() * p.element_size() for p in model.parameters())
    available = (STATE_COPIES * state + images * 2 * per_view * TRANSIENT) / MEMORY_SHARE + 1
    monkeypatch.setattr(memory, "available_memory", lambda: int(available))


def test_a_batch_too_large_for_memory_trains_in_chunks_and_says_so(tmp_path, images, monkeypatch):
    _squeezed_memory(monkeypatch, images=5)
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(images), "--out", str(out), "--epochs", "1", "--batch-size", "16",
                                 "--arch", "resnet18", "--image-size", "32", "--device", "cpu",
                                 "--precision", "fp32", "--workers", "0"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "a batch of 16 images needs about" in text and "gradient caching, 5 images' activations" in text
    assert json.loads((out / "config.json").read_text())["chunk_size"] == 5  # a resume keeps it
    assert (out / "encoder.safetensors").is_file()


def test_the_batches_that_loader_workers_hold_ready_take_memory_from_the_batch(tmp_path, images, monkeypatch):
    """Memory for 16 images' activations and not a byte more: a loader worker's batches ready (PREFETCH of them,
    two float32 32 px views an image) leave room for fewer."""
    _squeezed_memory(monkeypatch, images=16)
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(images), "--out", str(out), "--epochs", "1", "--batch-size", "16",
                                 "--arch", "resnet18", "--image-size", "32", "--device", "cpu",
                                 "--precision", "fp32", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "a batch of 16 images needs about" in " ".join(result.output.split())
    assert json.loads((out / "config.json").read_text())["chunk_size"] == 15  # 0.8 MB of batches ready, 1.1 MB an image


def test_a_batch_that_fits_or_a_chunk_size_given_is_left_alone(tmp_path, images, monkeypatch):
    _squeezed_memory(monkeypatch, images=5)
    out = tmp_path / "given"
    result = runner.invoke(app, ["pretrain", str(images), "--out", str(out), "--epochs", "1", "--batch-size", "16",
                                 "--chunk-size", "8", "--arch", "resnet18", "--image-size", "32", "--device", "cpu",
                                 "--precision", "fp32", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "needs about" not in result.output
    assert json.loads((out / "config.json").read_text())["chunk_size"] == 8
    _squeezed_memory(monkeypatch, images=16)
    out = tmp_path / "fits"
    result = runner.invoke(app, ["pretrain", str(images), "--out", str(out), "--epochs", "1", "--batch-size", "16",
                                 "--arch", "resnet18", "--image-size", "32", "--device", "cpu",
                                 "--precision", "fp32", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "needs about" not in result.output
    assert json.loads((out / "config.json").read_text())["chunk_size"] is None


def test_finetune_on_a_batch_too_large_for_memory_trains_on_a_smaller_one(tmp_path, tiny_encoder,
                                                                         small_digits_folder, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda: 1)  # nothing free: the smallest batch, two images
    out = tmp_path / "finetune"
    result = runner.invoke(app, ["finetune", str(tiny_encoder), str(small_digits_folder), "--label-fraction", "0.05",
                                 "--epochs", "1", "--out", str(out), "--device", "cpu", "--workers", "0"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "a batch of" in text and "needs about" in text and "using batch size 2 (the learning rate follows it)" in text
    config = json.loads((out / "config.json").read_text())
    assert config["batch_size"] == 2

"""End to end through the CLI: pretrain, skip broken files, export, resume, time budgets, user errors."""

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from simclr_cli import runtime, train
from simclr_cli.cli import app
from simclr_cli.config import AugmentConfig, FinetuneConfig, LabelledDataConfig, PretrainConfig, RuntimeConfig
from simclr_cli.data import ImageDataset, epoch_order
from simclr_cli.errors import ConfigError, WorkerDied
from simclr_cli.export import load_checkpoint, load_encoder
from simclr_cli.files import held, read_metadata
from simclr_cli.images import scan_images
from simclr_cli.models import SimCLR
from simclr_cli.progress import Reporter
from simclr_cli.runtime import Precision, StopFlag
from simclr_cli.train import pretrain, resume_pretrain

runner = CliRunner()
CPU = ["--image-size", "32", "--stem", "imagenet", "--workers", "0", "--device", "cpu"]
FAST = [*CPU, "--arch", "resnet18"]  # a smaller encoder than the default, for speed


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_mixed_folder_skips_broken_files_and_exports_a_torchvision_encoder(mixed_folder, tmp_path):
    root, expected = mixed_folder
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(root), "--out", str(out), "--epochs", "2", "--batch-size", "4",
                                 *FAST])
    assert result.exit_code == 0, result.output
    assert f"encoder saved to {out / 'encoder.safetensors'}" in result.output.replace("\n", "")
    assert "epoch 2/2" in result.output, "plain progress lines when not on a terminal"
    said = " ".join(result.output.split())
    assert f"next: simclr linear-eval {out / 'encoder.safetensors'} LABELLED_FOLDER" in said, said
    assert f"or: simclr embed {out / 'encoder.safetensors'} IMAGES OUT.npy" in said, said

    skipped = json.loads((out / "skipped.json").read_text())
    skipped_names = sorted(Path(s["path"]).name for s in skipped)
    assert skipped_names == sorted(Path(name).name for name in expected["broken"]) + [] or \
        skipped_names == sorted(["dangling.png", "empty.png", "not_an_image.jpg", "truncated.jpg"])
    assert any(s["path"].endswith("truncated.jpg") and "unreadable" in s["reason"] for s in skipped)

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 * (len(expected["good"]) // 4)
    assert {"step", "epoch", "loss", "lr", "images_per_s", "time"} <= set(records[0])
    config = json.loads((out / "config.json").read_text())
    assert config["batch_size"] == 4 and config["augment"]["image_size"] == 32

    model = torchvision.models.resnet18()
    missing = model.load_state_dict(load_file(str(out / "encoder.safetensors")), strict=False).missing_keys
    assert set(missing) == {"fc.weight", "fc.bias"}
    model.fc = torch.nn.Identity()
    features = model.eval()(torch.randn(3, 3, 32, 32))
    assert features.shape == (3, 512) and torch.isfinite(features).all()
    _, info = load_encoder(out)
    assert (info.arch, info.stem, info.feature_dim, info.image_size) == ("resnet18", "imagenet", 512, 32)
    assert info.config["epochs"] == 2 and len(info.mean) == 3
    assert (info.config["data_dir"], info.config["out_dir"]) == (root.name, "run"), "names, not local paths"
    assert str(tmp_path) not in json.dumps(read_metadata(out / "encoder.safetensors", "encoder"))


@pytest.fixture
def initial_scales(monkeypatch) -> list[torch.Tensor]:
    """The first residual block's last BatchNorm scale of each model the engine builds, as it starts."""
    scales = []

    def build(*args):
        model = SimCLR(*args)
        block = model.backbone.layer1[0]
        last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2  # bottleneck or basic block
        scales.append(last_bn.weight.detach().clone())
        return model

    monkeypatch.setattr(train, "SimCLR", build)
    return scales


def test_default_arch_batch_views_and_initialisation_on_a_cpu_at_32_px_are_recorded_in_config_json(
        small_digits_folder, tmp_path, initial_scales):
    out = tmp_path / "default-batch"
    result = runner.invoke(app, ["pretrain", str(small_digits_folder), "--out", str(out), "--epochs", "1", *CPU])
    assert result.exit_code == 0, result.output
    # The default batch on a CPU is 128; over 200 images that leaves 72 out of each epoch, and 2 steps of 100 none.
    assert ("using batch size 100 instead of 128: an epoch of 2 steps leaves 0 of the 200 images out, where 128 "
            "would leave 72") in " ".join(result.output.split())
    assert "batch 100, lr 0.75" in result.output  # 0.075 x sqrt(100)
    assert len(losses(out)) == 2
    saved = json.loads((out / "config.json").read_text())
    assert saved["batch_size"] == 100
    assert saved["arch"] == "resnet50", "SimCLR's encoder, the best measured at 10 and 60 minutes on a CPU (README)"
    assert saved["zero_init_residual"], "residual blocks start as their shortcuts by default"
    assert len(initial_scales) == 1 and not initial_scales[0].any(), "each block's last BatchNorm started at 0"
    assert saved["proj_out_bn"], "the head ends with BatchNorm by default"
    head = load_file(str(out / "head.safetensors"))
    assert "layers.3.bias" not in head and not head["layers.4.bias"].any(), "a scale and no shift, after training"
    assert "crops from 60%, jitter strength 1, blur off" in result.output
    assert (saved["augment"]["crop_min_scale"], saved["augment"]["jitter"]) == (0.6, 1.0), "decided once, kept"
    info = load_encoder(out)[1]
    assert (info.arch, info.feature_dim, info.config["batch_size"]) == ("resnet50", 2048, 100), "the file records them"


def test_width_and_initialisation_reach_the_engine_the_encoder_file_and_embed(small_digits_folder, tmp_path,
                                                                              initial_scales):
    out = tmp_path / "narrow"
    result = runner.invoke(app, ["pretrain", str(small_digits_folder), "--out", str(out), "--epochs", "1",
                                 "--batch-size", "32", "--width", "0.25", "--no-zero-init-residual",
                                 "--no-proj-out-bn", *FAST])
    assert result.exit_code == 0, result.output
    backbone, info = load_encoder(out)
    assert (info.width, info.feature_dim, backbone.layer4[-1].conv2.out_channels) == (0.25, 128, 128)
    saved = json.loads((out / "config.json").read_text())
    assert (saved["width"], saved["zero_init_residual"], saved["proj_out_bn"]) == (0.25, False, False)
    assert "layers.3.bias" in load_file(str(out / "head.safetensors")), "a plain linear output layer"
    assert len(initial_scales) == 1 and bool((initial_scales[0] == 1).all()), "torchvision's unit scales, not 0"
    threes = small_digits_folder / "3"
    embedded = runner.invoke(app, ["embed", str(out), str(threes), str(tmp_path / "threes.npy"), "--device", "cpu",
                                   "--workers", "0"])
    assert embedded.exit_code == 0, embedded.output
    assert np.load(tmp_path / "threes.npy", allow_pickle=False).shape == (len(list(threes.iterdir())), 128)


def _config(data, out, workers=0, epochs=2):
    return PretrainConfig(data_dir=str(data), out_dir=str(out), epochs=epochs, batch_size=32, arch="resnet18",
                          stem="imagenet", augment=AugmentConfig(image_size=32),
                          runtime=RuntimeConfig(device="cpu", workers=workers, seed=3))


def test_interrupted_run_resumes_to_the_same_loss_curve_and_weights(small_digits_folder, tmp_path):
    straight = tmp_path / "straight"
    epoch_losses = []
    pretrain(_config(small_digits_folder, straight),
             lambda kind, **fields: kind == "epoch" and epoch_losses.append(f"{fields['loss']:.4f}"))

    def interrupt_at_step_4(kind, **fields):  # a Ctrl-C in the middle of the first epoch
        if kind == "step" and fields["step"] == 4:
            os.kill(os.getpid(), signal.SIGINT)

    stopped, replies = tmp_path / "stopped", []

    def report(kind, **fields):
        interrupt_at_step_4(kind, **fields)
        if kind == "stopping":
            replies.append(fields["text"])

    result = pretrain(_config(small_digits_folder, stopped, workers=1), report)
    assert result.interrupted and result.state.step == 4 and result.encoder_path is None
    # answered at once: the step under way can take minutes, and a second Ctrl-C stops without saving
    assert replies == ["Ctrl-C: saving the run after this step, then stopping (Ctrl-C again stops at once, losing "
                       "the steps since the last save)"]
    assert load_checkpoint(stopped / "checkpoint.safetensors").progress["state"]["step_in_epoch"] == 4
    assert len(losses(stopped)) == 4

    cli = runner.invoke(app, ["pretrain", "--resume", str(stopped), "--workers", "0"])
    assert cli.exit_code == 0, cli.output
    assert "resuming" in cli.output
    assert "views: crops, colour and blur in batches in the main process" in cli.output  # no loader workers
    assert losses(stopped) == losses(straight), "same seed, same CPU: the resumed curve is the uninterrupted one"
    printed = re.findall(r"epoch \d/2: loss (\S+),", cli.output)
    assert printed == epoch_losses, "the first epoch's mean counts the steps before the interrupt"
    a, b = load_file(str(straight / "encoder.safetensors")), load_file(str(stopped / "encoder.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_run_keeps_the_loss_scale_its_gradient_scaler_had_reached(small_digits_folder, tmp_path,
                                                                              monkeypatch):
    """fp16 runs (CUDA) scale the loss; the scale grows while gradients stay finite. A CPU GradScaler stands in
    here, doubling every step: resumed at step 4, the run must go on from 2^14, not start again at 2^10."""
    monkeypatch.setattr(Precision, "grad_scaler",
                        lambda self: torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1))
    straight = tmp_path / "straight"
    pretrain(_config(small_digits_folder, straight, epochs=1))

    def interrupt_at_step_4(kind, **fields):
        if kind == "step" and fields["step"] == 4:
            os.kill(os.getpid(), signal.SIGINT)

    stopped = tmp_path / "stopped"
    assert pretrain(_config(small_digits_folder, stopped, epochs=1), interrupt_at_step_4).interrupted
    assert load_checkpoint(stopped / "checkpoint.safetensors").progress["scaler"]["scale"] == 2.0 ** 14
    resume_pretrain(stopped)
    scales = [load_checkpoint(run / "checkpoint.safetensors").progress["scaler"]["scale"] for run in (straight, stopped)]
    assert scales == [2.0 ** 16, 2.0 ** 16], "6 steps, each doubling the scale"


def test_a_run_that_crashed_before_its_first_checkpoint_resumes_from_the_start(small_digits_folder, tmp_path):
    """A crash or a lost machine in the first epoch leaves config.json and no checkpoint: --resume starts the
    run again with its saved settings (it said the folder was no run of `simclr pretrain`, and the same
    --out was refused as holding files)."""
    straight = tmp_path / "straight"
    pretrain(_config(small_digits_folder, straight, epochs=1))

    def crash_at_step_2(kind, **fields):  # the process dies in the first epoch: no checkpoint is written
        if kind == "step" and fields["step"] == 2:
            raise MemoryError("out of memory")

    crashed = tmp_path / "crashed"
    with pytest.raises(MemoryError):
        pretrain(_config(small_digits_folder, crashed, epochs=1), crash_at_step_2)
    assert (crashed / "config.json").is_file() and not (crashed / "checkpoint.safetensors").exists()
    again = runner.invoke(app, ["pretrain", str(small_digits_folder), "--out", str(crashed)])
    assert again.exit_code == 1 and f"resume it with --resume {crashed}" in " ".join(again.output.split())

    cli = runner.invoke(app, ["pretrain", "--resume", str(crashed)])
    assert cli.exit_code == 0, cli.output
    assert losses(crashed) == losses(straight)
    a, b = load_file(str(straight / "encoder.safetensors")), load_file(str(crashed / "encoder.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_a_finished_run_exports_again_past_a_log_line_cut_short(small_digits_folder, tmp_path):
    out = tmp_path / "done"
    pretrain(_config(small_digits_folder, out, epochs=1))
    (out / "encoder.safetensors").unlink()
    log = (out / "metrics.jsonl").read_text()
    (out / "metrics.jsonl").write_text(log + '{"step": 7, "epoch": 1, "lo')  # a crash in the middle of a write
    result = resume_pretrain(out)
    assert result.encoder_path.is_file() and result.state.finished
    assert (out / "metrics.jsonl").read_text() == log, "the cut line is dropped (it was a JSONDecodeError)"


def test_resuming_a_finished_run_leaves_its_files_bytes_and_the_indexes_built_from_them(small_digits_folder,
                                                                                        tmp_path):
    """The re-export wrote the same weights as new bytes (safetensors orders its metadata anew on every write):
    `simclr similar` refused every index built from the encoder as "changed since", and linear-eval's feature
    cache, keyed by the file's SHA-256, was computed again."""
    out = tmp_path / "done"
    pretrain(_config(small_digits_folder, out, epochs=1))

    def digests() -> dict[str, str]:
        return {name: hashlib.sha256((out / name).read_bytes()).hexdigest()
                for name in ("encoder.safetensors", "head.safetensors")}

    before = digests()
    index = tmp_path / "threes.npy"
    embedded = runner.invoke(app, ["embed", str(out), str(small_digits_folder / "3"), str(index), "--device", "cpu",
                                   "--workers", "0"])
    assert embedded.exit_code == 0, embedded.output
    resumed = runner.invoke(app, ["pretrain", "--resume", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert "had already finished; exporting its encoder again" in " ".join(resumed.output.split())
    assert digests() == before
    query = sorted((small_digits_folder / "3").iterdir())[0]
    found = runner.invoke(app, ["similar", str(query), "--index", str(index), "--json"])
    assert found.exit_code == 0, found.output


class SteadyClock:
    """train.py's `time`: each reading of the clock comes the next of `ticks` seconds (in a cycle) after
    the one before, so steps take the same times however loaded the machine running the test is."""

    def __init__(self, *ticks: float) -> None:
        self.now, self.ticks = 0.0, itertools.cycle(ticks or (0.25,))

    def monotonic(self) -> float:
        self.now += next(self.ticks)
        return self.now


def test_time_budget_ends_the_run_in_time_and_annealed(small_digits_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "time", SteadyClock())
    out = tmp_path / "budget"
    result = runner.invoke(app, ["pretrain", str(small_digits_folder), "--out", str(out), "--epochs", "1000",
                                 "--batch-size", "32", "--max-time", "12s", *FAST])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in records]
    step_time = times[-1] - times[-2]
    assert times[-1] <= 12.0, "the last step ends within the budget"
    assert times[-1] + max(1.0, 2 * step_time) + step_time > 12.0, "and no step that fitted was left out"
    peak = max(r["lr"] for r in records)
    assert records[-1]["lr"] < 0.15 * peak, "the schedule is fitted to the budget: the run ends annealed"
    assert len(records) >= 10
    # The summary said "final loss" of the last epoch's mean, which the last step's loss was far from.
    last_epoch = [r["loss"] for r in records if r["epoch"] == records[-1]["epoch"]]
    assert len(last_epoch) > 1 and last_epoch[-1] != pytest.approx(sum(last_epoch) / len(last_epoch), abs=1e-4)
    summary = " ".join(result.output.split())
    mean = f"{sum(last_epoch) / len(last_epoch):.4f}"
    if len(last_epoch) < sum(r["epoch"] == 1 for r in records):  # the budget cut it short: no epoch line gives it
        n = len(last_epoch)
        assert f"mean loss {mean} over the {n} steps of epoch {records[-1]['epoch']} the time budget left)" in summary
        assert f"epoch {records[-1]['epoch']}/1000" not in summary, "an epoch cut short has no line"
    else:
        assert f"last epoch's mean loss {mean})" in summary, summary
        assert f"epoch {records[-1]['epoch']}/1000: loss {mean}" in summary, "as the epoch's line gives it"
    assert "final loss" not in summary


def test_a_budget_spent_before_the_first_step_is_an_error_not_a_random_encoder(small_digits_folder, tmp_path,
                                                                               monkeypatch):
    monkeypatch.setattr(train, "time", SteadyClock(1.0))
    out = tmp_path / "short"
    result = runner.invoke(app, ["pretrain", str(small_digits_folder), "--out", str(out), "--batch-size", "32",
                                 "--max-time", "2s", *FAST])
    assert result.exit_code == 1, result.output
    assert "error: --max-time 2s was spent before the first step" in result.output
    assert "Traceback" not in result.output and not (out / "encoder.safetensors").exists()


def test_the_loaders_start_is_not_counted_in_a_steps_time(small_digits_folder, tmp_path, monkeypatch):
    """Each epoch's loader takes 30 s to start (workers, first decodes): its first step took 30 s more, and
    that step's time, kept in reserve for one more step, pushed a time budget's schedule ahead at every epoch."""
    clock = SteadyClock()
    monkeypatch.setattr(train, "time", clock)
    make_loader = train.make_loader

    def slow_to_start(*args, **kwargs):
        loader = make_loader(*args, **kwargs)

        class Starting:
            def __iter__(self):
                clock.now += 30.0
                return iter(loader)
        return Starting()

    monkeypatch.setattr(train, "make_loader", slow_to_start)
    out = tmp_path / "budget"
    config = dataclasses.replace(_config(small_digits_folder, out, epochs=3), max_time=1000.0, warmup_epochs=0.0)
    pretrain(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 * (200 // 32) and len({r["epoch"] for r in records}) == 3
    speeds = [r["images_per_s"] for r in records]  # the fake clock's readings differ by one in a step or two
    assert min(speeds) > 0.5 * max(speeds), speeds  # each epoch's first step too: a batch in 30 s before
    rates = [r["lr"] for r in records]
    assert all(a > b for a, b in zip(rates, rates[1:])) and rates[-1] < 0.1 * rates[0], rates


def test_a_time_budget_keeps_the_monitors_time_free_and_ends_annealed(small_digits_folder, tmp_path, monkeypatch):
    """A kNN monitor taking 20 s of a 100 s budget ran past it at the last epoch's end (48 s of a 30 s budget in
    the review), and the schedule, blind to it, ended the run at a rate far from annealed."""
    from simclr_cli.curves import KnnMonitor

    clock = SteadyClock()
    monkeypatch.setattr(train, "time", clock)
    monitor = tmp_path / "monitor"
    for label in range(2):
        (monitor / str(label)).mkdir(parents=True)
        for image in sorted((small_digits_folder / str(label)).iterdir())[:3]:
            shutil.copy(image, monitor / str(label))
    measured_at = []

    def slow_measure(self, backbone, info):
        clock.now += 20.0
        measured_at.append(clock.now)
        return 0.5

    monkeypatch.setattr(KnnMonitor, "measure", slow_measure)
    out = tmp_path / "budget"
    config = dataclasses.replace(_config(small_digits_folder, out, epochs=1000), max_time=100.0, warmup_epochs=0.0,
                                 monitor=str(monitor))
    pretrain(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["lr"] for r in records if "lr" in r]
    assert len(measured_at) >= 2 and max(measured_at) <= 100.0, measured_at
    assert rates[-1] < 0.15 * max(rates), rates


def test_the_progress_bar_counts_the_steps_the_time_budget_leaves():
    """At 30 s of a 40 s budget, step 6 of 900: the bar said 6/900, with an hour to go."""
    reporter = Reporter()
    reporter.live = True  # a terminal
    reporter.on_start(total_steps=900, max_time=40.0)
    try:
        fields = dict(epoch=1, lr=0.1, images_per_s=10.0, total_steps=900)
        reporter.on_step(step=1, progress=1.5 / 900, **fields)  # the steps further along than the time
        assert reporter.progress.tasks[0].total == 900
        reporter.on_step(step=6, progress=0.75, **fields)
        assert reporter.progress.tasks[0].total == 9 and reporter.progress.tasks[0].completed == 6
    finally:
        reporter.close()


@pytest.mark.parametrize("env, tty, live", [
    ({"TERM": "xterm-256color"}, True, True),
    ({"TERM": "dumb"}, True, False),
    ({"TERM": "xterm-256color", "FORCE_COLOR": "1"}, False, False),
], ids=["terminal", "dumb-terminal", "force-color-into-a-file"])
def test_the_live_bar_only_where_it_redraws(monkeypatch, tmp_path, env, tty, live):
    """TERM=dumb (Emacs' shell, IDE consoles): rich's Live never redraws there, and no progress showed all run.
    FORCE_COLOR=1 (many CIs) with the output in a file: the bar wrote cursor codes into the log 10 times a second."""
    from simclr_cli import progress

    for name in ("TERM", "FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    leader, follower = os.openpty() if tty else (None, os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT))
    try:
        with os.fdopen(follower, "w") as stream:  # built as progress.py builds its console, on this stream
            monkeypatch.setattr(progress, "console", type(progress.console)(file=stream, highlight=False,
                                                                            soft_wrap=True, markup=False))
            assert progress.Reporter().live is live
    finally:
        if leader is not None:
            os.close(leader)


def test_the_time_remaining_shows_with_steps_longer_than_half_a_minute(monkeypatch):
    """rich estimates the speed over a window of 30 s by default, keeping one sample per window: at 60 s a step
    (resnet50 at 224 px on a small CPU) it had no speed, and the time remaining stayed -:--:-- all run."""
    from rich.progress import TimeRemainingColumn

    from simclr_cli import progress

    clock = SteadyClock(0.0)
    monkeypatch.setattr(progress.console, "get_time", clock.monotonic)
    reporter = progress.Reporter()
    reporter.live = True  # a terminal
    reporter.on_start(total_steps=100)
    try:
        for step in range(1, 4):
            clock.now += 31.0
            reporter.on_step(step=step, epoch=1, lr=0.1, images_per_s=8.0, total_steps=100,
                             progress=(step + 0.5) / 100)
        assert TimeRemainingColumn().render(reporter.progress.tasks[0]).plain == "0:50:07"  # 97 steps of 31 s
    finally:
        reporter.close()


@pytest.mark.parametrize("epochs", [800, 1000], ids=["to-the-last-epoch", "ended-by-a-time-budget"])
def test_plain_progress_prints_a_line_a_half_minute_however_short_the_epochs(monkeypatch, capsys, epochs):
    """--epochs 800 on a small folder printed 800 lines into a log. Now: the first epoch, one line per 30 s, and
    the last epoch, the one a time budget ended on too."""
    from simclr_cli import progress

    clock = SteadyClock(0.0)
    monkeypatch.setattr(progress.console, "get_time", clock.monotonic)
    with progress.Reporter() as reporter:
        reporter.live = False  # as in a log file
        reporter.on_start(total_steps=2 * epochs)
        for epoch in range(1, 801):  # epochs of 2 steps of 0.1 s: 160 s in all
            for step in (2 * epoch - 1, 2 * epoch):
                clock.now += 0.1
                reporter.on_step(step=step, epoch=epoch, lr=0.1, loss=1.0, images_per_s=80.0,
                                 total_steps=2 * epochs, progress=(step + 0.5) / (2 * epochs))
            reporter.on_epoch(epoch=epoch, epochs=epochs, loss=1.0, images_per_s=80.0)
        reporter.on_done()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"training for {2 * epochs} steps"
    assert lines[1].startswith(f"epoch 1/{epochs}:") and lines[-1].startswith(f"epoch 800/{epochs}:"), lines
    assert len(lines) <= 3 + 160 // 30 and all(line.startswith("epoch") for line in lines[1:]), lines


def test_a_budget_already_spent_is_said_to_be_spent_not_about_to_be_passed():
    """Past it already (a slow end of epoch), the note said the reserve "would pass it"."""
    from types import SimpleNamespace

    run = SimpleNamespace(state=SimpleNamespace(step=8, step_seconds=2.0), total_steps=200, _monitor_seconds=0.0,
                          config=SimpleNamespace(max_time=25.0), _reserve=lambda: 5.7)
    assert train.PretrainRun._budget_note(run, 27.0) == \
        "time budget: stopping after step 8 of up to 200, at 0m27s of 0m25s: the budget is spent"
    assert train.PretrainRun._budget_note(run, 20.0) == (
        "time budget: stopping after step 8 of up to 200, at 0m20s of 0m25s: the 5.7 s it keeps for one more step "
        "and the export (twice a typical step's time) would pass it")


def test_the_time_budget_note_comes_after_the_epoch_line_held_back(monkeypatch, capsys):
    """The note printed before the last epoch's line, held back by the half-minute rule and printed at the end:
    training seemed to go on after the budget ended it."""
    from simclr_cli import progress

    clock = SteadyClock(0.0)
    monkeypatch.setattr(progress.console, "get_time", clock.monotonic)
    with progress.Reporter() as reporter:
        reporter.live = False  # as in a log file
        reporter.on_start(total_steps=200, max_time=60.0)
        for epoch in (1, 2, 3):
            clock.now += 1.0
            reporter.on_epoch(epoch=epoch, epochs=100, loss=1.0 / epoch, images_per_s=80.0)
        reporter.on_budget(text="time budget: stopping after step 6")
        reporter.on_done()
    lines = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()]
    assert lines == ["training for up to 200 steps (time budget 1m00s)", "epoch 1/100", "epoch 3/100",
                     "time budget"], lines


def test_plain_progress_under_a_time_budget_counts_the_steps_at_its_pace(monkeypatch, capsys):
    """--max-time on a folder of 300 steps printed "training for 300 steps (time budget ...)", then "step 50/300"
    for a run that ended after a few steps."""
    from simclr_cli import progress

    clock = SteadyClock(0.0)
    monkeypatch.setattr(progress.console, "get_time", clock.monotonic)
    with progress.Reporter() as reporter:
        reporter.live = False  # as in a log file
        reporter.on_start(total_steps=300, max_time=120.0)
        for step in range(1, 5):  # steps of 20 s; two more steps' time kept in reserve
            clock.now += 20.0
            reporter.on_step(step=step, epoch=1, lr=0.1, loss=1.0, images_per_s=8.0, total_steps=300,
                             progress=min(1.0, (clock.now + 40.0) / 120.0))
        reporter.on_done()
    lines = [line.split("  ")[0] for line in capsys.readouterr().out.splitlines()]
    assert lines == ["training for up to 300 steps (time budget 2m00s)", "step 2 of about 4", "step 4 of about 4"]


@pytest.mark.parametrize("budget", [False, True], ids=["epochs", "time-budget"])
def test_resuming_a_finished_run_says_only_that_it_exports_again(small_digits_folder, tmp_path, monkeypatch, budget):
    """It said "resuming r13 at epoch 2, step 3", "training for 0 steps" (or under --max-time "training for 93
    steps"), then "r13 had already finished"."""
    out = tmp_path / "done"
    if budget:  # steps of about 6 s: the budget ends the run after a few
        monkeypatch.setattr(train, "time", SteadyClock(2.0))
    length = ["--epochs", "100", "--max-time", "20s"] if budget else ["--epochs", "1"]
    result = runner.invoke(app, ["pretrain", str(small_digits_folder), "--out", str(out), "--batch-size", "64",
                                 *length, *FAST])
    assert result.exit_code == 0, result.output
    steps = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert steps < 100 * 3 if budget else steps == 3
    assert ("time budget: stopping after step" in result.output) == budget, "said where the budget ends the run"
    result = runner.invoke(app, ["pretrain", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "time budget" not in output, output
    assert f"{out} had already finished; exporting its encoder again" in output
    assert f"resuming {out}" not in output and "training for" not in output, output
    assert f"encoder saved to {out / 'encoder.safetensors'} ({steps} step{'' if steps == 1 else 's'}," in output


def test_a_run_resumed_on_fewer_images_than_its_steps_need_ends_there(small_digits_folder, tmp_path, capsys):
    """Stopped at step 9 of 12 (the second epoch's third), resumed on 64 of its 200 images (the first epoch's 6
    steps and 2 for the second): it said "training for -2 steps", took one more at lr 0 and ended. It now exports
    at once, and says why."""
    def interrupt_at_step_9(kind, **fields):
        if kind == "step" and fields["step"] == 9:
            os.kill(os.getpid(), signal.SIGINT)

    out, fewer = tmp_path / "run", tmp_path / "fewer"
    fewer.mkdir()
    for path in sorted(small_digits_folder.rglob("*.png"))[:64]:
        shutil.copy(path, fewer / f"{path.parent.name}_{path.name}")
    assert pretrain(_config(small_digits_folder, out), interrupt_at_step_9).interrupted
    capsys.readouterr()
    result = runner.invoke(app, ["pretrain", "--resume", str(out), str(fewer), "--workers", "0"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert f"{fewer} now gives 8 steps in 2 epochs, and the run has taken 9: it ends here" in output
    assert "training for" not in output and "(9 steps," in output, "nothing to train: no count of steps"
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()][-1] == 9
    assert (out / "encoder.safetensors").is_file()


def test_a_resumed_time_budget_keeps_its_schedule_going_down(small_digits_folder, tmp_path, monkeypatch):
    """Under --max-time the schedule never moves back, and keeps one more step's time in reserve; a run
    resumed mid-budget forgot both, and its learning rate went up again."""
    monkeypatch.setattr(train, "time", SteadyClock(2.0))  # steps of 6 s: 12 s kept in reserve

    def interrupt_at_step_6(kind, **fields):
        if kind == "step" and fields["step"] == 6:
            os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "budget"
    config = dataclasses.replace(_config(small_digits_folder, out, epochs=1000), max_time=100.0, warmup_epochs=0.0)
    assert pretrain(config, interrupt_at_step_6).interrupted
    resume_pretrain(out)
    rates = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rates) > 8 and all(a >= b for a, b in zip(rates, rates[1:])), rates


def test_non_finite_loss_stops_with_a_clear_message(small_digits_folder, tmp_path):
    out = tmp_path / "nan"
    result = runner.invoke(app, ["pretrain", str(small_digits_folder), "--out", str(out), "--epochs", "3",
                                 "--batch-size", "32", "--optimizer", "sgd", "--lr", "1e30", *FAST])
    assert result.exit_code == 1, result.output
    assert "the loss became" in result.output and "Lower --lr" in result.output
    assert "run again with another --out" in result.output  # this --out holds the diverged run's files
    assert "no checkpoint had been written yet" in result.output
    assert "Traceback" not in result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and all(math.isfinite(r["loss"]) for r in records), "the steps before it are kept"
    assert (out / "curves.png").is_file(), "and drawn"
    assert not (out / "encoder.safetensors").exists()


def test_weights_made_non_finite_by_the_last_update_are_never_saved(tmp_path, monkeypatch):
    """A step's loss is taken before its update: at --lr 3e38 (now refused) the first step logged a finite loss and
    left infinite weights, which were checkpointed and exported as a good encoder (exit 0). The update's effect
    is made here directly, after the epoch's one step."""
    data = tmp_path / "images"
    data.mkdir()
    for seed in range(16):
        pixels = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(data / f"{seed}.png")
    train_one_epoch = train.PretrainRun.train_one_epoch

    def and_break_a_weight(self, *args, **kwargs):
        metrics = train_one_epoch(self, *args, **kwargs)
        with torch.no_grad():
            next(self.model.parameters()).fill_(float("inf"))
        return metrics

    monkeypatch.setattr(train.PretrainRun, "train_one_epoch", and_break_a_weight)
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(data), "--out", str(out), "--epochs", "2", "--batch-size", "16",
                                 *FAST])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "the weights became NaN or infinite by step 1" in text and "no checkpoint had been written yet" in text
    assert "Lower --lr" in text and "Traceback" not in text
    assert all(math.isfinite(r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()))
    assert not (out / "checkpoint.safetensors").exists() and not (out / "encoder.safetensors").exists()
    assert (out / "curves.png").is_file()


def test_a_repeated_sigterm_is_one_request_and_a_later_one_stops_at_once(monkeypatch):
    """A group's SIGTERM reaches a --devices process from the sender and again from its launcher: one request
    to save. Later, or Ctrl-C twice however quickly, the second signal stops at once."""
    clock = [100.0]
    monkeypatch.setattr(runtime, "time", type("Clock", (), {"monotonic": staticmethod(lambda: clock[0])}))
    before = signal.getsignal(signal.SIGTERM)
    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler before the next line
        assert stop.signal == signal.SIGTERM
        clock[0] += StopFlag.REPEAT_SECONDS * 0.9
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal == signal.SIGTERM
        clock[0] += StopFlag.REPEAT_SECONDS * 0.2
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) == before


def test_the_first_signal_is_answered_from_another_thread_and_the_second_is_not(capsys):
    """The answer says the request was heard while the main thread is still inside a step; a print from the signal
    handler itself could land inside the main thread's own print."""
    answers = []
    with StopFlag(lambda name: answers.append((name, threading.current_thread() is threading.main_thread()))):
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert answers == [("SIGTERM", False)]  # joined on leaving: said before whatever comes next
    Reporter(quiet=True)("stopping", text="SIGTERM: saving")  # said even under --quiet
    assert capsys.readouterr().err == "SIGTERM: saving\n"


def test_a_crash_mid_epoch_resumes_from_the_last_timed_checkpoint(small_digits_folder, tmp_path, monkeypatch):
    """Checkpoints came only at the end of an epoch (or on a signal), so a crash or a lost machine lost the whole
    epoch, hours on a large folder. One is also written every CHECKPOINT_SECONDS (here: after every step)."""
    straight = tmp_path / "straight"
    pretrain(_config(small_digits_folder, straight, epochs=1))
    monkeypatch.setattr(train, "CHECKPOINT_SECONDS", 0.0)

    def crash_at_step_3(kind, **fields):
        if kind == "step" and fields["step"] == 3:
            raise MemoryError("out of memory")

    crashed = tmp_path / "crashed"
    with pytest.raises(MemoryError):
        pretrain(_config(small_digits_folder, crashed, epochs=1), crash_at_step_3)
    saved = load_checkpoint(crashed / "checkpoint.safetensors").progress["state"]
    assert saved["step"] == saved["step_in_epoch"] == 2 and saved["epoch"] == 0
    result = resume_pretrain(crashed)
    assert result.state.step == 6 and losses(crashed) == losses(straight)
    a, b = load_file(str(straight / "encoder.safetensors")), load_file(str(crashed / "encoder.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_timed_checkpoints_are_no_step_time_and_not_doubled_at_an_epoch_end(small_digits_folder, tmp_path,
                                                                            monkeypatch):
    """The step after a timed save counted the save as its time (its images/s dropped every 10 minutes), and a
    timed save on an epoch's last step was followed at once by the epoch's own."""
    clock = SteadyClock()
    monkeypatch.setattr(train, "time", clock)
    monkeypatch.setattr(train, "CHECKPOINT_SECONDS", 0.0)
    saves = []
    save_checkpoint = train.PretrainRun.save_checkpoint

    def slow_save(run):  # a save of 100 s, on a slow disk
        saves.append(run.state.step)
        clock.now += 100.0
        save_checkpoint(run)

    monkeypatch.setattr(train.PretrainRun, "save_checkpoint", slow_save)
    out = tmp_path / "run"
    pretrain(_config(small_digits_folder, out, epochs=2))
    assert saves == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]  # once a step: the epoch's own at 6 and 12
    speeds = [json.loads(line)["images_per_s"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert min(speeds) > 0.5 * sorted(speeds)[len(speeds) // 2], speeds


def test_a_signal_during_the_export_lets_it_finish(small_digits_folder, tmp_path, monkeypatch):
    """Ctrl-C while the encoder is written came too late to stop the training, and left an encoder without its
    head.safetensors, silently (exit 130 and no word): the export now finishes, and the run with it."""
    save_encoder = train.save_encoder

    def interrupted_save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return save_encoder(*args, **kwargs)

    monkeypatch.setattr(train, "save_encoder", interrupted_save)
    out, replies = tmp_path / "run", []
    result = pretrain(_config(small_digits_folder, out, epochs=1),
                      lambda kind, **fields: kind == "stopping" and replies.append(fields["text"]))
    assert not result.interrupted and result.encoder_path == out / "encoder.safetensors"
    assert replies == ["Ctrl-C: training is over; writing the encoder first (Ctrl-C again stops at once, and "
                       "`--resume` finishes the run)"]
    assert (out / "encoder.safetensors").is_file() and (out / "head.safetensors").is_file()


def test_a_second_signal_stops_at_once_and_says_so(monkeypatch, tmp_path):
    def stopped_at_once(*args, **kwargs):
        raise KeyboardInterrupt  # what StopFlag raises on a second signal

    monkeypatch.setattr(train, "PretrainRun", stopped_at_once)
    (tmp_path / "images").mkdir()
    result = runner.invoke(app, ["pretrain", str(tmp_path / "images"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 130
    assert "stopped at once" in result.output and "--resume" in result.output


def test_a_reader_of_the_output_that_goes_away_does_not_stop_the_run(small_digits_folder, tmp_path):
    """`simclr pretrain ... | head -1`: rich exited with 1 at the first line it could not write, ending the run
    without an encoder. The output now goes nowhere and the run goes on."""
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "simclr_cli", "pretrain", str(small_digits_folder), "--out",
                                str(out), "--epochs", "1", "--batch-size", "64", *FAST],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout.readline()  # the first line, then the reader is gone
    process.stdout.close()
    assert process.wait(timeout=300) == 0
    assert (out / "encoder.safetensors").is_file()


def test_the_console_goes_quiet_when_its_reader_goes_away():
    from simclr_cli.progress import console

    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "w") as stream:
        quiet = type(console)(file=stream)
        quiet.print("a result")  # rich's own Console raised SystemExit(1) here
        assert quiet.quiet


@pytest.mark.parametrize("group", [False, True], ids=["process", "process-group"])
def test_sigterm_saves_a_checkpoint_and_exits(small_digits_folder, tmp_path, group):
    """SIGTERM to the main process, or to its whole process group (Slurm's scancel, `kill -- -PGID`), loader
    workers included: they must leave the stopping to the main process, not die and take the run with them."""
    out = tmp_path / "term"
    process = subprocess.Popen([sys.executable, "-m", "simclr_cli", "pretrain", str(small_digits_folder),
                                "--out", str(out), "--epochs", "100", "--batch-size", "16", *FAST,
                                *(["--workers", "1"] if group else [])],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=group)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    if group:
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "simclr pretrain --resume" in stderr and "Traceback" not in stderr
    state = load_checkpoint(out / "checkpoint.safetensors").progress["state"]
    assert state["step"] >= 2 and not state["finished"]


def _killed_at(monkeypatch, index: int) -> None:
    """The loader worker that reaches image `index` is killed, as by the kernel's OOM killer (the main process, with no
    workers, reads it)."""
    real = ImageDataset.__getitem__

    def getitem(dataset, at):
        if at == index and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(dataset, at)

    monkeypatch.setattr(ImageDataset, "__getitem__", getitem)


def test_a_killed_loader_worker_saves_the_last_step_and_says_how_to_go_on(small_digits_folder, tmp_path, monkeypatch):
    """A loader worker killed (out of memory) ended the run with PyTorch's 290-line traceback, sometimes in the middle
    of a step, and without a checkpoint. The run now saves its last whole step and says in one line what to do; the
    resumed run trains as if nothing had happened."""
    straight = tmp_path / "straight"
    pretrain(_config(small_digits_folder, straight, epochs=1))
    _killed_at(monkeypatch, epoch_order(200, 3, 0)[3 * 32])  # the fourth of 6 batches of 32
    killed = tmp_path / "killed"
    with pytest.raises(WorkerDied) as stop:
        pretrain(_config(small_digits_folder, killed, workers=1, epochs=1))
    step = load_checkpoint(killed / "checkpoint.safetensors").progress["state"]["step"]
    assert 1 <= step <= 3 and len(losses(killed)) == step, "saved after the steps it took, as many as it logged"
    assert str(stop.value) == (f"a loader worker died (killed by signal: Killed), perhaps out of memory; the run is "
                               f"saved at step {step}. Continue with fewer workers: simclr pretrain --resume "
                               f"{killed} --workers 0")
    with pytest.raises(WorkerDied) as stop:  # again, in a resume given --device: not saved, so said again
        resume_pretrain(killed, workers=1, device="cpu")
    assert str(stop.value).endswith(f"Continue with fewer workers: simclr pretrain --resume {killed} --workers 0 "
                                    f"--device cpu")
    cli = runner.invoke(app, ["pretrain", "--resume", str(killed), "--workers", "0"])
    assert cli.exit_code == 0, cli.output
    assert losses(killed) == losses(straight)
    a, b = load_file(str(straight / "encoder.safetensors")), load_file(str(killed / "encoder.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_killed_loader_worker_is_one_line_and_exit_code_1(small_digits_folder, tmp_path, monkeypatch):
    _killed_at(monkeypatch, epoch_order(200, 0, 0)[32])  # the second batch
    result = runner.invoke(app, ["pretrain", str(small_digits_folder), "--out", str(tmp_path / "run"), "--epochs", "1",
                                 "--batch-size", "32", "--seed", "0", *FAST, "--workers", "1"])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert re.search(r"error: a loader worker died \(killed by signal: Killed\), perhaps out of memory; the run is "
                     r"saved at step [01]\. Continue with fewer workers: simclr pretrain --resume .* --workers 0$",
                     text), text
    assert result.output.count("error:") == 1 and "Traceback" not in result.output


@pytest.mark.parametrize("args,message", [
    (["pretrain", "{missing}"], "no such folder"),
    (["pretrain", "{empty}"], "no image files"),
    (["pretrain", "{broken}"], "/broken: 1 unreadable file(s), no readable image, the first "),
    (["pretrain", "{broken}"], "/broken/a.jpg: unreadable: UnidentifiedImageError: cannot identify image file; "
                               "replace or remove the damaged files"),
    (["pretrain", "{empty}", "--arch", "vgg16"], "--arch 'vgg16' is unknown"),
    (["pretrain", "{empty}", "--max-time", "soon"], "--max-time 'soon' is not a duration"),
    (["pretrain", "{empty}", "--weight-decay", "inf"], "--weight-decay inf must be a finite number"),
    (["pretrain", "{empty}", "--batch-size", "many"], "--batch-size"),
    (["pretrain", "{empty}", "--device", "cuda:7"], "--device cuda:7"),
    (["pretrain", "{two}", "--device", "cpu:1"], "--device cpu:1: cpu has one device, not numbered ones"),
    (["pretrain", "{empty}", "--seed", "99999999999999999999999"], "--seed 99999999999999999999999 is out of range"),
    (["pretrain", "{broken}", "--out", "{broken}"], "already holds files"),
    (["pretrain", "{broken}", "--out", "{file}"], "is a file; pass a folder"),
    (["pretrain", "{two}", "--out", "{file}/run", *FAST], "a folder on its path is a file"),
    (["pretrain", "{one}"], "only one image; SimCLR contrasts"),
    (["pretrain", "--resume", "{empty}"], "no config.json"),
    (["pretrain", "--resume", "{finetuned}"], "a `simclr finetune` run; continue it with `simclr finetune --resume"),
    (["pretrain", "--resume", "{finetuned_done}"], "a finished `simclr finetune` run, nothing to resume; pass the "
                                                   "folder of a run that `simclr pretrain` started"),
    (["pretrain", "--resume", "{file}"], "/file: a file, not a run folder; pass the folder of a run that "
                                         "`simclr pretrain` started"),
    (["pretrain", "{two}", "--out", "{finetuned}"], "already holds files; choose an empty folder, or pass another"),
    (["pretrain", "--resume", "{empty}", "--devices", "5000"], "--devices 5000 is too many; use at most 1024"),
    (["pretrain", "--resume", "{empty}", "--epochs", "200", "--lr", "0.1"],
     "--epochs, --lr with --resume: the run keeps the settings it started with"),
    (["pretrain"], "give the folder of images"),
    (["pretrain", "{empty}", "--precision", "fp16", "--device", "cpu"], "fp16 needs a CUDA GPU"),
    (["pretrain", "{two}", "--max-time", ""], "--max-time '' is not a duration"),  # "$BUDGET", unset: no budget
    (["pretrain", ""], "'DATA_DIR': is empty (an unset shell variable?)"),  # "$DATA", unset: the working folder
    (["pretrain", "{two}", "--out", " "], "'--out': is empty"),
    (["embed", "{two}", "", "x.npy"], "'IMAGES': is empty"),
    (["similar", "{two}", "--index", ""], "'--index': is empty"),
    (["finetune", "--resume", ""], "'--resume': is empty"),
])
def test_user_errors_exit_1_with_one_clear_line(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.jpg").write_text("not a jpeg")
    (tmp_path / "one").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "a.png")
    (tmp_path / "two").mkdir()
    for index in range(2):
        Image.new("RGB", (8, 8), (index * 50, 0, 0)).save(tmp_path / "two" / f"{index}.png")
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "finetuned").mkdir()  # a run folder of `simclr finetune`
    finetune_config = FinetuneConfig(model="encoder.safetensors", data=LabelledDataConfig(str(tmp_path / "two")),
                                     out_dir=str(tmp_path / "finetuned"))
    (tmp_path / "finetuned" / "config.json").write_text(json.dumps(finetune_config.to_json()))
    shutil.copytree(tmp_path / "finetuned", tmp_path / "finetuned_done")
    (tmp_path / "finetuned_done" / "finetuned.safetensors").write_bytes(b"")  # its product: the run finished
    paths = {name: str(tmp_path / name) for name in ("missing", "empty", "broken", "one", "two", "file", "finetuned",
                                                      "finetuned_done")}
    result = runner.invoke(app, [a.format(**paths) for a in args])
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_a_run_folder_given_as_data_dir_and_a_folder_of_runs_are_named_as_such(tmp_path):
    """`simclr pretrain runs/digits`: its curves.png was the only image, and the error said 'only one image'."""
    run = tmp_path / "runs" / "digits"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"out_dir": str(run), "runtime": {"seed": 0}}))
    (run / "metrics.jsonl").write_text("")
    Image.new("RGB", (8, 8)).save(run / "curves.png")
    result = runner.invoke(app, ["pretrain", str(run), "--out", str(tmp_path / "new"), *FAST])
    assert result.exit_code == 1, result.output
    assert result.output.strip() == (f"error: DATA_DIR {run}: a simclr run folder, not a folder of images; pass the "
                                     f"folder of images; to continue a pretrain run, pass --resume RUN"), result.output
    assert not (tmp_path / "new").exists()
    # a folder that holds only runs: "no image files" did not say why
    result = runner.invoke(app, ["pretrain", str(run.parent), "--out", str(tmp_path / "new"), *FAST])
    assert result.exit_code == 1, result.output
    assert result.output.strip() == (f"error: DATA_DIR {run.parent}: no image files; passed over 1 folder(s) of simclr "
                                     f"runs in {run.parent}: {run} (their plots are no photos); put JPEG, PNG, WebP, "
                                     f"BMP, GIF or TIFF images in it (any depth)"), result.output


def test_version_and_help_list_every_command():
    assert runner.invoke(app, ["--version"]).output.startswith("simclr ")
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    for command in ("pretrain", "linear-eval", "finetune", "embed", "similar"):
        assert command in result.output


def test_time_budget_schedule_never_goes_back_up(small_digits_folder, tmp_path, monkeypatch):
    """Steps of uneven length (the reserve for one more step follows the latest): the rate only goes down."""
    monkeypatch.setattr(train, "time", SteadyClock(0.1, 0.2, 1.5, 0.1, 0.1))
    out = tmp_path / "monotone"
    result = runner.invoke(app, ["pretrain", str(small_digits_folder), "--out", str(out), "--epochs", "1000",
                                 "--batch-size", "16", "--max-time", "20s", "--warmup-epochs", "0", *FAST])
    assert result.exit_code == 0, result.output
    rates = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "lr" in json.loads(line)]
    assert len(rates) >= 5 and all(a >= b for a, b in zip(rates, rates[1:])), rates



def test_a_slow_first_step_does_not_push_the_time_budgets_schedule_ahead(small_digits_folder, tmp_path, monkeypatch):
    """The session's first step takes 20 s more (torch.compile, cuDNN's autotuning), the others about 1 s.
    Reserved from the latest step, that step counted 40 s more of a 90 s budget as spent, for good: the rate
    fell to a quarter of its peak at once and stayed there for 40 steps. The reserve follows a typical step,
    each session's first left out: after the 20 s are spent, the cosine goes on from where they left it."""
    clock = SteadyClock()
    monkeypatch.setattr(train, "time", clock)
    step = train.PretrainRun._step
    calls = []

    def slow_first(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            clock.now += 20.0
        return step(self, *args, **kwargs)

    monkeypatch.setattr(train.PretrainRun, "_step", slow_first)
    out = tmp_path / "slow-start"
    config = dataclasses.replace(_config(small_digits_folder, out, epochs=1000), max_time=90.0, warmup_epochs=0.0)
    pretrain(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["lr"] for r in records]
    peak = 0.075 * math.sqrt(json.loads((out / "config.json").read_text())["batch_size"])
    assert len(records) >= 30 and records[-1]["time"] <= 90.0, records[-1]
    progress = (records[0]["time"] + 1.0) / 90  # after the first step, the least reserve (no typical step yet)
    assert rates[1] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * progress)), rel=0.05), rates
    assert all(a > b for a, b in zip(rates[1:], rates[2:])) and rates[-1] < 0.1 * peak, rates


def _forty_second_steps(monkeypatch) -> None:
    """Every step takes 40 s on a clock that stands still otherwise."""
    clock = SteadyClock(0.0)
    monkeypatch.setattr(train, "time", clock)
    step = train.PretrainRun._step

    def slow(self, *args, **kwargs):
        clock.now += 40.0
        return step(self, *args, **kwargs)

    monkeypatch.setattr(train.PretrainRun, "_step", slow)


def test_steps_longer_than_half_the_budget_left_do_not_overrun_it(small_digits_folder, tmp_path, monkeypatch):
    """Every step takes 40 s of a 70 s budget. Leaving the first step out of the reserve (it may be compilation)
    must not mean guessing 1 s for the second: the run stops after one step, at 40 s, not at 80."""
    _forty_second_steps(monkeypatch)
    out = tmp_path / "long-steps"
    pretrain(dataclasses.replace(_config(small_digits_folder, out, epochs=1000), max_time=70.0))
    times = [json.loads(line)["time"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert times == [40.0], times


def test_a_time_budget_that_ends_the_run_says_why(small_digits_folder, tmp_path, monkeypatch):
    """`--max-time 30s` printed "training for up to 1400 steps", then "encoder saved ... (1 steps, ...)" at
    13.7 s, and nothing said why. Here every step takes 40 s of a 70 s budget: after the first, the 80 s kept
    for one more step and the export would pass it."""
    _forty_second_steps(monkeypatch)
    out = tmp_path / "long-steps"
    result = runner.invoke(app, ["pretrain", str(small_digits_folder), "--out", str(out), "--epochs", "1000",
                                 "--batch-size", "32", "--max-time", "70s", *FAST])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert ("time budget: stopping after step 1 of up to 6000, at 0m40s of 1m10s: the 80.0 s it keeps for one "
            "more step and the export (twice the first step's time) would pass it") in output, output
    assert f"encoder saved to {out / 'encoder.safetensors'} (1 step, 32 images, mean loss " in output
    loss = json.loads((out / "metrics.jsonl").read_text())["loss"]
    assert f"mean loss {loss:.4f} over the 1 step of epoch 1 the time budget left)" in output, output


@pytest.mark.parametrize("good", [0, 1])
def test_a_folder_where_no_two_images_decode_is_a_one_line_error(tmp_path, cut_image, good):
    """Headers that read, data that does not: every batch is skipped. The run stops at the end of the first
    epoch instead of exporting a random encoder with exit code 0. One image that decodes has no negatives: its
    loss was exactly 0, and the run exported an untrained encoder."""
    data = tmp_path / "data"
    data.mkdir()
    for index in range(4):
        if index < good:
            Image.fromarray(np.random.default_rng(index).integers(0, 255, (40, 40, 3), np.uint8)).save(
                data / f"{index}.png")
        else:
            cut_image(data / f"{index}.png", index)
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(data), "--out", str(out), "--epochs", "3", "--batch-size", "2",
                                 *FAST])
    assert result.exit_code == 1, result.output
    assert "no batch of a whole epoch held two images that could be decoded" in " ".join(result.output.split())
    assert "Traceback" not in result.output and not (out / "encoder.safetensors").exists()


def test_a_run_folder_inside_its_data_is_not_scanned_as_data(small_digits_folder, tmp_path):
    """`simclr pretrain .` from the photos puts runs/ among them. The run's curves.png is not an image to
    train on: resuming finds the images it started with, and the same order."""
    data = tmp_path / "data"
    shutil.copytree(small_digits_folder, data)
    out = data / "runs" / "first"
    result = runner.invoke(app, ["pretrain", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "64",
                                 *FAST])
    assert result.exit_code == 0, result.output
    assert (out / "curves.png").is_file()
    result = runner.invoke(app, ["pretrain", "--resume", str(out), "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "now holds" not in result.output, result.output
    assert len(scan_images(data, exclude=out).paths) == len(scan_images(small_digits_folder).paths)
    # Nor is it for the next run from there: a second run trained on the first's curves.png.
    assert len(scan_images(data).paths) == len(scan_images(small_digits_folder).paths)
    second = runner.invoke(app, ["pretrain", str(data), "--out", str(data / "runs" / "second"), "--epochs", "1",
                                 "--batch-size", "64", *FAST])
    assert second.exit_code == 0, second.output
    assert f"{len(scan_images(small_digits_folder).paths):,} images in {data}" in second.output
    assert f"passed over 1 folder(s) of simclr runs in {data}: {out}" in " ".join(second.output.split())


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc, where no folder can be made")
@pytest.mark.parametrize("command", ["pretrain", "linear-eval", "finetune", "embed"])
def test_an_output_that_cannot_be_made_is_a_one_line_error(command, small_digits_folder, tiny_encoder):
    """An OSError no check foresaw (here: no folder can be made in /proc) is one line and exit 1."""
    out = "/proc/simclr-cannot-be-made/out"
    data = str(small_digits_folder)
    args = {"pretrain": [data, "--out", out, *FAST], "linear-eval": [str(tiny_encoder), data, "--out", out, *CPU[4:]],
            "finetune": [str(tiny_encoder), data, "--out", out, *CPU[4:]],
            "embed": [str(tiny_encoder), data, out + ".npy", *CPU[4:]]}[command]
    result = runner.invoke(app, [command, *args])
    assert result.exit_code == 1, result.output
    assert "/proc/simclr-cannot-be-made" in result.output and "Traceback" not in result.output, result.output
    assert result.output.strip().splitlines()[-1].startswith("error:"), result.output


def test_a_batch_of_unreadable_images_is_skipped_once(tmp_path, cut_image):
    """3 good images and 3 that fail to decode, batches of 2: a batch without two readable images is
    skipped (one image alone has no negatives), the others train once each, and the run ends (it looped
    for ever when the last batch of an epoch was the skipped one)."""
    data = tmp_path / "data"
    data.mkdir()
    for index in range(3):
        Image.fromarray(np.random.default_rng(index).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(
            data / f"a{index}.png")  # positions 0 to 2
    for index in range(3):
        cut_image(data / f"b{index}.png", 10 + index)

    def trains(order, step):  # both images of the step decode
        return max(order[2 * step:2 * step + 2]) < 3

    # epoch 1 trains, then ends on a skipped step
    seed = next(s for s in range(1000) if not trains(epoch_order(6, s, 0), 2) and trains(epoch_order(6, s, 0), 0))
    trained = sum(trains(epoch_order(6, seed, epoch), step) for epoch in range(2) for step in range(3))
    try:
        done = subprocess.run([sys.executable, "-m", "simclr_cli", "pretrain", str(data), "--out",
                               str(tmp_path / "run"), "--batch-size", "2", "--epochs", "2", "--seed", str(seed),
                               "--quiet", *FAST],
                              capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("2 epochs of 3 steps were still running after 300 s")
    assert done.returncode == 0, done.stderr
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([s for s in steps if "step" in s]) == trained < 6


def test_a_folder_smaller_than_the_batch_trains_at_the_learning_rate_of_its_real_batch(tmp_path):
    """6 images and --batch-size 64: the batch is 6, and so are the lr rule (0.075 x sqrt(batch)) and config.json."""
    data = tmp_path / "six"
    data.mkdir()
    for index in range(6):
        Image.fromarray(np.random.default_rng(index).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
            data / f"{index}.png")
    peak = 0.075 * math.sqrt(6)
    runs = {}
    for name, lr in (("default", []), ("explicit", ["--lr", str(peak)])):
        runs[name] = runner.invoke(app, ["pretrain", str(data), "--out", str(tmp_path / name), "--epochs", "2",
                                         "--batch-size", "64", *lr, *FAST])
        assert runs[name].exit_code == 0, runs[name].output
    assert "using batch size 6 instead of 64" in runs["default"].output
    assert f"batch 6, lr {peak:g}" in runs["default"].output
    assert json.loads((tmp_path / "default" / "config.json").read_text())["batch_size"] == 6
    rates = {name: [json.loads(line)["lr"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
             for name in runs}
    assert len(rates["default"]) == 2 and rates["default"] == pytest.approx(rates["explicit"]), rates


def test_a_resume_on_a_folder_that_grew_still_ends_its_schedule_at_the_last_step(small_digits_folder, tmp_path):
    """The steps were all counted in the new folder's epochs, the first (done) included: the run ended at its
    last epoch with the schedule short of its end, the learning rate far from zero."""
    data = tmp_path / "data"
    shutil.copytree(small_digits_folder, data)

    def interrupt_at(step):
        def report(kind, **fields):
            if kind == "step" and fields["step"] == step:
                os.kill(os.getpid(), signal.SIGINT)
        return report

    run = tmp_path / "run"
    config = _config(data, run, epochs=2)
    assert pretrain(config, interrupt_at(8)).interrupted  # in the second epoch: 6 steps of 32 a first one
    for path in sorted(data.rglob("*.png"))[:64]:  # two more steps an epoch
        shutil.copy(path, path.with_name(f"more-{path.name}"))
    warnings = []
    assert resume_pretrain(run, lambda kind, **fields: (kind == "warning" and warnings.append(fields["text"]),
                                                        interrupt_at(10)(kind, **fields))).interrupted
    assert any("data order differs" in text for text in warnings)
    result = resume_pretrain(run)  # the second resume sees no change, and must not count the first epoch in 8 steps
    assert result.state.step == 6 + 8
    rates = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rates[-1] < 0.01 * config.resolved_lr, "the schedule ends with the run"


def test_a_resume_that_computes_in_another_precision_says_so(small_digits_folder, tmp_path, monkeypatch):
    """--precision auto is decided per session, by the device: a run resumed on a machine with bf16 switched from
    fp32 without a word (config.json keeps "auto")."""
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)

    def interrupt_at_step_2(kind, **fields):
        if kind == "step" and fields["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    run = tmp_path / "run"
    assert pretrain(_config(small_digits_folder, run, epochs=1), interrupt_at_step_2).interrupted
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    warnings = []
    resume_pretrain(run, lambda kind, **fields: kind == "warning" and warnings.append(fields["text"]))
    assert [text for text in warnings if "precision" in text] == [
        "this session computes in bf16, the run's earlier ones in fp32 (--precision auto decides by the device): "
        "the run goes on, but not as an uninterrupted one would have"]


def test_a_resume_on_other_images_as_many_warns(small_digits_folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_digits_folder, data)
    run = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(data), "--out", str(run), "--epochs", "1", "--batch-size", "64",
                                 *FAST])
    assert result.exit_code == 0, result.output
    moved = tmp_path / "moved"
    data.rename(moved)
    result = runner.invoke(app, ["pretrain", "--resume", str(run), str(moved), "--workers", "0"])
    assert result.exit_code == 0 and "other images" not in result.output, result.output  # moved, not changed
    first = sorted(moved.rglob("*.png"))[0]
    first.rename(first.with_name(f"renamed-{first.name}"))
    result = runner.invoke(app, ["pretrain", "--resume", str(run), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "holds other images than the run's first session" in " ".join(result.output.split())


@pytest.mark.parametrize("moving", ["data_dir", "monitor"])
def test_a_folder_given_on_resume_is_kept_for_the_next_one(small_digits_folder, tmp_path, moving):
    """`--resume RUN DATA_DIR` for data that moved: config.json now names the new folder, so the next
    `--resume RUN` finds it (it looked in the old place). The --monitor folder likewise (a resume of a run
    whose monitor folder had moved was refused whatever was given)."""
    old, new = tmp_path / "old", tmp_path / "new"
    shutil.copytree(small_digits_folder, old)
    run = tmp_path / "run"
    data, monitor = (old, small_digits_folder) if moving == "data_dir" else (small_digits_folder, old)
    result = runner.invoke(app, ["pretrain", str(data), "--out", str(run), "--epochs", "1", "--batch-size", "64",
                                 "--monitor", str(monitor), *FAST])
    assert result.exit_code == 0, result.output
    old.rename(new)
    if moving == "data_dir":  # said plainly, with the fix
        result = runner.invoke(app, ["pretrain", "--resume", str(run), "--workers", "0"])
        assert result.exit_code == 1 and f"the run's images ({old}, saved in its config.json) are not there; if " \
            f"they moved, pass their new place" in " ".join(result.output.split()), result.output
    for args in ([str(new)] if moving == "data_dir" else ["--monitor", str(new)], []):
        result = runner.invoke(app, ["pretrain", "--resume", str(run), *args, "--workers", "0"])
        assert result.exit_code == 0, (args, result.output)
    assert json.loads((run / "config.json").read_text())[moving] == str(new)


def test_a_run_started_with_relative_paths_resumes_from_another_working_directory(small_digits_folder, tmp_path,
                                                                                   monkeypatch):
    """config.json keeps the data, --monitor and --cache-dir folders as absolute paths: `--resume` from another
    directory found none of them when they were given relative (the monitor was "no such folder")."""
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(start)
    data = os.path.relpath(small_digits_folder, start)
    result = runner.invoke(app, ["pretrain", data, "--out", "run", "--epochs", "1", "--batch-size", "64",
                                 "--monitor", data, "--cache", "--cache-dir", "cache", *FAST])
    assert result.exit_code == 0, result.output
    saved = json.loads((start / "run" / "config.json").read_text())
    assert saved["data_dir"] == saved["monitor"] == str(small_digits_folder)
    assert saved["cache_dir"] == str(start / "cache")
    monkeypatch.chdir(elsewhere)
    resumed = runner.invoke(app, ["pretrain", "--resume", str(start / "run"), "--workers", "0"])
    assert resumed.exit_code == 0, resumed.output
    assert "of 200 images stored" in resumed.output and not (elsewhere / "cache").exists(), "the same cache"


def test_a_new_run_is_held_against_a_resume_while_it_trains(small_digits_folder, tmp_path):
    """A `--resume` of a run still starting (no lock then) trained it twice over, into the same files."""
    out, answers = tmp_path / "run", []

    def report(kind, **fields):
        if kind == "step" and not answers:
            try:
                resume_pretrain(out)
                answers.append("resumed")
            except ConfigError as error:
                answers.append(str(error))
    pretrain(_config(small_digits_folder, out, epochs=1), report)
    assert answers == [f"--resume {out} is in use by another simclr process; let it finish, or stop it, then run "
                       f"again"]
    with held(out, "--resume"):  # let go at the end
        pass


def test_a_run_in_use_is_refused_to_a_second_resume(tiny_encoder, tmp_path):
    """Two resumes of one run would write the same checkpoint and logs: the second is refused, nothing touched."""
    run = shutil.copytree(tiny_encoder, tmp_path / "run")
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    with held(run, "--resume"):
        with pytest.raises(ConfigError, match=re.escape(f"--resume {run} is in use by another simclr process")):
            resume_pretrain(run)
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == before
    with held(run, "--resume"), pytest.raises(ConfigError, match="in use"):
        with held(run, "--resume"):
            pass
    with held(run, "--resume"):  # let go at the end of the block
        pass


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _edit_progress(checkpoint: Path, change) -> None:
    """Rewrite the checkpoint's `progress` metadata entry with change(text)."""
    metadata = read_metadata(checkpoint, "checkpoint")
    save_file(load_file(str(checkpoint)), str(checkpoint), {**metadata, "progress": change(metadata["progress"])})


def _step_as_text(text: str) -> str:
    progress = json.loads(text)
    progress["state"]["step"] = str(progress["state"]["step"])  # "6": a step count LoopState would add to
    return json.dumps(progress)


def _add_state_key(text: str) -> str:
    progress = json.loads(text)
    progress["state"]["best_loss"] = 0.5  # a key LoopState does not have
    return json.dumps(progress)


@pytest.mark.parametrize("damage,message", [
    (lambda run: _edit_json(run / "config.json", lambda c: c.update(max_time="10m")),
     "config.json is not the settings of a `simclr pretrain` run (max_time is '10m', not a number or null)"),
    (lambda run: _edit_json(run / "config.json", lambda c: c.update(epochs="5")),
     "(epochs is '5', not a whole number); pass the folder of a run"),
    (lambda run: _edit_json(run / "config.json", lambda c: c.update(arch="resnet34")),
     "checkpoint.safetensors: does not fit the run's config.json"),
    (lambda run: _edit_json(run / "config.json", lambda c: c.update(temperature=0)),
     "run: --temperature 0 is out of range; use 0.01 to 10 (the paper uses 0.1 to 0.5) (a setting saved in its"),
    (lambda run: _edit_progress(run / "checkpoint.safetensors", _add_state_key),
     "checkpoint.safetensors: does not fit the run's config.json"),
    (lambda run: _edit_progress(run / "checkpoint.safetensors", _step_as_text),
     "checkpoint.safetensors: does not fit the run's config.json"),
    (lambda run: _edit_progress(run / "checkpoint.safetensors", lambda text: text[:-1]),
     "checkpoint.safetensors: its 'progress' entry is missing or not JSON"),
    (lambda run: (run / "checkpoint.safetensors").unlink(),  # was taken for a run stopped in its first epoch
     "the run finished (encoder.safetensors is there) and its checkpoint.safetensors is gone"),
], ids=["max-time-text", "epochs-text", "arch-changed", "temperature-zero", "unknown-state-key", "state-step-text",
        "progress-not-json", "finished-without-checkpoint"])
def test_resuming_a_damaged_or_edited_run_folder_is_a_one_line_error(tiny_encoder, tmp_path, damage, message):
    run = shutil.copytree(tiny_encoder, tmp_path / "run")
    damage(run)
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    result = runner.invoke(app, ["pretrain", "--resume", str(run), "--quiet"])
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == before, "nothing touched"


def test_exporting_a_finished_run_again_with_other_runtime_flags_keeps_the_encoder_file(tiny_encoder, tmp_path):
    """`--resume RUN --workers 1 --device cpu` of a finished run wrote its settings into the encoder's metadata:
    another SHA-256, and every index embedded with the encoder refused it ("the model file changed since")."""
    run = shutil.copytree(tiny_encoder, tmp_path / "run")
    before = (run / "encoder.safetensors").read_bytes()
    result = runner.invoke(app, ["pretrain", "--resume", str(run), "--workers", "1", "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (run / "encoder.safetensors").read_bytes() == before
    assert json.loads(read_metadata(run / "encoder.safetensors", "encoder")["config"])["runtime"]["workers"] == 0
    (run / "encoder.safetensors").write_bytes(before[:-8] + bytes(8))  # other weights: exported again after all
    assert runner.invoke(app, ["pretrain", "--resume", str(run), "--workers", "1", "--quiet"]).exit_code == 0
    assert (run / "encoder.safetensors").read_bytes() != before[:-8] + bytes(8)
    assert json.loads(read_metadata(run / "encoder.safetensors", "encoder")["config"])["runtime"]["workers"] == 1


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_an_interrupted_resume_names_the_runtime_flags_it_was_given(tiny_encoder, tmp_path, monkeypatch, command):
    """Given to a --resume, --workers and --device are not saved in config.json: the printed "Continue with" left
    them out, and following it went back to the saved ones (the workers that ran out of memory, say)."""
    from types import SimpleNamespace

    from simclr_cli import finetune

    run = shutil.copytree(tiny_encoder, tmp_path / "run")
    stopped = SimpleNamespace(interrupted=True, run_dir=run, state=SimpleNamespace(step=3, epoch=0))
    monkeypatch.setattr(train, "resume_pretrain", lambda *args, **kwargs: stopped)
    monkeypatch.setattr(finetune, "resume_finetune", lambda *args, **kwargs: stopped)
    result = runner.invoke(app, [command, "--resume", str(run), "--workers", "0", "--device", "cpu"])
    assert result.exit_code == 130, result.output
    assert f"Continue with: simclr {command} --resume {run} --workers 0 --device cpu" in " ".join(result.output.split())
    result = runner.invoke(app, [command, "--resume", str(run)])
    assert " ".join(result.output.split()).endswith(f"Continue with: simclr {command} --resume {run}"), result.output


def test_a_log_line_that_is_not_a_record_is_dropped_on_resume(tiny_encoder, tmp_path):
    run = shutil.copytree(tiny_encoder, tmp_path / "run")
    log = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(log + "[1, 2]\n")
    result = runner.invoke(app, ["pretrain", "--resume", str(run), "--quiet"])
    assert result.exit_code == 0, result.output
    assert (run / "metrics.jsonl").read_text() == log
    assert "encoder saved to" in result.output and "next:" not in result.output, "--quiet: the result line alone"


def test_a_file_mended_between_sessions_leaves_skipped_json_on_resume(small_digits_folder, tmp_path, unlistable):
    data = shutil.copytree(small_digits_folder, tmp_path / "data")
    (data / "mended.png").write_text("not a png yet")
    (data / "broken.png").write_text("not a png")
    def interrupt_at_step_2(kind, **fields):
        if kind == "step" and fields["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    run = tmp_path / "run"
    unlistable.add("7")  # in the first session
    assert pretrain(_config(data, run, epochs=1), interrupt_at_step_2).interrupted
    unlistable.clear()
    assert sorted(Path(s["path"]).name for s in json.loads((run / "skipped.json").read_text())) == [
        "7", "broken.png", "mended.png"]
    shutil.copy(next((small_digits_folder / "3").iterdir()), data / "mended.png")
    result = resume_pretrain(run)
    assert result.state.finished
    assert [Path(s.path).name for s in result.skipped] == ["broken.png"]
    assert [Path(s["path"]).name for s in json.loads((run / "skipped.json").read_text())] == ["broken.png"]


def test_device_auto_on_resume_replaces_a_saved_device_this_machine_lacks(tiny_encoder, tmp_path):
    """A run started with --device cuda, resumed on a machine without one: the error says to pass --device auto,
    which was taken for "not given" and kept the saved cuda."""
    run = shutil.copytree(tiny_encoder, tmp_path / "run")
    _edit_json(run / "config.json", lambda config: config["runtime"].update(device="cuda"))
    kept = runner.invoke(app, ["pretrain", "--resume", str(run), "--workers", "0"])
    if not torch.cuda.is_available():
        assert kept.exit_code == 1 and "--device cuda: no CUDA GPU is visible here" in kept.output, kept.output
    result = runner.invoke(app, ["pretrain", "--resume", str(run), "--device", "auto", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert (run / "encoder.safetensors").is_file()


def test_a_new_run_holds_its_folder_before_it_sets_up(small_digits_folder, tmp_path):
    """Two runs started at once with the same --out both found it empty while they scanned their images, and the
    second wrote its config.json over the first's before the lock refused it. Now the lock comes first."""
    out = tmp_path / "run"
    out.mkdir()
    with held(out, "--out"):  # the first run, setting up
        result = runner.invoke(app, ["pretrain", str(small_digits_folder), "--out", str(out), "--epochs", "1", *FAST])
    assert result.exit_code == 1 and f"--out {out} is in use by another simclr process" in result.output, result.output
    assert list(out.iterdir()) == [], "nothing written into the other run's folder"


def test_the_even_batch_message_says_the_learning_rate_follows_only_where_it_does():
    said = []
    assert train.use_even_batch(700, 512, lambda kind, text: said.append(text), lr_follows=False) == 350
    assert train.use_even_batch(700, 512, lambda kind, text: said.append(text), lr_follows=True) == 350
    assert said == ["using batch size 350 instead of 512: an epoch of 2 steps leaves 0 of the 700 images out, where "
                    "512 would leave 188", "using batch size 350 instead of 512: an epoch of 2 steps leaves 0 of the "
                    "700 images out, where 512 would leave 188 (the learning rate follows the batch)"]
    assert train.use_even_batch(514, 512, lambda kind, text: said.append(text), lr_follows=True) == 512
    assert len(said) == 2, "2 of 514 images left out: the batch is kept, and nothing said"
    assert train.use_even_batch(10_100, 4096, lambda kind, text: said.append(text), lr_follows=False) == 3366
    assert said[-1] == ("using batch size 3366 instead of 4096: an epoch of 3 steps leaves 2 of the 10,100 images out, "
                        "where 4096 would leave 1,908"), "counts of images as the other messages write them"


def test_a_refused_run_leaves_no_folder_behind(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "runs" / "new"
    result = runner.invoke(app, ["pretrain", str(tmp_path / "empty"), "--out", str(out), *FAST])
    assert result.exit_code == 1, result.output
    assert not (tmp_path / "runs").exists(), "the folders made for the run are removed again"

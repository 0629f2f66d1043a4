"""`simclr embed`: rows and manifest agree with the encoder, float16, resume, and every user error."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib import format as npy_format
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.data import ImageDataset
from simclr_cli.embed import (Block, EmbedConfig, Progress, _finished_rows, _rows_in, _truncate_rows, embed_folder,
                              read_progress, share_out, work_dir)
from simclr_cli.errors import ModelFileError
from simclr_cli.export import load_encoder
from simclr_cli.files import held
from simclr_cli.features import compute_features
from simclr_cli.index import state_dir
from simclr_cli.runtime import resolve_precision

runner = CliRunner()
FAST = ["--device", "cpu", "--workers", "0", "--batch-size", "4"]
TWO_PROCESS_ATOL = 1e-2  # bf16 on CPUs that have it: one thread or two may round a feature differently


def run_embed(*args: str | Path):
    return runner.invoke(app, ["embed", *FAST, *map(str, args)])


def reference_features(model: Path, paths: list[str], precision: str) -> np.ndarray:
    """Features computed directly with the encoder, for comparison with the index rows."""
    backbone, info = load_encoder(model / "encoder.safetensors")
    device = torch.device("cpu")
    features, _, _ = compute_features(backbone, info, paths, device, resolve_precision(precision, device), workers=0)
    return features.numpy()


def test_embed_writes_rows_in_manifest_order(tiny_encoder, mixed_folder, tmp_path):
    root, names = mixed_folder
    out = tmp_path / "index.npy"
    result = run_embed(tiny_encoder, root, out)
    assert result.exit_code == 0, result.output
    rows = np.load(out, allow_pickle=False)
    manifest = json.loads(out.with_suffix(".json").read_text())

    # Rows of unreadable files are not written; the manifest lists the readable ones in row order.
    assert manifest["paths"] == [str((root / name).absolute()) for name in names["good"]]
    assert sorted(Path(s["path"]).name for s in manifest["skipped"]) == sorted(Path(n).name for n in names["broken"])
    assert rows.shape == (len(names["good"]), 512) and rows.dtype == np.float32
    assert manifest["rows"] == len(rows) and manifest["dim"] == 512 and manifest["dtype"] == "float32"
    assert manifest["normalized"] is True and manifest["complete"] is True
    encoder = tiny_encoder / "encoder.safetensors"
    assert manifest["model"] == str(encoder.absolute())
    assert manifest["model_sha256"] == hashlib.sha256(encoder.read_bytes()).hexdigest()
    assert manifest["preprocessing"]["image_size"] == 32

    # The rows are computed at the precision the manifest records: auto's choice for this CPU.
    assert manifest["precision"] == resolve_precision("auto", torch.device("cpu")).name
    expected = reference_features(tiny_encoder, manifest["paths"], manifest["precision"])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(rows, expected, atol=1e-5)
    assert not work_dir(out).exists()
    assert json.loads((state_dir() / "last_index.json").read_text())["index"] == str(out.absolute())
    # ... so the next step it suggests needs no --index
    assert "next: simclr similar QUERY.jpg  (" in result.output, result.output


def test_a_state_directory_that_cannot_be_read_fails_no_embed(tiny_encoder, mixed_folder, tmp_path, monkeypatch):
    """The next-step line reads the state directory to know whether `similar` needs --index: an error there
    (a name too long, a folder this user cannot search) made an embed that had succeeded exit 1."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / ("x" * 300)))
    out = tmp_path / "index.npy"
    result = run_embed(tiny_encoder, mixed_folder[0], out)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "warning: could not remember" in said and f"next: simclr similar QUERY.jpg --index {out} (" in said, said


def test_no_normalize_and_float16(tiny_encoder, mixed_folder, tmp_path, monkeypatch):
    root, _ = mixed_folder
    raw, half = tmp_path / "raw.npy", tmp_path / "half.npy"
    assert (result := run_embed(tiny_encoder, root, raw, "--no-normalize", "--quiet")).exit_code == 0, result.output
    assert "next:" not in result.output
    monkeypatch.setenv("SIMCLR_INDEX", str(raw))  # `simclr similar` would search raw.npy: the hint names half.npy
    assert (result := run_embed(tiny_encoder, root, half, "--dtype", "float16")).exit_code == 0, result.output
    assert f"next: simclr similar QUERY.jpg --index {half} (" in " ".join(result.output.split()), result.output
    raw_rows, half_rows = np.load(raw), np.load(half)
    manifest = json.loads(raw.with_suffix(".json").read_text())
    assert manifest["normalized"] is False
    expected = reference_features(tiny_encoder, manifest["paths"], manifest["precision"])
    np.testing.assert_allclose(raw_rows, expected, rtol=1e-4, atol=1e-5)
    assert half_rows.dtype == np.float16 and json.loads(half.with_suffix(".json").read_text())["dtype"] == "float16"
    unit = raw_rows / np.linalg.norm(raw_rows, axis=1, keepdims=True)
    np.testing.assert_allclose(half_rows.astype(np.float32), unit, atol=2e-3)


def test_an_embed_started_during_the_scan_of_an_overwrite_is_not_deleted(tiny_encoder, mixed_folder, tmp_path,
                                                                           monkeypatch):
    """`--overwrite` looked for a running embed of OUT before its scan, then deleted OUT's work folder after
    it: the work of an embed started meanwhile went with it."""
    from simclr_cli import embed

    root, _ = mixed_folder
    out = tmp_path / "out.npy"
    work = work_dir(out)
    scan = embed.scan_images

    def scan_while_another_starts(*args, **kwargs):
        found = scan(*args, **kwargs)
        work.mkdir()
        (work / "plan.json").write_text("{}")  # the other embed's, which it holds while it runs
        stack.enter_context(held(work, "OUT"))
        return found

    monkeypatch.setattr(embed, "scan_images", scan_while_another_starts)
    with contextlib.ExitStack() as stack:
        result = run_embed(tiny_encoder, root, out, "--overwrite")
        assert result.exit_code == 1 and f"OUT {work} is in use by another simclr process" in result.output
        assert (work / "plan.json").read_text() == "{}"


def test_a_first_sigterm_is_answered_and_saves_the_rows_so_far(tiny_encoder, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(8):
        Image.new("RGB", (40, 36), (30 * i, 90, 200 - 20 * i)).save(root / f"{i}.png")
    config = EmbedConfig(model=str(tiny_encoder), images=str(root), out=str(tmp_path / "out.npy"), batch_size=4,
                         device="cpu", workers=0)
    replies = []

    def report(kind, **fields):
        if kind == "embed_progress" and fields["done"] == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        elif kind == "stopping":
            replies.append(fields["text"])

    result = embed_folder(config, report)
    assert result.interrupted and result.rows == 4
    assert replies == ["SIGTERM: saving the rows after this batch, then stopping (a second SIGTERM stops at once, "
                       "keeping the rows of the batches before)"]


def _slow_embed_process(*args, **kwargs) -> None:
    """`simclr embed`'s process at 0.25 s a batch, recording after every one: a signal comes mid-embed, after
    every process has started its loop, however fast the CPU."""
    from simclr_cli import embed

    features = embed.iter_features

    def slowly(*args, **kwargs):
        for batch in features(*args, **kwargs):
            time.sleep(0.25)
            yield batch
    embed.iter_features, embed.SAVE_EVERY = slowly, 1
    embed._embed_process(*args, **kwargs)


@pytest.mark.parametrize("sig, group", [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["ctrl-c", "sigterm-to-the-command"])
def test_a_first_signal_to_two_processes_is_answered_once_and_resume_finishes(tiny_encoder, tmp_path, sig, group):
    """`--devices 2`: the processes were given no reporter, and the launcher said nothing, so a first Ctrl-C or
    SIGTERM went unanswered until the final line. The launcher answers it, once, as one process does."""
    root = tmp_path / "images"
    root.mkdir()
    for i in range(40):
        Image.new("RGB", (40, 36), (6 * i, 90, 240 - 6 * i)).save(root / f"{i:02d}.png")
    out = tmp_path / "out.npy"
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_embed\n"
              f"from simclr_cli import embed\nfrom simclr_cli.cli import app\n"
              f"embed._embed_process = test_embed._slow_embed_process\n"
              f"app(sys.argv[1:], prog_name='simclr')\n")
    command = ["embed", str(tiny_encoder), str(root), str(out), "--devices", "2", "--device", "cpu", "--workers", "0",
               "--batch-size", "2"]
    process = subprocess.Popen([sys.executable, "-c", script, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        records = [work_dir(out) / f"progress-1-{rank}.json" for rank in (0, 1)]  # session 1: the first
        while time.monotonic() < deadline and not all(record.is_file() for record in records):
            time.sleep(0.05)
        if group:
            os.killpg(process.pid, sig)  # the terminal's Ctrl-C reaches every process
        else:
            process.send_signal(sig)  # `kill -TERM`: the command alone
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    assert process.returncode == 130, stderr
    first, again = ("Ctrl-C", "Ctrl-C again") if sig == signal.SIGINT else ("SIGTERM", "a second SIGTERM")
    answer = (f"{first}: saving the rows after this batch, then stopping ({again} stops at once, keeping the rows of "
              f"the batches before)")
    assert stderr.count(answer) == 1, stderr
    assert stderr.index(answer) < stderr.index("interrupted with "), stderr
    assert "Traceback" not in stderr, stderr
    result = run_embed(tiny_encoder, root, out, "--resume", "--quiet")
    assert result.exit_code == 0, result.output
    assert len(np.load(out)) == 40 and not work_dir(out).exists()


def test_resume_gives_the_same_file(tiny_encoder, mixed_folder, tmp_path):
    root, names = mixed_folder
    whole, resumed = tmp_path / "whole.npy", tmp_path / "resumed.npy"
    assert (result := run_embed(tiny_encoder, root, whole)).exit_code == 0, result.output

    config = EmbedConfig(model=str(tiny_encoder), images=str(root), out=str(resumed), batch_size=4, device="cpu",
                         workers=0)
    first = embed_folder(config, stop_after_batches=2)  # stops as Ctrl-C would
    assert first.interrupted and 0 < first.rows <= 8 and not resumed.exists()
    assert (result := run_embed(tiny_encoder, root, resumed)).exit_code == 1
    assert "--resume" in result.output
    work = work_dir(resumed)
    with held(work, "OUT"):  # as if the first were still running: a second embed neither joins nor deletes it
        for flag in ("--resume", "--overwrite"):
            result = run_embed(tiny_encoder, root, resumed, flag)
            assert result.exit_code == 1 and f"OUT {work} is in use by another simclr process" in result.output
            assert len(result.output.strip().splitlines()) == 1, result.output
    assert read_progress(work, len(json.loads((work / "plan.json").read_text())["paths"])).done == 8

    events = []
    second = embed_folder(EmbedConfig(**{**config.__dict__, "resume": True}),
                          lambda kind, **fields: events.append((kind, fields)))
    start = next(fields for kind, fields in events if kind == "embed_start")
    assert start["done"] == 8  # the first two batches were not computed again
    counts = [fields["done"] for kind, fields in events if kind == "embed_progress"]
    assert counts == list(range(12, start["total"], 4)) + [start["total"]]  # from where it resumed, each batch once
    assert not second.interrupted and second.rows == len(names["good"])
    assert whole.read_bytes() == resumed.read_bytes()
    manifests = [json.loads(p.with_suffix(".json").read_text()) for p in (whole, resumed)]
    assert manifests[0] == manifests[1]
    assert (result := run_embed(tiny_encoder, root, resumed, "--resume")).exit_code == 0, result.output
    assert "already complete" in result.output


def test_a_killed_loader_worker_saves_progress_and_names_the_resume(tiny_encoder, gappy_folder, tmp_path, monkeypatch):
    """A loader worker killed (out of memory) ended the embed with PyTorch's traceback; now one line names the
    command that continues it, and that command finishes the same file."""
    whole, killed = tmp_path / "whole.npy", tmp_path / "killed.npy"
    assert (result := run_embed(tiny_encoder, gappy_folder, whole)).exit_code == 0, result.output
    served, real = [], ImageDataset.__getitem__

    def getitem(dataset, index):
        if torch.utils.data.get_worker_info() is not None:  # the worker's own copy of `served`
            served.append(index)
            if len(served) > 8:  # its third batch of 4: killed, as by the kernel's OOM killer
                os.kill(os.getpid(), signal.SIGKILL)
        return real(dataset, index)

    monkeypatch.setattr(ImageDataset, "__getitem__", getitem)
    result = runner.invoke(app, ["embed", "--device", "cpu", "--workers", "1", "--batch-size", "4", str(tiny_encoder),
                                 str(gappy_folder), str(killed)])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    resume = shlex.join(["simclr", "embed", str(tiny_encoder), str(gappy_folder), str(killed), "--batch-size", "4",
                         "--device", "cpu", "--workers", "0", "--resume"])
    assert text.endswith(f"error: a loader worker died (killed by signal: Killed), perhaps out of memory; progress is "
                         f"saved. Continue with fewer workers: {resume}"), text
    assert "Traceback" not in result.output and not killed.exists()
    assert (result := runner.invoke(app, shlex.split(resume)[1:])).exit_code == 0, result.output
    assert whole.read_bytes() == killed.read_bytes()


def test_an_embed_interrupted_before_devices_existed_resumes(tiny_encoder, gappy_folder, tmp_path):
    whole, old = tmp_path / "whole.npy", tmp_path / "old.npy"
    assert (result := run_embed(tiny_encoder, gappy_folder, whole)).exit_code == 0, result.output
    config = EmbedConfig(model=str(tiny_encoder), images=str(gappy_folder), out=str(old), batch_size=4,
                         device="cpu", workers=0)
    assert embed_folder(config, stop_after_batches=1).interrupted
    # The record as simclr wrote it before --devices: positions done, rows written from row 0, skipped files.
    work = work_dir(old)
    progress = read_progress(work, 11)
    assert len(progress.blocks) == 1 and (progress.done, progress.rows) == (4, 3)  # 01b.jpg skipped
    for record in work.glob("progress*.json"):
        record.unlink()
    (work / "progress.json").write_text(json.dumps({"done": progress.done, "rows": progress.rows,
                                                    "skipped": [s.to_json() for s in progress.skipped]}))
    assert (result := run_embed(tiny_encoder, gappy_folder, old, "--resume")).exit_code == 0, result.output
    assert whole.read_bytes() == old.read_bytes()


def test_truncate_rows_keeps_the_first_rows(tmp_path):
    path = tmp_path / "rows.npy"
    data = np.arange(1000 * 3, dtype=np.float16).reshape(1000, 3)
    rows = npy_format.open_memmap(path, mode="w+", dtype=np.float16, shape=data.shape)
    rows[:] = data
    del rows
    _truncate_rows(path, 997)
    np.testing.assert_array_equal(np.load(path, allow_pickle=False), data[:997])


def test_share_out_gives_every_unfinished_position_to_one_process():
    rng = np.random.default_rng(0)
    for _ in range(200):
        # Blocks covering [0, total), each part done; rows <= positions done (some images skipped).
        cuts = np.unique(np.r_[0, rng.integers(1, 60, rng.integers(0, 5)), 60])
        blocks = []
        for begin, end in zip(cuts[:-1], cuts[1:]):
            done = int(rng.integers(begin, end + 1))
            blocks.append(Block(int(begin), int(end), done, int(rng.integers(0, done - begin + 1))))
        processes = int(rng.integers(1, 5))
        shared = share_out(Progress(3, blocks, []), processes)

        assert shared.session == 4 and shared.done == Progress(3, blocks, []).done
        assert shared.rows == sum(b.rows for b in blocks)
        # The new blocks still cover every position once, and their row slots never overlap.
        spans = sorted((b.begin, b.end) for b in shared.blocks)
        assert spans[0][0] == 0 and spans[-1][1] == 60
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert all(b.rows <= b.done - b.begin and b.done <= b.end for b in shared.blocks)
        # What was finished stays finished, with its rows where they were.
        for old in blocks:
            kept = [b for b in shared.blocks if b.begin == old.begin]
            assert len(kept) == 1 and (kept[0].done, kept[0].rows) == (old.done, old.rows)
        # Each process gets an equal share (to one position) of what is left, and no finished block.
        left = [sum(b.end - b.done for b in shared.blocks if b.owner == p) for p in range(processes)]
        assert sum(left) == sum(b.end - b.done for b in blocks) and max(left) - min(left) <= 1
        assert all(b.owner is None for b in shared.blocks if b.done == b.end)


def test_the_resume_command_repeats_the_flags_that_matter():
    config = EmbedConfig(model="run", images="photos", out="photos.npy")
    assert config.resume_command() == "simclr embed run photos photos.npy --resume"
    config = EmbedConfig(model="run", images="my photos", out="photos.npy", dtype="float16", normalize=False,
                         batch_size=32, devices=2, device="cpu", precision="fp32", workers=0)
    assert config.resume_command() == ("simclr embed run 'my photos' photos.npy --dtype float16 --no-normalize "
                                       "--batch-size 32 --devices 2 --device cpu --precision fp32 --workers 0 --resume")


def test_the_printed_resume_command_resumes(tiny_encoder, mixed_folder, tmp_path):
    """With a --precision that auto would not choose here, as the command line would print it."""
    other_precision = "fp32" if resolve_precision("auto", torch.device("cpu")).name == "bf16" else "bf16"
    config = EmbedConfig(model=str(tiny_encoder), images=str(mixed_folder[0]), out=str(tmp_path / "my index.npy"),
                         batch_size=4, device="cpu", workers=0, precision=other_precision)
    assert embed_folder(config, stop_after_batches=1).interrupted
    command = shlex.split(config.resume_command())
    assert command[:2] == ["simclr", "embed"]
    assert command[-3:] == ["--workers", "0", "--resume"] and "--batch-size" in command
    result = runner.invoke(app, command[1:])
    assert result.exit_code == 0, (config.resume_command(), result.output)
    assert json.loads((tmp_path / "my index.json").read_text())["precision"] == other_precision


def test_an_embed_stopped_while_finishing_resumes(tiny_encoder, mixed_folder, tmp_path, monkeypatch):
    """Stopped after its rows went to OUT but before their manifest: --resume writes the manifest, computing
    nothing again, and the index is the one an uninterrupted embed writes."""
    import simclr_cli.embed as embed_module

    root = mixed_folder[0]
    whole, stopped = tmp_path / "whole.npy", tmp_path / "stopped.npy"
    assert (result := run_embed(tiny_encoder, root, whole)).exit_code == 0, result.output

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while a large manifest is written

    with monkeypatch.context() as patch:
        patch.setattr(embed_module, "write_manifest", interrupt)
        with pytest.raises(KeyboardInterrupt):
            embed_folder(EmbedConfig(model=str(tiny_encoder), images=str(root), out=str(stopped), batch_size=4,
                                     device="cpu", workers=0))
    assert stopped.is_file() and not stopped.with_suffix(".json").exists() and work_dir(stopped).is_dir()
    with monkeypatch.context() as patch:
        patch.setattr(embed_module, "_embed_process", lambda *args, **kwargs: pytest.fail("embedded again"))
        assert (result := run_embed(tiny_encoder, root, stopped, "--resume")).exit_code == 0, result.output
    assert whole.read_bytes() == stopped.read_bytes() and not work_dir(stopped).exists()
    manifests = [json.loads(p.with_suffix(".json").read_text()) for p in (whole, stopped)]
    assert manifests[0] == manifests[1]


def test_finished_rows_in_place_or_gathered(tmp_path):
    data = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)

    def rows_file() -> Path:
        work = tmp_path / "work"
        work.mkdir(exist_ok=True)
        rows = npy_format.open_memmap(work / "rows.npy", mode="w+", dtype=np.float32, shape=data.shape)
        rows[:] = data
        del rows
        return work

    # Rows that follow each other: rows.npy cut to them, nothing copied.
    path, count = _finished_rows(rows_file(), [Block(4, 10, 10, 3), Block(0, 4, 4, 4)])
    assert (path.name, count) == ("rows.npy", 7)
    np.testing.assert_array_equal(np.load(path), data[:7])
    # A gap (images skipped in the first block): rows 0-1 and 4-8 gathered into a new file.
    work = rows_file()
    path, count = _finished_rows(work, [Block(0, 4, 4, 2), Block(4, 10, 10, 5)])
    assert (path.name, count) == ("gathered.npy", 7)
    np.testing.assert_array_equal(np.load(path), np.r_[data[:2], data[4:9]])
    np.testing.assert_array_equal(np.load(work / "rows.npy"), data)  # untouched until the rename


def test_two_processes_write_the_file_of_one_and_resume_on_one(tiny_encoder, gappy_folder, tmp_path):
    one, two, resumed = tmp_path / "one.npy", tmp_path / "two.npy", tmp_path / "resumed.npy"
    assert (result := run_embed(tiny_encoder, gappy_folder, one)).exit_code == 0, result.output
    assert (result := run_embed(tiny_encoder, gappy_folder, two, "--devices", "2", "--quiet")).exit_code == 0, \
        result.output
    manifests = [json.loads(p.with_suffix(".json").read_text()) for p in (one, two)]
    assert manifests[0]["paths"] == manifests[1]["paths"] and manifests[1]["rows"] == 10
    assert [Path(s["path"]).name for s in manifests[1]["skipped"]] == ["01b.jpg"]
    # The first process's run of images has a gap (01b.jpg), so the rows were gathered. Each process uses
    # one core instead of two: the same features up to the order of float sums.
    np.testing.assert_allclose(np.load(two), np.load(one), atol=TWO_PROCESS_ATOL)

    # Two processes stopped after a batch each (as Ctrl-C), then resumed in one: nothing computed twice.
    config = EmbedConfig(model=str(tiny_encoder), images=str(gappy_folder), out=str(resumed), batch_size=4,
                         device="cpu", workers=0, devices=2)
    first = embed_folder(config, stop_after_batches=1)  # images 0-3 (01b.jpg among them) and 5-8
    assert first.interrupted and first.rows == 7 and not resumed.exists()
    starts = []
    second = embed_folder(EmbedConfig(**{**config.__dict__, "resume": True, "devices": 1}),
                          lambda kind, **fields: starts.append(fields) if kind == "embed_start" else None)
    assert starts[0]["done"] == 8 and not second.interrupted
    assert json.loads(resumed.with_suffix(".json").read_text())["paths"] == manifests[0]["paths"]
    np.testing.assert_allclose(np.load(resumed), np.load(one), atol=TWO_PROCESS_ATOL)
    assert not work_dir(resumed).exists()


def test_a_resume_with_the_model_at_a_new_path_names_that_path(tiny_encoder, gappy_folder, tmp_path):
    """The encoder moved (the same file, by SHA-256) between the stop and the --resume: the processes of a
    --devices 2 resume load it from where it is now, and the manifest names it there, so `simclr similar` finds
    it. A resume of the finished embed, with the file moved again, points the manifest at its new path."""
    old, new, third = (tmp_path / f"{name}.safetensors" for name in ("enc_old", "enc_new", "enc_third"))
    shutil.copy(tiny_encoder / "encoder.safetensors", old)
    out = tmp_path / "moved.npy"
    config = EmbedConfig(model=str(old), images=str(gappy_folder), out=str(out), batch_size=4, device="cpu",
                         workers=0)
    assert embed_folder(config, stop_after_batches=1).interrupted
    old.rename(new)
    assert (result := run_embed(new, gappy_folder, out, "--resume", "--devices", "2", "--quiet")).exit_code == 0, \
        result.output
    assert json.loads(out.with_suffix(".json").read_text())["model"] == str(new.absolute())
    similar = ["similar", str(gappy_folder / "00.png"), "--index", str(out), "-k", "1"]
    assert (result := runner.invoke(app, similar)).exit_code == 0, result.output

    new.rename(third)
    result = run_embed(third, gappy_folder, out, "--resume")
    assert result.exit_code == 0 and "already complete" in result.output, result.output
    assert f"now names the model at {third.absolute()}" in " ".join(result.output.split())
    assert json.loads(out.with_suffix(".json").read_text())["model"] == str(third.absolute())
    assert (result := runner.invoke(app, similar)).exit_code == 0, result.output

    manifest = out.with_suffix(".json").read_bytes()
    (tmp_path / "link").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "images").symlink_to(gappy_folder, target_is_directory=True)
    for spelled in (tmp_path / ".." / tmp_path.name / third.name, tmp_path / "link" / third.name):  # not moves
        result = run_embed(spelled, gappy_folder, out, "--resume")
        assert result.exit_code == 0 and "already complete; nothing to resume" in result.output, result.output
        assert "now names" not in result.output and out.with_suffix(".json").read_bytes() == manifest
    result = run_embed(third, tmp_path / "images", out, "--resume")  # IMAGES through a link: the same folder
    assert result.exit_code == 0 and "already complete; nothing to resume" in result.output, result.output


@pytest.fixture
def interrupted(tiny_encoder, mixed_folder, tmp_path) -> Path:
    out = tmp_path / "cut.npy"
    config = EmbedConfig(model=str(tiny_encoder), images=str(mixed_folder[0]), out=str(out), batch_size=4,
                         device="cpu", workers=0)
    assert embed_folder(config, stop_after_batches=1).interrupted
    return out


def test_user_errors_exit_1_with_a_message(tiny_encoder, mixed_folder, interrupted, tmp_path, monkeypatch):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign))
    empty = tmp_path / "empty"
    empty.mkdir()
    existing = tmp_path / "existing.npy"
    existing.write_bytes(b"")
    other_model = tmp_path / "other.safetensors"
    other_model.write_bytes((tiny_encoder / "encoder.safetensors").read_bytes())
    with open(other_model, "r+b") as handle:  # same header, one weight changed: a different model
        handle.seek(-4, 2)
        handle.write(b"\x00\x00\x80\x3f")
    out = tmp_path / "out.npy"
    a_folder = tmp_path / "folder.npy"
    a_folder.mkdir()
    folder = mixed_folder[0]
    other_precision = "fp32" if resolve_precision("auto", torch.device("cpu")).name == "bf16" else "bf16"
    cases = [
        ((tmp_path / "missing.safetensors", folder, out), "no such encoder file; pass the encoder.safetensors"),
        ((foreign, folder, out), "not a simclr encoder"),
        ((tmp_path, folder, out), "holds no encoder.safetensors"),
        ((tiny_encoder, tmp_path / "nowhere", out), "no such folder"),
        ((tiny_encoder, empty, out), "no image files"),
        ((tiny_encoder, folder, tmp_path / "out.txt"), "must end in .npy"),
        ((tiny_encoder, folder, existing), "already exists; pass --overwrite"),
        ((tiny_encoder, folder, out, "--dtype", "int8"), "--dtype 'int8' is not one of float32, float16"),
        ((tiny_encoder, folder, out, "--batch-size", "0"), "--batch-size 0 must be at least 1"),
        ((tiny_encoder, folder, out, "--devices", "0"), "--devices 0 must be at least 1"),
        ((tiny_encoder, folder, out, "--precision", "bf61"), "--precision 'bf61' is not one of auto, fp32"),
        ((tiny_encoder, folder, a_folder, "--overwrite"), "is a folder; pass a file name"),
        ((tiny_encoder, folder, existing / "x.npy"), "a folder on its path is a file"),
        ((tiny_encoder, folder, out, "--devices", "2", "--device", "cuda:1"), "--device cuda:1 with --devices 2"),
        ((tiny_encoder, folder, out, "--resume"), "no interrupted embed"),
        ((tiny_encoder, folder, out, "--resume", "--overwrite"), "use one of them"),
        ((tiny_encoder, folder, interrupted), "holds an interrupted embed; add --resume"),
        ((tiny_encoder, folder, interrupted, "--resume", "--dtype", "float16"), "differs from the interrupted"),
        ((tiny_encoder, folder, interrupted, "--resume", "--precision", other_precision),
         f"--precision {other_precision} differs from the interrupted"),
        ((tiny_encoder, empty, interrupted, "--resume"), "the interrupted embed read"),
        ((other_model, folder, interrupted, "--resume"), "SHA-256 differs"),
    ]
    for args, message in cases:
        result = run_embed(*args)
        assert result.exit_code == 1, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)
        assert "Traceback" not in result.output
    assert not out.exists()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run")  # as torchrun starts it: each process would embed everything
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = run_embed(tiny_encoder, folder, out)
    assert result.exit_code == 1 and "run it without torchrun, with --devices N" in " ".join(result.output.split())


def test_plain_progress_prints_the_total_once(capsys):
    from simclr_cli.cli import _EmbedReporter

    reporter = _EmbedReporter()
    reporter.live = False  # as in a log file
    reporter.on_embed_start(total=100)
    for done in (5, 10, 50, 100, 100, 100):  # --devices N reports the total again until every process ends
        reporter.on_embed_progress(done=done, total=100, images_per_s=1.0)
    printed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert printed == ["10/100", "50/100", "100/100"]


def test_a_folder_where_no_image_decodes_writes_nothing(tiny_encoder, tmp_path, cut_image):
    """PNGs cut in half pass the scan (their headers read) and fail to decode: one line, exit 1, and no
    empty index left behind or remembered."""
    cut = tmp_path / "cut"
    cut.mkdir()
    for index in range(2):
        cut_image(cut / f"{index}.png", index)
    out = tmp_path / "out.npy"
    result = run_embed(tiny_encoder, cut, out)
    assert result.exit_code == 1, result.output
    assert "none of its 2 images could be decoded" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not out.exists() and not work_dir(out).exists() and not (state_dir() / "last_index.json").exists()


def test_a_run_folder_given_as_images_is_refused_and_not_remembered(tiny_encoder, tmp_path):
    """`simclr embed runs/digits runs/digits d.npy`: MODEL given twice. Its curves.png alone was embedded, and the
    index of one plot became the last index, which `simclr similar` then searched."""
    out = tmp_path / "out.npy"
    result = run_embed(tiny_encoder, tiny_encoder, out)
    assert result.exit_code == 1, result.output
    assert (f"IMAGES {tiny_encoder}: a simclr run folder, not a folder of images; pass the folder of images (MODEL is "
            f"the first argument)") in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not out.exists() and not work_dir(out).exists() and not (state_dir() / "last_index.json").exists()


def test_a_folder_of_damaged_files_names_the_first_and_says_to_replace_them(tiny_encoder, tmp_path):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "b.png").write_bytes(b"\x00garbage")
    (damaged / "c.jpg").write_bytes(b"")
    result = run_embed(tiny_encoder, damaged, tmp_path / "out.npy")
    assert result.exit_code == 1, result.output
    assert (f"IMAGES {damaged}: 2 unreadable file(s), no readable image, the first {damaged}/b.png: unreadable: "
            f"UnidentifiedImageError: cannot identify image file; replace or remove the damaged files, or add "
            f"readable") in " ".join(result.output.split()), result.output


def test_a_work_folder_without_a_plan_is_started_again(tiny_encoder, mixed_folder, tmp_path):
    """An embed that stopped before writing its plan leaves nothing to resume: a plain run starts afresh
    (it said "add --resume", and --resume said "run without --resume")."""
    out = tmp_path / "out.npy"
    work_dir(out).mkdir()
    (work_dir(out) / "rows.npy").write_bytes(b"")
    assert (result := run_embed(tiny_encoder, mixed_folder[0], out)).exit_code == 0, result.output
    assert out.is_file() and not work_dir(out).exists()


def test_a_file_where_the_manifest_goes_is_kept_without_overwrite(tiny_encoder, mixed_folder, tmp_path):
    """OUT.json is replaced at the end: a file already there (not an index's) is refused before any work,
    and replaced only with --overwrite."""
    out = tmp_path / "q.npy"
    theirs = tmp_path / "q.json"
    theirs.write_text('{"mine": true}\n')
    result = run_embed(tiny_encoder, mixed_folder[0], out)
    assert result.exit_code == 1, result.output
    assert f"{theirs} already exists" in " ".join(result.output.split()), result.output
    assert "pass --overwrite" in result.output and "Traceback" not in result.output
    assert theirs.read_text() == '{"mine": true}\n' and not out.exists() and not work_dir(out).exists()
    assert (result := run_embed(tiny_encoder, mixed_folder[0], out, "--overwrite")).exit_code == 0, result.output
    assert json.loads(theirs.read_text())["rows"] == len(np.load(out))


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_folder_where_the_manifest_goes_is_refused_before_any_work(tiny_encoder, mixed_folder, tmp_path, overwrite):
    out = tmp_path / "d.npy"
    (tmp_path / "d.json").mkdir()
    result = run_embed(tiny_encoder, mixed_folder[0], out, *overwrite)
    assert result.exit_code == 1, result.output
    assert "d.json is a folder, where OUT" in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output and not out.exists() and not work_dir(out).exists()


def test_an_empty_out_left_by_a_finishing_embed_is_a_one_line_error(tmp_path):
    """np.load raises EOFError on an empty file, which click would report as "Aborted!"."""
    out = tmp_path / "out.npy"
    out.write_bytes(b"")
    with pytest.raises(ModelFileError, match="not the rows of the interrupted embed"):
        _rows_in(out, (2, 4), "float32")


def test_a_half_copy_of_the_encoder_embeds(tiny_encoder, mixed_folder, tmp_path):
    """Float16 weights with the same metadata: embedded in float32, not a dtype error that left OUT.npy.partial."""
    half = tmp_path / "half.safetensors"
    backbone, info = load_encoder(tiny_encoder / "encoder.safetensors")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in backbone.state_dict().items()}, str(half),
              metadata=info.to_metadata())
    out = tmp_path / "out.npy"
    assert (result := run_embed(half, mixed_folder[0], out, "--precision", "fp32")).exit_code == 0, result.output
    assert np.isfinite(np.load(out)).all() and not work_dir(out).exists()


def _drop(key):
    def change(work: Path) -> None:
        plan = json.loads((work / "plan.json").read_text())
        del plan[key]
        (work / "plan.json").write_text(json.dumps(plan))
    return change


def _set(name, key, value):
    def change(work: Path) -> None:
        record = json.loads((work / name).read_text())
        record[key] = value
        (work / name).write_text(json.dumps(record))
    return change


@pytest.mark.parametrize("change, message", [
    (_drop("model_sha256"), "plan.json has no model_sha256"),
    (_set("plan.json", "paths", None), "plan.json's paths is None"),
    (_set("plan.json", "skipped", ["a.png"]), "plan.json's skipped"),
    (lambda work: (work / "rows.npy").write_bytes(b""), "rows.npy is not a readable .npy file"),
    (lambda work: np.save(work / "rows.npy", np.zeros((3, 5), dtype=np.float32)), "rows.npy holds (3, 5) float32"),
    (_set("progress.json", "blocks", [{"start": 0}]), "progress record"),
])
def test_a_damaged_interrupted_embed_is_a_one_line_error(tiny_encoder, mixed_folder, interrupted, change, message):
    change(work_dir(interrupted))
    result = run_embed(tiny_encoder, mixed_folder[0], interrupted, "--resume")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    output = " ".join(result.output.split())
    assert "the interrupted embed is damaged" in output and message in output, result.output
    assert "run again with --overwrite" in output
    assert (result := run_embed(tiny_encoder, mixed_folder[0], interrupted, "--overwrite")).exit_code == 0, \
        result.output


@pytest.fixture(scope="module")
def finished(tiny_encoder, mixed_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "index.npy"
    assert (result := run_embed(tiny_encoder, mixed_folder[0], out)).exit_code == 0, result.output
    return out


@pytest.mark.parametrize("manifest, args, message", [
    ({}, [], "index.json: "),
    ("gone", [], "index.json is gone, so what it holds is unknown; run again with --overwrite"),
    ({"paths": []}, [], "holds ("),  # rows the manifest does not list
    (None, ["--dtype", "float16"], "--dtype float16 differs from the embed that wrote OUT's --dtype float32"),
    (None, ["--no-normalize"], "--no-normalize differs from the embed that wrote OUT's --normalize"),
    (None, ["{other}"], "the embed that wrote OUT read"),
])
def test_a_resume_of_a_finished_embed_checks_it_like_an_interrupted_one(tiny_encoder, mixed_folder, finished,
                                                                       tmp_path, manifest, args, message):
    """It trusted OUT.json: `{}` was a traceback, an empty list of paths "0 embeddings written", and other flags
    "written" though nothing was, in another dtype than asked."""
    out = tmp_path / "index.npy"
    shutil.copy(finished, out)
    saved = json.loads(finished.with_suffix(".json").read_text())
    if manifest != "gone":
        out.with_suffix(".json").write_text(json.dumps(saved if manifest is None else {**saved, **manifest}
                                                       if manifest else {}))
    (tmp_path / "other").mkdir()
    images = str(tmp_path / "other") if "{other}" in args else mixed_folder[0]
    result = run_embed(tiny_encoder, images, out, "--resume", *[a for a in args if a != "{other}"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and message in " ".join(result.output.split()), result.output


def test_a_resume_of_a_finished_embed_says_nothing_was_written(tiny_encoder, mixed_folder, finished):
    before = finished.stat().st_mtime_ns
    result = run_embed(tiny_encoder, mixed_folder[0], finished, "--resume")
    assert result.exit_code == 0 and "already complete" in result.output, result.output
    rows = len(json.loads(finished.with_suffix(".json").read_text())["paths"])
    assert f"{rows:,} embeddings are in {finished}" in " ".join(result.output.split())
    assert finished.stat().st_mtime_ns == before


def test_embed_passes_over_the_folders_of_simclr_runs_and_says_so(tiny_encoder, tmp_path):
    """`simclr pretrain .` from the photos, then `simclr embed` of them: the run's curves.png is no photo."""
    photos = tmp_path / "photos"
    for index in range(3):
        (photos / "album").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 40), (index * 60, 0, 0)).save(photos / "album" / f"{index}.png")
    run = photos / "runs" / "pretrain-1"
    shutil.copytree(tiny_encoder, run)
    assert (run / "curves.png").is_file()
    result = run_embed(tiny_encoder, photos, tmp_path / "photos.npy")
    assert result.exit_code == 0, result.output
    assert f"passed over 1 folder(s) of simclr runs in {photos}: {run}" in " ".join(result.output.split())
    manifest = json.loads((tmp_path / "photos.json").read_text())
    assert sorted(Path(path).name for path in manifest["paths"]) == ["0.png", "1.png", "2.png"]

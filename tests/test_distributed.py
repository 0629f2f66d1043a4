"""Several processes (gloo on the CPU): global NT-Xent, DDP, sharding, launching, resuming (distributed.py)."""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from simclr_cli import distributed
from simclr_cli.cli import app
from simclr_cli.config import AugmentConfig, PretrainConfig, RuntimeConfig, replace
from simclr_cli.errors import ConfigError, SimclrError
from simclr_cli.export import load_checkpoint, load_encoder
from simclr_cli.gradcache import cached_backward, chunk_count, paired_chunks
from simclr_cli.loss import global_nt_xent, nt_xent
from simclr_cli.models import SimCLR

TEMPERATURE = 0.2
runner = CliRunner()


@pytest.fixture
def tiny_folder(tmp_path, small_digits_folder) -> Path:
    """16 digit images (32 px): two steps of 8 per epoch."""
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted(small_digits_folder.rglob("*.png"))[:16]:
        shutil.copy(path, images / f"{path.parent.name}_{path.name}")
    return images


# -- without processes -------------------------------------------------------------------------

@pytest.mark.parametrize("batch_size,world", [(8, 1), (8, 2), (7, 2), (10, 3)])
def test_shards_of_every_global_batch_are_the_single_process_batch(monkeypatch, batch_size, world):
    order = list(range(100, 131))  # 31 images: the last, partial batch is dropped
    steps = len(order) // batch_size
    shards = []
    for r in range(world):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        local, local_batch = distributed.shard_order(order, batch_size, start_step=1)
        assert len(local) == (steps - 1) * local_batch
        shards.append([local[i:i + local_batch] for i in range(0, len(local), local_batch)])
    for step in range(1, steps):
        rejoined = [index for shard in shards for index in shard[step - 1]]
        assert rejoined == order[step * batch_size:(step + 1) * batch_size]


def test_helpers_are_neutral_without_a_process_group():
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    assert torch.equal(global_nt_xent(a, b, TEMPERATURE), nt_xent(a, b, TEMPERATURE))
    assert distributed.gather_sizes(5) == [5]
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.use_sync_bn(None, torch.device("cpu")) is False
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap_ddp(model, torch.device("cpu")) is model


@pytest.mark.parametrize("device,backend,pinned", [("cpu", "gloo", []), ("cuda", "cpu:gloo,cuda:nccl", [1])])
def test_the_runs_device_decides_the_backend_not_the_machines(monkeypatch, device, backend, pinned):
    """`--device cpu --devices 2` on a machine with one GPU pinned process 1 to GPU 1 (invalid ordinal), joined
    with NCCL, and left every process a thread per core."""
    calls: dict[str, list] = {"set_device": [], "backends": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", calls["set_device"].append)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: calls["backends"].append(backend))
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    threads = torch.get_num_threads()
    try:
        distributed.init_process_group(device)
        assert calls == {"set_device": pinned, "backends": [backend]}
        assert torch.get_num_threads() == (4 if device == "cpu" else threads)  # the cores split on the CPU
    finally:
        torch.set_num_threads(threads)


def test_only_torchruns_own_variables_make_a_process_join_a_group(monkeypatch):
    """RANK and WORLD_SIZE alone (set by other tools) made a plain pretrain fail with torch's traceback over
    MASTER_ADDR, and embed refuse to run "under torchrun"."""
    for name in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.launched()
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert distributed.launched()
    monkeypatch.delenv("MASTER_ADDR")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run")
    assert distributed.launched()
    # A group that cannot be joined (here: MASTER_ADDR missing) is one line.
    with pytest.raises(ConfigError, match=r"RANK 0 of WORLD_SIZE 1\) but could not join their group: .*MASTER_ADDR "
                                          r"expected, but not set; start it with torchrun"):
        distributed.init_process_group("cpu")


def test_a_repeated_ctrl_c_is_one_request_in_a_process_group(monkeypatch):
    """A Ctrl-C reaches a --devices process from the terminal and again from its launcher, which passes on a
    SIGINT sent to it alone: one request to save. Later, the second one stops at once."""
    from simclr_cli import runtime
    from simclr_cli.runtime import StopFlag

    clock = [100.0]
    monkeypatch.setattr(runtime, "time", type("Clock", (), {"monotonic": staticmethod(lambda: clock[0])}))
    monkeypatch.setattr(runtime, "is_distributed", lambda: True)
    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # Python runs the handler before the next line
        clock[0] += StopFlag.REPEAT_SECONDS * 0.9
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            pytest.fail("the copy of the Ctrl-C stopped the process at once")
        assert stop.signal == signal.SIGINT
        clock[0] += StopFlag.REPEAT_SECONDS * 0.2
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_bad_values_are_one_line_errors(tiny_folder, tmp_path):
    with pytest.raises(ConfigError, match="--devices 0"):
        PretrainConfig(data_dir=str(tiny_folder), out_dir=str(tmp_path / "r"), devices=0).validate()
    with pytest.raises(ConfigError, match="--chunk-size 0"):
        PretrainConfig(data_dir=str(tiny_folder), out_dir=str(tmp_path / "r"), chunk_size=0).validate()
    result = runner.invoke(app, ["pretrain", str(tiny_folder), "--devices", "0", "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "--devices 0" in result.output
    result = runner.invoke(app, ["pretrain", str(tiny_folder), "--devices", "2", "--device", "cuda:0", "--out",
                                 str(tmp_path / "r")])
    assert result.exit_code == 1 and "pass --device cuda, or --devices 1" in " ".join(result.output.split())


def _stop_after_first_step(kind, **fields):
    if kind == "step" and fields["step"] == 1:
        os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: checkpoint after this step and stop


def test_a_batch_smaller_than_the_processes_says_what_a_resume_can_change(tiny_folder, tmp_path, monkeypatch):
    """A resumed run refuses --batch-size, which the error told it to raise."""
    from simclr_cli import train

    config = PretrainConfig(data_dir=str(tiny_folder), out_dir=str(tmp_path / "b2"), epochs=1, batch_size=2,
                            arch="resnet18", stem="imagenet", augment=AugmentConfig(image_size=32),
                            runtime=RuntimeConfig(device="cpu", workers=0, seed=0))
    assert train.pretrain(config, _stop_after_first_step).interrupted
    monkeypatch.setattr(train, "world_size", lambda: 3)  # as one of three processes (collectives stay neutral)
    with pytest.raises(ConfigError, match=r"--batch-size 2 is smaller than the 3 processes: each needs an image per "
                                          r"step; resume with --devices 2 or fewer$"):
        train.resume_pretrain(tmp_path / "b2")
    with pytest.raises(ConfigError, match=r"; use --batch-size 3 or more, or fewer --devices$"):
        train.pretrain(replace(config, out_dir=str(tmp_path / "new")))
    two = tmp_path / "two"  # a larger --batch-size is cut back to the images there are
    two.mkdir()
    for name in ("a", "b"):
        shutil.copy(next(tiny_folder.glob("*.png")), two / f"{name}.png")
    with pytest.raises(ConfigError, match=r"--batch-size 2 is smaller than the 3 processes: each needs an image per "
                                          r"step; use --devices 2 or fewer, or add images$"):
        train.pretrain(replace(config, data_dir=str(two), batch_size=256, out_dir=str(tmp_path / "few")))


def test_a_resume_with_a_moved_monitor_finds_its_device_at_the_new_place(tiny_folder, small_digits_folder, tmp_path):
    """The launcher reads the run's saved --device first: it checked the old --monitor place and refused the
    resume that one process accepts."""
    from simclr_cli import train
    from simclr_cli.cli import _run_device

    monitor = tmp_path / "monitor"
    shutil.copytree(small_digits_folder, monitor)
    config = PretrainConfig(data_dir=str(tiny_folder), out_dir=str(tmp_path / "run"), epochs=1, batch_size=8,
                            arch="resnet18", stem="imagenet", augment=AugmentConfig(image_size=32),
                            monitor=str(monitor), runtime=RuntimeConfig(device="cpu", workers=0, seed=0))
    assert train.pretrain(config, _stop_after_first_step).interrupted
    monitor.rename(tmp_path / "moved")
    resumed = {"run_dir": tmp_path / "run", "data_dir": None, "monitor": str(tmp_path / "moved"), "device": None,
               "workers": None}
    assert _run_device(None, resumed) == "cpu"


def test_a_workers_death_hint_resumes_on_as_many_processes(monkeypatch):
    from types import SimpleNamespace

    from simclr_cli import train

    run = SimpleNamespace(run_dir=Path("my run"), workers=4, device_given=None)
    assert train.PretrainRun._resume_command(run) == "simclr pretrain --resume 'my run' --workers 2"
    monkeypatch.setattr(train, "world_size", lambda: 2)
    assert train.PretrainRun._resume_command(run) == "simclr pretrain --resume 'my run' --workers 2 --devices 2"
    run.device_given = "cpu"  # given to the resume, not saved: repeated
    assert train.PretrainRun._resume_command(run) == ("simclr pretrain --resume 'my run' --workers 2 --device cpu "
                                                      "--devices 2")


def test_a_report_the_full_disk_cut_short_is_no_report(tmp_path):
    """A worker's report written on a full disk came out empty, and reading it raised a ValueError traceback."""
    (tmp_path / "error-rank0.txt").write_text("")
    (tmp_path / "error-rank1.txt").write_text("SimclrError\nthe disk is full")
    assert distributed._reports(tmp_path) == [("SimclrError", "the disk is full")]
    distributed._report(str(tmp_path / "gone"), "SimclrError", "no folder to write in")  # raises nothing


# -- two processes on the CPU ------------------------------------------------------------------

def _two_view_images(samples: torch.Tensor) -> torch.Tensor:
    return samples.transpose(0, 1).flatten(0, 1)  # (2n, C, H, W): a views, then b views


def _embed(model, samples):
    return model(_two_view_images(samples)).view(2, len(samples), -1).transpose(0, 1)  # (n, 2, D)


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _worst_error(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> float:
    """The largest gradient error of any parameter, relative to that parameter's largest gradient."""
    return max(((actual[k] - g).abs().max() / (g.abs().max() + 1e-12)).item() for k, g in expected.items())


def _compare_with_one_process() -> list[dict[str, float]]:
    """In each of two processes: the global loss and gradients vs the whole batch in one process."""
    from simclr_cli.runtime import rank

    torch.manual_seed(0)
    model = SimCLR("resnet18", "imagenet", proj_dim=16).eval()  # BN on running statistics: no SyncBN on CPU
    parallel = distributed.wrap_ddp(model, torch.device("cpu"))
    samples = torch.randn(8, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # same on every rank
    errors = {"rank": rank()}
    for case, batch_size, chunk_size in [("even", 8, None), ("uneven", 7, None), ("chunked", 8, 3),
                                         ("uneven chunked", 7, 2)]:  # ranks of 4 and 3 images, 2 chunks each
        batch = samples[:batch_size]
        model.zero_grad()
        expected_loss = nt_xent(*_embed(model, batch).unbind(1), TEMPERATURE)  # one process, no collectives
        expected_loss.backward()
        expected = _grads(model)

        local, _ = distributed.shard_order(list(range(batch_size)), batch_size)
        sizes = distributed.gather_sizes(len(local))
        model.zero_grad()
        if chunk_size:
            loss = cached_backward(parallel, lambda module, rows: module(rows), batch[local].flatten(0, 1),
                                   lambda z: global_nt_xent(z[0::2], z[1::2], TEMPERATURE, sizes),
                                   paired_chunks(len(local), chunk_count(sizes, chunk_size)))
        else:
            loss = global_nt_xent(*_embed(parallel, batch[local]).unbind(1), TEMPERATURE, sizes)
            loss.backward()
        errors[f"{case} loss"] = abs(distributed.mean_over_ranks(loss.detach()).item() - expected_loss.item())
        errors[f"{case} gradients"] = _worst_error(expected, _grads(model))
    return distributed.gather_objects([errors])


def test_two_processes_give_the_loss_and_gradients_of_one(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    errors = distributed.launch(_compare_with_one_process, (), devices=2)
    assert [e.pop("rank") for e in errors] == [0, 1]
    for per_rank in errors:
        for name, error in per_rank.items():
            assert error < (1e-5 if "loss" in name else 1e-4), (name, error)


def _fail_on_rank_one() -> None:
    from simclr_cli.runtime import rank

    if rank() == 1:
        raise ConfigError("--out something: rank one says no")
    distributed.barrier()  # rank 0 waits in a collective: the launcher must stop it


def test_a_user_error_in_one_process_is_one_line_in_the_launcher(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the launcher's own files go
    with pytest.raises(ConfigError, match="rank one says no"):
        distributed.launch(_fail_on_rank_one, (), devices=2)
    assert not list(tmp_path.glob("torchelastic_*")), "the launcher's log folders are left behind"
    assert not list(tmp_path.glob("pytorch-errorfile-*")), "the failed process's error file is left behind"
    assert tempfile.tempdir == str(tmp_path)


def _launch_apart(function: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """distributed.launch(this module's `function`, devices=2) in a process of its own, ended (with its workers)
    after `timeout`; a SimclrError is its stderr's last line, "ErrorClass: message"."""
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_distributed\n"
              f"from simclr_cli import distributed\nfrom simclr_cli.errors import SimclrError\n"
              f"try:\n    distributed.launch(test_distributed.{function}, (), devices=2)\n"
              f"except SimclrError as error:\n    sys.exit(f'{{type(error).__name__}}: {{error}}')\n")
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _second_signal() -> None:
    raise KeyboardInterrupt  # what StopFlag raises in every process on a second Ctrl-C or SIGTERM, mid-step


def test_a_second_signal_in_the_processes_stops_the_command_at_once():
    """torch's wrapper of each process took the KeyboardInterrupt for its parent's death and ended the process
    with code 0 and no result: the launcher waited for them for ever, and ignored the Ctrl-C that followed."""
    result = _launch_apart("_second_signal")
    assert result.stderr.strip().splitlines()[-1:] == ["Interrupted: stopped at once: the workers stopped without "
                                                       "saving; what they saved before is kept"], result.stderr


def _disk_full_on_rank_one() -> None:
    from simclr_cli.runtime import rank

    if rank() == 1:
        raise OSError(errno.ENOSPC, "No space left on device", "run/checkpoint.safetensors")
    distributed.barrier()


def _killed_on_rank_one() -> None:
    from simclr_cli.runtime import rank

    if rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer does
    distributed.barrier()


@pytest.mark.parametrize("failure,expected", [
    (_disk_full_on_rank_one, "run/checkpoint.safetensors: No space left on device; fix that, or pass another path, "
                             "and run the command again"),
    (_killed_on_rank_one, "process 1 was killed by SIGKILL (out of memory?); the other processes were stopped; what "
                          "they saved before is kept; continue with `simclr pretrain --resume run`")],
    ids=["disk-full", "killed"])
def test_a_process_that_fails_without_a_simclr_error_is_one_line(failure, expected):
    """A full disk was a 111-line traceback with --devices 2 (one line in one process), a process killed by the
    out-of-memory killer a 75-line one ending in ChildFailedError."""
    with pytest.raises(SimclrError) as raised:
        distributed.launch(failure, (), devices=2, resume=lambda: "simclr pretrain --resume run")
    assert str(raised.value) == expected


@pytest.mark.parametrize("world", [2, 1])
@pytest.mark.parametrize("error", [RuntimeError, ConnectionResetError], ids=["gloo", "socket"])
def test_a_worker_whose_call_failed_waits_for_the_launcher_to_see_a_dead_peer_first(monkeypatch, tmp_path, world,
                                                                                     error):
    """The [killed] case above went red in CI: rank 0's barrier failed ("Connection reset by peer") and it ended
    before the launcher, which reports one failure, the first it sees, polled rank 1's death. A peer lost from a
    socket of Python's own is an OSError: it was reported at once, as a disk's error ("fix that, or pass another
    path"), not waited on."""
    def collective_fails(*args, **kwargs):
        raise error(errno.ECONNRESET, "Connection reset by peer")

    slept = []
    monkeypatch.setattr(distributed, "run_in_group", collective_fails)
    monkeypatch.setattr(distributed.time, "sleep", slept.append)
    monkeypatch.setattr(distributed.gc, "freeze", lambda: None)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(error, match="reset by peer"):
            distributed._in_group(print, (), "cpu", str(tmp_path))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert slept == ([distributed.PEER_GRACE_SECONDS] if world > 1 else []), "alone, nothing to wait for"
    assert distributed.PEER_GRACE_SECONDS >= 10 * 0.2, "many of the launcher's polls (monitor_interval 0.2 s)"
    assert not list(tmp_path.iterdir()), "no report: the launcher's traceback is the one to show for a bug"

    def interrupted(seconds: float) -> None:  # a Ctrl-C during the wait
        raise KeyboardInterrupt

    monkeypatch.setattr(distributed.time, "sleep", interrupted)
    try:
        distributed._in_group(print, (), "cpu", str(tmp_path))
    except error as failure:  # the failure, still
        assert "reset by peer" in str(failure)
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C during the wait hid the failure")
    else:
        pytest.fail("the failure was lost")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_the_copy_of_a_request_after_the_process_saved_is_no_second_signal(monkeypatch, tmp_path, sig):
    """A group's Ctrl-C reaches a --devices process from the terminal and, up to a poll of the launcher (0.2 s)
    later, from the launcher. A process whose batch ended sooner had saved and left its StopFlag: the copy stopped
    it at once, the command said "stopped at once: the workers stopped without saving", after 31 s where the
    other process waited for the launcher to read its result."""
    from simclr_cli.runtime import StopFlag

    def takes_the_request_then_its_copy() -> str:
        with StopFlag() as stop:
            os.kill(os.getpid(), sig)  # the request: the loop saves and ends
        assert stop.signal == sig
        os.kill(os.getpid(), sig)  # its copy, from the launcher
        return "saved"

    def copy_ended_the_process(signum, frame):
        raise AssertionError(f"the copy of the {signal.Signals(signum).name} stopped the process")

    monkeypatch.setattr(StopFlag, "taken", None, raising=False)
    monkeypatch.setattr(distributed, "run_in_group", lambda entrypoint, *args, device: entrypoint(*args))
    monkeypatch.setattr(distributed.gc, "freeze", lambda: None)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, copy_ended_the_process)  # not this test's process: its default action ends it
    try:
        assert distributed._in_group(takes_the_request_then_its_copy, (), "cpu", str(tmp_path)) == "saved"
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert not list(tmp_path.iterdir()), "no report of a stop"


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_on_two_cpu_processes_exports_an_encoder(tiny_folder, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    (tmp_path / "temp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))  # where the launcher's own files go
    result = runner.invoke(app, ["pretrain", str(tiny_folder), "--devices", "2", "--device", "cpu", "--out",
                                 str(run_dir), "--image-size", "32", "--stem", "imagenet", "--epochs", "1", "--arch",
                                 "resnet18", "--batch-size", "8", "--chunk-size", "3", "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "encoder saved to" in result.output
    backbone, info = load_encoder(run_dir, "cpu")
    assert info.arch == "resnet18" and info.image_size == 32
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    assert [m["step"] for m in _metrics(run_dir)] == [1, 2]  # written once, by rank 0
    with safe_open(str(run_dir / "checkpoint.safetensors"), "pt") as checkpoint:
        assert not any("module." in key for key in checkpoint.keys())  # the unwrapped model
    assert json.loads((run_dir / "config.json").read_text())["devices"] == 2
    assert not list((tmp_path / "temp").glob("torchelastic_*")), "the launcher's log folders are left behind"


def test_a_run_resumes_on_another_number_of_processes(tiny_folder, tmp_path):
    from simclr_cli.train import pretrain

    run_dir = tmp_path / "run"
    config = PretrainConfig(data_dir=str(tiny_folder), out_dir=str(run_dir), epochs=1, batch_size=8,
                            arch="resnet18", stem="imagenet", augment=AugmentConfig(image_size=32),
                            runtime=RuntimeConfig(device="cpu", workers=0, seed=0))
    first = pretrain(config, _stop_after_first_step)
    assert first.interrupted and first.state.step == 1

    result = runner.invoke(app, ["pretrain", "--resume", str(run_dir), "--devices", "2", "--device", "cpu",
                                 "--quiet"])
    assert result.exit_code == 0, result.output
    assert [m["step"] for m in _metrics(run_dir)] == [1, 2]
    load_encoder(run_dir, "cpu")


def _start_two_process_run(folder: Path, out: Path, group: bool, **options: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "simclr_cli", "pretrain", str(folder), "--out", str(out),
                             "--devices", "2", "--device", "cpu", "--epochs", "100", "--batch-size", "16",
                             "--image-size", "32", "--stem", "imagenet", "--arch", "resnet18", "--workers", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=group,
                            **options)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
@pytest.mark.parametrize("group", [False, True], ids=["launcher", "process-group"])
def test_a_signal_on_two_processes_saves_a_checkpoint_and_exits_130(small_digits_folder, tmp_path, group, sig):
    """SIGTERM or SIGINT to the launcher alone (`kill -INT`, Jupyter's or an IDE's stop button), or to every
    process (Slurm's scancel, systemd, `kill -- -PGID`, the terminal's Ctrl-C): the processes save and hand
    their result back, and the command names the run's own folder.

    The launcher used to leave SIGTERM to PyTorch's launcher, which passed it on and then waited 30 s for
    processes that had saved but could not hand back their result, and killed them (also one mid-step: a
    step on a CPU can outlast 30 s); it ignored a SIGINT, and the run trained to its end. Under a group kill
    each process gets the signal twice, from the sender and from the launcher, which must still be one
    request to save, not the second signal that stops at once.
    """
    out = tmp_path / "term run"
    process = _start_two_process_run(small_digits_folder, out, group)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (out / "metrics.jsonl").is_file():
        time.sleep(0.2)
    while time.monotonic() < deadline and not (out / "metrics.jsonl").read_text().strip():
        time.sleep(0.2)
    if group:
        os.killpg(process.pid, sig)
    else:
        process.send_signal(sig)
    _, stderr = _communicate(process, timeout=180)
    assert process.returncode == 130, stderr
    state = load_checkpoint(out / "checkpoint.safetensors").progress["state"]
    assert state["step"] >= 1 and not state["finished"]
    # The result came back from the processes: the launcher's own shutdown would have said "stopped by SIGTERM".
    assert (f"interrupted after step {state['step']}; checkpoint saved. Continue with: simclr pretrain --resume "
            f"{shlex.quote(str(out))} --devices 2") in " ".join(stderr.split()), stderr
    assert "Traceback" not in stderr and "death signal" not in stderr, stderr  # nor the launcher's own log


def _communicate(process: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """process.communicate(), its process group killed after `timeout`."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise


def test_ctrl_c_while_the_processes_set_up_stops_them(tiny_folder, tmp_path):
    """The processes started with SIGINT ignored (the launcher's), and took it only once training: a Ctrl-C
    while they imported and set up was lost and the run trained to its end; without that, it printed each
    process's traceback."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = tmp_path / "run"
    process = _start_two_process_run(tiny_folder, out, True, env={**os.environ, "TMPDIR": str(scratch)})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(scratch.glob("simclr-launch-*/launcher/*/attempt_0")):
        time.sleep(0.05)  # the launcher's folder for its processes: they start next
    time.sleep(1.0)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = _communicate(process, timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.startswith("stopped") and len(stderr.strip().splitlines()) == 1, stderr
    assert not (out / "checkpoint.safetensors").exists()


def test_sigterm_while_the_processes_start_is_one_line_and_130(tiny_folder, tmp_path):
    """Before the processes can save anything: the launcher stops them at once, and says so on one line."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    process = _start_two_process_run(tiny_folder, tmp_path / "run", False, env={**os.environ, "TMPDIR": str(scratch)})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(scratch.glob("simclr-launch-*")):
        time.sleep(0.05)
    time.sleep(0.2)  # its handler is set just after the folder is made
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.startswith("stopped by SIGTERM") and len(stderr.strip().splitlines()) == 1, stderr
    # The run's folder had no settings yet: a --resume of it was refused.
    assert stderr.strip().endswith("nothing was saved yet: run the same command again"), stderr
    assert not list(scratch.iterdir())  # the launch's own folder went with it


def _pretrain_with_a_file_missing_on_rank_one(data: str, out: str) -> None:
    """Pretrain where process 1's scan misses a file (another machine's copy of the data, a file added
    between the scans)."""
    from simclr_cli import train
    from simclr_cli.runtime import rank

    if rank() == 1:
        scan = train.scan_images

        def missing_one(*args, **kwargs):
            found = scan(*args, **kwargs)
            found.paths = found.paths[1:]
            return found
        train.scan_images = missing_one  # type: ignore[assignment]
    config = PretrainConfig(data_dir=data, out_dir=out, epochs=1, batch_size=8, arch="resnet18", stem="imagenet",
                            devices=2, augment=AugmentConfig(image_size=32),
                            runtime=RuntimeConfig(device="cpu", workers=0, seed=0)).validate()
    train.PretrainRun(config).run()


def test_processes_that_found_different_images_stop_with_one_line(tiny_folder, tmp_path):
    """They batched differently and waited for each other's steps for ever."""
    from simclr_cli.errors import DataError

    with pytest.raises(DataError, match=r"the processes found different images \(by rank: 16, 15\)"):
        distributed.launch(_pretrain_with_a_file_missing_on_rank_one, (str(tiny_folder), str(tmp_path / "run")),
                           devices=2)


def _warnings_of_a_pretrain(data: str, out: str) -> list[str]:
    """Pretrain one epoch; rank 0 returns the warnings it reported."""
    from simclr_cli import train
    from simclr_cli.runtime import is_main

    warnings: list[str] = []

    def report(kind, **fields):
        if kind == "warning":
            warnings.append(fields["text"])
    config = PretrainConfig(data_dir=data, out_dir=out, epochs=1, batch_size=8, arch="resnet18", stem="imagenet",
                            devices=2, augment=AugmentConfig(image_size=32),
                            runtime=RuntimeConfig(device="cpu", workers=0, seed=0)).validate()
    train.PretrainRun(config, report if is_main() else train.silent).run()
    return warnings


def test_unreadable_images_found_by_any_process_are_warned_of(small_digits_folder, tmp_path, cut_image, monkeypatch):
    """Each process decodes its share of every batch; those found by process 1 were listed in skipped.json,
    but warned of by no one (process 1 reports nothing)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted(small_digits_folder.rglob("*.png"))[:21]:
        shutil.copy(path, images / f"{path.parent.name}_{path.name}")
    for index in range(3):  # 24 images: three whole batches of 8, every image decoded
        cut_image(images / f"cut{index}.png", index)
    warnings = distributed.launch(_warnings_of_a_pretrain, (str(images), str(tmp_path / "run")), devices=2)
    skipped = json.loads((tmp_path / "run" / "skipped.json").read_text())
    assert len(skipped) == 3
    assert sorted(w for w in warnings if w.startswith("skipped")) == sorted(
        f"skipped {item['path']}: {item['reason']}" for item in skipped)


class _Clock:
    """`time` for train.py in one process: each reading `tick` seconds after the one before."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 0.0, tick

    def monotonic(self) -> float:
        self.now += self.tick
        return self.now


def _weights_apart_after_a_time_budget(data: str, out: str) -> list[float]:
    """Pretrain under --max-time with clocks that disagree between the processes; return how far each
    process's weights are from rank 0's."""
    from simclr_cli import train
    from simclr_cli.runtime import rank

    train.time = _Clock(0.25 if rank() == 0 else 0.3)  # type: ignore[assignment]
    config = PretrainConfig(data_dir=data, out_dir=out, epochs=1000, batch_size=8, arch="resnet18", stem="imagenet",
                            max_time=8.0, warmup_epochs=0.0, devices=2, augment=AugmentConfig(image_size=32),
                            runtime=RuntimeConfig(device="cpu", workers=0, seed=0)).validate()
    run = train.PretrainRun(config)
    run.run()
    weights = torch.cat([p.detach().flatten() for p in run.model.parameters()])
    rank0 = weights.clone()
    torch.distributed.broadcast(rank0, src=0)
    return distributed.gather_objects([(weights - rank0).abs().max().item()])


def test_a_time_budget_keeps_the_processes_weights_equal(tiny_folder, tmp_path, monkeypatch):
    """The learning rate follows the time spent: each process read its own clock, stepped at its own
    rate, and DDP (which averages gradients, not weights) left the copies of the model apart."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert distributed.launch(_weights_apart_after_a_time_budget, (str(tiny_folder), str(tmp_path / "run")),
                              devices=2) == [0.0, 0.0]
    assert len(_metrics(tmp_path / "run")) >= 4


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (NCCL, SyncBatchNorm)")
def test_pretrain_on_two_gpus_with_sync_batchnorm(tiny_folder, tmp_path):
    run_dir = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(tiny_folder), "--devices", "2", "--device", "cuda", "--out",
                                 str(run_dir), "--image-size", "32", "--stem", "imagenet", "--epochs", "1",
                                 "--batch-size", "8", "--sync-bn", "--workers", "0"])
    assert result.exit_code == 0, result.output
    backbone, _ = load_encoder(run_dir, "cpu")
    assert all(torch.isfinite(t).all() for t in backbone.state_dict().values())
    assert [m["step"] for m in _metrics(run_dir)] == [1, 2]

"""Many processes, one per device: launching, the process group, gathers with gradients, global BN.

`simclr pretrain --devices N` starts N processes on this machine through torch's elastic launcher
(the engine behind `torchrun`); `torchrun ... -m simclr_cli pretrain ...` starts them across
machines. Either way each process finds RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT in its
environment and joins the process group here: NCCL for CUDA tensors, gloo for CPU tensors (the
small control messages, and whole runs on the CPU). Everything returns neutral values without a
process group, so single-process runs never touch torch.distributed.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from simclr_cli import errors as simclr_errors
from simclr_cli.config import check_sizes
from simclr_cli.errors import ConfigError, SimclrError, os_error_message
from simclr_cli.runtime import (StopFlag, is_distributed, local_rank, rank, reply_at_once, resolve_device,
                                world_size)

_ERROR_FILE = "error-rank{}.txt"
_STOPPED = "stopped at once"  # a report's kind for a worker that a signal stopped without saving
_OTHER_SIGNAL = {signal.SIGINT: signal.SIGTERM, signal.SIGTERM: signal.SIGINT}
# How long a worker whose call failed waits before it ends, where others are running: the launcher reports the
# first failure it sees, one alone, and a failure in a collective is most often another process's death.
PEER_GRACE_SECONDS = 3.0


def launched() -> bool:
    """Whether this process was started by torchrun or the elastic launcher (it should join a group).

    RANK and WORLD_SIZE alone are not enough: other tools (and other jobs' environments) set them, and a
    plain `simclr pretrain` then failed with torch's traceback over a missing MASTER_ADDR.
    """
    return "TORCHELASTIC_RUN_ID" in os.environ or all(
        name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def check_devices(devices: int, device_spec: str) -> None:
    """Fail early, in the launching process, when --devices cannot be honoured here."""
    check_sizes(devices=devices)  # again here: a --resume's config is not validated before the launch
    if device_spec.startswith("cuda:"):  # each process takes GPU LOCAL_RANK: an index would put all on one
        raise ConfigError(f"--device {device_spec} with --devices {devices}: the processes take GPUs 0 to "
                          f"{devices - 1}, one each; pass --device cuda, or --devices 1 to use {device_spec} alone")
    device = resolve_device(device_spec)
    if device.type == "mps":
        raise ConfigError(f"--devices {devices}: Apple's MPS backend runs one process only; use --device cpu "
                          f"or --devices 1")
    if device.type == "cuda" and devices > torch.cuda.device_count():
        raise ConfigError(f"--devices {devices}: only {torch.cuda.device_count()} GPU(s) here; pass at most "
                          f"--devices {torch.cuda.device_count()} (or use torchrun for several machines)")


def launch(entrypoint: Callable[..., Any], args: Sequence[Any], devices: int, device: str = "auto",
           resume: Callable[[], str | None] | None = None, answer: Callable[[str], None] | None = None) -> Any:
    """Run entrypoint(*args) in `devices` processes on this machine; return rank 0's result.

    Uses torch's elastic launcher (standalone rendezvous on a free local port, no restarts).
    Each process joins the process group for `device` (the run's --device) before the call and leaves
    it after. A SimclrError or an OSError (a full disk) in any process comes back as the same one-line
    error here, and so does a process killed (by the out-of-memory killer, say); other exceptions raise
    the launcher's ChildFailedError, whose message holds the worker's traceback (the launcher's own log
    is muted).

    Ctrl-C and SIGTERM sent to this process are passed on to the workers, which checkpoint at the end
    of their step and return together (the launcher's own handling sent a Ctrl-C's workers a second
    signal, which stops a worker at once, and waited 30 s for a SIGTERM's workers to return, then
    killed them, on a CPU before a long step ended). A worker takes the copy passed on and the
    terminal's own (or the group kill's) as one request. A second SIGINT or SIGTERM to this process,
    or SIGHUP or SIGQUIT (the launcher's), stops the workers at once, as a second one sent to them
    does. Stopped before the workers return, the Interrupted error (exit code 130) names `resume()`,
    the command that continues, or says to run the command again when it gives None (nothing saved).

    The first signal is answered at once by the process that draws the progress, as in one process: rank 0's
    StopFlag where the workers draw it (pretrain), `answer(name)` here where this process does (embed, whose
    workers report nothing), on a thread of its own, once, when the signal is passed on.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    error_dir = Path(tempfile.mkdtemp(prefix="simclr-launch-"))
    # The launcher's own log (its modules' loggers set their levels themselves, so each one is muted).
    launcher_logs = [logging.getLogger(name) for name in ["torch.distributed.elastic", "torch.multiprocessing.spawn",
                                                          *logging.root.manager.loggerDict]
                     if name.startswith(("torch.distributed.elastic", "torch.multiprocessing"))]
    saved_levels = [log.level for log in launcher_logs]
    # The launcher's per-run folder goes inside error_dir, removed at the end (by default a torchelastic_* folder
    # was left in the temp folder by every run).
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=devices, run_id=str(uuid.uuid4()),
                          logs_specs=DefaultLogsSpecs(log_dir=str(error_dir / "launcher")),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.2, start_method="spawn", signals_to_handle="SIGHUP,SIGQUIT")
    saved_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP,
                                                             signal.SIGQUIT)}
    passed_on: list[int] = []
    answering: list[threading.Thread] = []

    def pass_on(signum: int, frame: Any) -> None:
        received = signal.Signals(signum)
        if passed_on or not multiprocessing.active_children():  # a second one, or no worker started yet
            # The launcher stops the workers with the signal other than their request to save: the same one,
            # within StopFlag.REPEAT_SECONDS, would be taken for that request again.
            stopping = _OTHER_SIGNAL[signal.Signals(passed_on[0])] if passed_on else received
            raise SignalException(received.name, sigval=stopping)
        passed_on.append(signum)
        for worker in multiprocessing.active_children():  # the launcher's, spawned from this process
            try:
                os.kill(worker.pid, signum)
            except ProcessLookupError:
                pass
        if answer is not None:
            answering.append(reply_at_once(answer, signum))

    signal.signal(signal.SIGINT, pass_on)
    signal.signal(signal.SIGTERM, pass_on)
    for log in launcher_logs:
        log.setLevel(logging.CRITICAL)
    saved_tempdir, tempfile.tempdir = tempfile.tempdir, str(error_dir)  # where a failing worker's error file goes
    try:
        with _sigint_held_for_workers():
            results = elastic_launch(config, _in_group)(entrypoint, tuple(args), device, str(error_dir))
        return results[0]
    except SignalException as stop:
        name = str(stop) if str(stop) in ("SIGINT", "SIGTERM") else stop.sigval.name  # pass_on's, or the launcher's
        raise simclr_errors.Interrupted(f"stopped by {name}: the workers were stopped at once{_kept(resume)}") \
            from None
    except Exception as failure:
        reports = _reports(error_dir)
        if reports:
            kind, message = reports[0]
            if kind == _STOPPED:  # a second Ctrl-C or SIGTERM in a worker (the others may have failed of it)
                raise simclr_errors.Interrupted(f"stopped at once: the workers stopped without "
                                                f"saving{_kept(resume)}") from None
            error_class = getattr(simclr_errors, kind, SimclrError)
            raise (error_class if issubclass(error_class, SimclrError) else SimclrError)(message) from None
        if passed_on:  # a worker ended by the SIGTERM outside its loop, where it is not caught (while starting)
            raise simclr_errors.Interrupted(f"stopped by {signal.Signals(passed_on[0]).name}: the workers were "
                                            f"stopped at once, before they could save{_kept(resume)}") from None
        ended = _ended_without_a_word(failure)
        if ended is None:  # a bug: the launcher's error holds the worker's traceback
            raise
        raise SimclrError(f"{ended}; the other processes were stopped{_kept(resume)}") from None
    finally:
        for replying in answering:  # the answer comes before the line that ends the command
            replying.join(timeout=1.0)
        tempfile.tempdir = saved_tempdir
        for log, level in zip(launcher_logs, saved_levels):
            log.setLevel(level)
        for sig, handler in saved_handlers.items():
            signal.signal(sig, handler)
        shutil.rmtree(error_dir, ignore_errors=True)


def _ended_without_a_word(failure: Exception) -> str | None:
    """What ended a worker that left no error (killed by a signal, an exit code alone), in words; None for a worker
    that raised (its traceback is in the launcher's error) and for failures that are not a worker's."""
    first_failure = getattr(failure, "get_first_failure", None)  # the launcher's ChildFailedError
    if first_failure is None:
        return None
    failed_rank, process = first_failure()
    if process.exitcode < 0:
        name = process.signal_name()
        return f"process {failed_rank} was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    if os.path.isfile(process.error_file):
        return None
    return f"process {failed_rank} ended with exit code {process.exitcode}"


def _kept(resume: Callable[[], str | None] | None) -> str:
    """The end of a stopped launch's message: what is kept, and the command that goes on from it."""
    if resume is None:
        return "; what they saved before is kept"
    command = resume()
    return (f"; what they saved before is kept; continue with `{command}`" if command
            else "; nothing was saved yet: run the same command again")


@contextlib.contextmanager
def _sigint_held_for_workers() -> Iterator[None]:
    """Start the workers with SIGINT blocked, held until _in_group takes it: they inherit this thread's mask.

    A Ctrl-C while a worker starts (seconds of imports) printed its traceback, or, under an ignored
    SIGINT, was lost. This process takes SIGINT on a thread kept for it (Python runs the handler here).
    """
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX
        yield
        return
    from multiprocessing import resource_tracker

    # Started now: started with the workers, it would unblock SIGINT here (CPython's resource tracker does).
    resource_tracker.ensure_running()
    done = threading.Event()
    threading.Thread(target=done.wait, daemon=True, name="simclr-sigint").start()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        done.set()


def _in_group(entrypoint: Callable[..., Any], args: tuple, device: str, error_dir: str) -> Any:
    """A launched worker: join the group, run, leave; leave a SimclrError's message, or word of a stop, for the
    launcher."""
    # Ctrl-C stops the process until the run's StopFlag takes it as a request to save (a worker started with
    # SIGINT ignored, or held: a Ctrl-C while it set up was lost, the run trained to its end), and SIGTERM ends it.
    # The copy of a request that StopFlag took is let go after it too (see _unless_a_copy).
    signal.signal(signal.SIGINT, _unless_a_copy)
    signal.signal(signal.SIGTERM, _unless_a_copy)
    try:
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # one held while it started is taken here
        return run_in_group(entrypoint, *args, device=device)
    except SimclrError as error:
        _report(error_dir, type(error).__name__, str(error))
        raise
    except OSError as error:
        if isinstance(error, ConnectionError):  # a peer lost, as gloo's RuntimeError below
            _wait_for_a_dead_peer()
        else:  # a full disk, a folder this user cannot write: one line, as in one process
            _report(error_dir, SimclrError.__name__, os_error_message(error))
        raise
    except KeyboardInterrupt:
        # A second Ctrl-C or SIGTERM. torch's wrapper of the process takes a KeyboardInterrupt for its parent's death
        # and ends the process with code 0 and no result, which the launcher waited for for ever. The other
        # processes fail in their next collective: the report says why.
        _report(error_dir, _STOPPED, "")
        sys.exit(130)
    except Exception:
        _wait_for_a_dead_peer()
        raise
    finally:
        # Done: a signal passed on by the launcher now would kill the process before it hands back its result.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # The process ends next. Python collects garbage as it exits, over every object PyTorch made: frozen,
        # they are left out, and a 2-process CPU run ended 6 s sooner.
        gc.freeze()


def _wait_for_a_dead_peer() -> None:
    """After a failed call, before this process ends: waited for, a process killed (by the out-of-memory killer) is
    seen first, 15 polls of the launcher on, and named; the others' "Connection reset by peer" tracebacks from their
    collective reached the launcher first now and then. A bug in this process alone is still the first failure: the
    others wait on it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        with contextlib.suppress(KeyboardInterrupt):  # a Ctrl-C meanwhile: the failure is still what to report
            time.sleep(PEER_GRACE_SECONDS)


def _unless_a_copy(signum: int, frame: Any) -> None:
    """A worker's SIGINT or SIGTERM outside its StopFlag: stops the process (KeyboardInterrupt; SIGTERM's default
    action), unless it is the other copy of the request its StopFlag took.

    A Ctrl-C to the process group reaches a worker from the terminal and, up to one of the launcher's polls later
    (0.2 s: the launcher's main thread holds SIGINT, and runs the handler after its sleep), from the launcher. A
    worker whose batch ended sooner had saved and left its StopFlag, and the copy stopped it at once: "stopped at
    once: the workers stopped without saving", and, as the other worker waited for its result to be read, after the
    launcher's 30 s shutdown.
    """
    if StopFlag.repeats_request(signum):
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _report(error_dir: str, kind: str, message: str) -> None:
    """Leave the launcher this process's reason to stop: an error class's name and its message."""
    number = os.environ.get("RANK", "0")  # the group is left by now: runtime.rank() would say 0
    path = Path(error_dir, _ERROR_FILE.format(number))
    temporary = path.with_name(f".{path.name}.tmp")  # whole or not at all: the disk may be the full one
    with contextlib.suppress(OSError):
        temporary.write_text(f"{kind}\n{message}")
        os.replace(temporary, path)


def _reports(error_dir: Path) -> list[tuple[str, str]]:
    """The (kind, message) the failed processes left, in rank order."""
    found = []
    for path in sorted(error_dir.glob("error-rank*.txt")):
        with contextlib.suppress(OSError, ValueError):
            kind, message = path.read_text().split("\n", 1)
            found.append((kind, message))
    return found


def run_in_group(entrypoint: Callable[..., Any], *args: Any, device: str = "auto") -> Any:
    """Join the process group described by the environment for `device` (a --device), call entrypoint(*args),
    then leave it."""
    init_process_group(device)
    try:
        return entrypoint(*args)
    finally:
        if is_distributed():
            dist.destroy_process_group()


def init_process_group(device: str = "auto") -> None:
    """Join the group from torchrun's variables for a run on `device` (a --device): NCCL for CUDA tensors and
    gloo for CPU ones.

    Pins this process to GPU LOCAL_RANK on GPUs; on the CPU, splits the cores between the processes of
    this machine, so two processes do not each start a thread per core. The run's device decides, not
    the machine's: `--device cpu` on a machine with one GPU pinned process 1 to a GPU that is not there.
    """
    if is_distributed():
        return
    cuda = resolve_device(device).type == "cuda" and dist.is_nccl_available()
    if cuda:
        torch.cuda.set_device(local_rank())
    else:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_processes))
    try:
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo")
    except (ValueError, RuntimeError) as error:  # a variable missing or wrong, the address unreachable
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ConfigError(f"this process was started as one of several (RANK {os.environ.get('RANK')} of WORLD_SIZE "
                          f"{os.environ.get('WORLD_SIZE')}) but could not join their group: {reason}; start it "
                          f"with torchrun, or without those variables (--devices N for several processes)") from None


# -- collectives; each one is the identity (or the neutral value) without a process group ---------

class _AllGather(torch.autograd.Function):
    """all_gather whose backward hands each rank the sum, over all ranks, of its slot's gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        gathered = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        return tuple(gathered)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        grad = torch.stack(grads)  # (W, ...): this rank's loss's gradient for every rank's slot
        dist.all_reduce(grad)  # (W, ...): every rank's losses' gradients, summed
        return grad[rank()]


def all_gather_with_grad(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape on all), in rank order; gradients flow back to their owners.

    A loss over the gathered batch depends on this rank's rows through every rank's loss, so the
    backward pass sums the gradients of all ranks (an all-reduce; a reduce-scatter would send less).
    """
    if not is_distributed():
        return [tensor]
    return list(_AllGather.apply(tensor))


def gather_sizes(size: int) -> list[int]:
    """Every rank's `size`, in rank order (a CPU message: no GPU synchronisation)."""
    if not is_distributed():
        return [size]
    sizes = torch.zeros(world_size(), dtype=torch.long)
    sizes[rank()] = size
    dist.all_reduce(sizes)
    return sizes.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any: ranks must agree to stop, skip or end together."""
    if not is_distributed():
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def from_rank0(value: float) -> float:
    """Rank 0's `value` on every rank: a clock reading, from which every rank must compute the same
    learning rate (DDP averages gradients, never weights: a step at another rate leaves the copies apart)."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a (detached) tensor over ranks, e.g. global-loss shares into the global loss."""
    if not is_distributed():
        return value
    total = value.clone()
    dist.all_reduce(total)
    return total / world_size()


def gather_objects(items: list[Any]) -> list[Any]:
    """The concatenation of every rank's list of small picklable items, in rank order."""
    if not is_distributed():
        return items
    lists: list[Any] = [None] * world_size()
    dist.all_gather_object(lists, items)
    return [item for part in lists for item in part]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# -- models and data ------------------------------------------------------------------------------

def use_sync_bn(requested: bool | None, device: torch.device) -> bool:
    """Whether to turn BatchNorm into SyncBatchNorm: by default when distributed on GPUs.

    SimCLR normalises over the global batch ("global BN", section 4 of arXiv 2002.05709) so that a
    device cannot tell its own positives apart by their local batch statistics. torch's
    SyncBatchNorm runs on GPUs only: on the CPU each process normalises its own images.
    """
    if world_size() == 1:
        return False  # one process: BatchNorm already sees the whole batch
    if requested and device.type != "cuda":
        raise ConfigError(f"--sync-bn needs CUDA GPUs (torch's SyncBatchNorm); the device here is {device}. "
                          f"Pass --no-sync-bn: each process then normalises its own images")
    return device.type == "cuda" if requested is None else requested


def convert_sync_bn(model: nn.Module) -> nn.Module:
    """The model with every BatchNorm layer replaced by SyncBatchNorm (same parameters and keys)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """The model in DistributedDataParallel (gradients averaged over ranks), or itself alone."""
    if not is_distributed():
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def shard_order(order: Sequence[int], batch_size: int, start_step: int = 0) -> tuple[list[int], int]:
    """This rank's part of an epoch's global order, and its per-step batch size.

    Global batch s is order[s*B:(s+1)*B], as in a single process; rank r takes the contiguous slice
    [r*B//W, (r+1)*B//W) of every full batch from `start_step` on, so --batch-size is the global
    batch whatever the number of processes, and the global batch is the same images in the same order.
    """
    steps = len(order) // batch_size
    low, high = rank() * batch_size // world_size(), (rank() + 1) * batch_size // world_size()
    local = [index for step in range(start_step, steps)
             for index in order[step * batch_size + low:step * batch_size + high]]
    return local, high - low

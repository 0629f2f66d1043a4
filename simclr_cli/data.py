"""Datasets and loaders over image files that skip the files that fail to decode."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image

from simclr_cli.errors import WorkerDied
from simclr_cli.images import Skipped, UnreadableImage, load_rgb


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A seed that depends only on (run seed, epoch, image index): augmentations do not depend on
    worker count or batch order, so an interrupted run resumes bit for bit."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class ImageDataset(torch.utils.data.Dataset):
    """Images (and optional labels) through a transform; a bad file yields a Skipped marker.

    With `seed` set, the transform's randomness is drawn from a generator seeded by
    (seed, epoch, index); set `epoch` before each pass. `decode(index, path)` replaces
    load_rgb(path, min_side) (the decoded cache's reader, cache.WorkingImages, is one).
    """

    def __init__(self, paths: Sequence[Path | str], transform: Callable[[Image.Image], torch.Tensor],
                 labels: Sequence[int] | None = None, min_side: int | None = None, seed: int | None = None,
                 decode: Callable[[int, str], Image.Image] | None = None):
        self.paths = [str(p) for p in paths]
        self.transform = transform
        self.labels = list(labels) if labels is not None else None
        self.min_side = min_side
        self.seed = seed
        self.epoch = 0
        self.decode = decode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            image = self.decode(index, path) if self.decode else load_rgb(path, self.min_side)
        except UnreadableImage as error:
            return Skipped(path, str(error))
        if self.seed is None:
            sample = self.transform(image)
        else:
            with torch.random.fork_rng(devices=[]):
                # The CPU generator only: torch.manual_seed also seeds every device, 0.9 ms a call.
                torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
                sample = self.transform(image)
        label = self.labels[index] if self.labels is not None else -1
        return sample, label, index


@dataclass
class Batch:
    """A collated batch: samples (stacked), labels, dataset indices, and the files skipped.

    `params` holds batch_augment's parameter table when the samples are uint8 crops still to be
    augmented (the transform returned (crops, params) pairs).
    """

    samples: torch.Tensor | None
    labels: torch.Tensor
    indices: torch.Tensor
    skipped: list[Skipped]
    params: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.samples is None else self.samples.shape[0]

    def pin_memory(self) -> "Batch":
        if self.samples is not None:
            self.samples = self.samples.pin_memory()
        if self.params is not None:
            self.params = self.params.pin_memory()
        return self


def collate(items: list) -> Batch:
    """Stack the good items of a batch and collect the Skipped markers."""
    skipped = [item for item in items if isinstance(item, Skipped)]
    good = [item for item in items if not isinstance(item, Skipped)]
    if not good:
        return Batch(None, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), skipped)
    labels = torch.tensor([item[1] for item in good], dtype=torch.long)
    indices = torch.tensor([item[2] for item in good], dtype=torch.long)
    if isinstance(good[0][0], tuple):  # (uint8 crops, parameter table) from batch_augment.ViewSampler
        samples = torch.stack([item[0][0] for item in good])
        return Batch(samples, labels, indices, skipped, torch.stack([item[0][1] for item in good]))
    samples = torch.stack([item[0] for item in good])
    return Batch(samples, labels, indices, skipped)


def epoch_order(size: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of one epoch, a function of (seed, epoch) alone."""
    generator = torch.Generator().manual_seed(sample_seed(seed, epoch, -1))
    return torch.randperm(size, generator=generator).tolist()


# The share of an epoch's images that dropping its last, incomplete batch may leave out before batches are evened.
LEFT_OUT = 0.1


def even_batch(images: int, batch: int) -> int:
    """The batch size for an epoch of `images` in ceil(images / batch) equal steps, where batches of `batch` leave
    more than LEFT_OUT of the images out; else `batch`.

    Epochs drop their last, incomplete batch: 700 images at --batch-size 512 train on 512 an epoch. Two
    steps of 350 train on all 700; in general the images // steps of each step leave fewer than `steps` out.
    A few images left out (2 of 514) are not worth halving the batch; nor is a size that needs more steps
    (batches smaller than the step count)."""
    steps = -(-images // batch)
    even = images // steps
    evened = images // even == steps and images % even < images % batch
    return even if evened and images % batch > LEFT_OUT * images else batch


# Ctrl-C reaches every process of the terminal's group, and SIGTERM from Slurm (scancel, the time limit), systemd or
# `kill -- -PGID` every process of the job, the loader workers included: the main process alone decides how to stop,
# and ends its workers itself. A worker ignores SIGINT, and a SIGTERM from anyone but its parent; its parent's (the
# DataLoader stopping a slow worker, multiprocessing at exit) ends it, as PyTorch's own handler does. A SIGTERM is
# blocked from before the worker starts (PyTorch's handler would end the worker) until a thread waits for it.
SIGNALS_BY_SENDER = hasattr(signal, "sigwaitinfo")  # Linux; elsewhere PyTorch's handler stays
# All of that needs the workers forked from this thread: with its signal mask, and this process as their parent. Started
# by a forkserver (Python 3.14's default on Linux) they were the forkserver's children, and SIGTERM was not blocked.
_START = torch.multiprocessing.get_context("fork") if SIGNALS_BY_SENDER else None


def _quiet_worker(_: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if SIGNALS_BY_SENDER:
        threading.Thread(target=_end_on_sigterm_from, args=(os.getppid(),), daemon=True,
                         name="simclr-sigterm").start()


def _end_on_sigterm_from(parent: int) -> None:
    while True:  # an orphan (its parent killed outright) obeys anyone's SIGTERM
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent or os.getppid() != parent:
            os._exit(0)


class _Loader(torch.utils.data.DataLoader):
    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        if not SIGNALS_BY_SENDER:
            return _DeathsTold(super().__iter__())
        # The workers start here, with this thread's signal mask: SIGTERM blocked. Here it is held till after.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            return _DeathsTold(super().__iter__())
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# A worker killed with a batch on its way: the main process loses the connection that hands it the batch's shared
# memory (ConnectionResetError, EOFError) a moment before the worker can be seen dead, and PyTorch lets that error out
# as itself. The worker's SIGCHLD, PyTorch's handler raising "DataLoader worker ... is killed by signal", comes
# within this many seconds; a lost connection with no dead worker behind it waits them out, then goes on as itself.
DEATH_GRACE_SECONDS = 1.0


def _child_signals_here() -> bool:
    """Whether PyTorch's SIGCHLD handler, which raises for a dead loader worker, runs in this thread: the main
    thread, where there is SIGCHLD."""
    return hasattr(signal, "SIGCHLD") and threading.current_thread() is threading.main_thread()


class _DeathsTold:
    """A DataLoader's `batches` (with workers), where a connection lost to a dying worker ends them with PyTorch's
    own "DataLoader worker ... is killed by signal" error, not the OSError."""

    def __init__(self, batches: Iterator):
        self.batches = batches

    def __iter__(self) -> "_DeathsTold":
        return self

    def __next__(self):
        try:
            return next(self.batches)
        except (OSError, EOFError):
            if _child_signals_here():
                deadline = time.monotonic() + DEATH_GRACE_SECONDS
                while (left := deadline - time.monotonic()) > 0:
                    time.sleep(min(left, 0.05))  # PyTorch's SIGCHLD handler raises in here
            raise


# PyTorch warns, in two multi-line warnings naming its own files, when the workers outnumber the cores it counts.
# --workers is the user's to choose (loading from a network disk may want more), and pretrain's and embed's first lines
# say how many there are. (Set here, not per call: warning filters are global.)
warnings.filterwarnings("ignore", message=r"This DataLoader will create \d+ worker processes", category=UserWarning)


# Batches each worker prepares ahead, PyTorch's default. They wait in shared memory: 4, chosen with no measurement
# behind it, held 8 workers' 32 batches of 1.2 GB at --batch-size 4096 (224 px uint8 crops), 39 GB of /dev/shm.
PREFETCH = 2


def in_flight_bytes(workers: int, batch_bytes: int) -> int:
    """The bytes of the batches a make_loader's workers hold ready, at `batch_bytes` a batch (as the loader yields
    them); none without workers."""
    return workers * PREFETCH * batch_bytes


def make_loader(dataset: ImageDataset, batch_size: int, order: Sequence[int] | None, workers: int,
                drop_last: bool = False, pin_memory: bool = False,
                collate_fn: Callable[[list], Batch] = collate) -> torch.utils.data.DataLoader:
    """A DataLoader over `order` (dataset indices; None for the natural order) that skips bad files.

    `collate_fn` must build on `collate` (batch_augment.AugmentInLoader does)."""
    return _Loader(
        dataset,
        batch_size=batch_size,
        sampler=list(order) if order is not None else None,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_fn,
        drop_last=drop_last,
        pin_memory=pin_memory,
        worker_init_fn=_quiet_worker if workers > 0 else None,
        multiprocessing_context=_START if workers > 0 else None,
        prefetch_factor=PREFETCH if workers > 0 else None,
        persistent_workers=False,
    )


class UntilWorkerDies:
    """Iterates `batches` until they end or a loader worker dies (the kernel's OOM killer, a crash); `died` then
    says how (WorkerDied.how), where the loop can save the steps it finished and stop with one line.

    PyTorch learns of a dead worker from SIGCHLD, and its handler raises wherever the main thread is: in the middle
    of a training step (some parameters updated, some not), which a checkpoint then saved as the step before. The
    handler waits while the loop's body runs, and raises as the next batch is asked for, between steps.
    """

    def __init__(self, batches: Iterable[Batch]):
        self.batches = batches
        self.died: str | None = None

    def __iter__(self) -> Iterator[Batch]:
        batches, held = iter(self.batches), None
        try:
            while True:
                try:
                    if held is not None:
                        held.replay()
                    batch = next(batches)
                except StopIteration:
                    return
                except RuntimeError as error:
                    self.died = WorkerDied.how(error)
                    if self.died is None:
                        raise
                    return
                with _HeldChildSignals() as held:
                    yield batch
        finally:
            # A dead worker not reaped stays registered with PyTorch's SIGCHLD handler until its loader is
            # collected, and any SIGCHLD meanwhile raised "DataLoader worker ... is killed" wherever the main
            # thread was: in pytest's own code once, after a test that killed a worker (CI's INTERNALERROR).
            # Reaped here (multiprocessing waits for its finished children), the handler passes it over.
            multiprocessing.active_children()


class _HeldChildSignals:
    """SIGCHLD's handler set aside (where there is one, and this is the main thread): the signals are noted, and
    `replay` hands them to it."""

    def __enter__(self) -> "_HeldChildSignals":
        self.handler = signal.getsignal(signal.SIGCHLD) if _child_signals_here() else None
        self.noted = False
        if callable(self.handler):
            signal.signal(signal.SIGCHLD, self._note)
        return self

    def _note(self, signum: int, frame) -> None:
        self.noted = True

    def __exit__(self, *exc) -> None:
        if callable(self.handler):
            signal.signal(signal.SIGCHLD, self.handler)

    def replay(self) -> None:
        if self.noted and callable(self.handler):
            self.handler(signal.SIGCHLD, None)


def to_device_ahead(batches: Iterable[Batch], device: torch.device) -> Iterable[Batch]:
    """Yield batches with samples on `device`, each copied while the one before is used (params stay on the CPU).

    On a CUDA device the copy runs on a side stream, one batch ahead, from pinned memory; the
    training stream waits for that copy alone (an event), never the host. Elsewhere a pass-through.
    """
    if device.type != "cuda":
        yield from batches
        return
    stream = torch.cuda.Stream(device)
    pending: tuple[Batch, torch.cuda.Event] | None = None
    for batch in batches:
        with torch.cuda.stream(stream):
            if batch.samples is not None:
                batch.samples = batch.samples.to(device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        if pending is not None:
            yield _on_current_stream(*pending)
        pending = (batch, copied)
    if pending is not None:
        yield _on_current_stream(*pending)


def _on_current_stream(batch: Batch, copied: "torch.cuda.Event") -> Batch:
    current = torch.cuda.current_stream()
    current.wait_event(copied)
    if batch.samples is not None:
        batch.samples.record_stream(current)  # its memory is not reused before the training stream is done
    return batch

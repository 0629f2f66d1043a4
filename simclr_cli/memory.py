"""Whether a training batch fits in the CPU's free memory, and how many images do.

Training keeps every view's activations until the backward pass: a resnet50 at 224 px keeps about
86 MB a view in fp32, so pretraining's default batch of 256 images (512 views) needs about 52 GB,
more than most machines without a GPU have, and the kernel would kill the process mid-step.
Pretraining then uses gradient caching (gradcache.py, --chunk-size), which keeps the loss over the
whole batch with only a chunk's activations alive; fine-tuning trains on a smaller batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from simclr_cli.files import format_bytes
from simclr_cli.gradcache import batchnorm_buffers_kept
from simclr_cli.runtime import Precision

MEMORY_SHARE = 0.8  # of the memory free at the start, what a run may plan to use
TRANSIENT = 1.25  # the backward pass's own buffers, on top of the activations it frees as it goes
STATE_COPIES = 4  # weights, gradients and up to two optimiser buffers (LARS momentum, AdamW's two)
# Of the memory share, the most that the batches loader workers hold ready may take: counted against the batch
# alone, 16 workers' float32 views at 224 px took all of it and left chunks of one image, which free none of theirs.
LOADER_SHARE = 0.25


def activation_bytes(model: nn.Module, image_size: int, precision: Precision, views: int = 2) -> int:
    """The bytes that a forward pass keeps for the backward pass, per view: what `2 * views` blank views keep
    beyond what `views` keep, over `views`. What does not grow with the batch drops out: under autocast, the
    low-precision copies of the weights that each layer keeps (counted as a bf16 resnet18's activations, they
    made the estimate 8-19 times what a step took)."""
    return math.ceil((_saved_bytes(model, image_size, precision, 2 * views)
                      - _saved_bytes(model, image_size, precision, views)) / views)


def _saved_bytes(model: nn.Module, image_size: int, precision: Precision, views: int) -> int:
    """The bytes of the tensors autograd saves in a forward pass of `views` blank views, each storage counted
    once, the parameters left out."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    blank = torch.zeros(views, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
    modes = {module: module.training for module in model.modules()}
    model.train()  # as it trains (BatchNorm keeps more in training mode)
    try:
        with batchnorm_buffers_kept(model), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            with precision.autocast():
                model(blank)
    finally:
        for module, training in modes.items():
            module.training = training
    return sum(saved.values())


def available_memory() -> int | None:
    """Bytes the kernel can give this process without swapping (Linux's MemAvailable), or within its container's
    memory limit if that leaves less; None if unknown."""
    known = [value for value in (_meminfo_available(), _cgroup_available()) if value is not None]
    return min(known) if known else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


CGROUP = Path("/sys/fs/cgroup")  # where the cgroup hierarchies are mounted
PROC_CGROUP = Path("/proc/self/cgroup")  # this process's cgroup in each of them
CGROUP_FILES = (("", "memory.max", "memory.current", "inactive_file"),  # v2: (where, limit, usage, memory.stat key)
                ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"))  # v1


def _cgroup_available() -> int | None:
    """Bytes left under the tightest memory limit of this process's cgroup and the ones above it (Docker's
    --memory, a Kubernetes limit, Slurm's or systemd's MemoryMax), the file cache the kernel can drop not
    counted as used; None without a limit. MemAvailable is the machine's: under a limit it can be many
    times what the process may have before it is killed."""
    left = []
    for where, limit_file, usage_file, inactive_key in CGROUP_FILES:
        for folder in _cgroup_folders(CGROUP / where, v1=bool(where)):
            try:
                limit = (folder / limit_file).read_text().strip()
                if limit == "max" or int(limit) >= 1 << 60:  # v1 writes "no limit" as the largest page-aligned number
                    continue
                usage = int((folder / usage_file).read_text())
                stats = (folder / "memory.stat").read_text().split("\n")
                inactive = next((int(line.split()[1]) for line in stats if line.startswith(inactive_key + " ")), 0)
            except (OSError, ValueError, IndexError):
                continue
            left.append(max(0, int(limit) - (usage - inactive)))
    return min(left) if left else None


def _cgroup_folders(root: Path, v1: bool) -> list[Path]:
    """This process's cgroup folder under `root` and those above it, up to `root`; `root` alone where the
    process's path is not there (a container sees its own cgroup as the root)."""
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:
        return [root]
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "-", "")
        if ("memory" in controllers.split(",")) if v1 else controllers == "":
            relative = Path(path.lstrip("/"))
            if ".." in relative.parts or not (root / relative).is_dir():  # outside this namespace's root, or unseen
                return [root]
            return [root / relative, *(root / parent for parent in relative.parents)]  # the last parent is "."
    return [root]


def fitting_chunk(per_view: int, state_bytes: int, batch_size: int, available: float,
                  views_per_image: int = 2, loader_bytes: int = 0) -> int | None:
    """None if a batch of `batch_size` images fits in MEMORY_SHARE of `available` bytes; otherwise the most
    images whose activations fit beside the model's state and the `loader_bytes` of batches that the loader
    workers hold ready (at least 1)."""
    budget = MEMORY_SHARE * available - STATE_COPIES * state_bytes - loader_bytes
    per_image = views_per_image * per_view * TRANSIENT
    if batch_size * per_image <= budget:
        return None
    return max(1, int(budget // per_image))


@dataclass(frozen=True)
class Shortfall:
    """A batch too large for the free memory: the most images that fit, and the numbers behind it."""

    images: int
    needed: float  # bytes the whole batch would take
    available: float  # bytes free

    def describe(self, batch_size: int) -> str:
        return (f"a batch of {batch_size} images needs about {format_bytes(self.needed)} here and "
                f"{format_bytes(self.available)} is free")


def fitting_workers(workers: int, worker_bytes: int, report: Callable[..., None]) -> int:
    """The most of `workers` loader processes whose ready batches (`worker_bytes` each) fit in LOADER_SHARE of
    this CPU's memory share, with a warning when that is fewer; all of them if the free memory is unknown."""
    available = available_memory()
    if available is None or worker_bytes <= 0:
        return workers
    fitting = min(workers, int(LOADER_SHARE * MEMORY_SHARE * available // worker_bytes))
    if fitting < workers:
        report("warning", text=f"{workers} loader workers would hold {format_bytes(workers * worker_bytes)} of "
                               f"batches ready, and {format_bytes(available)} is free: using {fitting} (--workers "
                               f"sets it)")
    return fitting


def batch_shortfall(model: nn.Module, image_size: int, precision: Precision, batch_size: int,
                    views_per_image: int = 2, loader_bytes: int = 0) -> Shortfall | None:
    """How a training batch overflows this CPU's free memory, or None if it fits (or the free memory is unknown).

    `loader_bytes`: what the loader workers hold ready (data.in_flight_bytes), for a batch of `batch_size`; a
    smaller batch chosen for the shortfall holds less, so it leaves some room to spare."""
    available = available_memory()
    if available is None:
        return None
    per_view = activation_bytes(model, image_size, precision)
    state = sum(p.numel() * p.element_size() for p in model.parameters())
    images = fitting_chunk(per_view, state, batch_size, available, views_per_image, loader_bytes)
    if images is None:
        return None
    needed = views_per_image * batch_size * per_view * TRANSIENT + STATE_COPIES * state + loader_bytes
    return Shortfall(images, needed, available)

"""Whether a pretraining batch fits in the CPU's free memory, and the gradient-caching chunk that does.

Training keeps every view's activations until the backward pass: a resnet50 at 224 px keeps about
90 MB a view in fp32, so the default batch of 256 images (512 views) needs about 47 GB, more than
most machines without a GPU have; the kernel would kill the process mid-step. Gradient caching
(gradcache.py, --chunk-size) keeps the loss over the whole batch with only a chunk's activations alive.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from simclr_cli.gradcache import batchnorm_buffers_kept
from simclr_cli.runtime import Precision

MEMORY_SHARE = 0.8  # of the memory free at the start, what a run may plan to use
TRANSIENT = 1.25  # the backward pass's own buffers, on top of the activations it frees as it goes
STATE_COPIES = 4  # weights, gradients and up to two optimiser buffers (LARS momentum, AdamW's two)


def activation_bytes(model: nn.Module, image_size: int, precision: Precision, views: int = 2) -> int:
    """The bytes that a forward pass keeps for the backward pass, per view: measured on `views` blank
    views (the tensors autograd saves, each storage counted once, the parameters left out)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    blank = torch.zeros(views, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)
    with batchnorm_buffers_kept(model), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with precision.autocast():
            model(blank)
    return math.ceil(sum(saved.values()) / views)


def available_memory() -> int | None:
    """Bytes the kernel can give this process without swapping (Linux's MemAvailable), or None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def fitting_chunk(per_view: int, state_bytes: int, batch_size: int, available: int) -> int | None:
    """None if a batch of `batch_size` images (two views each) fits in MEMORY_SHARE of `available`
    bytes; otherwise the most images whose activations fit beside the model's state (at least 1)."""
    budget = MEMORY_SHARE * available - STATE_COPIES * state_bytes
    per_image = 2 * per_view * TRANSIENT
    if batch_size * per_image <= budget:
        return None
    return max(1, int(budget // per_image))


def cpu_chunk_size(model: nn.Module, image_size: int, precision: Precision, batch_size: int) -> tuple[int, str] | None:
    """The --chunk-size a CPU run needs, and a line that says why, or None when the batch fits (or the free
    memory is unknown)."""
    available = available_memory()
    if available is None:
        return None
    per_view = activation_bytes(model, image_size, precision)
    state = sum(p.numel() * p.element_size() for p in model.parameters())
    chunk = fitting_chunk(per_view, state, batch_size, available)
    if chunk is None:
        return None
    needed = 2 * batch_size * per_view * TRANSIENT + STATE_COPIES * state
    return chunk, (f"a batch of {batch_size} images needs about {needed / 2**30:.1f} GiB here and "
                   f"{available / 2**30:.1f} GiB is free: gradient caching, {chunk} images' activations at a time "
                   f"(the loss is still over the whole batch; BatchNorm statistics per chunk); --chunk-size sets it")

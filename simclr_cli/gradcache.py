"""Gradient caching: the gradients of a contrastive loss over a batch larger than memory.

Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"
(arXiv 2101.06983). NT-Xent couples every image with every other one, so a batch cannot simply be
split into independent pieces. But the loss depends on the parameters only through the
embeddings, so: (1) embed the whole batch chunk by chunk without a graph, (2) compute the loss on
the detached embeddings and back-propagate it to them alone (cheap: N x D numbers), (3) re-run each
chunk with a graph and back-propagate its slice of that cached gradient. The parameters' gradients
are those of the full batch, and only one chunk's activations are alive at any time.

Two things must be equal in passes (1) and (3) for this to hold:
- Randomness inside the forward pass (dropout, stochastic depth): each chunk's random state is
  saved before pass (1) and restored for pass (3). ResNets draw nothing in the forward pass (the
  augmentations are drawn by the data pipeline, per image), so for them this is a formality.
- BatchNorm: in training mode it normalises each chunk with the chunk's own statistics, in both
  passes alike, so the gradients are exact for "BN per chunk" (with SyncBatchNorm, per chunk of
  every device together). The running averages are updated once per chunk: pass (1) leaves them
  as they were.

BN per chunk would let a model find an image's positive by the statistics the two views share
when they are normalised together, a cue its negatives in other chunks lack (SimCLR section 4, on
why it uses global BN). So the two views of an image never share a chunk (`paired_chunks`), as in
MoCo's shuffling BN (arXiv 1911.05722, section 3.3).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
from torch import nn


def chunk_count(sizes: list[int], chunk_size: int) -> int:
    """How many chunks each rank splits its images into, the same on every rank.

    Enough that the largest rank's chunks hold at most `chunk_size` images; never more than the
    smallest rank's images, so no chunk is empty (ranks must run the same number of forward passes:
    SyncBatchNorm and DistributedDataParallel talk to each other in every one).
    """
    return max(1, min(math.ceil(max(sizes) / chunk_size), min(sizes)))


@contextlib.contextmanager
def batchnorm_buffers_kept(model: nn.Module) -> Iterator[None]:
    """Undo the running-statistics updates made inside the block."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{name: buf.clone() for name, buf in m.named_buffers(recurse=False) if buf is not None} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, buffers in zip(norms, saved):
                for name, value in buffers.items():
                    getattr(module, name).copy_(value)


class _RandomState:
    """The CPU generator and the current device's generator, saved to replay a forward pass."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def paired_chunks(images: int, chunks: int, device: torch.device | None = None) -> list[torch.Tensor]:
    """Row indices of each chunk of 2 x `images` views in pairs (image i's a view at row 2i, its b view at 2i + 1).

    The images are split into `chunks` nearly equal pieces; chunk j holds the a views of piece j
    and the b views of piece j + 1 (the last chunk takes the first piece's), so no chunk holds both
    views of an image. One chunk is the whole batch.
    """
    pieces = torch.arange(images, device=device).tensor_split(chunks)
    return [torch.cat([2 * piece, 2 * pieces[(j + 1) % chunks] + 1]) for j, piece in enumerate(pieces)]


def cached_backward(model: nn.Module, embed: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                    inputs: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                    chunks: list[torch.Tensor],
                    scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss) -> torch.Tensor:
    """Accumulate into the parameters' .grad the gradient of loss_fn(embed(model, inputs)); return the loss.

    embed(model, rows) maps rows of `inputs` to rows of embeddings, and is run on `chunks`, lists
    of row indices that cover every row once (`paired_chunks`); loss_fn gets the embeddings of all
    rows, in the order of `inputs`. `model` may be DistributedDataParallel: the gradients are then
    averaged over ranks once, after the last chunk. `scale` is applied to the loss before its
    backward pass (a GradScaler's scale for fp16).
    """
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    no_sync = model.no_sync if inner is not model else contextlib.nullcontext
    device = inputs.device
    states, embedded = [], []
    with torch.no_grad(), batchnorm_buffers_kept(inner):
        for rows in chunks:
            states.append(_RandomState(device))
            embedded.append(embed(inner, inputs[rows]))
    chunked = torch.cat(embedded)  # (R, ...) in chunk order
    embeddings = torch.empty_like(chunked)
    embeddings[torch.cat(chunks)] = chunked  # (R, ...) in the order of inputs, no graph behind it
    embeddings.requires_grad_()
    loss = loss_fn(embeddings)
    scale(loss).backward()  # the loss's gradient with respect to the embeddings only
    after = _RandomState(device)
    for index, (rows, state) in enumerate(zip(chunks, states)):
        state.restore()
        with no_sync() if index < len(chunks) - 1 else contextlib.nullcontext():
            embed(model, inputs[rows]).backward(embeddings.grad[rows])
    after.restore()
    return loss.detach()

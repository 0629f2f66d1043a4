"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(projections_a: torch.Tensor, projections_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Return the mean NT-Xent loss over the 2N views (SimCLR, arXiv 2002.05709, eq. 1).

    Row i of `projections_a` and row i of `projections_b` are the two views of image i. For each
    of the 2N views, the loss is the cross-entropy of its positive against the other 2N - 2 views
    (self-similarity masked out), with cosine similarities divided by the temperature. N comes from
    the inputs, so a short last batch works. Computed in float32 (cosines are at most 1, so the
    logits are at most 1/temperature and log-sum-exp keeps them stable even at 0.05).
    """
    if projections_a.shape != projections_b.shape or projections_a.dim() != 2:
        raise ValueError(f"expected two (N, D) tensors of one shape, got {tuple(projections_a.shape)} "
                         f"and {tuple(projections_b.shape)}")
    n = projections_a.shape[0]
    z = F.normalize(torch.cat([projections_a, projections_b]).float(), dim=1)  # (2N, D)
    views = torch.arange(2 * n, device=z.device)
    positives = torch.cat([views[n:], views[:n]])  # (2N,): a's partner is its b view and back
    return _ContrastiveSum.apply(z, positives, [(0, 2 * n)], temperature) / (2 * n)


def _chunk_rows(columns: int, device: torch.device) -> int:
    """Query rows per block: about 32 MB of logits on a CPU, 512 MB on a GPU."""
    elements = 2**23 if device.type == "cpu" else 2**27
    return max(1, elements // max(columns, 1))


class _ContrastiveSum(torch.autograd.Function):
    """sum over queries q of -log softmax(z[q] . z / temperature, own column excluded)[positive of q].

    The queries are the rows of z in `spans` ((begin, end) ranges, in order) and `positives` holds
    each query's positive column. The same numbers as the textbook (2N, 2N) logits with a masked
    diagonal and cross-entropy, but computed a block of query rows at a time and recomputed in the
    backward pass instead of kept: memory holds one block of logits, not several full (2N, 2N)
    matrices, and no eye mask or index tensor is built. Gradient, with P the softmax rows:
    d/dz[q] = (P z - z[positive]) / t and d/dz += (P^T z[q] - onehot(positive)^T z[q]) / t.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, positives: torch.Tensor, spans: list[tuple[int, int]], temperature: float):
        with _float32(z):
            rows = torch.cat([torch.arange(b, e, device=z.device) for b, e in spans])  # (Q,)
            positive_logits = (z[rows] * z[positives]).sum(dim=1) / temperature  # (Q,)
            log_normalisers = torch.cat([_logsumexp_(logits) for _, _, logits in _blocks(z, spans, temperature)])
        ctx.save_for_backward(z, rows, positives, log_normalisers)
        ctx.spans, ctx.temperature = spans, temperature
        return (log_normalisers - positive_logits).sum()

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        z, rows, positives, log_normalisers = ctx.saved_tensors
        scale = grad_total / ctx.temperature
        grad = torch.zeros_like(z)  # (M, D)
        done = 0
        with _float32(z):
            for begin, end, logits in _blocks(z, ctx.spans, ctx.temperature):
                softmax = logits.sub_(log_normalisers[done:done + end - begin, None]).exp_().mul_(scale)  # (c, M)
                grad[begin:end].addmm_(softmax, z)  # (c, M) @ (M, D)
                grad.addmm_(softmax.T, z[begin:end])  # (M, c) @ (c, D)
                done += end - begin
        grad.index_add_(0, rows, z[positives] * -scale)  # the positive logits' own terms (no host sync)
        grad.index_add_(0, positives, z[rows] * -scale)
        return grad, None, None, None


def _float32(z: torch.Tensor) -> torch.autocast:
    """Autocast off: called inside one (a caller's bf16 forward pass), the logits' matmuls would run in
    bf16 while the positive logits stay float32, and the loss would be off by a fifth at tau = 0.1."""
    return torch.autocast(z.device.type, enabled=False)


def _logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """log-sum-exp of each row, (c,), overwriting the (c, M) logits (no temporary copies)."""
    peak = logits.amax(dim=1, keepdim=True)  # (c, 1): finite, every row has its positive
    return logits.sub_(peak).exp_().sum(dim=1).log_().add_(peak.squeeze(1))


def _block_spans(spans: list[tuple[int, int]], columns: int, device: torch.device) -> list[tuple[int, int]]:
    step = _chunk_rows(columns, device)
    return [(b, min(b + step, end)) for begin, end in spans for b in range(begin, end, step)]


def _blocks(z: torch.Tensor, spans: list[tuple[int, int]], temperature: float):
    """(begin, end, logits) for each block of query rows z[begin:end] against every row of z, own
    column -inf: logits (c, M)."""
    for begin, end in _block_spans(spans, len(z), z.device):
        logits = (z[begin:end] / temperature) @ z.T  # (c, D) @ (D, M) -> (c, M)
        logits[:, begin:end].fill_diagonal_(float("-inf"))  # no view is its own candidate
        yield begin, end, logits


def global_nt_xent(projections_a: torch.Tensor, projections_b: torch.Tensor, temperature: float,
                   sizes: list[int] | None = None) -> torch.Tensor:
    """Return this process's share of NT-Xent over the global batch of every process (SimCLR section 4).

    Each process holds the two views of its own images; the projections of all processes are
    gathered with gradients flowing back, so every view is contrasted with all 2N - 2 other views
    of the global batch, as in the paper, not with its own device's alone. `sizes` lists every
    rank's image count (gathered when None), so ranks may hold different numbers of images.

    The share is (sum of this rank's views' losses) x world size / 2N: the mean of the shares over
    ranks is the global loss, and DistributedDataParallel's mean of gradients is its gradient.
    Without a process group this is `nt_xent`.
    """
    from simclr_cli.distributed import all_gather_with_grad, gather_sizes
    from simclr_cli.runtime import rank, world_size

    if world_size() == 1:
        return nt_xent(projections_a, projections_b, temperature)
    n = projections_a.shape[0]
    sizes = sizes if sizes is not None else gather_sizes(n)
    widest, total, offset = max(sizes), sum(sizes), sum(sizes[:rank()])
    local = torch.cat([projections_a, projections_b]).float()  # (2n, D): a views, then b views
    local = F.pad(local.view(2, n, -1), (0, 0, 0, widest - n)).view(2 * widest, -1)  # (2 widest, D)
    gathered = all_gather_with_grad(local)  # W x (2 widest, D)
    views_a = torch.cat([g[:size] for g, size in zip(gathered, sizes)])  # (N, D) in rank order
    views_b = torch.cat([g[widest:widest + size] for g, size in zip(gathered, sizes)])  # (N, D)
    z = F.normalize(torch.cat([views_a, views_b]), dim=1)  # (2N, D): global a views, then global b views
    rows_a = torch.arange(offset, offset + n, device=z.device)  # this rank's a views in z
    positives = torch.cat([rows_a + total, rows_a])  # (2n,): a's partner is its b view and back
    spans = [(offset, offset + n), (total + offset, total + offset + n)]  # this rank's a views, then b views
    return _ContrastiveSum.apply(z, positives, spans, temperature) * len(sizes) / (2 * total)

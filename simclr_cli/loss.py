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
    logits = z @ z.T / temperature  # (2N, 2N)
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)  # (2N, 2N)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)  # (2N,)
    return F.cross_entropy(logits, positives)


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
    rows = torch.cat([rows_a, rows_a + total])  # (2n,)
    logits = z[rows] @ z.T / temperature  # (2n, 2N)
    logits[torch.arange(2 * n, device=z.device), rows] = float("-inf")  # no view is its own candidate
    positives = torch.cat([rows_a + total, rows_a])  # (2n,): a's partner is its b view and back
    return F.cross_entropy(logits, positives, reduction="sum") * len(sizes) / (2 * total)

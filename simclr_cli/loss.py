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

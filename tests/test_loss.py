"""NT-Xent against a slow reference written from the paper's formula (SimCLR eq. 1 and Algorithm 1)."""

import math

import pytest
import torch

from simclr_cli.loss import nt_xent


def reference_nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, tau: float) -> torch.Tensor:
    """Algorithm 1 of arXiv 2002.05709, literally: views interleaved as (2k-1, 2k), python loops,
    l(i, j) = -log exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau), averaged over all 2N views."""
    views = []
    for a, b in zip(z_a, z_b):
        views += [a, b]

    def sim(u, v):
        return (u @ v) / (u.norm() * v.norm())

    def pair_loss(i, j):
        numerator = torch.exp(sim(views[i], views[j]) / tau)
        denominator = sum(torch.exp(sim(views[i], views[k]) / tau) for k in range(len(views)) if k != i)
        return -torch.log(numerator / denominator)

    n = len(z_a)
    total = sum(pair_loss(2 * k, 2 * k + 1) + pair_loss(2 * k + 1, 2 * k) for k in range(n))
    return total / (2 * n)


@pytest.mark.parametrize("n", [1, 2, 5, 16])
@pytest.mark.parametrize("dim", [3, 32, 128])
@pytest.mark.parametrize("tau", [0.05, 0.1, 0.5, 1.0])
def test_value_and_gradients_match_reference(n, dim, tau):
    torch.manual_seed(n * 1000 + dim)
    z_a = torch.randn(n, dim, dtype=torch.float64, requires_grad=True)
    z_b = torch.randn(n, dim, dtype=torch.float64, requires_grad=True)
    expected = reference_nt_xent(z_a, z_b, tau)
    grad_a_ref, grad_b_ref = torch.autograd.grad(expected, [z_a, z_b])

    # Our loss computes in float32: compare with the float64 reference at float32 precision.
    a32 = z_a.detach().float().requires_grad_()
    b32 = z_b.detach().float().requires_grad_()
    actual = nt_xent(a32, b32, tau)
    actual.backward()
    assert actual.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-5)
    torch.testing.assert_close(a32.grad.double(), grad_a_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b32.grad.double(), grad_b_ref, rtol=1e-4, atol=1e-6)


def test_identical_views_far_from_others_give_small_loss():
    # Orthogonal images, identical views: the positive dominates every row.
    z = torch.eye(4) * 3
    assert nt_xent(z, z.clone(), 0.1).item() < 1e-3
    # Same views but shuffled partners: the positive is the worst candidate, loss is large.
    assert nt_xent(z, z.roll(1, dims=0), 0.1).item() > 5


def test_single_image_batch_has_no_negatives_and_zero_loss():
    z_a, z_b = torch.randn(1, 8), torch.randn(1, 8)
    assert nt_xent(z_a, z_b, 0.5).item() == pytest.approx(0.0, abs=1e-6)


def test_stable_at_low_temperature_with_large_and_bf16_inputs():
    torch.manual_seed(0)
    z_a = (torch.randn(64, 128) * 1e4).requires_grad_()
    z_b = (torch.randn(64, 128) * 1e4).requires_grad_()
    loss = nt_xent(z_a, z_b, 0.05)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(z_a.grad).all()
    bf16 = nt_xent(z_a.detach().bfloat16(), z_b.detach().bfloat16(), 0.05)
    assert bf16.dtype == torch.float32 and math.isfinite(bf16.item())


def test_float32_inside_a_callers_bf16_autocast():
    """Called within a bf16 forward pass, the loss and its gradients stay those of float32."""
    torch.manual_seed(0)
    z_a = torch.randn(256, 128)
    z_b = (z_a + 0.3 * torch.randn(256, 128)).requires_grad_()  # near-positive views: logits near 1 / tau
    expected = nt_xent(z_a, z_b, 0.1)
    (expected_grad,) = torch.autograd.grad(expected, z_b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nt_xent(z_a, z_b, 0.1)
        (grad,) = torch.autograd.grad(loss, z_b)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-7)


def test_uniform_random_projections_give_about_log_of_candidates():
    # With independent high-dimensional random views every similarity is near 0, so each row is a
    # near-uniform choice among 2N - 1 candidates.
    torch.manual_seed(1)
    n = 256
    loss = nt_xent(torch.randn(n, 4096), torch.randn(n, 4096), 10.0)
    assert loss.item() == pytest.approx(math.log(2 * n - 1), rel=1e-3)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape|one shape"):
        nt_xent(torch.randn(4, 8), torch.randn(5, 8), 0.1)


def test_blocks_of_query_rows_give_the_whole_matrix_result(monkeypatch):
    """The loss is computed a few query rows at a time; blocks that do not divide 2N change nothing."""
    import simclr_cli.loss as loss_module

    torch.manual_seed(0)
    z_a = torch.randn(10, 16, dtype=torch.float64, requires_grad=True)
    z_b = torch.randn(10, 16, dtype=torch.float64, requires_grad=True)
    expected = reference_nt_xent(z_a, z_b, 0.2)
    grads = torch.autograd.grad(expected, [z_a, z_b])
    monkeypatch.setattr(loss_module, "_chunk_rows", lambda columns, device: 3)  # blocks of 3 rows
    a32, b32 = (z.detach().float().requires_grad_() for z in (z_a, z_b))
    actual = nt_xent(a32, b32, 0.2)
    actual.backward()
    assert actual.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(a32.grad.double(), grads[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(b32.grad.double(), grads[1], rtol=1e-4, atol=1e-6)

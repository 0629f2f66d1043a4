"""Gradient caching: chunked gradients equal the whole batch's (simclr_cli/gradcache.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from simclr_cli.gradcache import cached_backward, chunk_count, paired_chunks
from simclr_cli.loss import nt_xent
from simclr_cli.models import SimCLR

TEMPERATURE = 0.2


def _embed(model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """(r, F) views -> (r, D) embeddings."""
    return model(rows)


def _loss(embeddings: torch.Tensor) -> torch.Tensor:
    """NT-Xent of (2N, D) embeddings in pairs: image i's two views at rows 2i and 2i + 1."""
    return nt_xent(embeddings[0::2], embeddings[1::2], TEMPERATURE)


def _gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.grad.clone() for name, param in model.named_parameters()}


def _whole_batch(model: nn.Module, samples: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = _loss(_embed(model, samples.flatten(0, 1)))
    loss.backward()
    return loss.detach(), _gradients(model)


def _chunked(model: nn.Module, samples: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    chunks = paired_chunks(len(samples), chunk_count([len(samples)], chunk_size))
    loss = cached_backward(model, _embed, samples.flatten(0, 1), _loss, chunks)
    return loss, _gradients(model)


def _assert_same(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor], rtol: float = 1e-4) -> None:
    assert expected.keys() == actual.keys()
    for name, reference in expected.items():
        scale = reference.abs().max().item() + 1e-12
        error = (actual[name] - reference).abs().max().item()
        assert error <= rtol * scale, f"{name}: gradient off by {error:g} (largest {scale:g})"


def _mlp(batchnorm: bool = False, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    norm = [nn.BatchNorm1d(32)] if batchnorm else []
    drop = [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(nn.Linear(12, 32), *norm, nn.ReLU(), *drop, nn.Linear(32, 8))


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 7, 10, 64])
def test_chunked_gradients_equal_whole_batch_without_batchnorm(chunk_size):
    model = _mlp()
    samples = torch.randn(10, 2, 12)
    expected_loss, expected = _whole_batch(model, samples)
    loss, actual = _chunked(model, samples, chunk_size)
    torch.testing.assert_close(loss, expected_loss)
    _assert_same(expected, actual)


def test_chunked_gradients_equal_whole_batch_for_a_resnet_with_eval_batchnorm():
    torch.manual_seed(0)
    model = SimCLR("resnet18", "imagenet", proj_dim=16).eval()  # BN uses running statistics: per image
    samples = torch.randn(5, 2, 3, 32, 32)
    chunk_size = 2  # chunks of 2, 2 and 1 images

    model.zero_grad()
    expected_loss = _loss(_embed(model, samples.flatten(0, 1)))
    expected_loss.backward()
    expected = _gradients(model)
    model.zero_grad()
    loss = cached_backward(model, _embed, samples.flatten(0, 1), _loss, paired_chunks(5, chunk_count([5], chunk_size)))
    torch.testing.assert_close(loss, expected_loss.detach(), rtol=1e-5, atol=1e-6)
    _assert_same(expected, _gradients(model), rtol=1e-3)


def _per_chunk_reference(model: nn.Module, samples: torch.Tensor, chunks: int):
    """The loss with each chunk forwarded (and normalised) on its own, all with a graph: slow, obvious.

    Chunk j holds the first views of the j-th piece of the images and the second views of the next.
    """
    model.zero_grad()
    pieces = samples.tensor_split(chunks)
    first, second = [], []
    for piece, following in zip(pieces, pieces[1:] + pieces[:1]):
        embedded = model(torch.cat([piece[:, 0], following[:, 1]]))
        first.append(embedded[:len(piece)])
        second.append(embedded[len(piece):])
    second = second[-1:] + second[:-1]  # piece j's second views were forwarded with chunk j - 1
    loss = nt_xent(torch.cat(first), torch.cat(second), TEMPERATURE)
    loss.backward()
    return loss.detach(), _gradients(model)


@pytest.mark.parametrize("chunk_size", [2, 4])
def test_training_batchnorm_gives_exact_gradients_of_per_chunk_statistics(chunk_size):
    samples = torch.randn(10, 2, 12)
    chunks = chunk_count([10], chunk_size)
    reference_model, model = _mlp(batchnorm=True).train(), _mlp(batchnorm=True).train()
    expected_loss, expected = _per_chunk_reference(reference_model, samples, chunks)
    loss, actual = _chunked(model, samples, chunk_size)
    torch.testing.assert_close(loss, expected_loss)
    _assert_same(expected, actual)
    # Running statistics moved once per chunk, as in the reference, not twice.
    torch.testing.assert_close(model[1].running_mean, reference_model[1].running_mean)
    torch.testing.assert_close(model[1].running_var, reference_model[1].running_var)
    assert model[1].num_batches_tracked.item() == reference_model[1].num_batches_tracked.item() == chunks


def test_randomness_in_the_forward_pass_is_replayed():
    samples = torch.randn(9, 2, 12)
    reference_model, model = _mlp(dropout=0.5), _mlp(dropout=0.5)
    torch.manual_seed(1)
    expected_loss, expected = _per_chunk_reference(reference_model, samples, 3)
    torch.manual_seed(1)
    loss, actual = _chunked(model, samples, 3)
    torch.testing.assert_close(loss, expected_loss)
    _assert_same(expected, actual)


@pytest.mark.parametrize("images,chunks", [(10, 2), (10, 3), (7, 7), (9, 4)])
def test_the_two_views_of_an_image_are_never_forwarded_together(images, chunks):
    """With BatchNorm per chunk, a pair normalised together would share statistics its negatives lack."""
    samples = torch.arange(images, dtype=torch.float32).repeat_interleave(2).view(images, 2, 1)  # image ids
    forwarded = []

    def embed(model, rows):
        forwarded.append(rows.flatten().tolist())
        return model(rows)

    cached_backward(nn.Linear(1, 4), embed, samples.flatten(0, 1), _loss, paired_chunks(images, chunks))
    assert len(forwarded) == 2 * chunks  # a pass without a graph, then one with, per chunk
    for ids in forwarded:
        assert len(ids) == len(set(ids)), f"both views of an image in one forward pass: {ids}"
    assert sorted(sum(forwarded[:chunks], [])) == sorted(samples.flatten().tolist())  # every view once


def test_one_chunk_is_the_whole_batch():
    assert [rows.tolist() for rows in paired_chunks(3, 1)] == [[0, 2, 4, 1, 3, 5]]


def test_chunk_count_is_shared_by_ranks_and_never_leaves_a_chunk_empty():
    assert chunk_count([10], 3) == 4
    assert chunk_count([10], 10) == 1
    assert chunk_count([10], 100) == 1
    assert chunk_count([8, 7], 2) == 4  # both ranks split into 4, so both run 4 forward passes
    assert chunk_count([8, 3], 1) == 3  # 8 chunks would leave the 3-image rank with empty ones


def test_pretrain_with_chunks_runs_and_exports(tmp_path, small_digits_folder):
    import shutil

    from simclr_cli.config import AugmentConfig, PretrainConfig, RuntimeConfig
    from simclr_cli.export import load_encoder
    from simclr_cli.train import pretrain

    images = tmp_path / "images"
    images.mkdir()
    for path in sorted(small_digits_folder.rglob("*.png"))[:20]:
        shutil.copy(path, images / f"{path.parent.name}_{path.name}")
    config = PretrainConfig(data_dir=str(images), out_dir=str(tmp_path / "run"), epochs=1,
                            batch_size=10, chunk_size=3, arch="resnet18", stem="imagenet",
                            augment=AugmentConfig(image_size=32),
                            runtime=RuntimeConfig(device="cpu", workers=0, seed=0))
    result = pretrain(config)
    assert result.state.step == 2 and result.final_loss is not None
    backbone, info = load_encoder(result.run_dir, "cpu")
    assert info.arch == "resnet18"

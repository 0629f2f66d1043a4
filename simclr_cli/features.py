"""Frozen-encoder features for a list of images, in batches, with the encoder's own preprocessing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from simclr_cli.augment import preprocessing
from simclr_cli.data import ImageDataset, make_loader
from simclr_cli.files import EncoderInfo
from simclr_cli.images import Skipped
from simclr_cli.runtime import Precision, default_workers


@dataclass
class FeatureBatch:
    """Features (float32, on the CPU) of the images at `indices` of the input list; files skipped."""

    indices: torch.Tensor  # (n,) int64
    features: torch.Tensor  # (n, D) float32
    skipped: list[Skipped]


def eval_dataset(info: EncoderInfo, paths: Sequence[str | Path], labels: Sequence[int] | None = None) -> ImageDataset:
    """`paths` through the encoder's evaluation transform. Large JPEGs are decoded in draft mode no
    smaller than the side the transform resizes to (256 for 224 px), so never scaled back up."""
    transform = preprocessing(info)
    return ImageDataset(paths, transform, labels, min_side=transform.resize)


@torch.inference_mode()
def iter_features(backbone: nn.Module, info: EncoderInfo, paths: Sequence[str | Path], device: torch.device,
                  precision: Precision, batch_size: int = 256, workers: int | None = None,
                  order: Sequence[int] | None = None) -> Iterator[FeatureBatch]:
    """Yield FeatureBatch for `paths` (in `order` if given), skipping unreadable files."""
    dataset = eval_dataset(info, paths)
    loader = make_loader(dataset, batch_size, order, default_workers() if workers is None else workers,
                         pin_memory=device.type == "cuda")
    backbone.eval().to(device, memory_format=torch.channels_last)
    for batch in loader:
        if batch.samples is None:
            yield FeatureBatch(batch.indices, torch.empty(0, info.feature_dim), batch.skipped)
            continue
        images = batch.samples.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with precision.autocast():
            features = backbone(images)  # (n, D)
        yield FeatureBatch(batch.indices, features.float().cpu(), batch.skipped)


def compute_features(backbone: nn.Module, info: EncoderInfo, paths: Sequence[str | Path], device: torch.device,
                     precision: Precision, batch_size: int = 256,
                     workers: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[Skipped]]:
    """All features at once: (features (M, D) float32, kept indices (M,), skipped files)."""
    features, indices, skipped = [], [], []
    for batch in iter_features(backbone, info, paths, device, precision, batch_size, workers):
        features.append(batch.features)
        indices.append(batch.indices)
        skipped.extend(batch.skipped)
    if not features:
        return torch.empty(0, info.feature_dim), torch.empty(0, dtype=torch.long), skipped
    return torch.cat(features), torch.cat(indices), skipped

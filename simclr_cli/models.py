"""Backbone registry, the encoder f (a torchvision ResNet) and the projection head g."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision import models as tvm

from simclr_cli.config import ARCHITECTURES

# One registry, keyed by the names in config.ARCHITECTURES, feeds the CLI choices, validation and
# the per-backbone tests.
BACKBONES: dict[str, Callable[[], tvm.ResNet]] = {name: getattr(tvm, name) for name in ARCHITECTURES}


def build_backbone(arch: str, stem: str = "imagenet") -> tvm.ResNet:
    """A randomly initialised torchvision ResNet with `fc` removed; forward gives h.

    stem "cifar" swaps the 7x7/2 convolution and max-pool for one 3x3/1 convolution, as the
    SimCLR paper does for 32 px CIFAR-10 images (Appendix B.9). Key names stay torchvision's.
    """
    model = BACKBONES[arch]()
    model.feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    if stem == "cifar":
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif stem != "imagenet":
        raise ValueError(f"unknown stem {stem!r}")
    model.stem = stem
    return model


class ProjectionHead(nn.Module):
    """g(h): an MLP from the representation to the space where NT-Xent is applied.

    SimCLR (arXiv 2002.05709, section 4.2) uses two layers with a ReLU: the loss may then throw away
    information (colour, orientation) that the representation h keeps. SimCLRv2 (arXiv 2006.10029)
    uses three layers and fine-tunes from the first. Hidden layers are Linear-BN-ReLU.
    """

    def __init__(self, in_dim: int, hidden_dim: int | None = None, out_dim: int = 128, layers: int = 2):
        super().__init__()
        hidden_dim = hidden_dim or in_dim
        blocks: list[nn.Module] = []
        width = in_dim
        for _ in range(layers - 1):
            blocks += [nn.Linear(width, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            width = hidden_dim
        blocks.append(nn.Linear(width, out_dim))
        self.layers = nn.Sequential(*blocks)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class SimCLR(nn.Module):
    """f then g; `forward` gives the projections z of a batch of images."""

    def __init__(self, arch: str, stem: str, proj_layers: int = 2, proj_dim: int = 128):
        super().__init__()
        self.backbone = build_backbone(arch, stem)
        self.head = ProjectionHead(self.backbone.feature_dim, out_dim=proj_dim, layers=proj_layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

"""Backbone registry, the encoder f (a ResNet) and the projection head g."""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn

from simclr_cli.config import RESNETS, channels


# -- ResNet (He et al. 2015, arXiv 1512.03385), written out so that loading an encoder needs no
# torchvision: importing it costs about 2 s on a small CPU (torchvision.ops imports torch._dynamo),
# more than `simclr similar` spends on everything else. Module and key names, shapes and weight
# initialisation are torchvision's, so our files load into torchvision.models.resnetXX and back
# (tests/test_models.py checks that both give the same outputs for the same weights).

def _conv3x3(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(inplanes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 down, 3x3 (strided, as torchvision's "ResNet v1.5"), 1x1 up, and a shortcut (ResNet-50+)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """The encoder f: images (B, 3, H, W) -> h (B, feature_dim), global-average-pooled, no classifier."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], depths: tuple[int, int, int, int],
                 width: float = 1.0):
        super().__init__()
        planes = [channels(base, width) for base in (64, 128, 256, 512)]
        self.inplanes = planes[0]
        self.conv1 = nn.Conv2d(3, planes[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, planes[0], depths[0])
        self.layer2 = self._make_layer(block, planes[1], depths[1], stride=2)
        self.layer3 = self._make_layer(block, planes[2], depths[2], stride=2)
        self.layer4 = self._make_layer(block, planes[3], depths[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.feature_dim = planes[3] * block.expansion

    def initialise(self, zero_init_residual: bool = False) -> "ResNet":
        """torchvision's initialisation: He-normal (fan out) convolutions, unit BatchNorm scales.

        zero_init_residual: the last BatchNorm of every residual branch starts at scale 0, so each block
        starts as its shortcut (Goyal et al. 2017, arXiv 1706.02677), as in SimCLR's reference ResNet
        (`init_zero=True`) and torchvision's `zero_init_residual=True`.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    nn.init.zeros_(module.bn3.weight)
                elif isinstance(module, BasicBlock):
                    nn.init.zeros_(module.bn2.weight)
        return self

    def _make_layer(self, block, planes: int, count: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        blocks = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        blocks += [block(self.inplanes, planes) for _ in range(1, count)]
        return nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)  # (B, feature_dim)


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}

# One registry, keyed by the names in config.RESNETS, feeds the CLI choices, validation and the
# per-backbone tests.
BACKBONES: dict[str, Callable[[], ResNet]] = {name: partial(ResNet, _BLOCKS[block], depths)
                                             for name, (block, depths) in RESNETS.items()}


def build_backbone(arch: str, stem: str = "imagenet", initialise: bool = True, width: float = 1.0,
                   zero_init_residual: bool = False) -> ResNet:
    """A randomly initialised ResNet without classifier (forward gives h); with initialise=False,
    under torch.device("meta"), an empty one for weights from a file (export.load_encoder).

    stem "cifar" swaps the 7x7/2 convolution and max-pool for one 3x3/1 convolution, as the
    SimCLR paper does for 32 px CIFAR-10 images (Appendix B.9). Key names stay torchvision's.
    zero_init_residual: see ResNet.initialise.
    """
    model = BACKBONES[arch](width=width)
    if stem == "cifar":
        model.conv1 = nn.Conv2d(3, model.bn1.num_features, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif stem != "imagenet":
        raise ValueError(f"unknown stem {stem!r}")
    model.stem = stem
    return model.initialise(zero_init_residual) if initialise else model


class ProjectionHead(nn.Module):
    """g(h): an MLP from the representation to the space where NT-Xent is applied.

    SimCLR (arXiv 2002.05709, section 4.2) uses two layers with a ReLU: the loss may then throw away
    information (colour, orientation) that the representation h keeps. SimCLRv2 (arXiv 2006.10029)
    uses three layers and fine-tunes from the first. Hidden layers are Linear-BN-ReLU.

    out_bn: the last layer is Linear-BN with a learned scale and no shift (the bias stays 0), as in
    google-research/simclr's `projection_head` (`use_bn=True`, `center=False` on the final layer);
    otherwise a plain Linear with a bias.
    """

    def __init__(self, in_dim: int, hidden_dim: int | None = None, out_dim: int = 128, layers: int = 2,
                 out_bn: bool = False):
        super().__init__()
        hidden_dim = hidden_dim or in_dim
        blocks: list[nn.Module] = []
        width = in_dim
        for _ in range(layers - 1):
            blocks += [nn.Linear(width, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            width = hidden_dim
        if out_bn:
            norm = nn.BatchNorm1d(out_dim)
            norm.bias.requires_grad_(False)  # scale only
            blocks += [nn.Linear(width, out_dim, bias=False), norm]
        else:
            blocks.append(nn.Linear(width, out_dim))
        self.layers = nn.Sequential(*blocks)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class SimCLR(nn.Module):
    """f then g; `forward` gives the projections z of a batch of images."""

    def __init__(self, arch: str, stem: str, proj_layers: int = 2, proj_dim: int = 128, width: float = 1.0,
                 zero_init_residual: bool = False, proj_out_bn: bool = False):
        super().__init__()
        self.backbone = build_backbone(arch, stem, width=width, zero_init_residual=zero_init_residual)
        self.head = ProjectionHead(self.backbone.feature_dim, out_dim=proj_dim, layers=proj_layers, out_bn=proj_out_bn)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

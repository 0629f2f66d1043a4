"""The SimCLR view pipeline (SimCLR Appendix A) and the evaluation transform.

torchvision is imported only by the training pipeline, and PyTorch only by what returns tensors: the
evaluation transform is Pillow and numpy, so `simclr similar` can run without importing either (2-6 s
on a small CPU; see numpy_encoder.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from simclr_cli.config import AugmentConfig

if TYPE_CHECKING:
    import torch
    from torchvision import transforms as T

    from simclr_cli.files import EncoderInfo

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def blur_kernel_size(image_size: int) -> int:
    """An odd kernel about 10% of the image side (SimCLR Appendix A)."""
    return max(3, int(0.1 * image_size) // 2 * 2 + 1)


def simclr_augmentation(config: AugmentConfig, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> T.Compose:
    """One random view, as in SimCLR (arXiv 2002.05709, Appendix A).

    Random resized crop (scale crop_min_scale..1, aspect 3/4..4/3) with a horizontal flip; colour
    jitter of strength s with probability 0.8 (brightness, contrast, saturation 0.8s, hue 0.2s,
    applied in random order); grayscale with probability 0.2; Gaussian blur with probability 0.5,
    kernel about 10% of the side, sigma in [0.1, 2.0]. The paper shows that the composition of
    crop and colour distortion is what makes the contrastive task hard enough to learn from.
    """
    from torchvision import transforms as T

    s = config.jitter_strength
    steps: list[torch.nn.Module] = [
        T.RandomResizedCrop(config.image_size, scale=(config.crop_scale, 1.0), ratio=(3 / 4, 4 / 3),
                            interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.RandomHorizontalFlip(),
    ]
    if s > 0:
        steps.append(T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, min(0.5, 0.2 * s))], p=0.8))
    steps.append(T.RandomGrayscale(p=0.2))
    if config.use_blur:
        steps.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(config.image_size), sigma=(0.1, 2.0))], p=0.5))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


class TwoViews:
    """Apply the same random transform twice: the two views of one image, stacked (2, C, H, W)."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image) -> torch.Tensor:
        import torch

        return torch.stack([self.transform(image), self.transform(image)])


MAX_RESIZED_PIXELS = 1 << 25  # beyond this (100 MB of RGB), only what the centre crop keeps is resized


class EvalTransform:
    """Resize the shorter side to size/0.875 (to size itself for small images), centre crop, normalise.

    The same numbers as torchvision's Resize(bicubic) + CenterCrop + ToTensor + Normalize on an RGB
    Pillow image (tests/test_augment.py compares them), without importing torchvision.
    """

    def __init__(self, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.size = image_size
        self.resize = image_size if image_size <= 64 else round(image_size / 0.875)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    def __repr__(self) -> str:  # recorded in index manifests
        return (f"EvalTransform(resize shorter side to {self.resize} (bicubic), centre crop {self.size}, "
                f"normalize mean={self.mean.flatten().tolist()} std={self.std.flatten().tolist()})")

    def __call__(self, image: Image.Image) -> torch.Tensor:
        import torch

        return torch.from_numpy(self.pixels(image))  # (3, S, S)

    def pixels(self, image: Image.Image) -> np.ndarray:
        """The transformed image as a float32 array (3, S, S)."""
        width, height = image.size
        short, long = min(width, height), max(width, height)
        resized_long = int(self.resize * long / short)  # torchvision's rounding
        size = (self.resize, resized_long) if width <= height else (resized_long, self.resize)
        left = int(round((size[0] - self.size) / 2.0))
        top = int(round((size[1] - self.size) / 2.0))
        crop = (left, top, left + self.size, top + self.size)
        if size[0] * size[1] > MAX_RESIZED_PIXELS:
            # A long strip: resize only what the crop keeps (within a few grey levels of resizing it all,
            # which could take gigabytes: 1 x 1,000,000 pixels -> 256 x 256,000,000).
            scale_x, scale_y = width / size[0], height / size[1]
            box = (crop[0] * scale_x, crop[1] * scale_y, crop[2] * scale_x, crop[3] * scale_y)
            image = image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        else:
            image = image.resize(size, Image.Resampling.BICUBIC) if size != image.size else image
            image = image.crop(crop)
        image = image if image.mode == "RGB" else image.convert("RGB")
        pixels = np.array(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)  # (3, S, S)
        pixels /= 255
        pixels -= self.mean
        pixels /= self.std
        return pixels


def preprocessing(info: EncoderInfo) -> EvalTransform:
    """The evaluation transform an encoder was trained for (resize, centre crop, normalise)."""
    return EvalTransform(info.image_size, info.mean, info.std)

"""SimCLR views in batches: crops at uint8 in the loader, colour and blur for a whole batch at once.

The per-image pipeline (augment.simclr_augmentation) runs every step of SimCLR's augmentation
(arXiv 2002.05709, Appendix A) on one Pillow image at a time in the loader workers; with two views
per image it, not the model, sets the pace. Here the work is split where it is cheapest:

- `ViewSampler`, in the loader workers: draws every random parameter of both views of one image
  (with torchvision's own samplers, so the distributions are the same), takes the two random
  resized crops at uint8 and returns them with a parameter table; nothing else is done per image.
- `BatchAugment`, on the training device: flip, colour jitter (brightness, contrast, saturation,
  hue in a random order per image, as torchvision's ColorJitter), grayscale, Gaussian blur and
  normalisation over the whole batch, each image with its own parameters from the table.

Every random number comes from the per-(seed, epoch, image index) generator that ImageDataset
seeds, so the views do not depend on the batch, the worker count or the number of processes, and
a resumed run sees the same views as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from simclr_cli.augment import IMAGENET_MEAN, IMAGENET_STD, blur_kernel_size
from simclr_cli.config import AugmentConfig
from simclr_cli.data import Batch, collate

# Columns of the parameter table, one row per view.
FLIP, JITTER, BRIGHTNESS, CONTRAST, SATURATION, HUE, ORDER, GRAY, BLUR, SIGMA = 0, 1, 2, 3, 4, 5, 6, 10, 11, 12
PARAMS = 13  # ORDER takes four columns: the permutation of the four jitter operations
JITTER_P, GRAY_P, BLUR_P, FLIP_P = 0.8, 0.2, 0.5, 0.5
SIGMA_RANGE = (0.1, 2.0)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision (Pillow rounds 0.2989 to 0.299)


class ViewSampler:
    """The CPU half, per image: two random resized crops at uint8 and both views' parameters.

    Call it inside a seeded generator context (ImageDataset does): it draws from torch's global
    generator with torchvision's own samplers (RandomResizedCrop.get_params, ColorJitter.get_params).
    Returns (crops (2, 3, S, S) uint8, params (2, PARAMS) float32).
    """

    def __init__(self, config: AugmentConfig):
        self.size = config.image_size
        self.scale = (config.crop_scale, 1.0)
        self.ratio = (3 / 4, 4 / 3)
        s = config.jitter_strength
        self.jitter = T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, min(0.5, 0.2 * s)) if s > 0 else None
        self.blur = config.use_blur

    def __call__(self, image: Image.Image | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        crops = np.empty((2, self.size, self.size, 3), dtype=np.uint8)
        params = torch.empty(2, PARAMS)
        for view in range(2):
            top, left, height, width = T.RandomResizedCrop.get_params(image, self.scale, self.ratio)
            # Pillow resamples only the box, single-threaded (torch's uint8 resize is slower when
            # its threads compete with the training process).
            crops[view] = image.resize((self.size, self.size), Image.Resampling.BICUBIC,
                                       box=(left, top, left + width, top + height))
            params[view] = self.sample_params()
        return torch.from_numpy(crops).permute(0, 3, 1, 2).contiguous(), params  # (2, 3, S, S) uint8

    def sample_params(self) -> torch.Tensor:
        """One view's parameters after the crop: (PARAMS,) float32."""
        row = torch.zeros(PARAMS)
        row[FLIP] = float(torch.rand(1) < FLIP_P)
        row[BRIGHTNESS:HUE + 1] = torch.tensor([1.0, 1.0, 1.0, 0.0])  # the identity, when not jittered
        row[ORDER:ORDER + 4] = torch.arange(4)
        if self.jitter is not None:
            row[JITTER] = float(torch.rand(1) < JITTER_P)
            j = self.jitter
            order, brightness, contrast, saturation, hue = T.ColorJitter.get_params(
                j.brightness, j.contrast, j.saturation, j.hue)
            row[BRIGHTNESS:HUE + 1] = torch.tensor([brightness, contrast, saturation, hue])
            row[ORDER:ORDER + 4] = order.float()
        row[GRAY] = float(torch.rand(1) < GRAY_P)
        if self.blur:
            row[BLUR] = float(torch.rand(1) < BLUR_P)
            row[SIGMA] = torch.empty(1).uniform_(*SIGMA_RANGE).item()
        return row


# -- the device half: batched operations, each image with its own factor ---------------------------

def _per_image(factor: torch.Tensor) -> torch.Tensor:
    return factor.view(-1, 1, 1, 1)  # (M, 1, 1, 1): broadcasts over (M, C, H, W)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma of (M, 3, H, W) images in [0, 1], as (M, 1, H, W)."""
    r, g, b = images.unbind(dim=-3)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(-3)  # (M, 1, H, W)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _per_image(factor)
    return (f * images + (1 - f) * other).clamp_(0, 1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (images * _per_image(factor)).clamp_(0, 1)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = grayscale(images).mean(dim=(-3, -2, -1), keepdim=True)  # (M, 1, 1, 1)
    return _blend(images, mean, factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, grayscale(images), factor)


def adjust_hue(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each image by its factor (in turns, -0.5..0.5): RGB to HSV and back."""
    r, g, b = images.unbind(dim=-3)
    value = images.amax(dim=-3)
    chroma = value - images.amin(dim=-3)
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(value == r, (g - b) / safe,
                      torch.where(value == g, 2 + (b - r) / safe, 4 + (r - g) / safe))  # (M, H, W), sixths
    hue = (hue / 6 + factor.view(-1, 1, 1)).remainder_(1.0)
    saturation = chroma / torch.where(value > 0, value, torch.ones_like(value))
    # HSV to RGB: channel n in (R, G, B) is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6.
    k = (torch.tensor([5.0, 3.0, 1.0], device=images.device).view(1, 3, 1, 1)
         + 6 * hue.unsqueeze(-3)).remainder_(6)  # (M, 3, H, W)
    weight = torch.minimum(k, 4 - k).clamp_(0, 1)
    return (value.unsqueeze(-3) * (1 - saturation.unsqueeze(-3) * weight)).clamp_(0, 1)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # torchvision's fn_idx order


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur each of (M, C, H, W) with its own sigma: separable kernel, reflected borders (torchvision's)."""
    m, c, h, w = images.shape
    half = (kernel_size - 1) / 2
    x = torch.linspace(-half, half, kernel_size, device=images.device)  # (k,)
    kernel = torch.exp(-0.5 * (x / sigma.view(-1, 1)) ** 2)  # (M, k)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (M C, k)
    pad = kernel_size // 2
    planes = F.pad(images.reshape(1, m * c, h, w), (pad, pad, pad, pad), mode="reflect")  # (1, M C, H+2p, W+2p)
    planes = F.conv2d(planes, kernel.view(m * c, 1, 1, kernel_size), groups=m * c)  # (1, M C, H+2p, W)
    planes = F.conv2d(planes, kernel.view(m * c, 1, kernel_size, 1), groups=m * c)  # (1, M C, H, W)
    return planes.view(m, c, h, w)


def augment_chunk(pixels: int, on_cpu: bool) -> int:
    """Images augmented at a time: about eight 224 px images' worth of pixels on a CPU, 512 on a GPU.

    On a GPU the whole batch at once would peak at about 7.6x its float32 size (hue 5.8x, blur
    3.6x), 37 GB for the 8,192 views of batch 4096, which --chunk-size would not bound."""
    return max(8, 8 * 224 * 224 // pixels) if on_cpu else max(1, 512 * 224 * 224 // pixels)


class BatchAugment:
    """The device half: flip, jitter, grayscale, blur and normalise a batch of uint8 crops.

    `__call__(crops, params)`: crops (..., 3, S, S) uint8 on the device, params (..., PARAMS) on the
    CPU (ViewSampler's rows, any leading shape); returns float32 (..., 3, S, S), normalised. Each
    operation runs once, on the images that drew it (index sets are made on the CPU side, so
    nothing waits for the device).
    """

    def __init__(self, config: AugmentConfig, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.kernel_size = blur_kernel_size(config.image_size)
        self.mean, self.std = mean, std

    def __call__(self, crops: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        shape = crops.shape
        crops = crops.reshape(-1, *shape[-3:])  # (B, 3, S, S)
        table = params.reshape(-1, PARAMS).float()
        out = torch.empty(crops.shape, dtype=torch.float32, device=crops.device)
        on_cpu = crops.device.type == "cpu"
        # On a CPU, a few images at a time stay in cache (the whole batch at once is 3-5x slower),
        # and one thread: these small operations spend more time waiting for a second thread that
        # the loader workers keep busy than they gain from it (10x slower measured on 2 cores).
        chunk = augment_chunk(shape[-2] * shape[-1], on_cpu)
        threads = torch.get_num_threads()
        if on_cpu:
            torch.set_num_threads(1)
        try:
            for start in range(0, len(crops), chunk):
                out[start:start + chunk] = self._augment(crops[start:start + chunk], table[start:start + chunk])
        finally:
            torch.set_num_threads(threads)
        return out.view(shape)

    def _augment(self, crops: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        device = crops.device
        images = crops.float().div_(255)  # (B, 3, S, S) in [0, 1]
        factors = table.to(device, non_blocking=True)

        def where(mask: torch.Tensor) -> torch.Tensor:
            return mask.nonzero().flatten().to(device, non_blocking=True)

        def apply(index: torch.Tensor, op, *args) -> None:
            if len(index):
                images.index_copy_(0, index, op(images.index_select(0, index), *args))

        apply(where(table[:, FLIP] > 0), torch.flip, [-1])
        jittered = table[:, JITTER] > 0
        for position in range(4):  # torchvision's ColorJitter: the four operations in a random order
            for op_index, op in enumerate(JITTER_OPS):
                index = where(jittered & (table[:, ORDER + position] == op_index))
                apply(index, op, factors[index, BRIGHTNESS + op_index])
        apply(where(table[:, GRAY] > 0), lambda x: grayscale(x).expand_as(x))
        blurred = where(table[:, BLUR] > 0)
        apply(blurred, gaussian_blur, factors[blurred, SIGMA], self.kernel_size)
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        return images.sub_(mean).div_(std)


def resolve_augment_on(spec: str, device: torch.device) -> str:
    """`--augment-on auto`: batches on the device when it is a GPU; on a CPU, batches in the loader
    workers, where they overlap the training step (measured by benchmarks/bench_pretrain.py)."""
    if spec != "auto":
        return spec
    return "cpu" if device.type == "cpu" else "device"


class AugmentInLoader:
    """A loader collate function: collate, then BatchAugment in the loader worker (`--augment-on cpu`)."""

    def __init__(self, augment: BatchAugment):
        self.augment = augment

    def __call__(self, items: list) -> Batch:
        batch = collate(items)
        if batch.samples is not None and batch.params is not None:
            batch.samples, batch.params = self.augment(batch.samples, batch.params), None
        return batch

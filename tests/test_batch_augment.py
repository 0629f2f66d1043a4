"""The batched views sample what torchvision's per-image SimCLR pipeline samples, op for op."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from simclr_cli.augment import IMAGENET_MEAN, IMAGENET_STD, TwoViews, blur_kernel_size, simclr_augmentation
from simclr_cli.batch_augment import (BLUR, BRIGHTNESS, CONTRAST, FLIP, GRAY, HUE, JITTER, ORDER, PARAMS, SATURATION,
                                      SIGMA, AugmentInLoader, BatchAugment, ViewSampler, adjust_brightness,
                                      adjust_contrast, adjust_hue, adjust_saturation, augment_chunk, gaussian_blur,
                                      resolve_augment_on)
from simclr_cli.config import AugmentConfig
from simclr_cli.data import ImageDataset, collate, make_loader


def photo(width=48, height=40, seed=0) -> Image.Image:
    """A smooth colourful image with a few hard edges."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [128 + 110 * np.sin(rng.uniform(2, 9) * x + rng.uniform(2, 9) * y + rng.uniform(0, 6)) for _ in range(3)]
    array = np.stack(channels, axis=-1)
    array[height // 3:height // 2, width // 4:width // 2] = rng.uniform(0, 255, 3)
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def sample_params(config: AugmentConfig, count: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    sampler = ViewSampler(config)
    return torch.stack([sampler.sample_params() for _ in range(count)])  # (count, PARAMS)


def test_parameters_have_the_papers_ranges_and_probabilities():
    params = sample_params(AugmentConfig(image_size=224), 4000)
    fractions = {name: params[:, column].mean().item() for name, column in
                 (("flip", FLIP), ("jitter", JITTER), ("gray", GRAY), ("blur", BLUR))}
    expected = {"flip": 0.5, "jitter": 0.8, "gray": 0.2, "blur": 0.5}
    for name, value in expected.items():  # binomial standard error at n=4000 is at most 0.008
        assert fractions[name] == pytest.approx(value, abs=0.03), name
    for column in (BRIGHTNESS, CONTRAST, SATURATION):
        values = params[:, column]
        assert 0.2 <= values.min() < 0.25 and 1.75 < values.max() <= 1.8  # 1 +- 0.8 s, s = 1
        assert values.mean().item() == pytest.approx(1.0, abs=0.03)  # uniform
    assert -0.2 <= params[:, HUE].min() < -0.19 and 0.19 < params[:, HUE].max() <= 0.2
    assert 0.1 <= params[:, SIGMA].min() < 0.12 and 1.98 < params[:, SIGMA].max() <= 2.0
    orders = params[:, ORDER:ORDER + 4]
    assert (orders.sort(dim=1).values == torch.arange(4.0)).all(), "each order is a permutation"
    first = torch.bincount(orders[:, 0].long(), minlength=4) / len(params)
    assert torch.allclose(first, torch.full((4,), 0.25), atol=0.03), "every operation comes first equally often"


def test_small_images_use_the_cifar_strength_and_no_blur():
    params = sample_params(AugmentConfig(image_size=32), 2000)
    assert params[:, BLUR].sum() == 0
    assert 0.6 <= params[:, BRIGHTNESS].min() and params[:, BRIGHTNESS].max() <= 1.4
    assert params[:, HUE].abs().max() <= 0.1
    none = sample_params(AugmentConfig(image_size=32, jitter=0.0), 500)
    assert none[:, JITTER].sum() == 0


@pytest.mark.parametrize("size,smallest", [(224, 0.08), (32, 0.2)])  # the paper's 0.08; 0.2 for small images
def test_crops_cover_the_papers_scale_and_aspect_ranges(size, smallest):
    torch.manual_seed(0)
    sampler = ViewSampler(AugmentConfig(image_size=size))
    image = photo(400, 300)
    boxes = torch.tensor([v2.RandomResizedCrop.get_params(image, sampler.scale, sampler.ratio) for _ in range(3000)],
                         dtype=torch.float)
    area = boxes[:, 2] * boxes[:, 3] / (400 * 300)
    aspect = boxes[:, 3] / boxes[:, 2]
    assert smallest <= area.min() < smallest + 0.01 and area.max() <= 1.0
    assert (aspect >= 0.74).all() and (aspect <= 1.34).all()
    crops, params = sampler(image)
    assert crops.shape == (2, 3, size, size) and crops.dtype == torch.uint8 and params.shape == (2, PARAMS)


@pytest.mark.parametrize("op, reference, column", [
    (adjust_brightness, TF.adjust_brightness, BRIGHTNESS),
    (adjust_contrast, TF.adjust_contrast, CONTRAST),
    (adjust_saturation, TF.adjust_saturation, SATURATION),
    (adjust_hue, TF.adjust_hue, HUE),
])
def test_each_jitter_operation_equals_torchvisions_for_the_same_factor(op, reference, column):
    images = torch.stack([TF.to_dtype(TF.pil_to_tensor(photo(seed=i)), torch.float32, scale=True) for i in range(6)])
    images[0, :, :4, :4] = 0.5  # grey pixels: hue undefined, saturation zero
    factors = sample_params(AugmentConfig(image_size=224), 6, seed=1)[:, column]
    ours = op(images, factors)
    expected = torch.stack([reference(image, factor.item()) for image, factor in zip(images, factors)])
    assert torch.allclose(ours, expected, atol=2e-5), (ours - expected).abs().max()


@pytest.mark.parametrize("size", [32, 96])
def test_blur_equals_torchvisions_for_the_same_sigma(size):
    images = torch.stack([TF.to_dtype(TF.pil_to_tensor(photo(size, size, i)), torch.float32, scale=True)
                          for i in range(4)])
    sigmas = torch.tensor([0.1, 0.7, 1.3, 2.0])
    k = blur_kernel_size(size)
    ours = gaussian_blur(images, sigmas, k)
    expected = torch.stack([TF.gaussian_blur(image, [k, k], [s.item(), s.item()]) for image, s in zip(images, sigmas)])
    assert torch.allclose(ours, expected, atol=1e-5)


def per_image_reference(crop: torch.Tensor, row: torch.Tensor, kernel: int) -> torch.Tensor:
    """One view through torchvision's functional ops, in the paper's order, from a parameter row."""
    image = TF.to_dtype(crop, torch.float32, scale=True)
    if row[FLIP]:
        image = TF.horizontal_flip(image)
    if row[JITTER]:
        ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
        for op_index in row[ORDER:ORDER + 4].long().tolist():
            image = ops[op_index](image, row[BRIGHTNESS + op_index].item())
    if row[GRAY]:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if row[BLUR]:
        image = TF.gaussian_blur(image, [kernel, kernel], [row[SIGMA].item()] * 2)
    return TF.normalize(image, IMAGENET_MEAN, IMAGENET_STD)


def test_a_batch_equals_torchvisions_ops_image_by_image():
    config = AugmentConfig(image_size=48, blur=True, jitter=1.0)
    torch.manual_seed(5)
    sampler = ViewSampler(config)
    pairs = [sampler(photo(64, 56, seed=i)) for i in range(12)]  # 12 images, 24 views: every branch is taken
    crops = torch.stack([c for c, _ in pairs])  # (12, 2, 3, 48, 48)
    params = torch.stack([p for _, p in pairs])  # (12, 2, PARAMS)
    views = BatchAugment(config)(crops, params)
    assert views.shape == (12, 2, 3, 48, 48) and views.dtype == torch.float32
    kernel = blur_kernel_size(48)
    for i in range(12):
        for v in range(2):
            expected = per_image_reference(crops[i, v], params[i, v], kernel)
            assert torch.allclose(views[i, v], expected, atol=1e-4), (i, v, params[i, v])
    flat = params.view(-1, PARAMS)
    assert flat[:, JITTER].any() and flat[:, GRAY].any() and flat[:, BLUR].any() and flat[:, FLIP].any()


def test_output_statistics_match_the_per_image_pipeline_on_a_fixed_image():
    # Blur is left out here (it is compared op for op above): torchvision blurs Pillow images slowly.
    config = AugmentConfig(image_size=32, blur=False, jitter=1.0)
    image = photo(96, 80)
    torch.manual_seed(0)
    reference = TwoViews(simclr_augmentation(config))
    per_image = torch.stack([reference(image) for _ in range(600)]).view(-1, 3, 32, 32)
    sampler = ViewSampler(config)
    pairs = [sampler(image) for _ in range(600)]
    batched = BatchAugment(config)(torch.stack([c for c, _ in pairs]), torch.stack([p for _, p in pairs]))
    batched = batched.view(-1, 3, 32, 32)
    # Tolerances: sampling noise (about 0.03 here) plus Pillow's uint8 rounding after every
    # jitter operation (a few grey levels, about 0.04 after normalisation).
    for name, stat in (("mean", lambda x: x.mean(dim=(2, 3))), ("contrast", lambda x: x.std(dim=(2, 3))),
                       ("colourfulness", lambda x: x.std(dim=1).mean(dim=(1, 2)))):
        a, b = stat(per_image), stat(batched)
        assert torch.allclose(a.mean(0), b.mean(0), atol=0.1), (name, a.mean(0), b.mean(0))
        assert torch.allclose(a.std(0), b.std(0), rtol=0.1), (name, a.std(0), b.std(0))


def test_views_depend_only_on_seed_epoch_and_index_not_on_batches_or_workers(small_digits_folder):
    from simclr_cli.images import scan_images

    paths = scan_images(small_digits_folder).paths[:24]
    config = AugmentConfig(image_size=32)
    dataset = ImageDataset(paths, ViewSampler(config), min_side=32, seed=7)
    one = next(iter(make_loader(dataset, 24, list(range(24)), 0, collate_fn=AugmentInLoader(BatchAugment(config)))))
    order = list(range(23, -1, -1))
    batches = list(make_loader(dataset, 8, order, 2, collate_fn=AugmentInLoader(BatchAugment(config))))
    other = torch.cat([b.samples for b in batches])[torch.tensor(order).argsort()]
    assert one.samples.shape == (24, 2, 3, 32, 32) and one.params is None
    assert torch.allclose(one.samples, other, atol=1e-6), "same views whatever the batches and workers"
    dataset.epoch = 1
    loader = make_loader(dataset, 24, list(range(24)), 0, collate_fn=AugmentInLoader(BatchAugment(config)))
    next_epoch = next(iter(loader))
    assert not torch.allclose(one.samples, next_epoch.samples), "a new epoch draws new views"
    raw = collate([dataset[i] for i in range(4)])
    assert raw.samples.dtype == torch.uint8 and raw.params.shape == (4, 2, PARAMS)


def test_auto_picks_the_device_on_a_gpu_and_the_loader_on_a_cpu():
    assert resolve_augment_on("auto", torch.device("cpu")) == "cpu"
    assert resolve_augment_on("auto", torch.device("cuda", 0)) == "device"
    assert resolve_augment_on("per-image", torch.device("cuda", 0)) == "per-image"


def test_the_batch_is_augmented_in_the_chunks_augment_chunk_gives(monkeypatch):
    from simclr_cli import batch_augment

    config = AugmentConfig(image_size=32)
    sampler = ViewSampler(config)
    pairs = [sampler(photo(40, 36, seed=i)) for i in range(5)]
    crops, params = torch.stack([c for c, _ in pairs]), torch.stack([p for _, p in pairs])  # 10 views
    whole = BatchAugment(config)(crops, params)
    sizes = []
    augment = BatchAugment._augment
    monkeypatch.setattr(batch_augment, "augment_chunk", lambda pixels, on_cpu: 3)
    monkeypatch.setattr(BatchAugment, "_augment", lambda self, c, t: sizes.append(len(c)) or augment(self, c, t))
    assert torch.equal(BatchAugment(config)(crops, params), whole)
    assert sizes == [3, 3, 3, 1]


def test_a_gpu_augments_a_large_batch_in_bounded_chunks():
    assert augment_chunk(224 * 224, on_cpu=False) == 512  # 8,192 views of batch 4096 go 512 at a time
    assert augment_chunk(32 * 32, on_cpu=False) == 25088
    assert augment_chunk(4096 * 4096, on_cpu=False) == 1
    assert augment_chunk(224 * 224, on_cpu=True) == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_batch_equals_the_cpu_batch():
    config = AugmentConfig(image_size=64, blur=True, jitter=1.0)  # every operation, the blur's convolution too
    torch.manual_seed(1)
    sampler = ViewSampler(config)
    pairs = [sampler(photo(80, 70, seed=i)) for i in range(16)]
    crops, params = torch.stack([c for c, _ in pairs]), torch.stack([p for _, p in pairs])
    on_cpu = BatchAugment(config)(crops, params)
    on_gpu = BatchAugment(config)(crops.cuda(), params).cpu()
    assert torch.allclose(on_cpu, on_gpu, atol=1e-4)

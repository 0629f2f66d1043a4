"""The view pipeline follows SimCLR Appendix A, with the paper's CIFAR settings for small images."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from simclr_cli.augment import EvalTransform, TwoViews, blur_kernel_size, simclr_augmentation
from simclr_cli.config import AugmentConfig


def find(pipeline, kind):
    found = []
    for step in pipeline.transforms:
        inner = step.transforms if isinstance(step, T.RandomApply) else [step]
        found += [(step, t) for t in inner if isinstance(t, kind)]
    return found


def test_imagenet_size_pipeline_has_the_papers_parameters():
    pipeline = simclr_augmentation(AugmentConfig(image_size=224))
    (_, crop), = find(pipeline, T.RandomResizedCrop)
    assert crop.size == (224, 224) and crop.scale == (0.08, 1.0)
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert find(pipeline, T.RandomHorizontalFlip)[0][1].p == 0.5
    (wrapper, jitter), = find(pipeline, T.ColorJitter)
    assert wrapper.p == 0.8
    assert jitter.brightness == pytest.approx((0.2, 1.8)) and jitter.contrast == pytest.approx((0.2, 1.8))
    assert jitter.saturation == pytest.approx((0.2, 1.8)) and jitter.hue == pytest.approx((-0.2, 0.2))
    assert find(pipeline, T.RandomGrayscale)[0][1].p == 0.2
    (wrapper, blur), = find(pipeline, T.GaussianBlur)
    assert wrapper.p == 0.5 and blur.sigma == (0.1, 2.0) and blur.kernel_size == (23, 23)


def test_small_images_use_cifar_settings_and_flags_override():
    pipeline = simclr_augmentation(AugmentConfig(image_size=32))
    assert not find(pipeline, T.GaussianBlur)
    (_, jitter), = find(pipeline, T.ColorJitter)
    assert jitter.brightness == pytest.approx((0.6, 1.4)) and jitter.hue == pytest.approx((-0.1, 0.1))
    custom = simclr_augmentation(AugmentConfig(image_size=32, jitter=1.0, blur=True, crop_min_scale=0.2))
    assert find(custom, T.GaussianBlur) and find(custom, T.RandomResizedCrop)[0][1].scale == (0.2, 1.0)
    assert find(custom, T.ColorJitter)[0][1].brightness == pytest.approx((0.2, 1.8))


def test_blur_kernel_is_odd_and_about_a_tenth_of_the_side():
    for size in (32, 96, 224, 512):
        k = blur_kernel_size(size)
        assert k % 2 == 1 and abs(k - 0.1 * size) <= 1.5


def test_two_views_differ_and_have_the_training_shape():
    torch.manual_seed(0)
    image = Image.effect_mandelbrot((80, 60), (-2, -1.2, 1, 1.2), 40).convert("RGB")
    views = TwoViews(simclr_augmentation(AugmentConfig(image_size=32)))(image)
    assert views.shape == (2, 3, 32, 32)
    assert not torch.equal(views[0], views[1])


def test_eval_transform_is_deterministic_and_normalised():
    image = Image.new("RGB", (50, 40), (124, 116, 104))
    transform = EvalTransform(32)
    out = transform(image)
    assert out.shape == (3, 32, 32) and torch.equal(out, transform(image))
    assert out.abs().max() < 0.02  # the ImageNet mean colour normalises to about zero


@pytest.mark.parametrize("image_size", [28, 32, 96, 224])
@pytest.mark.parametrize("width, height", [(300, 200), (120, 333), (32, 32), (20, 45), (256, 256)])
def test_eval_transform_equals_torchvisions_composition(image_size, width, height):
    """Ours needs no torchvision import; it must give torchvision's numbers exactly, or an index
    built before would no longer match the queries."""
    from simclr_cli.augment import IMAGENET_MEAN, IMAGENET_STD

    generator = torch.Generator().manual_seed(width * height)
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
    image = Image.fromarray(pixels.numpy())
    resize = image_size if image_size <= 64 else round(image_size / 0.875)
    reference = T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                           T.CenterCrop(image_size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    assert torch.equal(EvalTransform(image_size)(image), reference(image))


def test_a_long_strip_resizes_only_its_centre(monkeypatch):
    """A 1 x 2,000,000 image would take 1.5 GB resized whole; only the centre crop's source is resized.
    That path, forced on a smaller strip, gives torchvision's numbers within a few grey levels."""
    import simclr_cli.augment as augment

    assert EvalTransform(224)(Image.new("RGB", (1, 2_000_000), (124, 116, 104))).shape == (3, 224, 224)
    ramp = np.linspace(0, 255, 3000)[:, None, None] * np.ones((1, 40, 3))  # (H, W, 3): darker to lighter
    ramp[1480:1520, 10:30] = (255, 0, 0)  # a red patch at the centre
    strip = Image.fromarray(ramp.astype(np.uint8))
    reference = EvalTransform(224)(strip)
    monkeypatch.setattr(augment, "MAX_RESIZED_PIXELS", 0)
    assert (EvalTransform(224)(strip) - reference).abs().mean() < 0.02

"""numpy_encoder: the numpy forward pass gives the PyTorch encoder's features, and refuses damaged files."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from simclr_cli import numpy_encoder
from simclr_cli.config import ARCHITECTURES
from simclr_cli.embed import embed_queries
from simclr_cli.errors import ModelFileError
from simclr_cli.export import load_encoder, save_encoder
from simclr_cli.files import EncoderInfo
from simclr_cli.images import scan_images
from simclr_cli.models import build_backbone
from simclr_cli.numpy_encoder import embed_queries as embed_on_cpu
from simclr_cli.numpy_encoder import load_numpy_encoder


def trained_looking(arch: str, stem: str, width: float, seed: int = 0) -> torch.nn.Module:
    """A backbone whose BatchNorms have non-trivial running statistics, scales and shifts, as after training
    (fresh ones are the identity in eval mode, which would hide a wrong fold)."""
    torch.manual_seed(seed)
    backbone = build_backbone(arch, stem, width=width)
    for module in backbone.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return backbone.eval()


def write_encoder(path, arch: str = "resnet18", stem: str = "imagenet", width: float = 1.0, size: int = 64):
    backbone = trained_looking(arch, stem, width)
    info = EncoderInfo(arch, stem, backbone.feature_dim, size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                       "test", {}, width)
    save_encoder(path, backbone, info, extra={"head.layers.0.weight": torch.ones(4, backbone.feature_dim)})
    return backbone


@pytest.mark.parametrize("arch, stem, width, size", [
    *[(arch, "imagenet", 0.5, 64) for arch in ARCHITECTURES],
    *[(arch, "cifar", 0.25, 32) for arch in ARCHITECTURES],
    ("resnet50", "imagenet", 1.0, 96),  # full width, an odd feature-map size (3x3 at the end)
    ("resnet18", "cifar", 2.0, 33),  # SimCLRv2's 2x, an odd image size
])
def test_numpy_forward_equals_the_torch_backbone(tmp_path, arch, stem, width, size):
    path = tmp_path / "encoder.safetensors"
    backbone = write_encoder(path, arch, stem, width, size)
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = backbone(images).numpy()  # (3, D)
    encoder, info = load_numpy_encoder(path)
    features = encoder(images.numpy())
    assert features.shape == expected.shape == (3, info.feature_dim)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(features, expected, rtol=0, atol=2e-5 * scale)


def test_large_images_are_convolved_in_bands_of_rows(tmp_path, monkeypatch):
    """Patch matrices are capped (PATCH_BYTES) by convolving bands of output rows: one row per band here."""
    path = tmp_path / "encoder.safetensors"
    backbone = write_encoder(path, "resnet18", "imagenet", 0.5, 45)
    images = torch.randn(2, 3, 45, 45, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = backbone(images).numpy()  # (2, D)
    monkeypatch.setattr(numpy_encoder, "PATCH_BYTES", 1)
    encoder, _ = load_numpy_encoder(path)
    np.testing.assert_allclose(encoder(images.numpy()), expected, rtol=0, atol=2e-5 * np.abs(expected).max())


def test_queries_get_the_torch_paths_features_skips_and_positions(tmp_path, mixed_folder):
    """numpy_encoder.embed_queries and embed.embed_queries at fp32 on the CPU: same files kept, in the same
    order, same unit features; more queries than one batch, and unreadable files among them."""
    path = tmp_path / "encoder.safetensors"
    write_encoder(path, size=48)
    paths = [str(p) for p in scan_images(mixed_folder[0], check=False).paths] * 2  # every mode; some unreadable
    assert len(paths) > 16
    features, positions, skipped = embed_on_cpu(path, paths)
    expected, expected_positions, expected_skipped = embed_queries(path, paths, torch.device("cpu"), "fp32")
    assert positions == expected_positions and skipped and skipped == expected_skipped
    np.testing.assert_allclose(features, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1, atol=1e-6)


def damage(path, change) -> None:
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    change(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize("change, message", [
    (lambda t, m: t.pop("layer3.1.bn2.running_var"), "weights do not match a resnet18"),
    (lambda t, m: t.update({"layer5.0.conv1.weight": torch.ones(1)}), "unexpected key 'layer5"),
    (lambda t, m: t.update({"layer2.0.conv2.weight": torch.ones(128, 64, 3, 3)}), "layer2.0.conv2.weight"),
    (lambda t, m: t.update({"conv1.weight": torch.ones(64, 3, 3, 3)}), "not the imagenet stem"),
    (lambda t, m: t.pop("layer2.0.downsample.0.weight"), "weights do not match"),
    (lambda t, m: m.update({"feature_dim": "2048"}), "metadata gives 2048-d features, its resnet18 gives 512"),
    # Weights consistent among themselves but not the ResNet that the metadata names: PyTorch refuses them too.
    (lambda t, m: m.update({"width": "2.0"}), "conv1.weight has shape"),
    (lambda t, m: t.update({"layer1.0.conv2.weight": torch.ones(64, 64, 1, 1)}), "layer1.0.conv2.weight"),
    (lambda t, m: t.update({"layer2.0.downsample.0.weight": torch.ones(128, 64, 3, 3)}), "layer2.0.downsample.0"),
    (lambda t, m: t.update({"layer2.0.downsample.0.weight": torch.ones(96, 64, 1, 1),
                            **{f"layer2.0.downsample.1.{name}": torch.ones(96) for name in
                               ("weight", "bias", "running_mean", "running_var")}}), "layer2.0.downsample.0"),
    (lambda t, m: t.update({"conv1.weight": t["conv1.weight"].int()}), "conv1.weight holds int32"),
    (lambda t, m: t.update({"layer1.0.bn1.running_var": t["layer1.0.bn1.running_var"].long()}),
     "layer1.0.bn1.running_var holds int64"),
    (lambda t, m: t["layer4.1.bn2.running_var"].index_fill_(0, torch.tensor([3]), float("nan")),
     "layer4.1.bn2.running_var holds NaN or infinite weights; the file is damaged"),
    (lambda t, m: t["conv1.weight"].view(-1).index_fill_(0, torch.tensor([0]), float("-inf")),
     "conv1.weight holds NaN or infinite weights"),
    (lambda t, m: t.update({"layer1.1.downsample.0.weight": torch.ones(64, 64, 1, 1),
                            **{f"layer1.1.downsample.1.{name}": torch.ones(64) for name in
                               ("weight", "bias", "running_mean", "running_var")}}), "unexpected key 'layer1.1"),
])
def test_damaged_weights_are_one_line_errors_as_with_torch(tmp_path, change, message):
    path = tmp_path / "encoder.safetensors"
    write_encoder(path)
    damage(path, change)
    with pytest.raises(ModelFileError, match=message):
        load_numpy_encoder(path)
    with pytest.raises(ModelFileError, match="NaN" if "NaN" in message else None):  # PyTorch's loader too
        load_encoder(path)


@pytest.mark.parametrize("head", [torch.full((4, 512), float("nan")), torch.ones(4, 512).to(torch.float8_e4m3fn)])
def test_the_head_is_never_read_as_by_torch(tmp_path, head):
    """g's weights (kept beside f's in a run's head.safetensors, or by a user in one file) play no part in h:
    numpy refused a NaN head and failed on a float8 one with a traceback, where PyTorch loads the file."""
    path = tmp_path / "encoder.safetensors"
    write_encoder(path, size=32)
    images = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    expected = load_numpy_encoder(path)[0](images)
    damage(path, lambda t, m: t.update({"head.layers.0.weight": head, "classifier.weight": head.clone()}))
    np.testing.assert_array_equal(load_numpy_encoder(path)[0](images), expected)
    load_encoder(path)


def test_weights_in_a_dtype_numpy_lacks_are_left_to_torch(tmp_path):
    path = tmp_path / "encoder.safetensors"
    write_encoder(path, size=32)
    damage(path, lambda t, m: t.update({"bn1.bias": t["bn1.bias"].to(torch.float8_e5m2)}))
    with pytest.raises(numpy_encoder.NotInNumpy, match="bn1.bias holds F8_E5M2"):
        load_numpy_encoder(path)
    load_encoder(path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_weights_saved_in_another_float_dtype_load_as_float32(tmp_path, dtype):
    """A user's half (or double) copy of an encoder, metadata unchanged: both loaders compute in float32, on
    the weights as the file holds them, instead of PyTorch failing on float32 images against half weights."""
    path = tmp_path / "encoder.safetensors"
    write_encoder(path)
    damage(path, lambda t, m: t.update({k: v.to(dtype) for k, v in t.items() if v.is_floating_point()}))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    converted = trained_looking("resnet18", "imagenet", 1.0)
    converted.load_state_dict({k: v.to(dtype).float() if v.is_floating_point() else v
                               for k, v in converted.state_dict().items()})
    with torch.inference_mode():
        expected = converted(images).numpy()  # (2, D): the file's weights, in float32
        backbone, _ = load_encoder(path)
        assert all(p.dtype == torch.float32 for p in backbone.parameters())
        features = backbone(images).numpy()
    scale = np.abs(expected).max()
    np.testing.assert_allclose(features, expected, rtol=0, atol=2e-5 * scale)
    encoder, _ = load_numpy_encoder(path)
    np.testing.assert_allclose(encoder(images.numpy()), expected, rtol=0, atol=2e-5 * scale)


def test_the_module_imports_no_torch(tmp_path):
    path = tmp_path / "encoder.safetensors"
    write_encoder(path, size=32)
    script = ("import sys\nfrom simclr_cli.numpy_encoder import load_numpy_encoder\nimport numpy as np\n"
              f"encoder, _ = load_numpy_encoder({str(path)!r})\nencoder(np.zeros((1, 3, 32, 32), np.float32))\n"
              "print(sorted(name for name in sys.modules if name.split('.')[0] in ('torch', 'torchvision')))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

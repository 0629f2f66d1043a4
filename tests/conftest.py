"""Tiny real image folders made in the test session: digits by class, and a folder of mixed formats,
modes and sizes with a few broken files in it."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from export_digits import export_digits  # noqa: E402

# Threads beyond the two cores of CI only add contention.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def private_state(tmp_path, monkeypatch):
    """Keep the 'last index' of every test (any `simclr embed` remembers one) out of the user's own state
    directory, and the user's $SIMCLR_INDEX out of the tests."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("SIMCLR_INDEX", raising=False)


def _photo(size: tuple[int, int], seed: int) -> np.ndarray:
    """A smooth random RGB image (uint8, H x W x 3): gradients plus a few blobs, not noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = []
    for _ in range(3):
        a, b, c = rng.uniform(-1, 1, 3)
        channels.append(128 + 100 * np.sin(3 * a * x + 3 * b * y + c))
    image = np.stack(channels, axis=-1)
    for _ in range(3):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        mask = (x - cx) ** 2 + (y - cy) ** 2 < r**2
        image[mask] = rng.uniform(0, 255, 3)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_cut_image(path: Path, seed: int, size: tuple[int, int] = (48, 48)) -> Path:
    """An image whose header reads, so a scan keeps it, but whose data stops half-way, so decoding it
    fails; its format follows the name (.jpg, .png)."""
    image_format = Image.registered_extensions()[path.suffix.lower()]
    buffer = io.BytesIO()
    Image.fromarray(_photo(size, seed)).save(buffer, format=image_format, quality=95)
    path.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    return path


@pytest.fixture
def unlistable(monkeypatch) -> set[str]:
    """The names of folders that cannot be listed (add to it, clear it), as after `chmod 000` for anyone but root,
    which these tests may run as: os.scandir refuses them."""
    names: set[str] = set()
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path).name in names:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    return names


@pytest.fixture
def cut_image():
    """write_cut_image, for tests (which do not import conftest)."""
    return write_cut_image


def write_mixed_folder(root: Path) -> dict[str, list[str]]:
    """Write images of many formats and modes (some nested, some broken); return what is what."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "nested" / "deeper").mkdir(parents=True)
    good: list[str] = []

    def save(name: str, image: Image.Image, **kwargs) -> None:
        path = root / name
        image.save(path, **kwargs)
        good.append(name)

    rgb = Image.fromarray(_photo((48, 40), 0))
    save("rgb.png", rgb)
    save("UPPER.JPG", Image.fromarray(_photo((64, 48), 1)), format="JPEG", quality=90)
    save("grey.png", Image.fromarray(_photo((40, 40), 2)).convert("L"))
    save("grey_alpha.png", Image.fromarray(_photo((40, 40), 3)).convert("LA"))
    rgba = Image.fromarray(_photo((40, 40), 4)).convert("RGBA")
    alpha = np.zeros((40, 40), dtype=np.uint8)
    alpha[:, 20:] = 255
    rgba.putalpha(Image.fromarray(alpha))
    save("rgba.png", rgba)
    palette = Image.fromarray(_photo((40, 40), 5)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    save("palette_transparent.png", palette, transparency=0)
    save("cmyk.jpg", Image.fromarray(_photo((40, 40), 6)).convert("CMYK"), format="JPEG")
    sixteen = (np.asarray(Image.fromarray(_photo((40, 40), 7)).convert("L"), dtype=np.uint16) * 257)
    save("sixteen_bit.png", Image.fromarray(sixteen))
    save("nested/photo.webp", Image.fromarray(_photo((50, 30), 8)), format="WEBP")
    save("nested/photo.bmp", Image.fromarray(_photo((30, 50), 9)))
    frames = [Image.fromarray(_photo((32, 32), 10 + i)).convert("P") for i in range(3)]
    frames[0].save(root / "nested/animated.gif", save_all=True, append_images=frames[1:])
    good.append("nested/animated.gif")
    save("nested/deeper/photo.tiff", Image.fromarray(_photo((36, 36), 13)))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    save("nested/deeper/rotated.jpg", Image.fromarray(_photo((60, 30), 14)), format="JPEG", exif=exif)

    broken = ["empty.png", "truncated.jpg", "not_an_image.jpg"]
    (root / "empty.png").write_bytes(b"")
    write_cut_image(root / "truncated.jpg", 15, (256, 256))
    (root / "not_an_image.jpg").write_text("this is text, not a JPEG")

    save("stereo.mpo", rgb, format="MPO")  # a camera's multi-picture JPEG: Pillow's JPEG opener reads it
    ignored = [".hidden.png", "notes.txt", "scan.pdf", "album.palm"]  # Pillow writes the last two, never reads them
    rgb.save(root / ".hidden.png")
    (root / "notes.txt").write_text("not an image")
    rgb.save(root / "scan.pdf")
    rgb.convert("P").save(root / "album.palm")
    os.symlink(root, root / "nested" / "loop")  # a link back up the tree
    os.symlink(root / "missing.png", root / "dangling.png")
    broken.append("dangling.png")
    return {"good": sorted(good), "broken": sorted(broken), "ignored": ignored}


@pytest.fixture(scope="session")
def mixed_folder(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("mixed") / "images"
    return root, write_mixed_folder(root)


@pytest.fixture
def gappy_folder(tmp_path) -> Path:
    """Ten PNGs and, third in scan order, a JPEG whose header reads but whose data is cut: it is skipped only
    when decoded, so its row is missing from the middle of the first images' rows."""
    root = tmp_path / "gappy"
    root.mkdir()
    for i in range(10):
        Image.fromarray(_photo((40, 36), 100 + i)).save(root / f"{i:02d}.png")
    write_cut_image(root / "01b.jpg", 99, (256, 256))
    return root


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory) -> Path:
    """scikit-learn's digits as 32 px PNGs, one subfolder per class (1,797 images)."""
    root = tmp_path_factory.mktemp("digits") / "digits"
    export_digits(root, size=32)
    return root


@pytest.fixture(scope="session")
def small_digits_folder(tmp_path_factory) -> Path:
    """200 digits (about 20 per class) as 32 px PNGs, for quick training runs."""
    root = tmp_path_factory.mktemp("digits_small") / "digits"
    export_digits(root, size=32, limit=200)
    return root


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory, small_digits_folder) -> Path:
    """A run folder with a briefly pretrained resnet18 (ImageNet stem, 32 px: fast on CPU).

    Unit BatchNorm scales, not the default shortcuts: after these six steps, blocks started as their
    shortcuts are still at 7% of unit scale, which the fine-tune tests' two epochs do not grow back
    (README, Quality: "Why the test suite's encoder fine-tunes worse with the flag")."""
    from simclr_cli.config import AugmentConfig, PretrainConfig, RuntimeConfig
    from simclr_cli.train import pretrain

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    config = PretrainConfig(data_dir=str(small_digits_folder), out_dir=str(run_dir), epochs=2, batch_size=64,
                            arch="resnet18", stem="imagenet", zero_init_residual=False,
                            augment=AugmentConfig(image_size=32),
                            runtime=RuntimeConfig(device="cpu", workers=0, seed=0))
    pretrain(config)
    return run_dir

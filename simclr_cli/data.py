"""Image folders: scanning, decoding any Pillow image to RGB, datasets that skip bad files."""

from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from simclr_cli.errors import DataError

# Every extension Pillow can open, in lower case; matching ignores the file's case.
IMAGE_EXTENSIONS = frozenset(ext.lower() for ext in Image.registered_extensions())
# Pillow's own default limit (about 89 megapixels): anything larger is refused, not decoded.
MAX_PIXELS = 89_478_485
# Transparent pixels are composited on the ImageNet mean colour, which normalises to zero.
NEUTRAL_BACKGROUND = (124, 116, 104)

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey half-image


class UnreadableImage(Exception):
    """Raised for one file that cannot be decoded; the caller skips and reports it."""


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@dataclass
class Scan:
    """The images found under a folder, in sorted order, and the files passed over."""

    root: Path
    paths: list[Path] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk(root: Path) -> Iterable[tuple[Path, str]]:
    """Yield (directory, file name) under root, following links, skipping loops and hidden entries."""
    seen: set[tuple[int, int]] = set()
    for directory, subdirs, files in os.walk(root, followlinks=True):
        info = os.stat(directory)
        key = (info.st_dev, info.st_ino)
        if key in seen:  # a symbolic link back up the tree
            subdirs[:] = []
            continue
        seen.add(key)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in files:
            yield Path(directory), name


def probe(path: Path) -> str | None:
    """Return why a file cannot be an image (reading its header only), or None if it looks fine."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as img:
            width, height = img.size
    except FileNotFoundError:
        return "dangling link or missing file"
    except Image.DecompressionBombError:
        return "decompression bomb: refused"
    except Exception as error:  # Pillow raises many types for bad headers
        return f"unreadable: {type(error).__name__}: {error}".splitlines()[0][:200]
    if width * height > MAX_PIXELS:
        return f"decompression bomb: {width}x{height} pixels is over the {MAX_PIXELS:,} limit: refused"
    return None


def scan_images(root: str | Path, check: bool = True, threads: int = 8) -> Scan:
    """Return every image under root at any depth, sorted by relative path, and the files skipped.

    Subfolders are not classes here. Hidden files and non-image extensions are ignored; with
    `check`, each file's header is read so that empty or foreign files are skipped up front.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such folder; pass a folder of images")
    if not root.is_dir():
        raise DataError(f"{root}: is a file, not a folder; pass the folder that holds the images")
    candidates = sorted(
        (directory / name for directory, name in _walk(root) if is_image_name(name)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    scan = Scan(root=root)
    problems: Iterable[str | None]
    if check:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            problems = list(pool.map(probe, candidates))
    else:
        problems = [None if p.exists() else "dangling link or missing file" for p in candidates]
    for path, problem in zip(candidates, problems):
        if problem is None:
            scan.paths.append(path)
        else:
            scan.skipped.append(Skipped(str(path), problem))
    return scan


def require_images(scan: Scan) -> Scan:
    """Raise a one-line DataError when a scan found nothing usable."""
    if not scan.paths:
        found = f"{len(scan.skipped)} unreadable file(s), no readable image" if scan.skipped else "no image files"
        raise DataError(f"{scan.root}: {found}; put JPEG, PNG, WebP, BMP, GIF or TIFF images in it (any depth)")
    return scan


def to_rgb(img: Image.Image) -> Image.Image:
    """Return an 8-bit RGB image for any Pillow mode, compositing transparency on a neutral colour."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":  # 16/32-bit integer or float grey
        values = np.asarray(img, dtype=np.float32)
        if mode.startswith("I;16") or (values.size and values.max() > 255):
            values = values / 257.0
        elif mode == "F" and values.size and values.max() <= 1.0:
            values = values * 255.0
        grey = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
        return grey.convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, NEUTRAL_BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if mode == "1":
        img = img.convert("L")
    return img.convert("RGB")


def load_rgb(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Decode one file to RGB with EXIF orientation applied; raises UnreadableImage.

    A JPEG much larger than `min_side` is decoded in draft mode, at the smallest power-of-two
    reduction whose both sides are still at least `min_side` pixels.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise UnreadableImage(f"decompression bomb: {img.width}x{img.height} pixels: refused")
                if min_side and img.format == "JPEG" and min(img.size) >= 2 * min_side:
                    img.draft("RGB", (min_side, min_side))
                img.seek(0)  # first frame of animations
                img = ImageOps.exif_transpose(img)
                img.load()
                return to_rgb(img)
    except UnreadableImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UnreadableImage(f"decompression bomb: refused ({error})") from None
    except Exception as error:  # truncated data, bad headers, I/O errors
        message = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        raise UnreadableImage(f"unreadable: {message}") from None


def note_skipped(known: dict[str, Skipped], skipped: list[Skipped], report: Callable[..., None]) -> None:
    """Add newly skipped files to `known` (path -> Skipped) and warn once about each."""
    for item in skipped:
        if item.path not in known:
            known[item.path] = item
            report("warning", text=f"skipped {item.path}: {item.reason}")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A seed that depends only on (run seed, epoch, image index): augmentations do not depend on
    worker count or batch order, so an interrupted run resumes bit for bit."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class ImageDataset(torch.utils.data.Dataset):
    """Images (and optional labels) through a transform; a bad file yields a Skipped marker.

    With `seed` set, the transform's randomness is drawn from a generator seeded by
    (seed, epoch, index); set `epoch` before each pass. `decode(index, path)` replaces
    load_rgb(path, min_side) (the decoded cache's reader, cache.WorkingImages, is one).
    """

    def __init__(self, paths: Sequence[Path | str], transform: Callable[[Image.Image], torch.Tensor],
                 labels: Sequence[int] | None = None, min_side: int | None = None, seed: int | None = None,
                 decode: Callable[[int, str], Image.Image] | None = None):
        self.paths = [str(p) for p in paths]
        self.transform = transform
        self.labels = list(labels) if labels is not None else None
        self.min_side = min_side
        self.seed = seed
        self.epoch = 0
        self.decode = decode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            image = self.decode(index, path) if self.decode else load_rgb(path, self.min_side)
        except UnreadableImage as error:
            return Skipped(path, str(error))
        if self.seed is None:
            sample = self.transform(image)
        else:
            with torch.random.fork_rng(devices=[]):
                # The CPU generator only: torch.manual_seed also seeds every device, 0.9 ms a call.
                torch.default_generator.manual_seed(sample_seed(self.seed, self.epoch, index))
                sample = self.transform(image)
        label = self.labels[index] if self.labels is not None else -1
        return sample, label, index


@dataclass
class Batch:
    """A collated batch: samples (stacked), labels, dataset indices, and the files skipped.

    `params` holds batch_augment's parameter table when the samples are uint8 crops still to be
    augmented (the transform returned (crops, params) pairs).
    """

    samples: torch.Tensor | None
    labels: torch.Tensor
    indices: torch.Tensor
    skipped: list[Skipped]
    params: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.samples is None else self.samples.shape[0]

    def pin_memory(self) -> "Batch":
        if self.samples is not None:
            self.samples = self.samples.pin_memory()
        if self.params is not None:
            self.params = self.params.pin_memory()
        return self


def collate(items: list) -> Batch:
    """Stack the good items of a batch and collect the Skipped markers."""
    skipped = [item for item in items if isinstance(item, Skipped)]
    good = [item for item in items if not isinstance(item, Skipped)]
    if not good:
        return Batch(None, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), skipped)
    labels = torch.tensor([item[1] for item in good], dtype=torch.long)
    indices = torch.tensor([item[2] for item in good], dtype=torch.long)
    if isinstance(good[0][0], tuple):  # (uint8 crops, parameter table) from batch_augment.ViewSampler
        samples = torch.stack([item[0][0] for item in good])
        return Batch(samples, labels, indices, skipped, torch.stack([item[0][1] for item in good]))
    samples = torch.stack([item[0] for item in good])
    return Batch(samples, labels, indices, skipped)


def epoch_order(size: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of one epoch, a function of (seed, epoch) alone."""
    generator = torch.Generator().manual_seed(sample_seed(seed, epoch, -1))
    return torch.randperm(size, generator=generator).tolist()


def _quiet_worker(_: int) -> None:
    # Ctrl-C reaches the whole process group; the main process alone decides how to stop.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset: ImageDataset, batch_size: int, order: Sequence[int] | None, workers: int,
                drop_last: bool = False, pin_memory: bool = False,
                collate_fn: Callable[[list], Batch] = collate) -> torch.utils.data.DataLoader:
    """A DataLoader over `order` (dataset indices; None for the natural order) that skips bad files.

    `collate_fn` must build on `collate` (batch_augment.AugmentInLoader does)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=list(order) if order is not None else None,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_fn,
        drop_last=drop_last,
        pin_memory=pin_memory,
        worker_init_fn=_quiet_worker if workers > 0 else None,
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )


def to_device_ahead(batches: Iterable[Batch], device: torch.device) -> Iterable[Batch]:
    """Yield batches with samples on `device`, each copied while the one before is used (params stay on the CPU).

    On a CUDA device the copy runs on a side stream, one batch ahead, from pinned memory; the
    training stream waits for that copy alone (an event), never the host. Elsewhere a pass-through.
    """
    if device.type != "cuda":
        yield from batches
        return
    stream = torch.cuda.Stream(device)
    pending: tuple[Batch, torch.cuda.Event] | None = None
    for batch in batches:
        with torch.cuda.stream(stream):
            if batch.samples is not None:
                batch.samples = batch.samples.to(device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        if pending is not None:
            yield _on_current_stream(*pending)
        pending = (batch, copied)
    if pending is not None:
        yield _on_current_stream(*pending)


def _on_current_stream(batch: Batch, copied: "torch.cuda.Event") -> Batch:
    current = torch.cuda.current_stream()
    current.wait_event(copied)
    if batch.samples is not None:
        batch.samples.record_stream(current)  # its memory is not reused before the training stream is done
    return batch

"""Two-view batches per second from a folder of large photos: simclr's pipeline against torchvision's.

It writes --images smooth random JPEG photos of --photo-size pixels (a few megapixels), then times
two passes (epochs) over them at --image-size with each pipeline, the same --workers and batch:
  torchvision  the standard per-image pipeline: Pillow decode at full size, the paper's transforms
               (augment.simclr_augmentation: RandomResizedCrop, flip, ColorJitter, grayscale,
               GaussianBlur, ToTensor, Normalize) twice per image, DataLoader
  simclr       what `simclr pretrain --cache` runs on a CPU: Pillow draft-mode decode to the working
               resolution, stored in the decoded cache in the first epoch and read from it in the
               second, crops at uint8, then flip/jitter/grayscale/blur/normalise in batches in the
               loader worker (`--augment-on cpu`); also `--augment-on device` (the batch step in
               the main process, as on a GPU) and the first epoch without the cache
and prints batches/s per epoch and the ratios. Targets: 3x from the second epoch, no slower in
the first.

    .venv/bin/python benchmarks/bench_views.py
    .venv/bin/python benchmarks/bench_views.py --images 200 --photo-size 3000 2000 --batch-size 64
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_photos(folder: Path, count: int, size: tuple[int, int]) -> None:
    """Smooth random colour fields with a little grain, saved as JPEG (quality 90)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    width, height = size
    for i in range(count):
        small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        picture = np.asarray(small.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
        grain = rng.integers(-6, 7, (height, width, 1), dtype=np.int16)
        Image.fromarray(np.clip(picture + grain, 0, 255).astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)


class TorchvisionViews(torch.utils.data.Dataset):
    """The standard per-image pipeline: full-size decode, torchvision transforms, two views."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB"))


def time_epochs(make_batches, epochs: int) -> list[float]:
    """Seconds per epoch, each from the loader's start to its last batch."""
    seconds = []
    for epoch in range(epochs):
        start = time.perf_counter()
        for _ in make_batches(epoch):
            pass
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--photo-size", type=int, nargs=2, default=[2400, 1800], metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=None, help="loader processes (default: simclr's default)")
    args = parser.parse_args()
    if args.images < args.batch_size:
        parser.error(f"--images {args.images} is fewer than --batch-size {args.batch_size}: no whole batch to time")

    from simclr_cli.augment import TwoViews, simclr_augmentation
    from simclr_cli.batch_augment import AugmentInLoader, BatchAugment, ViewSampler
    from simclr_cli.cache import DecodedCache, WorkingImages, working_side
    from simclr_cli.config import AugmentConfig
    from simclr_cli.data import ImageDataset, collate, make_loader
    from simclr_cli.runtime import default_workers

    workers = default_workers() if args.workers is None else args.workers
    config = AugmentConfig(image_size=args.image_size)
    side = working_side(args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        write_photos(folder, args.images, tuple(args.photo_size))
        paths = sorted(folder.glob("*.jpg"))
        megapixels = args.photo_size[0] * args.photo_size[1] / 1e6
        print(f"{platform.machine()}, {os.cpu_count()} CPU core(s) (shared: other jobs may be running), "
              f"{workers} loader worker(s); {args.images} JPEG photos of {megapixels:.1f} MP, "
              f"{args.image_size} px views, batch {args.batch_size}")
        steps = args.images // args.batch_size

        def torchvision_batches(epoch):
            dataset = TorchvisionViews(paths, TwoViews(simclr_augmentation(config)))
            return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                               num_workers=workers)

        def simclr_batches(cache, on_device):
            dataset = ImageDataset(paths, ViewSampler(config), seed=0, decode=WorkingImages(side, cache))
            augment = BatchAugment(config)

            def batches(epoch):
                dataset.epoch = epoch
                order = torch.randperm(len(paths)).tolist()
                loader = make_loader(dataset, args.batch_size, order, workers, drop_last=True,
                                     collate_fn=collate if on_device else AugmentInLoader(augment))
                for batch in loader:
                    yield augment(batch.samples, batch.params) if on_device else batch.samples
            return batches

        results = {"torchvision": time_epochs(torchvision_batches, 2)}
        results["simclr, no cache"] = time_epochs(simclr_batches(None, False), 1)
        for name, on_device in (("simclr --cache", False), ("simclr --cache --augment-on device", True)):
            cache, _ = DecodedCache.prepare(Path(tmp) / name.replace(" ", "_"), folder, paths, side)
            results[name] = time_epochs(simclr_batches(cache, on_device), 2)
        base = [steps / s for s in results["torchvision"]]
        for name, seconds in results.items():
            rates = [steps / s for s in seconds]
            text = ", ".join(f"epoch {e + 1}: {rate:.2f} batches/s ({rate / base[e]:.2f}x)"
                             for e, rate in enumerate(rates))
            print(f"{name:38s} {text}")
        ours = [steps / s for s in results["simclr --cache"]]
        print(f"ratio simclr --cache / torchvision: first epoch {ours[0] / base[0]:.2f}x (target >= 1), "
              f"second epoch {ours[1] / base[1]:.2f}x (target >= 3)")


if __name__ == "__main__":
    main()

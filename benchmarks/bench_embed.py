"""Images/s of `simclr embed` against a plain torchvision loop on the same files and model.

It writes --images random JPEG files (--file-size px), an untrained resnet18 encoder at --image-size,
then times, best of --repeats:
  simclr     embed.embed_folder: scan (headers checked), model load and hash, decode, forward,
             normalise, rows streamed into OUT.npy, manifest
  plain      torchvision ImageFolder + DataLoader (same workers, batch size and eval transform) + the
             same model, features kept in a list and saved with np.save at the end
and prints the ratio. simclr decodes JPEGs much larger than the input size in Pillow's draft mode
(part of its speed), so its features differ slightly from the plain loop's.

    .venv/bin/python benchmarks/bench_embed.py
    .venv/bin/python benchmarks/bench_embed.py --images 2000 --image-size 224 --batch-size 128
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


def write_images(folder: Path, count: int, size: int) -> None:
    generator = np.random.default_rng(0)
    (folder / "all").mkdir(parents=True)  # ImageFolder wants one class folder
    for i in range(count):
        y, x = np.mgrid[0:size, 0:size] / size
        picture = np.stack([128 + 100 * np.sin(generator.uniform(2, 14) * x + generator.uniform(2, 14) * y)
                            for _ in range(3)], axis=-1)
        Image.fromarray(picture.astype(np.uint8)).save(folder / "all" / f"{i:06d}.jpg", quality=90)


def plain_loop(model_path: Path, folder: Path, out: Path, batch_size: int, workers: int) -> None:
    import torchvision

    from simclr_cli.export import load_encoder
    from simclr_cli.augment import preprocessing

    backbone, info = load_encoder(model_path)
    dataset = torchvision.datasets.ImageFolder(str(folder), transform=preprocessing(info))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    features = []
    with torch.inference_mode():
        for images, _ in loader:
            features.append(backbone(images))
    np.save(out, torch.cat(features).numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--file-size", type=int, default=256, help="side of the JPEG files, in pixels")
    parser.add_argument("--image-size", type=int, default=64, help="encoder input size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="loader processes (default: simclr's default)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from simclr_cli.augment import IMAGENET_MEAN, IMAGENET_STD
    from simclr_cli.embed import EmbedConfig, embed_folder
    from simclr_cli.export import save_encoder
    from simclr_cli.files import EncoderInfo
    from simclr_cli.models import build_backbone
    from simclr_cli.runtime import default_workers

    workers = default_workers() if args.workers is None else args.workers
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["XDG_STATE_HOME"] = str(folder / "state")  # leave the user's "last index" alone
        write_images(folder / "images", args.images, args.file_size)
        backbone = build_backbone("resnet18", "imagenet")
        info = EncoderInfo("resnet18", "imagenet", backbone.feature_dim, args.image_size, IMAGENET_MEAN,
                           IMAGENET_STD, "bench", {})
        model = folder / "encoder.safetensors"
        save_encoder(model, backbone, info)
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__} with "
              f"{torch.get_num_threads()} threads; {args.images} JPEGs of {args.file_size} px, resnet18 at "
              f"{args.image_size} px, batch {args.batch_size}, {workers} loader worker(s), best of {args.repeats}")
        ours, plain = [], []
        for repeat in range(args.repeats):
            start = time.perf_counter()
            plain_loop(model, folder / "images", folder / "plain.npy", args.batch_size, workers)
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            embed_folder(EmbedConfig(model=str(model), images=str(folder / "images"), out=str(folder / "ours.npy"),
                                     batch_size=args.batch_size, device="cpu", workers=workers, overwrite=True))
            ours.append(time.perf_counter() - start)
        # Same rows; not the same values to the last digit: simclr decodes large JPEGs in Pillow's draft mode.
        assert np.load(folder / "ours.npy").shape == np.load(folder / "plain.npy").shape
        ours_speed, plain_speed = args.images / min(ours), args.images / min(plain)
        print(f"simclr embed: {ours_speed:,.1f} images/s; plain torchvision loop: {plain_speed:,.1f} images/s; "
              f"ratio simclr/plain {ours_speed / plain_speed:.2f}x")


if __name__ == "__main__":
    main()

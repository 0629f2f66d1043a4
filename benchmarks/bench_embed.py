"""Images/s of `simclr embed` against a plain torchvision loop on the same files and model.

It writes --images random JPEG files (--file-size px), an untrained resnet18 encoder at --image-size,
then times, best of --repeats (after an untimed warm-up of both on one batch, and in turns: the first call
pays imports and first-call costs, torchvision's import alone 4 to 8 s):
  simclr     embed.embed_folder: scan (headers checked), model load and hash, decode, forward,
             normalise, rows streamed into OUT.npy, manifest
  plain      torchvision ImageFolder + DataLoader (same workers, batch size and eval transform) + the
             same model, features kept in a list and saved with np.save at the end
and prints the ratio. Both compute in fp32. simclr decodes JPEGs much larger than the input size in
Pillow's draft mode (part of its speed), so its features differ slightly from the plain loop's: each
row's cosine with the plain loop's row of the same image must be above 0.99.

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


def plain_loop(model_path: Path, folder: Path, out: Path, batch_size: int, workers: int) -> list[str]:
    """Features of every image into `out`; return the images' paths in row order."""
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
    return [path for path, _ in dataset.samples]


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
    from simclr_cli.index import manifest_path, read_manifest
    from simclr_cli.models import build_backbone
    from simclr_cli.runtime import default_workers

    workers = default_workers() if args.workers is None else args.workers
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["XDG_STATE_HOME"] = str(folder / "state")  # leave the user's "last index" alone
        write_images(folder / "images", args.images, args.file_size)
        write_images(folder / "warm-up", min(args.batch_size, args.images), args.file_size)
        backbone = build_backbone("resnet18", "imagenet")
        info = EncoderInfo("resnet18", "imagenet", backbone.feature_dim, args.image_size, IMAGENET_MEAN,
                           IMAGENET_STD, "bench", {})
        model = folder / "encoder.safetensors"
        save_encoder(model, backbone, info)
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__} with "
              f"{torch.get_num_threads()} threads; {args.images} JPEGs of {args.file_size} px, resnet18 at "
              f"{args.image_size} px, batch {args.batch_size}, {workers} loader worker(s), best of {args.repeats}")

        def run_plain(images: str) -> list[str]:
            return plain_loop(model, folder / images, folder / "plain.npy", args.batch_size, workers)

        def run_ours(images: str) -> None:
            # fp32 as the plain loop: "auto" would be bf16 on a CPU with bf16 instructions
            embed_folder(EmbedConfig(model=str(model), images=str(folder / images), out=str(folder / "ours.npy"),
                                     batch_size=args.batch_size, device="cpu", precision="fp32", workers=workers,
                                     overwrite=True))

        run_plain("warm-up")
        run_ours("warm-up")
        times = {run_plain: [], run_ours: []}
        for repeat in range(args.repeats):  # in turns, so neither always runs on a machine the other warmed
            for run in (run_plain, run_ours) if repeat % 2 == 0 else (run_ours, run_plain):
                start = time.perf_counter()
                paths = run("images")
                times[run].append(time.perf_counter() - start)
                if run is run_plain:
                    plain_paths = paths
        # Same rows, not the same values to the last digit: simclr decodes large JPEGs in Pillow's draft mode.
        ours_paths = [str(path) for path in read_manifest(manifest_path(folder / "ours.npy")).paths]
        row_of = {os.path.abspath(path): row for row, path in enumerate(plain_paths)}
        plain_rows = np.load(folder / "plain.npy")[[row_of[path] for path in ours_paths]]  # (N, D), ours' order
        ours_rows = np.load(folder / "ours.npy")  # (N, D), unit rows
        cosines = (ours_rows * plain_rows).sum(1) / np.linalg.norm(plain_rows, axis=1)  # (N,)
        assert len(ours_rows) == args.images and cosines.min() > 0.99, f"lowest row cosine {cosines.min():.4f}"
        ours, plain = times[run_ours], times[run_plain]
        ours_speed, plain_speed = args.images / min(ours), args.images / min(plain)
        print(f"simclr embed: {ours_speed:,.1f} images/s; plain torchvision loop: {plain_speed:,.1f} images/s; "
              f"ratio simclr/plain {ours_speed / plain_speed:.2f}x; row cosines >= {cosines.min():.4f}")


if __name__ == "__main__":
    main()

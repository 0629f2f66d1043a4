"""Pretraining images per second end to end: `simclr pretrain --cache` against a plain reference loop.

It writes --images smooth random JPEG photos of --photo-size pixels, then trains the same model
(--arch, default ResNet-18, with pretrain's projection head and initialisation), batch and resolution
for --epochs with:
  plain    torchvision's per-image pipeline (full-size Pillow decode, augment.simclr_augmentation
           twice per image) in a DataLoader, the model in channels_last, the textbook NT-Xent
           (one (2N, 2N) matmul, eye mask, cross-entropy), SGD with momentum
  simclr   train.pretrain with --cache and --augment-on auto (on a CPU: crops and batched
           colour/blur in the loader workers), its NT-Xent, LARS, checkpoints every epoch, and
           --precision auto (bf16 autocast on a CPU with bf16 instructions; --precision fp32 to
           compare without it)
Both use the same number of loader workers and torch threads. It prints images/s per epoch (the
loader's start included) and over the whole run, and the ratio. Target: 1.5x.

    .venv/bin/python benchmarks/bench_pretrain.py
    .venv/bin/python benchmarks/bench_pretrain.py --images 128 --batch-size 32 --image-size 224 --epochs 3
    .venv/bin/python benchmarks/bench_pretrain.py --skip-plain --augment-on device   # vs cpu: what auto picks
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from simclr_cli.config import PretrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loss import straightforward  # noqa: E402
from bench_views import TorchvisionViews, write_photos  # noqa: E402


def pretrain_config(folder: Path, out: Path, args: argparse.Namespace, workers: int) -> PretrainConfig:
    """The settings of the simclr run; the plain loop builds its model from the same ones."""
    from simclr_cli.config import AugmentConfig, PretrainConfig, RuntimeConfig

    return PretrainConfig(data_dir=str(folder), out_dir=str(out), epochs=args.epochs, batch_size=args.batch_size,
                          arch=args.arch, stem="imagenet", cache=True, warmup_epochs=0, augment_on=args.augment_on,
                          augment=AugmentConfig(image_size=args.image_size),
                          runtime=RuntimeConfig(device="cpu", precision=args.precision, workers=workers))


def plain_loop(paths, config: PretrainConfig) -> list[float]:
    """The reference: images/s of each epoch, for the model that `config` trains."""
    from simclr_cli.augment import TwoViews, simclr_augmentation
    from simclr_cli.models import SimCLR

    torch.manual_seed(0)
    model = SimCLR(config.arch, config.stem, config.proj_layers, config.proj_dim, config.width,
                   zero_init_residual=config.zero_init_residual, proj_out_bn=config.proj_out_bn)
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-6)
    dataset = TorchvisionViews(paths, TwoViews(simclr_augmentation(config.augment)))
    rates = []
    for _ in range(config.epochs):
        start, images = time.perf_counter(), 0
        loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True,
                                             num_workers=config.runtime.workers)
        for views in loader:  # (N, 2, 3, S, S)
            n = len(views)
            batch = views.transpose(0, 1).reshape(2 * n, *views.shape[2:])  # (2N, 3, S, S)
            projections = model(batch.contiguous(memory_format=torch.channels_last))  # (2N, 128)
            loss = straightforward(projections[:n], projections[n:], config.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            images += n
        rates.append(images / (time.perf_counter() - start))
    return rates


def simclr_run(config: PretrainConfig) -> tuple[list[float], float]:
    """train.pretrain with the cache: images/s of each epoch and of the whole call."""
    from simclr_cli.train import pretrain

    rates = []

    def report(kind, **fields):
        if kind == "epoch":
            rates.append(fields["images_per_s"])

    start = time.perf_counter()
    result = pretrain(config, report)
    return rates, result.state.images_seen / (time.perf_counter() - start)


def main() -> None:
    from simclr_cli.config import ARCHITECTURES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--photo-size", type=int, nargs=2, default=[2400, 1800], metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--arch", default="resnet18", choices=ARCHITECTURES,
                        help="the encoder both train (default resnet18)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=None, help="loader processes (default: simclr's default)")
    parser.add_argument("--augment-on", default="auto", help="simclr's --augment-on")
    parser.add_argument("--precision", default="auto",
                        help="simclr's --precision (auto: bf16 on CPUs with bf16 instructions; the plain loop is fp32)")
    parser.add_argument("--skip-plain", action="store_true", help="time simclr alone (to compare --augment-on)")
    args = parser.parse_args()
    if args.images < args.batch_size:
        parser.error(f"--images {args.images} is fewer than --batch-size {args.batch_size}: no whole batch to time")

    from simclr_cli.runtime import default_workers, resolve_precision

    workers = default_workers() if args.workers is None else args.workers
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        write_photos(folder, args.images, tuple(args.photo_size))
        print(f"{platform.machine()}, {os.cpu_count()} CPU core(s) (shared: other jobs may be running), "
              f"{torch.get_num_threads()} torch threads, {workers} loader worker(s); {args.arch} at {args.image_size} "
              f"px, batch {args.batch_size}, simclr in {resolve_precision(args.precision, torch.device('cpu')).name}, "
              f"{args.images} photos of "
              f"{args.photo_size[0] * args.photo_size[1] / 1e6:.1f} MP, {args.epochs} epochs")
        config = pretrain_config(folder, Path(tmp) / "run", args, workers)
        ours, ours_total = simclr_run(config)
        if args.skip_plain:
            print(f"simclr --cache --augment-on {args.augment_on}: " + ", ".join(
                f"epoch {e + 1}: {r:.1f} images/s" for e, r in enumerate(ours)) + f"; whole run {ours_total:.1f}")
            return
        start = time.perf_counter()
        plain = plain_loop(sorted(folder.glob("*.jpg")), config)
        plain_total = (args.images // args.batch_size) * args.batch_size * args.epochs / (time.perf_counter() - start)
        for name, rates, total in (("plain", plain, plain_total), ("simclr --cache", ours, ours_total)):
            print(f"{name:15s} " + ", ".join(f"epoch {e + 1}: {r:.1f} images/s" for e, r in enumerate(rates))
                  + f"; whole run (set-up, checkpoints, export included) {total:.1f} images/s")
        print(f"ratio simclr / plain: last epoch {ours[-1] / plain[-1]:.2f}x, "
              f"whole run {ours_total / plain_total:.2f}x (target 1.5x)")


if __name__ == "__main__":
    main()

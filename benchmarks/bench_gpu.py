"""On one CUDA GPU: does the data pipeline hide behind the model? Full pretraining vs the model alone.

It writes --images JPEG files of ImageNet's typical size (500x375, smooth random photos), then:
  model alone  the SimCLR model (--arch, 2-layer head), NT-Xent and LARS on random views already in
               GPU memory: bf16 autocast, channels_last, --compile if given; the ceiling
  pipeline     train.pretrain on the folder with --cache and --augment-on device (crops in the loader
               workers, colour and blur in batches on the GPU, copies one batch ahead), same model,
               batch, precision and optimiser; timed over the epochs after the first (the first
               fills the decoded cache), from the end of their first step to the end of the last, each
               waited for on the GPU
and prints images/s of both (views/s is twice that) and the ratio. Targets: the pipeline at least
90% of the model-alone rate, and at least 2,000 source images/s for ResNet-50 at 224 px, batch 512,
bf16 on one H200. Without CUDA it says so and exits 0.

    .venv/bin/python benchmarks/bench_gpu.py
    .venv/bin/python benchmarks/bench_gpu.py --images 16384 --epochs 4 --workers 12 --compile
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def _write_one(job: tuple[Path, int]) -> None:
    path, seed = job
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    picture = np.asarray(small.resize((500, 375), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-6, 7, (375, 500, 1), dtype=np.int16)
    Image.fromarray(np.clip(picture + grain, 0, 255).astype(np.uint8)).save(path, quality=90)


def write_imagenet_sized(folder: Path, count: int) -> None:
    folder.mkdir(parents=True)
    with ProcessPoolExecutor() as pool:
        list(pool.map(_write_one, [(folder / f"{i:06d}.jpg", i) for i in range(count)], chunksize=64))


def model_alone(arch: str, batch: int, size: int, steps: int, compile_model: bool) -> float:
    """Images/s of forward, NT-Xent, backward and LARS on random views in GPU memory."""
    from simclr_cli.config import PretrainConfig
    from simclr_cli.loss import nt_xent
    from simclr_cli.models import SimCLR
    from simclr_cli.optim import build_optimizer

    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    defaults = PretrainConfig(data_dir="", out_dir="")  # pretrain's model: blocks as shortcuts, head BatchNorm
    model = SimCLR(arch, "imagenet", defaults.proj_layers, defaults.proj_dim,
                   zero_init_residual=defaults.zero_init_residual, proj_out_bn=defaults.proj_out_bn)
    model = model.to(device, memory_format=torch.channels_last).train()
    optimizer = build_optimizer("lars", model, 0.3 * batch / 256, 1e-6)
    step_model = torch.compile(model) if compile_model else model
    views = torch.randn(2 * batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            projections = step_model(views)  # (2N, 128)
        loss = nt_xent(projections[:batch], projections[batch:], 0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(5):  # warm-up: cuDNN autotuning, compilation
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def pipeline(folder: Path, out: Path, arch: str, batch: int, size: int, epochs: int, workers: int,
             compile_model: bool) -> float:
    """Images/s of train.pretrain after its first epoch."""
    from simclr_cli.config import AugmentConfig, PretrainConfig, RuntimeConfig
    from simclr_cli.train import pretrain

    marks = []  # (step, time) at the first step after the first epoch and at the last step

    def report(kind, **fields):
        if kind == "step" and fields["epoch"] >= 2 and (not marks or fields["step"] == fields["total_steps"]):
            # Wait for the GPU at these two steps only: the loop's own syncs (reading the loss) come every 10 steps
            # of an epoch, not at global multiples of 10, and a sync every step would stall the copies ahead.
            torch.cuda.synchronize()
            marks.append((fields["step"], time.perf_counter()))
        elif kind in ("message", "warning"):
            print(f"  {fields['text']}")

    config = PretrainConfig(data_dir=str(folder), out_dir=str(out), epochs=epochs, batch_size=batch, arch=arch,
                            stem="imagenet", cache=True, augment_on="device", compile=compile_model,
                            augment=AugmentConfig(image_size=size),
                            runtime=RuntimeConfig(device="cuda", precision="bf16", workers=workers))
    pretrain(config, report)
    (first_step, first_time), (last_step, last_time) = marks[0], marks[-1]
    return (last_step - first_step) * batch / (last_time - first_time)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10240)
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="timed steps of the model-alone run")
    parser.add_argument("--workers", type=int, default=None,
                        help="loader processes (default: all cores but two; simclr's own default stops at 8)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model in both runs")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error(f"--epochs {args.epochs}: the first epoch fills the cache and is not timed; use at least 2")
    if (args.images // args.batch_size) * (args.epochs - 1) < 2:
        parser.error(f"--images {args.images} at --batch-size {args.batch_size} leaves fewer than 2 steps after the "
                     f"first epoch to time between; use more --images or --epochs")
    if not torch.cuda.is_available():
        print("no CUDA GPU here: benchmark 3 skipped (nothing measured)")
        return

    workers = max(1, (os.cpu_count() or 3) - 2) if args.workers is None else args.workers
    print(f"{torch.cuda.get_device_name()}, {os.cpu_count()} CPU cores, {workers} loader workers; {args.arch} at "
          f"{args.image_size} px, batch {args.batch_size} (x2 views), bf16, compile {args.compile}")
    alone = model_alone(args.arch, args.batch_size, args.image_size, args.steps, args.compile)
    print(f"model alone, views in GPU memory: {alone:,.0f} images/s ({2 * alone:,.0f} views/s)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        start = time.perf_counter()
        write_imagenet_sized(folder, args.images)
        print(f"wrote {args.images} JPEG files of 500x375 in {time.perf_counter() - start:.0f} s")
        full = pipeline(folder, Path(tmp) / "run", args.arch, args.batch_size, args.image_size, args.epochs,
                        workers, args.compile)
    print(f"full pipeline from JPEG files (--cache, epochs 2+): {full:,.0f} images/s ({2 * full:,.0f} views/s)")
    print(f"ratio pipeline / model alone: {full / alone:.2f} (target >= 0.90); source images/s {full:,.0f} "
          f"(target >= 2,000)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

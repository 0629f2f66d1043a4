"""Does pretraining learn? SimCLR on Fashion-MNIST under a CPU time budget, against honest baselines.

One command:

    .venv/bin/python benchmarks/quality.py --budget 10m
    .venv/bin/python benchmarks/quality.py --budget 60m
    .venv/bin/python benchmarks/quality.py --budget 30s --subset 2000      # a quick check of the pipeline
    .venv/bin/python benchmarks/quality.py --budget 60m --simclr-run runs/quality-60m-.../simclr --skip raw,random
                                                                    # the supervised ceiling of an earlier run

Steps, all in one run:
  data        Fashion-MNIST (60,000 train / 10,000 test, 28 px grayscale, 10 classes) from Debian's
              `dataset-fashion-mnist` package, installed with apt-get when missing, exported once
              as PNG folders (train/ and test/, one subfolder per class) under --data
  simclr      `simclr pretrain` on the train images, without their labels, under --max-time BUDGET,
              with `--monitor` on a small labelled slice of the train images (curves.png)
  measures    `simclr linear-eval ENCODER TRAIN --val TEST`: the linear probe's top-1 and the
              weighted kNN top-1 (k = 20), train -> test
  baselines   the same linear probe and kNN on
              raw pixels     the 784 grey levels of each image, no encoder
              random         the same encoder (arch, width, stem, image size) with its initial weights
              supervised     the same encoder trained with labels (cross-entropy, crops and flips, SGD)
                             for the same time budget: a ceiling for the budget
It prints a markdown table and writes it, with the numbers in JSON, to OUT/results.md and
OUT/results.json. The whole run takes about twice the budget plus the evaluations (each linear
probe chooses its L2 strength from 7 values by L-BFGS on 48,000 images: minutes on a small CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from simclr_cli.files import EncoderInfo

import numpy as np

PACKAGE = "dataset-fashion-mnist"
PACKAGE_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
# Folder names sort in label order, so the class indices of linear-eval are Fashion-MNIST's.
CLASSES = ("0-tshirt-top", "1-trouser", "2-pullover", "3-dress", "4-coat", "5-sandal", "6-shirt", "7-sneaker",
           "8-bag", "9-ankle-boot")
TARGETS = {600: 0.88, 3600: 0.90}  # the linear top-1 targets after 10 and 60 minutes


# -- data -----------------------------------------------------------------------------------------

def ensure_package() -> Path:
    """The folder of the idx files, installing the Debian package when they are missing."""
    if all((PACKAGE_DIR / name).is_file() for pair in IDX_FILES.values() for name in pair):
        return PACKAGE_DIR
    if shutil.which("apt-get") is None:
        sys.exit(f"error: {PACKAGE_DIR} has no Fashion-MNIST files and there is no apt-get here; install Debian's "
                 f"{PACKAGE} package, or copy the four idx .gz files there")
    command = ["apt-get", "install", "-y", "-q", PACKAGE]
    if os.geteuid() != 0:
        command = ["sudo", *command]
    print(f"Fashion-MNIST is not installed: running `{shlex.join(command)}`", flush=True)
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(command, env=environment).returncode != 0:
        update = ["apt-get", "update"] if os.geteuid() == 0 else ["sudo", "apt-get", "update"]
        print(f"retrying after `{shlex.join(update)}`", flush=True)
        subprocess.run(update, env=environment, check=False)
        if subprocess.run(command, env=environment).returncode != 0:
            sys.exit(f"error: could not install {PACKAGE}; run `{shlex.join(command)}` yourself and try again")
    return PACKAGE_DIR


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip): uint8 images (N, 28, 28) or labels (N,)."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_split(package_dir: Path, split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    images, labels = (read_idx(package_dir / name) for name in IDX_FILES[split])
    return (images[:limit], labels[:limit]) if limit else (images, labels)


def export_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """PNG files root/<class>/<index>.png, once: a finished export is marked by root/.complete."""
    from PIL import Image

    marker = root / ".complete"
    if marker.is_file() and marker.read_text().strip() == str(len(images)):
        return
    if root.exists():
        shutil.rmtree(root)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
    for index, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image, mode="L").save(root / CLASSES[label] / f"{index:05d}.png")
    marker.write_text(f"{len(images)}\n")


def prepare_data(data_dir: Path, subset: int | None, monitor_size: int) -> dict[str, object]:
    """Export train/test (and the monitor's labelled slice) and return the folders and the arrays."""
    package_dir = ensure_package()
    test_limit = None if subset is None else min(10_000, max(1_000, subset // 6))
    train_x, train_y = load_split(package_dir, "train", subset)
    test_x, test_y = load_split(package_dir, "test", test_limit)
    monitor_size = min(monitor_size, len(train_x) // 2)
    root = data_dir / ("full" if subset is None else f"subset-{subset}")
    started = time.monotonic()
    print(f"exporting {len(train_x):,} train and {len(test_x):,} test images to {root} (once)", flush=True)
    export_folder(root / "train", train_x, train_y)
    export_folder(root / "test", test_x, test_y)
    # The monitor's slice: the last train images (labelled), a small folder the kNN monitor splits 80/20.
    if monitor_size:
        export_folder(root / f"monitor-{monitor_size}", train_x[-monitor_size:], train_y[-monitor_size:])
    print(f"  ready in {time.monotonic() - started:.0f} s", flush=True)
    return {"root": root, "train": root / "train", "test": root / "test",
            "monitor": root / f"monitor-{monitor_size}" if monitor_size else None,
            "train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


# -- the simclr commands --------------------------------------------------------------------------

def simclr(*args: str, capture: bool = False) -> str:
    """Run `simclr ARGS` in a fresh process (as a user would); stop the benchmark if it fails."""
    command = [sys.executable, "-m", "simclr_cli", *args]
    print(f"$ simclr {shlex.join(args)}", flush=True)
    result = subprocess.run(command, stdout=subprocess.PIPE if capture else None, text=True)
    if result.returncode != 0:
        sys.exit(f"error: `simclr {shlex.join(args)}` failed with exit code {result.returncode}")
    return result.stdout or ""


def linear_eval(model: Path, data: dict, out: Path, workers: int | None) -> dict[str, float]:
    extra = ["--workers", str(workers)] if workers is not None else []
    text = simclr("linear-eval", str(model), str(data["train"]), "--val", str(data["test"]), "--out", str(out),
                  "--device", "cpu", "--json", *extra, capture=True)
    results = json.loads(text)
    return {"linear_top1": results["top1"], "knn_top1": results["knn_top1"], "l2": results["l2"]}


# -- baselines ------------------------------------------------------------------------------------

def raw_pixels(data: dict) -> dict[str, float]:
    """The linear probe and kNN of simclr_cli.evaluate on the raw grey levels (784 features)."""
    import torch

    from simclr_cli.evaluate import knn_report, train_linear_probe

    def flat(images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255)  # (N, 784)

    train_x, test_x = flat(data["train_x"]), flat(data["test_x"])
    train_y = torch.from_numpy(data["train_y"].astype(np.int64))
    test_y = torch.from_numpy(data["test_y"].astype(np.int64))
    probe, _ = train_linear_probe(train_x, train_y, len(CLASSES))
    linear = (probe.logits(test_x).argmax(1) == test_y).double().mean().item()
    knn = knn_report(train_x, train_y, test_x, test_y, len(CLASSES))["knn_top1"]
    return {"linear_top1": linear, "knn_top1": knn, "l2": probe.l2}


def zero_init(like: EncoderInfo) -> bool:
    """Whether the pretraining run behind `like` started its residual blocks as their shortcuts."""
    return bool(like.config.get("zero_init_residual", False))


def save_random_encoder(path: Path, like: EncoderInfo, seed: int) -> None:
    """The encoder `simclr pretrain` starts from: the same arch, width, stem, image size and initialisation
    as `like`, with its initial weights."""
    import torch

    from simclr_cli.export import save_encoder
    from simclr_cli.models import build_backbone

    torch.manual_seed(seed)
    backbone = build_backbone(like.arch, like.stem, width=like.width, zero_init_residual=zero_init(like))
    save_encoder(path, backbone, dataclasses.replace(like, config={"baseline": "random weights"}))


def train_supervised(path: Path, data: dict, like: EncoderInfo, batch_size: int, budget: float,
                     seed: int) -> dict[str, float]:
    """The same encoder with a linear classifier, trained with labels for `budget` seconds; save its backbone.

    Cross-entropy, random resized crops (scale 0.5-1, as finetune uses for small images) and flips,
    SGD with Nesterov momentum 0.9, lr 0.1 x batch/256 with a 2% warmup and a cosine decay that
    follows the elapsed fraction of the budget (as pretrain's --max-time does), weight decay 5e-4
    on weights only, at the precision `simclr pretrain` picks (bf16 autocast on a CPU with bf16
    instructions). Images come from memory, so no time goes to decoding: a generous ceiling.
    """
    import math

    import torch
    from torchvision.transforms import v2

    from simclr_cli.export import save_encoder
    from simclr_cli.models import build_backbone
    from simclr_cli.runtime import resolve_precision

    started = time.monotonic()
    precision = resolve_precision("auto", torch.device("cpu"))
    torch.manual_seed(seed)
    backbone = build_backbone(like.arch, like.stem, width=like.width, zero_init_residual=zero_init(like))
    classifier = torch.nn.Linear(backbone.feature_dim, len(CLASSES))
    model = torch.nn.Sequential(backbone, classifier).to(memory_format=torch.channels_last).train()
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    peak_lr = 0.1 * batch_size / 256
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0}],
                                lr=peak_lr, momentum=0.9, nesterov=True)
    crop = v2.Compose([v2.RandomResizedCrop(like.image_size, scale=(0.5, 1.0), antialias=True),
                       v2.RandomHorizontalFlip()])
    mean = torch.tensor(like.mean).view(1, 3, 1, 1)
    std = torch.tensor(like.std).view(1, 3, 1, 1)
    images = torch.from_numpy(data["train_x"].copy()).unsqueeze(1)  # (N, 1, 28, 28) uint8
    labels = torch.from_numpy(data["train_y"].astype(np.int64))
    if len(images) < batch_size:
        sys.exit(f"error: --batch-size {batch_size} is larger than the {len(images)} training images")
    generator = torch.Generator().manual_seed(seed)
    seen, steps, last_step, correct = 0, 0, 0.0, 0
    done = False
    while not done:
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            now = time.monotonic() - started
            if now + max(1.0, 2 * last_step) >= budget:
                done = True
                break
            index = order[start:start + batch_size]
            batch = torch.stack([crop(image) for image in images[index]]).float() / 255  # (B, 1, S, S)
            batch = ((batch.expand(-1, 3, -1, -1) - mean) / std).contiguous(memory_format=torch.channels_last)
            fraction = min(1.0, (now + max(1.0, 2 * last_step)) / budget)
            lr = peak_lr * (fraction / 0.02 if fraction < 0.02 else 0.5 * (1 + math.cos(math.pi * fraction)))
            for group in optimizer.param_groups:
                group["lr"] = lr
            with precision.autocast():
                logits = model(batch).float()  # (B, 10)
            loss = torch.nn.functional.cross_entropy(logits, labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            correct += (logits.argmax(1) == labels[index]).sum().item()
            seen, steps = seen + len(index), steps + 1
            last_step = time.monotonic() - started - now
    info = dataclasses.replace(like, config={"baseline": "supervised", "budget_s": budget, "steps": steps,
                                             "images_seen": seen})
    save_encoder(path, backbone.eval(), info)
    return {"images_seen": seen, "steps": steps, "train_top1": correct / max(seen, 1),
            "seconds": time.monotonic() - started}


# -- the report -----------------------------------------------------------------------------------

def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def markdown_table(rows: list[dict], budget_text: str) -> str:
    lines = ["| model | budget | images seen | linear top-1 | kNN top-1 (k = 20) |",
             "| --- | --- | ---: | ---: | ---: |"]
    for row in rows:
        seen = "-" if row.get("images_seen") is None else f"{row['images_seen']:,}"
        budget = budget_text if row.get("timed") else "-"
        lines.append(f"| {row['name']} | {budget} | {seen} | {percent(row['linear_top1'])} | "
                     f"{percent(row['knn_top1'])} |")
    return "\n".join(lines)


def joined_pretrain_args(argv: list[str]) -> list[str]:
    """argv with `--pretrain-args VALUE` as `--pretrain-args=VALUE`: argparse reads a lone flag such as
    "--blur" after it as an option of its own, not as the value."""
    joined, rest = [], iter(argv)
    for arg in rest:
        value = next(rest, None) if arg == "--pretrain-args" else None
        joined.append(arg if value is None else f"{arg}={value}")
    return joined


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="10m", help="CPU time for pretraining, and for the supervised "
                                                        "baseline: 30s, 10m, 1h (default 10m)")
    parser.add_argument("--subset", type=int, default=None,
                        help="use only the first N train images (and N/6 test images, at least 1,000): quick checks")
    parser.add_argument("--arch", default=None, help="encoder (default: simclr pretrain's, resnet50)")
    parser.add_argument("--stem", default="auto", help="auto (simclr's default), imagenet or cifar")
    parser.add_argument("--image-size", type=int, default=48,
                        help="training resolution (default 48: the 28 px images upsampled; see the README)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: simclr pretrain's (128 at <= 64 px on a CPU); the supervised baseline uses "
                             "the same")
    parser.add_argument("--monitor-size", type=int, default=1000,
                        help="labelled train images for pretrain's per-epoch kNN monitor (0: none)")
    parser.add_argument("--pretrain-args", default="",
                        help="more `simclr pretrain` flags, quoted, e.g. \"--temperature 0.2 --jitter 0.4\" or "
                             "\"--blur\"")
    parser.add_argument("--skip", default="", help="baselines to leave out, comma-separated: raw,random,supervised")
    parser.add_argument("--simclr-run", type=Path, default=None,
                        help="a finished `simclr pretrain` run on the same data with the same --budget (an earlier "
                             "run's OUT/simclr): measure it and the baselines without pretraining again")
    parser.add_argument("--workers", type=int, default=None, help="loader processes (default: simclr's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=Path("data/fashion-mnist"), help="where the PNG folders go")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default runs/quality-<budget>[-subset<N>]-<timestamp>); must be new")
    args = parser.parse_args(joined_pretrain_args(sys.argv[1:]))

    from simclr_cli.config import parse_duration
    from simclr_cli.errors import ConfigError

    try:
        budget = parse_duration(args.budget, "--budget")
    except ConfigError as error:
        sys.exit(f"error: {error}")
    if args.subset is not None and args.subset < 100:
        sys.exit(f"error: --subset {args.subset} is too small; use at least 100 images")
    skip = {name for name in args.skip.split(",") if name}
    if skip - {"raw", "random", "supervised"}:
        sys.exit(f"error: --skip {args.skip!r}: only raw, random and supervised can be left out")
    if args.simclr_run is not None:
        if args.pretrain_args or args.batch_size:
            sys.exit("error: --pretrain-args and --batch-size set the pretraining, which --simclr-run skips; leave "
                     "them out")
        if not (args.simclr_run / "checkpoint.safetensors").is_file():
            sys.exit(f"error: --simclr-run {args.simclr_run}: no checkpoint.safetensors; pass the simclr/ folder of "
                     f"an earlier run")
    label = args.budget.replace(" ", "") + (f"-subset{args.subset}" if args.subset else "")
    out = args.out or Path("runs") / f"quality-{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and any(out.iterdir()):
        sys.exit(f"error: --out {out} already holds files; pass a new folder")
    out.mkdir(parents=True, exist_ok=True)
    run_started = time.monotonic()
    command = "benchmarks/quality.py " + shlex.join(sys.argv[1:])

    data = prepare_data(args.data, args.subset, args.monitor_size)
    workers = ["--workers", str(args.workers)] if args.workers is not None else []
    monitor = ["--monitor", str(data["monitor"])] if data["monitor"] else []

    if args.simclr_run is None:
        simclr_dir = out / "simclr"
        # pretrain's own --epochs (100) stays: the budget ends the run first, and warmup stays 10% of it.
        simclr("pretrain", str(data["train"]), "--out", str(simclr_dir), "--max-time", args.budget,
               *(["--arch", args.arch] if args.arch else []), "--stem", args.stem, "--image-size",
               str(args.image_size), "--device", "cpu", "--seed", str(args.seed),
               *(["--batch-size", str(args.batch_size)] if args.batch_size else []), *monitor,
               *workers, *shlex.split(args.pretrain_args))
    else:
        simclr_dir = args.simclr_run
    from simclr_cli.errors import ModelFileError
    from simclr_cli.export import load_checkpoint, load_encoder
    from simclr_cli.files import read_json

    _, info = load_encoder(simclr_dir)
    if args.simclr_run is not None:  # an earlier run is comparable only with the same budget and data
        max_time = info.config.get("max_time") or 0
        if max_time != budget:
            sys.exit(f"error: --simclr-run {simclr_dir} was pretrained with --max-time {max_time:g} s, not the "
                     f"{budget:g} s of --budget {args.budget}; pass the same budget")
        # The run's config.json, not the model file: that names the data folder by its last name only ("train").
        try:
            data_dir = read_json(simclr_dir / "config.json", "run configuration").get("data_dir") or ""
        except ModelFileError as error:
            sys.exit(f"error: --simclr-run {simclr_dir}: {error}; pass the simclr/ folder of an earlier run")
        if Path(data_dir).resolve() != data["train"].resolve():
            sys.exit(f"error: --simclr-run {simclr_dir} was pretrained on {data_dir}, not {data['train']}; pass the "
                     f"same --subset and --data")
    batch_size = info.config["batch_size"]  # as pretrain resolved it: the supervised baseline uses the same
    state = load_checkpoint(simclr_dir / "checkpoint.safetensors").progress["state"]
    width = "" if info.width == 1 else f" {info.width:g}x"
    rows = [{"name": f"SimCLR ({info.arch}{width}, {info.stem} stem, {info.image_size} px)", "timed": True,
             "images_seen": state["images_seen"], "steps": state["step"], "epochs": state["epoch"],
             "seconds": state["elapsed"], **linear_eval(simclr_dir, data, out / "simclr-eval", args.workers)}]

    if "raw" not in skip:
        print("raw pixels: linear probe and kNN on the 784 grey levels", flush=True)
        rows.append({"name": "raw pixels (784 grey levels)", "images_seen": None, **raw_pixels(data)})
    if "random" not in skip:
        random_dir = out / "random"
        save_random_encoder(random_dir / "encoder.safetensors", info, args.seed)
        rows.append({"name": "same encoder, random weights", "images_seen": 0,
                     **linear_eval(random_dir, data, out / "random-eval", args.workers)})
    if "supervised" not in skip:
        print(f"supervised baseline: {info.arch} with labels for {args.budget}", flush=True)
        supervised_dir = out / "supervised"
        trained = train_supervised(supervised_dir / "encoder.safetensors", data, info, batch_size, budget, args.seed)
        rows.append({"name": "same encoder, supervised (labels, same time)", "timed": True, **trained,
                     **linear_eval(supervised_dir, data, out / "supervised-eval", args.workers)})

    table = markdown_table(rows, args.budget)
    simclr_row, raw_row = rows[0], next((row for row in rows if row["name"].startswith("raw")), None)
    verdicts = []
    if budget in TARGETS:
        verdicts.append(f"linear top-1 {percent(simclr_row['linear_top1'])} vs the target {percent(TARGETS[budget])}: "
                        + ("met" if simclr_row["linear_top1"] >= TARGETS[budget] else "NOT met"))
    if raw_row is not None:
        verdicts.append(f"kNN top-1 {percent(simclr_row['knn_top1'])} vs raw pixels {percent(raw_row['knn_top1'])}: "
                        + ("above" if simclr_row["knn_top1"] > raw_row["knn_top1"] else "NOT above"))
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}, "
               f"Python {platform.python_version()}")
    report = "\n".join([
        f"# Quality: SimCLR on Fashion-MNIST, {args.budget} budget",
        "",
        f"Command: `{command}`  ",
        f"Data: {len(data['train_x']):,} train images (pretraining without labels), {len(data['test_x']):,} "
        f"test images; linear probe and kNN train -> test.  ",
        f"Machine: {machine}; load average at the end {os.getloadavg()[0]:.1f}.  ",
        f"Wall time of the whole benchmark: {time.monotonic() - run_started:.0f} s.",
        "",
        table,
        "",
        *[f"- {verdict}" for verdict in verdicts],
        "",
    ])
    (out / "results.md").write_text(report)
    (out / "results.json").write_text(json.dumps({"command": command, "budget_s": budget, "subset": args.subset,
                                                  "rows": rows, "verdicts": verdicts}, indent=2) + "\n")
    print()
    print(report)
    print(f"written to {out / 'results.md'} and {out / 'results.json'}; curves in {simclr_dir / 'curves.png'}")


if __name__ == "__main__":
    main()

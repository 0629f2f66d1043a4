"""Compare `simclr pretrain` settings on Fashion-MNIST in minutes each: the table behind the defaults.

    python benchmarks/sweep.py --budget 5m "--lr-scaling linear --crop-min-scale 0.08" "--lr 1.2" ...

Each SETTING is a string of `simclr pretrain` flags added to the defaults ("" for the defaults alone).
Put the settings after `--` when one is a single flag, which sweep.py would otherwise read as its own:
`sweep.py --budget 5m -- "--blur" "--lr 0.5"`.
For each, in turn: `simclr pretrain` on the 60,000 train images without labels under --max-time BUDGET
(at --image-size, 48 px by default, and simclr's default batch: 128 on a CPU at <= 64 px; no monitor), then a quick
evaluation of its encoder on the 10,000 test images: kNN top-1 (k = 20, the kNN of `simclr linear-eval`) over all
train images, and a linear probe at a fixed L2 strength (1e-4 on standardised features, float32
L-BFGS, 200 iterations) instead of linear-eval's search over seven strengths. At 32 px that took
about 45 s where `benchmarks/quality.py`'s evaluation takes 3.5 minutes, and gave the same kNN and a
linear top-1 within a few tenths of a point (84.9% against 84.7% for the same encoder). The data
come from benchmarks/quality.py's export.

Prints a markdown table; each row also goes to OUT/sweep.jsonl as it finishes.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (benchmarks/ is not a package)

L2 = 1e-4


def quick_eval(run_dir: Path, data: dict) -> dict[str, float]:
    """kNN top-1 and the fixed-L2 linear probe's top-1 on the test images."""
    import torch

    from simclr_cli.evaluate import fit_logistic, knn_scores
    from simclr_cli.export import load_encoder
    from simclr_cli.features import compute_features
    from simclr_cli.labels import read_class_folders
    from simclr_cli.runtime import resolve_precision

    device = torch.device("cpu")
    backbone, info = load_encoder(run_dir, device)
    precision = resolve_precision("auto", device)
    classes, train_set, _, _ = read_class_folders(data["train"])
    _, test_set, _, _ = read_class_folders(data["test"], classes)
    train_y, test_y = torch.tensor(train_set.labels), torch.tensor(test_set.labels)
    train, _, _ = compute_features(backbone, info, train_set.paths, device, precision, workers=1)  # (N, D)
    test, _, _ = compute_features(backbone, info, test_set.paths, device, precision, workers=1)  # (M, D)
    classes = len(classes)
    knn = (knn_scores(train, train_y, test, classes).argmax(1) == test_y).double().mean().item()
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    weight, bias = fit_logistic((train - mean) / std, train_y, classes, L2, max_iter=200)
    linear = ((((test - mean) / std) @ weight.T + bias).argmax(1) == test_y).double().mean().item()
    return {"linear_top1": linear, "knn_top1": knn}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="+", help='`simclr pretrain` flags per setting, e.g. "--lr 1.2"')
    parser.add_argument("--budget", default="5m", help="pretraining time per setting (default 5m)")
    parser.add_argument("--image-size", type=int, default=48, help="training resolution (default 48, as quality.py)")
    parser.add_argument("--data", type=Path, default=Path("data/fashion-mnist"), help="where the PNG folders go")
    parser.add_argument("--out", type=Path, default=None, help="default runs/sweep-<timestamp>; must be new")
    args = parser.parse_args()
    out = args.out or Path("runs") / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and any(out.iterdir()):
        sys.exit(f"error: --out {out} already holds files; pass a new folder")
    out.mkdir(parents=True, exist_ok=True)
    data = quality.prepare_data(args.data, None, 0)

    rows = []
    for number, setting in enumerate(args.settings):
        run_dir = out / f"setting-{number}"
        quality.simclr("pretrain", str(data["train"]), "--out", str(run_dir), "--max-time", args.budget,
                       "--image-size", str(args.image_size), "--device", "cpu", "--quiet", *shlex.split(setting))
        from simclr_cli.export import load_checkpoint

        state = load_checkpoint(run_dir / "checkpoint.safetensors").progress["state"]
        row = {"setting": setting, "budget": args.budget, "images_seen": state["images_seen"],
               **quick_eval(run_dir, data)}
        rows.append(row)
        with open(out / "sweep.jsonl", "a") as log:
            log.write(json.dumps(row) + "\n")
        print(f"{setting or '(defaults)'}: linear {row['linear_top1']:.1%}, kNN {row['knn_top1']:.1%}", flush=True)

    print(f"\n| setting (`simclr pretrain` flags) | images seen | linear top-1 (L2 {L2:g}) | kNN top-1 (k = 20) |")
    print("| --- | ---: | ---: | ---: |")
    for row in rows:
        setting = f"`{row['setting']}`" if row["setting"] else "(defaults)"
        print(f"| {setting} | {row['images_seen']:,} | {row['linear_top1']:.1%} | {row['knn_top1']:.1%} |")


if __name__ == "__main__":
    main()

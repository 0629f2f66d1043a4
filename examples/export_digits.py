"""Write scikit-learn's bundled handwritten digits (1,797 images, 10 classes) as PNG files.

    python examples/export_digits.py data/digits [--size 32]

The layout is one subfolder per class (data/digits/0/0000.png, ...): `simclr pretrain` ignores the
subfolders; `simclr linear-eval` reads them as labels. Needs scikit-learn (pip install -e '.[examples]').
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def export_digits(out: Path, size: int = 32, limit: int | None = None) -> int:
    """Write the digits as `size` px greyscale PNGs under out/<label>/; return how many."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    count = 0
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        if limit is not None and count >= limit:
            break
        folder = out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        grey = Image.fromarray(np.uint8(np.clip(pixels / 16.0 * 255.0, 0, 255)), mode="L")
        grey.resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{index:04d}.png")
        count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write (created)")
    parser.add_argument("--size", type=int, default=32, help="side of the written images in pixels")
    args = parser.parse_args()
    count = export_digits(args.out, args.size)
    print(f"wrote {count:,} digit images to {args.out}")


if __name__ == "__main__":
    main()

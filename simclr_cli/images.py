"""Image files, without PyTorch: finding them under a folder, and decoding any Pillow image to RGB."""

from __future__ import annotations

import json
import os
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import EpsImagePlugin, Image, ImageFile, ImageOps

from simclr_cli.errors import DataError



def _decodes(name: str) -> bool:
    """Whether Pillow decodes the format, not only identifies it: its stub formats (WMF off Windows, HDF5, GRIB,
    BUFR) and MPEG never give pixels, and EPS only with Ghostscript."""
    factory = Image.OPEN[name][0]
    if name == "MPEG" or (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)):
        return False
    return name != "EPS" or bool(EpsImagePlugin.has_ghostscript())


# Every extension of a format Pillow can decode (its JPEG opener reads .mpo), in lower case; matching ignores the
# file's case. PDF and Palm files, which Pillow writes but cannot read, and videos (.mpg) are other files, not
# unreadable images.
IMAGE_EXTENSIONS = frozenset(ext.lower() for ext, name in Image.registered_extensions().items()
                             if name == "MPO" or (name in Image.OPEN and _decodes(name)))
# Pillow's own default limit (about 89 megapixels): anything larger is refused, not decoded.
MAX_PIXELS = 89_478_485
# Transparent pixels are composited on the ImageNet mean colour, which normalises to zero.
NEUTRAL_BACKGROUND = (124, 116, 104)

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey half-image
# Pillow warns of what the callers here report themselves in one line (a decompression bomb, refused by its size) or
# get past (a corrupt EXIF block in an image that decodes): its two-line Python warnings would only add noise, once
# per loader worker. (Set here, not per call: warning filters are global, and images are decoded in threads.)
warnings.filterwarnings("ignore", module=r"PIL(\.|$)")


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
    runs: list[Path] = field(default_factory=list)  # folders of simclr runs passed over
    label: str = ""  # the argument that named root, e.g. "IMAGES", for errors

    def runs_note(self) -> str | None:
        """A line naming the run folders passed over, if any."""
        if not self.runs:
            return None
        more = f" and {len(self.runs) - 1} more" if len(self.runs) > 1 else ""
        return (f"passed over {len(self.runs)} folder(s) of simclr runs in {self.root}: {self.runs[0]}{more} (their "
                f"plots are no photos)")


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_run_folder(directory: str | Path, files: Iterable[str]) -> bool:
    """Whether a folder holding `files` is a simclr run's, whose curves.png and confusion_matrix.png are no
    images to train on: linear-eval's report beside its probe, or a pretrain or finetune config.json (written
    at the start) beside its metrics.jsonl."""
    names = set(files)
    if {"linear_eval.json", "linear.safetensors"} <= names:
        return True
    if not {"config.json", "metrics.jsonl"} <= names:
        return False
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"out_dir", "runtime"} <= config.keys()


def holds_run(folder: str | Path) -> bool:
    """Whether `folder` itself is a simclr run's (is_run_folder); False for one that cannot be listed, which its
    scan reports."""
    try:
        return is_run_folder(folder, os.listdir(folder))
    except OSError:
        return False


def _walk(root: Path, exclude: Path | None = None, runs: list[Path] | None = None,
          unreadable: list[Skipped] | None = None) -> Iterable[tuple[Path, str]]:
    """Yield (directory, file name) under root, following links, skipping loops, hidden entries, the
    folder `exclude` (however it is reached) and the folders of other simclr runs below root (added to
    `runs`); folders that cannot be listed are added to `unreadable`."""
    seen: set[tuple[int, int]] = set()
    if exclude is not None and exclude.is_dir():
        info = os.stat(exclude)
        seen.add((info.st_dev, info.st_ino))

    def note(error: OSError) -> None:
        if unreadable is not None:
            unreadable.append(Skipped(str(error.filename), f"unreadable folder: {error.strerror}; its images are left "
                                                           f"out"))

    for depth, (directory, subdirs, files) in enumerate(os.walk(root, onerror=note, followlinks=True)):
        info = os.stat(directory)
        key = (info.st_dev, info.st_ino)
        if key in seen:  # a symbolic link back up the tree
            subdirs[:] = []
            continue
        if depth > 0 and is_run_folder(directory, files):
            subdirs[:] = []
            if runs is not None:
                runs.append(Path(directory))
            continue
        seen.add(key)
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in files:
            yield Path(directory), name


def _described(error: Exception, path: str | Path) -> str:
    """The error's type and first line (200 characters at most), less the file name that the system's errors and
    some of Pillow's (cannot identify image file '...') hold: whoever reports it names the file already."""
    if isinstance(error, OSError) and error.strerror:  # "[Errno 13] Permission denied: '...'": the reason alone
        text = error.strerror
    else:
        text = str(error).replace(f" {os.fspath(path)!r}", "")
    return f"{type(error).__name__}: {text}".splitlines()[0][:200]


def probe(path: Path) -> str | None:
    """Return why a file cannot be an image (reading its header only), or None if it looks fine."""
    try:
        info = os.stat(path)  # one look for both checks: a scan makes it for every file
        if not stat.S_ISREG(info.st_mode):  # a pipe named *.png: opened, it would wait for a writer
            return "not a regular file (a pipe, a socket or a device)"
        if info.st_size == 0:
            return "empty file"
        with Image.open(path) as img:
            width, height = img.size
    except FileNotFoundError:
        return "dangling link or missing file"
    except Image.DecompressionBombError:
        return "decompression bomb: refused"
    except Exception as error:  # Pillow raises many types for bad headers
        return f"unreadable: {_described(error, path)}"
    if width * height > MAX_PIXELS:
        return f"decompression bomb: {width}x{height} pixels is over the {MAX_PIXELS:,} limit: refused"
    return None


def scan_images(root: str | Path, check: bool = True, threads: int = 8, exclude: str | Path | None = None,
                label: str = "", instead: str = "pass the folder of images") -> Scan:
    """Return every image under root at any depth, sorted by relative path, and the files skipped.

    Subfolders are not classes here. Hidden files, non-image extensions, the folder `exclude` (a run's
    own, inside its data) and the folders of other simclr runs (is_run_folder; listed in `runs`) are
    ignored; with `check`, each file's header is read so that empty or foreign files are skipped up front.
    A root that is itself a run's folder is refused, naming it as `label` (the argument, e.g. "IMAGES") and
    saying `instead`, what to pass.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such folder; pass a folder of images")
    if not root.is_dir():
        raise DataError(f"{root}: is a file, not a folder; pass the folder that holds the images")
    # Mostly MODEL's run folder given again in the place of the images: read as data, its curves.png alone would
    # be embedded, searched with or trained on, with no word of what went wrong.
    if holds_run(root):
        raise DataError(f"{_named(label, root)}: a simclr run folder, not a folder of images; {instead}")
    runs: list[Path] = []
    unreadable: list[Skipped] = []
    candidates = sorted(
        (directory / name for directory, name in _walk(root, exclude and Path(exclude), runs, unreadable)
         if is_image_name(name)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    scan = Scan(root=root, runs=runs, skipped=unreadable, label=label)
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


def _named(label: str, path: str | Path) -> str:
    return f"{label} {path}" if label else str(path)


def first_skipped(skipped: list[Skipped]) -> tuple[str, str]:
    """(the first skipped file and why, what to do about it), for an error saying nothing was readable: the count
    alone named no file to look at."""
    first = skipped[0]
    why = first.reason.split(";")[0]  # an unreadable folder's reason goes on to say its images are left out
    if why.startswith("unreadable folder") or "PermissionError" in why:
        fix = "let this user read it"
    elif "FileNotFoundError" in why:  # gone between the listing and the read
        fix = "keep the files in place while the command runs"
    elif "not a regular file" in why:  # a pipe or a device: nothing to replace
        fix = "move it out of the folder"
    else:
        fix = "replace or remove the damaged files"
    return f"{first.path}: {why}", fix


def require_images(scan: Scan) -> Scan:
    """Raise a one-line DataError when a scan found nothing usable."""
    if scan.paths:
        return scan
    runs = f"; {scan.runs_note()}" if scan.runs else ""  # a folder of runs alone: why their plots do not count
    where, kinds = _named(scan.label, scan.root), "JPEG, PNG, WebP, BMP, GIF or TIFF images"
    if not scan.skipped:
        raise DataError(f"{where}: no image files{runs}; put {kinds} in it (any depth)")
    file, fix = first_skipped(scan.skipped)
    raise DataError(f"{where}: {len(scan.skipped):,} unreadable file(s), no readable image, the first {file}{runs}; "
                    f"{fix}, or add readable {kinds}")


def to_rgb(img: Image.Image) -> Image.Image:
    """Return an 8-bit RGB image for any Pillow mode, compositing transparency on a neutral colour."""
    mode, key = img.mode, img.info.get("transparency")
    if mode in ("RGB", "L") and key is not None:  # a colour key (PNG tRNS): that colour is transparent
        img, mode = img.convert("RGBA"), "RGBA"
    if (mode == "1" or mode.startswith("I")) and isinstance(key, int):  # a colour key on bilevel or 16-bit grey
        opaque = np.asarray(img) != (bool(key) if mode == "1" else key)  # (H, W)
        img = img.copy()
        del img.info["transparency"]
        background = Image.new("RGB", img.size, NEUTRAL_BACKGROUND)
        background.paste(to_rgb(img), mask=Image.fromarray(opaque))
        return background
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":  # 16/32-bit integer or float grey
        values = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=np.inf, neginf=-np.inf)  # NaN: 0
        finite = values[np.isfinite(values)]  # the range by the finite values; +-inf end up white or black
        top = finite.max() if finite.size else 0.0
        if mode.startswith("I;16") or top > 255:
            values = values / 257.0
        elif mode == "F" and top <= 1.0:
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


def _scale_grey_key(img: Image.Image) -> None:
    """A 2- or 4-bit grey PNG's colour key is a value of that depth, but Pillow decodes its pixels to 8 bits: the
    key is brought to 8 bits too, or no pixel would match it. Call before the image is loaded."""
    key = img.info.get("transparency")
    args = img.tile[0][3] if img.format == "PNG" and img.mode == "L" and img.tile else None  # a tuple before Pillow 11
    rawmode = args if isinstance(args, str) else args[0] if isinstance(args, tuple) and args else None
    bits = {"L;2": 2, "L;4": 4}.get(rawmode)
    if bits and isinstance(key, int):
        img.info["transparency"] = key * (255 // (2**bits - 1))


def load_rgb(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Decode one file to RGB with EXIF orientation applied; raises UnreadableImage.

    A JPEG much larger than `min_side` is decoded in draft mode, at the smallest power-of-two
    reduction whose both sides are still at least `min_side` pixels.
    """
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise UnreadableImage(f"decompression bomb: {img.width}x{img.height} pixels: refused")
            img.seek(0)  # first frame of animations (before draft: seeking a multi-picture JPEG undoes it)
            _scale_grey_key(img)
            if min_side and img.format in ("JPEG", "MPO") and min(img.size) >= 2 * min_side:
                img.draft("RGB", (min_side, min_side))
            img = ImageOps.exif_transpose(img)
            img.load()
            return to_rgb(img)
    except UnreadableImage:
        raise
    except Image.DecompressionBombError as error:
        raise UnreadableImage(f"decompression bomb: refused ({error})") from None
    except Exception as error:  # truncated data, bad headers, I/O errors
        raise UnreadableImage(f"unreadable: {_described(error, path)}") from None


def note_skipped(known: dict[str, Skipped], skipped: list[Skipped], report: Callable[..., None]) -> None:
    """Add newly skipped files to `known` (path -> Skipped) and warn once about each."""
    for item in skipped:
        if item.path not in known:
            known[item.path] = item
            report("warning", text=f"skipped {item.path}: {item.reason}")

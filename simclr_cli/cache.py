"""The decoded cache (`--cache`): every image once as uint8 at a working resolution, memory-mapped.

Decoding a photo of a few megapixels costs far more than everything SimCLR does to it afterwards.
The first epoch decodes each image (Pillow draft mode where it can), brings it to the working
resolution (shorter side 1.15x the training size, longer side at most 4/3 of that: images more
elongated than 4:3 are brought down further, whole, since a random resized crop may sit anywhere on
them) and stores it in a fixed-size slot of one memory-mapped file; later epochs read the slot
instead of the file. Loader workers write their own slots, so filling the cache costs no extra pass.
They write with pwrite, not through the map: a disk that fills up then fails a write (the images
left are decoded every epoch, with a warning) instead of killing the worker with SIGBUS.

Files, beside each other in the run folder or in --cache-dir (`decoded-<side>px-<folder hash>`):
  .u8     the pixels: one slot of side x ceil(4/3 side) x 3 bytes per image, in scan order
  .slots  (images, 4) uint32: state (0 empty, 1 stored, 2 unreadable), height, width, CRC-32 of the
          three before it and the pixels
  .json   the manifest: side, and every image's path, size and mtime
  .lock   in a --cache-dir, held while a run checks or creates the cache: runs sharing it take turns
A slot is used only while its file's size and mtime match the manifest and its row and pixels their
CRC-32 (a damaged file, or pixels a crash kept from the disk, are decoded again); changed files are
decoded again, and a different list of files starts a new cache (a run still reading the one it
replaced, from a shared --cache-dir, notices and decodes its files itself: `DecodedCache.mapped`).

Every image takes the same route (decode, working resolution, crop) whether or not its slot is
filled yet, so a run with --cache sees the same views as without, and resumes bit for bit. (That holds
for the batched views, `--augment-on cpu` and `device`; `per-image` without the cache decodes straight
to the training size, so its views differ slightly from those with the cache.)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import weakref
import zlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from simclr_cli.errors import DataError
from simclr_cli.files import atomic_path, format_bytes, write_json
from simclr_cli.images import UnreadableImage, load_rgb

WORKING_SCALE = 1.15
MAX_ASPECT = 4 / 3
EMPTY, STORED, UNREADABLE = 0, 1, 2
SLOT_FIELDS = 4  # a .slots row: state, height, width, CRC-32
FORMAT = "simclr-decoded-cache"
VERSION = 6  # 1 kept only the central 4:3 of wider images; 2 kept PNG colour keys as colours; 3 those of
# bilevel, 2-, 4- and 16-bit grey images; 4 had no checksums; 5 summed the pixels alone


def working_side(image_size: int) -> int:
    """The shorter side images are kept at: 1.15x the training size, rounded up."""
    return math.ceil(WORKING_SCALE * image_size)


def slot_shape(side: int) -> tuple[int, int]:
    """(short, long) sides of one slot: the largest working image, in either orientation."""
    return side, math.ceil(side * MAX_ASPECT)


def to_working_resolution(image: Image.Image, side: int) -> np.ndarray:
    """The whole image brought down to fit a slot, shorter side at most `side`: (H, W, 3) uint8.

    Images more elongated than 4:3 come down further, to the slot's longer side: random resized crops
    are at most 4:3 but may lie anywhere on the image (on a 16:9 photo, about half of them reach
    outside its central 4:3), so the views keep the paper's distribution at a slightly lower
    resolution (a 3:2 photo's shorter side is 0.89 `side`, still above the training size).
    Smaller images are not enlarged (the crop's resize does that once, later).
    """
    width, height = image.size
    short, long = slot_shape(side)
    scale = min(1.0, short / min(width, height), long / max(width, height))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size == (width, height):
        return np.asarray(image)
    return np.asarray(image.resize(size, Image.Resampling.BICUBIC))


def load_working(path: str | Path, side: int) -> np.ndarray:
    """Decode one file straight to the working resolution; raises UnreadableImage."""
    return to_working_resolution(load_rgb(path, min_side=side), side)


def _stats(path: str) -> list[int] | None:
    """Size, modification and change times: a file replaced by one of the same size and mtime (`cp -p`) has a new
    ctime. None for a file gone since the scan: its slot stays empty, and decoding it skips it as unreadable."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns, info.st_ctime_ns]


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """An exclusive lock on `path` (made if missing) while the block runs, waiting for it: two runs that
    start at once on a shared --cache-dir would otherwise both create the cache, each recording the
    other's files as its own. A file system that locks nothing, or a lock file that cannot be opened,
    is done without."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # the lock goes with it


def _write_at(fd: int, data: np.ndarray, offset: int) -> None:
    """All of `data`'s bytes at `offset`; OSError (ENOSPC: the disk is full) if they cannot be."""
    view = memoryview(np.ascontiguousarray(data)).cast("B")
    while len(view):
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _checksum(state: int, height: int, width: int, pixels: np.ndarray | bytes = b"") -> int:
    """The CRC-32 a slot's row ends with: of its state and sides, and its pixels."""
    return zlib.crc32(pixels, zlib.crc32(np.array([state, height, width], dtype=np.uint32).tobytes()))


def _close(files: tuple[int, ...]) -> None:
    for fd in files:
        with contextlib.suppress(OSError):
            os.close(fd)


def _identity(base: Path) -> tuple[int, ...] | None:
    """Which files the cache's names point to now (None: not there): a run that starts the cache over, for
    another list of files, replaces them."""
    ids: list[int] = []
    for suffix in (".u8", ".slots"):
        try:
            info = os.stat(f"{base}{suffix}")
        except OSError:
            return None
        ids += [info.st_dev, info.st_ino]
    return tuple(ids)


class DecodedCache:
    """The memory-mapped slots of one folder's images at one working side.

    Build or check it once, in one process, with `prepare`; loader workers then open it lazily
    (the memory maps are not pickled with the object).
    """

    def __init__(self, base: Path, count: int, side: int):
        self.base, self.count, self.side = base, count, side
        self.slot = slot_shape(side)
        self._pixels: np.memmap | None = None  # read-only maps; writes go through the descriptors below
        self._slots: np.memmap | None = None
        self._files: tuple[int, int] | None = None  # (.u8, .slots) opened for writing
        self._identity = _identity(base)  # the files the slots below belong to
        self._store = True  # False once a write failed (a full disk): images are decoded, not stored

    @property
    def slot_bytes(self) -> int:
        return self.slot[0] * self.slot[1] * 3

    @property
    def nbytes(self) -> int:
        return self.count * self.slot_bytes

    @classmethod
    def locate(cls, directory: str | Path, root: str | Path, count: int, side: int) -> "DecodedCache":
        """The cache of `count` images under folder `root` in `directory`, as `prepare` left it."""
        digest = hashlib.blake2b(str(Path(root).resolve()).encode(), digest_size=4).hexdigest()
        return cls(Path(directory) / f"decoded-{side}px-{digest}", count, side)

    @classmethod
    def prepare(cls, directory: str | Path, root: str | Path, paths: Sequence[str | Path],
                side: int, shared: bool = True) -> tuple["DecodedCache", str]:
        """Open the cache for these files, creating or refreshing it; return it and a one-line summary. `shared`:
        other runs may use `directory` at the same time (a --cache-dir, not the run's own folder, which the run
        holds: there a lock file would be one more file a failed run leaves in it)."""
        directory = Path(directory)
        cache = cls.locate(directory, root, len(paths), side)
        paths = [str(p) for p in paths]
        stats = [_stats(p) for p in paths]
        directory.mkdir(parents=True, exist_ok=True)
        with _locked(f"{cache.base}.lock") if shared else contextlib.nullcontext():
            manifest = cache._read_manifest()
            if manifest is None or manifest["paths"] != paths or not cache._files_exist():
                cache._create(directory)
                summary = (f"decoded cache {cache.base}.u8 created ({format_bytes(cache.nbytes)} for {len(paths):,} "
                           f"images)")
            else:
                changed = [i for i, (old, new) in enumerate(zip(manifest["stats"], stats)) if old != new]
                slots = np.fromfile(f"{cache.base}.slots", dtype=np.uint32).reshape(cache.count, SLOT_FIELDS)
                if changed:  # written whole (16 bytes an image), not through a map: a SIGBUS on a full disk
                    slots[changed] = EMPTY
                    fd = os.open(f"{cache.base}.slots", os.O_WRONLY)
                    try:
                        _write_at(fd, slots, 0)
                    finally:
                        os.close(fd)
                stored = int((slots[:, 0] == STORED).sum())
                summary = (f"decoded cache {cache.base}.u8: {stored:,} of {len(paths):,} images stored"
                           + (f", {len(changed):,} changed since and decoded again" if changed else ""))
            write_json(f"{cache.base}.json", {"format": FORMAT, "version": VERSION, "side": side,
                                              "slot": list(cache.slot), "paths": paths, "stats": stats})
            cache._identity = _identity(cache.base)
        return cache, summary

    def _read_manifest(self) -> dict | None:
        """The manifest, if it is one of this version and side (a damaged one is None: the cache starts over)."""
        try:
            manifest = json.loads(Path(f"{self.base}.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(manifest, dict):
            return None
        if (manifest.get("format"), manifest.get("version"), manifest.get("side")) != (FORMAT, VERSION, self.side):
            return None
        paths, stats = manifest.get("paths"), manifest.get("stats")
        if not (isinstance(paths, list) and isinstance(stats, list) and len(paths) == len(stats) == self.count):
            return None
        return manifest

    def _files_exist(self) -> bool:
        sizes = {".u8": self.nbytes, ".slots": self.count * SLOT_FIELDS * 4}
        return all(Path(f"{self.base}{suffix}").is_file() and Path(f"{self.base}{suffix}").stat().st_size == size
                   for suffix, size in sizes.items())

    def _create(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        old = Path(f"{self.base}.u8")
        reusable = old.stat().st_size if old.is_file() else 0
        free = shutil.disk_usage(directory).free + reusable
        if self.nbytes > free:
            raise DataError(f"--cache needs {format_bytes(self.nbytes)} in {directory} but only {format_bytes(free)} "
                            f"is free; pass --cache-dir on a larger disk, or --no-cache")
        Path(f"{self.base}.json").unlink(missing_ok=True)  # no manifest: half-made files are never trusted
        for suffix, size in ((".slots", self.count * SLOT_FIELDS * 4), (".u8", self.nbytes)):
            with atomic_path(f"{self.base}{suffix}") as tmp:
                with open(tmp, "wb") as handle:
                    handle.truncate(size)  # sparse: zero slots, all EMPTY

    def mapped(self) -> bool:
        """Map the files, unless another run on the same folder has started them over since (loader workers map
        them anew every epoch): False then, as their slots hold another list's images."""
        if self._pixels is None:
            if self._identity is None or _identity(self.base) != self._identity:
                return False
            self._pixels = np.memmap(f"{self.base}.u8", dtype=np.uint8, mode="r", shape=(self.count, self.slot_bytes))
            self._slots = np.memmap(f"{self.base}.slots", dtype=np.uint32, mode="r", shape=(self.count, SLOT_FIELDS))
            self._files = (os.open(f"{self.base}.u8", os.O_WRONLY), os.open(f"{self.base}.slots", os.O_WRONLY))
            weakref.finalize(self, _close, self._files)  # a run in a process that lives on (the API, tests)
        return True

    def _map(self) -> None:
        if not self.mapped():
            raise DataError(f"{self.base}.u8: the decoded cache was started over by another run on the same folder")

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None, "_slots": None, "_files": None}

    def get(self, index: int) -> np.ndarray | None:
        """The stored image (H, W, 3) uint8 (a copy), None when not stored or damaged; raises UnreadableImage."""
        self._map()
        state, height, width, checksum = (int(v) for v in self._slots[index])
        if state == UNREADABLE and _checksum(state, 0, 0) == checksum:
            raise UnreadableImage("unreadable (recorded in the decoded cache when it was first read)")
        if state != STORED or not (height > 0 and width > 0 and height * width * 3 <= self.slot_bytes):
            return None  # empty, or a damaged row: decoded again
        pixels = np.array(self._pixels[index, :height * width * 3])
        if _checksum(state, height, width, pixels) != checksum:  # damaged, or lost to a crash: decoded again
            return None
        return pixels.reshape(height, width, 3)

    def put(self, index: int, image: np.ndarray | None) -> None:
        """Store an image (H, W, 3) uint8, or None to record the file as unreadable."""
        self._map()
        if not self._store:
            return
        pixels_fd, slots_fd = self._files
        try:
            if image is None:
                row = (UNREADABLE, 0, 0, _checksum(UNREADABLE, 0, 0))
            else:
                pixels = np.ascontiguousarray(image).reshape(-1)
                _write_at(pixels_fd, pixels, index * self.slot_bytes)
                row = (STORED, image.shape[0], image.shape[1], _checksum(STORED, *image.shape[:2], pixels))
            _write_at(slots_fd, np.array(row, dtype=np.uint32), index * SLOT_FIELDS * 4)  # after the pixels
        except OSError as error:  # a full disk or quota: this process stops storing, and says so once
            self._store = False
            print(f"warning: the decoded cache {self.base}.u8 cannot grow ({error.strerror or error}): images "
                  f"not stored yet are decoded every epoch; free some space, or pass --cache-dir on a larger disk",
                  file=sys.stderr)


class WorkingImages:
    """ImageDataset's decoder for the fast pipelines: (index, path) -> the working-resolution image.

    Reads the decoded cache when it holds the image, else decodes the file and stores it there.
    """

    def __init__(self, side: int, cache: DecodedCache | None = None):
        self.side, self.cache = side, cache

    def __call__(self, index: int, path: str) -> Image.Image:
        if self.cache is not None and not self.cache.mapped():
            self.cache = None  # started over by another run: this worker decodes every file, slower but right
        if self.cache is None:
            return Image.fromarray(load_working(path, self.side))
        array = self.cache.get(index)
        if array is None:
            try:
                array = load_working(path, self.side)
            except UnreadableImage:
                self.cache.put(index, None)
                raise
            self.cache.put(index, array)
        return Image.fromarray(array)

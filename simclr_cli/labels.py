"""Labelled images: class subfolders or a (path,label) CSV, a validation set, label-fraction subsets."""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Sequence

import numpy as np

from simclr_cli.errors import ConfigError, DataError
from simclr_cli.files import file_id
from simclr_cli.images import Scan, Skipped, first_skipped, holds_run, is_image_name, probe, scan_images

DEFAULT_VAL_SPLIT = 0.2


@dataclass
class LabelledSet:
    """Images and their class indices (into the classes of the LabelledData that holds them)."""

    paths: list[Path]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices) -> "LabelledSet":
        return LabelledSet([self.paths[i] for i in indices], [self.labels[i] for i in indices])

    def counts(self, num_classes: int) -> list[int]:
        return np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=num_classes).tolist()

    def to_json(self) -> list[list]:
        return [[str(path), label] for path, label in zip(self.paths, self.labels)]

    @classmethod
    def from_json(cls, rows: list[list]) -> "LabelledSet":
        return cls([Path(path) for path, _ in rows], [int(label) for _, label in rows])


@dataclass
class LabelledData:
    """A training and a validation set over the same sorted class names, and the files skipped."""

    classes: list[str]
    train: LabelledSet
    val: LabelledSet
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # things the user should hear about


def _check_classes(source: str, classes: list[str], counts: list[int]) -> None:
    empty = [name for name, count in zip(classes, counts) if count == 0]
    if empty:
        raise DataError(f"{source}: class {empty[0]!r} has no readable images"
                        + (f" (nor do {len(empty) - 1} other classes)" if len(empty) > 1 else "")
                        + "; add images to it or remove it")
    if len(classes) < 2:
        raise DataError(f"{source}: only one class ({classes[0]!r}); a classifier needs at least two, "
                        f"one subfolder (or CSV label) per class")


def check_decoded(classes: list[str], decoded: Iterable[int], fix: str = "") -> None:
    """Refuse a class none of whose training images decoded (`decoded`: the label of each that did). Scans read
    headers only, and a model never shown the class would be reported as if it had learnt it; `fix` is added
    to the message."""
    counts = Counter(decoded)
    for label, name in enumerate(classes):
        if counts[label] == 0:
            raise DataError(f"class {name!r} has no training image that could be decoded (see the warnings above); "
                            f"add images to it or remove it{fix}")


def read_class_folders(root: str | Path, classes: list[str] | None = None, flag: str = "TRAIN",
                       exclude: Path | None = None) -> tuple[list[str], LabelledSet, list[Skipped], list[str]]:
    """Read the ImageFolder layout root/<class>/**/<image>; return (classes, set, skipped, notes).

    With `classes` given (the training classes), every subfolder must be one of them. `exclude` is the folder of
    the run reading them (a pretrain's, for --monitor): new, it does not look like a run's yet.
    """
    root = Path(root)
    instead = "pass a folder of labelled images, one subfolder per class"
    scan = scan_images(root, check=False, label=flag,  # existence errors, as for pretrain
                       instead=f"{instead} (MODEL is the first argument)" if flag == "TRAIN" else instead)
    subfolders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    ours = exclude.resolve() if exclude is not None else None

    def holds_ours(folder: Path) -> bool:
        return ours is not None and ours.is_relative_to(folder.resolve())

    # The folders of simclr runs are no classes: a run's own (`simclr pretrain .`), or one that holds only runs
    # (its runs/). Their plots would be a class's images.
    found = {name: scan_images(root / name, exclude=exclude) for name in subfolders
             if not holds_run(root / name) and (root / name).resolve() != ours}
    runs = [root / name for name in subfolders if name not in found]
    runs += [root / name for name, scan_of in found.items() if (scan_of.runs or holds_ours(root / name))
             and not scan_of.paths and not scan_of.skipped]
    subfolders = [name for name in subfolders if root / name not in runs]
    runs = [run for run in runs if not holds_ours(run)]  # the note names other runs' folders
    for name in subfolders:  # "no readable images" would hide why
        unlisted = [s for s in found[name].skipped if s.path == str(root / name)]
        if unlisted:
            why = unlisted[0].reason.split(";")[0]
            raise DataError(f"{flag} {root}: class folder {name!r} cannot be listed ({why}); let this user read it, "
                            f"or remove it")
    notes = [note] if (note := Scan(root, runs=runs).runs_note()) else []
    if not subfolders:
        csv_hint = ", or pass --labels labels.csv" if flag == "TRAIN" else ""
        raise DataError(f"{flag} {root}: no class subfolders{''.join(f'; {n}' for n in notes)}; put each class's "
                        f"images in its own subfolder (e.g. {root}/cat, {root}/dog){csv_hint}")
    loose = [p for p in scan.paths if p.parent == root]
    if loose:
        notes.append(f"{len(loose):,} image(s) directly in {root} belong to no class subfolder: ignored")
    if classes is not None:
        unknown = [name for name in subfolders if name not in classes]
        if unknown:
            raise DataError(f"{flag} {root}: class {unknown[0]!r} is not among the training classes "
                            f"({', '.join(classes)}); rename or remove that subfolder")
    for name in subfolders:  # a class of damaged files alone: "no readable images; add images" named none of them
        if found[name].skipped and not found[name].paths:
            file, fix = first_skipped(found[name].skipped)
            raise DataError(f"{flag} {root}: class {name!r} has no readable images, {len(found[name].skipped):,} "
                            f"unreadable file(s), the first {file}; {fix}, or remove the class")
    names = classes if classes is not None else subfolders
    paths, labels, skipped, counts = [], [], [], []
    for name in subfolders:
        paths += found[name].paths
        labels += [names.index(name)] * len(found[name].paths)
        skipped += found[name].skipped
        counts.append(len(found[name].paths))
    if classes is None:
        _check_classes(f"{flag} {root}", subfolders, counts)
    elif 0 in counts:
        name = subfolders[counts.index(0)]
        raise DataError(f"{flag} {root}: class {name!r} has no readable images; add images to it or remove it")
    return names, LabelledSet(paths, labels), skipped, notes


def _check_outside(out_dir: Path, root: Path, flag: str) -> None:
    """Refuse an output folder inside a folder of class subfolders: the next run would read its files (a
    confusion matrix, say) as the images of one more class. A hidden one (scans skip it) is left alone."""
    out, folder = out_dir.resolve(), root.resolve()  # links resolved, as scans follow them
    if not out.is_relative_to(folder):
        return
    inside = out.relative_to(folder).parts
    if not inside:
        raise ConfigError(f"--out {out_dir} is {flag} {root} itself; pass an --out outside it")
    if not any(part.startswith(".") for part in inside):
        raise ConfigError(f"--out {out_dir} is inside {flag} {root}, where the next run would read its files as "
                          f"images of a class {inside[0]!r}; pass an --out outside {root}")


def read_label_csv(csv_path: str | Path, root: str | Path) -> tuple[list[str], LabelledSet, list[Skipped]]:
    """Read `path,label` rows (paths relative to root, or absolute; an optional header row)."""
    csv_path, root = Path(csv_path), Path(root)
    if not csv_path.is_file():
        raise DataError(f"--labels {csv_path}: no such file; pass a CSV of path,label rows")
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; pass the folder the paths in {csv_path} are relative to")
    rows: dict[Path, str] = {}
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            first = True  # the header, if any, is the first row that is not blank
            for number, row in enumerate(csv.reader(handle), start=1):
                if not row or all(not cell.strip() for cell in row):
                    continue
                header, first = first and [cell.strip().lower() for cell in row] == ["path", "label"], False
                if header:
                    continue
                if len(row) != 2 or not row[0].strip() or not row[1].strip():
                    raise DataError(f"--labels {csv_path}, line {number}: expected two fields, path,label; "
                                    f"got {','.join(row)!r}")
                # one key per file however the row spells it (relative, absolute, with ./ or ..), or a file
                # listed twice would be in the data twice, perhaps in both the training and validation sets
                path, label = Path(os.path.abspath(root / row[0].strip())), row[1].strip()  # abspath normalises
                if rows.get(path, label) != label:
                    raise DataError(f"--labels {csv_path}, line {number}: {row[0].strip()} is labelled both "
                                    f"{rows[path]!r} and {label!r}; keep one row per file")
                rows[path] = label
    except UnicodeDecodeError:
        raise DataError(f"--labels {csv_path}: not a UTF-8 text file; pass a CSV of path,label rows") from None
    except csv.Error as error:  # e.g. an unclosed quote, which swallows the lines after it
        raise DataError(f"--labels {csv_path}: not a valid CSV ({error}); look for an unclosed quote") from None
    if not rows:
        raise DataError(f"--labels {csv_path}: no rows; write one path,label row per image")
    missing = [path for path in rows if not path.is_file()]
    if missing:
        raise DataError(f"--labels {csv_path}: {len(missing):,} file(s) it names do not exist, e.g. {missing[0]}; "
                        f"paths are relative to {root}; fix them or remove those rows")
    not_images = [path for path in rows if not is_image_name(path.name)]
    if not_images:
        raise DataError(f"--labels {csv_path}: {not_images[0]} is not an image file name; list images only")
    classes = sorted(set(rows.values()))
    paths, labels, skipped = [], [], []
    for path in sorted(rows, key=str):
        problem = probe(path)
        if problem is None:
            paths.append(path)
            labels.append(classes.index(rows[path]))
        else:
            skipped.append(Skipped(str(path), problem))
    data = LabelledSet(paths, labels)
    _check_classes(f"--labels {csv_path}", classes, data.counts(len(classes)))
    return classes, data, skipped


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held-out) indices: about `fraction` of every class held out, at least one image of any
    class with two or more, none of a class with one; seeded."""
    rng = np.random.default_rng(seed)
    labels_array = np.asarray(labels)
    kept, held = [], []
    for label in sorted(set(labels)):
        members = rng.permutation(np.flatnonzero(labels_array == label)).tolist()
        count = len(members)
        take = min(max(round(fraction * count), 1), count - 1) if count >= 2 else 0
        held += members[:take]
        kept += members[take:]
    return sorted(kept), sorted(held)


def balanced_subset(labels: list[int], fraction: float, seed: int,
                    usable: Callable[[int], bool] | None = None) -> list[int]:
    """Indices of a class-balanced, seeded subset of about `fraction` of the images (SimCLR's 1% and 10%
    label protocol): the same count from every class (fewer where a class has fewer images).

    Each class's images are drawn in one seeded order, so with one seed a smaller fraction's subset
    is contained in a larger one's. With `usable` (index -> whether the image decodes), images it
    refuses are passed over for the next in that order: a share of one image must not be a broken
    file. A fraction of 1 keeps everything.
    """
    if fraction >= 1:
        return list(range(len(labels)))
    classes = sorted(set(labels))
    per_class = max(1, round(fraction * len(labels) / len(classes)))
    rng = np.random.default_rng(seed)
    labels_array = np.asarray(labels)
    chosen = []
    with ThreadPoolExecutor(max_workers=8) as pool:  # decoding releases the GIL
        for label in classes:
            order = rng.permutation(np.flatnonzero(labels_array == label)).tolist()
            chosen += _first_usable(order, per_class, usable, pool)
    return sorted(chosen)


def _first_usable(order: Sequence[int], count: int, usable: Callable[[int], bool] | None,
                  pool: ThreadPoolExecutor) -> list[int]:
    """The first `count` of `order` that `usable` accepts (all of them without it), checking no more than needed."""
    if usable is None:
        return list(order[:count])
    taken: list[int] = []
    start = 0
    while len(taken) < count and start < len(order):
        batch = order[start:start + count - len(taken)]
        taken += [index for index, ok in zip(batch, pool.map(usable, batch)) if ok]
        start += len(batch)
    return taken


def _file_ids(paths: Iterable[str | Path]) -> set[tuple[int, int]]:
    """The files `paths` name (file_id), less those gone since the scan (their decode is skipped and reported
    later)."""
    return {key for key in map(file_id, paths) if key is not None}


def _one_row_per_file(data: LabelledSet, classes: list[str], source: str) -> tuple[LabelledSet, str | None]:
    """`data` with each file once, however many names reach it (links, hard links, a CSV's two spellings): a file
    twice could be split into both the training and the validation set. Returns a note when some were."""
    first: dict[object, int] = {}
    keep = []
    for index, path in enumerate(data.paths):
        key = file_id(path) or path
        if key in first:
            other = first[key]
            if data.labels[other] != data.labels[index]:
                raise DataError(f"{source}: {data.paths[other]} and {path} are one file, labelled both "
                                f"{classes[data.labels[other]]!r} and {classes[data.labels[index]]!r}; keep it "
                                f"in one class")
            continue
        first[key] = index
        keep.append(index)
    if len(keep) == len(data):
        return data, None
    return data.subset(keep), (f"{source}: {len(data) - len(keep):,} image(s) are other names (links) of images "
                               f"listed before them: each file is kept once")


def _check_held_out(train: LabelledSet, val: LabelledSet, val_dir: str | Path, flag: str) -> None:
    """--val may share no file with the training images (by identity, whatever the name or link)."""
    train_ids = _file_ids(train.paths)
    shared = [path for path in val.paths if file_id(path) in train_ids]
    if shared:
        raise ConfigError(f"--val {val_dir} shares {len(shared):,} of its {len(val):,} images with {flag} (e.g. "
                          f"{shared[0]}): an accuracy on training images overstates generalisation; remove them from "
                          f"one of the two, or pass --val-split F to hold out part of {flag}")


def load_labelled(train_dir: str | Path, labels_csv: str | Path | None = None, val_dir: str | Path | None = None,
                  val_split: float | None = None, seed: int = 0, flag: str = "TRAIN",
                  out_dir: str | Path | None = None, exclude: str | Path | None = None) -> LabelledData:
    """Read the training images and their labels, and the validation set (--val DIR or a seeded,
    stratified --val-split of the training images); errors name the folder as `flag`. `out_dir`, the run's
    output folder, must not be inside a folder of class subfolders; `exclude`, a run's folder that may be (a
    pretrain's, reading its --monitor), is passed over."""
    if val_dir is not None and val_split is not None:
        raise ConfigError("--val and --val-split both given; use --val DIR for a separate validation folder "
                          "or --val-split F to hold out part of TRAIN, not both")
    if val_dir is not None and labels_csv is None and Path(val_dir).resolve() == Path(train_dir).resolve():
        raise ConfigError(f"--val {val_dir} is {flag} itself: an accuracy on the training images measures no "
                          f"generalisation; pass a separate folder, or --val-split F to hold out part of {flag}")
    if out_dir is not None:
        for folder, folder_flag in ((None if labels_csv else train_dir, flag), (val_dir, "--val")):
            if folder is not None:
                _check_outside(Path(out_dir), Path(folder), folder_flag)
    notes: list[str] = []
    if labels_csv is not None:
        classes, train, skipped = read_label_csv(labels_csv, train_dir)
    else:
        classes, train, skipped, notes = read_class_folders(train_dir, flag=flag,
                                                            exclude=exclude and Path(exclude))
    source = f"--labels {labels_csv}" if labels_csv else f"{flag} {train_dir}"
    train, repeated = _one_row_per_file(train, classes, source)
    notes += [repeated] if repeated else []
    if val_dir is not None:
        _, val, val_skipped, val_notes = read_class_folders(val_dir, classes, flag="--val")
        val, repeated = _one_row_per_file(val, classes, f"--val {val_dir}")  # a file twice would weigh double
        val_notes += [repeated] if repeated else []
        _check_held_out(train, val, val_dir, flag)
        return LabelledData(classes, train, val, skipped + val_skipped, notes + val_notes)
    fraction = DEFAULT_VAL_SPLIT if val_split is None else val_split
    kept, held = stratified_split(train.labels, fraction, seed)
    if not held:
        where, or_val = (train_dir, " or pass --val DIR") if flag == "TRAIN" else (f"{flag} {train_dir}", "")
        raise DataError(f"{where}: too few images to hold out a validation set (every class has one image); add "
                        f"images{or_val}")
    return LabelledData(classes, train.subset(kept), train.subset(held), skipped, notes)

"""`simclr embed`: a folder of images -> an index (rows streamed into a memory-mapped .npy + manifest).

While it runs, the work lives in `OUT.npy.partial/`: `rows.npy` (one row per scanned image, filled in
order), `plan.json` (the images, model hash and settings, written once) and `progress.json` (how far it
got, written atomically every few batches after the rows are flushed). `--resume` continues from
`progress.json`; at the end the rows are cut to the images actually embedded and renamed to OUT.npy
in one step. Rows of unreadable images are not written: the manifest lists the embedded images in
row order and the skipped ones apart.
"""

from __future__ import annotations

import io
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib import format as npy_format

from simclr_cli import __version__
from simclr_cli.data import Skipped, require_images, scan_images
from simclr_cli.errors import ConfigError, ModelFileError
from simclr_cli.export import load_encoder, read_json, resolve_model_path, write_json
from simclr_cli.features import iter_features, preprocessing
from simclr_cli.index import DTYPES, Manifest, manifest_path, remember_index, sha256_file, write_manifest
from simclr_cli.runtime import StopFlag, default_workers, resolve_device, resolve_precision

Report = Callable[..., None]
SAVE_EVERY = 8  # batches between progress records


def silent(kind: str, **fields: Any) -> None:
    """A Report that ignores everything."""


@dataclass(frozen=True)
class EmbedConfig:
    """Everything `simclr embed` needs."""

    model: str
    images: str
    out: str
    dtype: str = "float32"
    normalize: bool = True
    batch_size: int = 256
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None
    resume: bool = False
    overwrite: bool = False

    def validate(self) -> "EmbedConfig":
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size} must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"--workers {self.workers} must be 0 (load in the main process) or more")
        if Path(self.out).suffix != ".npy":
            raise ConfigError(f"OUT {self.out}: the index must end in .npy (its manifest goes beside it as .json)")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite both given; use one of them")
        return self


@dataclass
class EmbedResult:
    index: Path
    rows: int
    total: int  # images scanned
    skipped: list[Skipped] = field(default_factory=list)
    interrupted: bool = False
    images_per_s: float = 0.0


def work_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _start(config: EmbedConfig, model_path: Path, sha256: str, info, precision: str) -> dict[str, Any]:
    """Scan the folder and write plan.json and an empty rows.npy; return the plan."""
    out, work = Path(config.out), work_dir(Path(config.out))
    if work.exists() and not config.overwrite:
        raise ConfigError(f"{work} holds an interrupted embed; add --resume to continue it, or --overwrite "
                          f"to start again")
    if out.exists() and not config.overwrite:
        raise ConfigError(f"OUT {out} already exists; pass --overwrite to replace it, or another name")
    scan = require_images(scan_images(config.images))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    plan = {
        "images": str(Path(config.images).absolute()), "model": str(model_path.absolute()), "model_sha256": sha256,
        "dtype": config.dtype, "normalize": config.normalize, "dim": info.feature_dim, "precision": precision,
        "paths": [str(p.absolute()) for p in scan.paths],
        "skipped": [Skipped(str(Path(s.path).absolute()), s.reason).to_json() for s in scan.skipped],
    }
    npy_format.open_memmap(work / "rows.npy", mode="w+", dtype=config.dtype,
                           shape=(len(scan.paths), info.feature_dim)).flush()
    write_json(work / "progress.json", {"done": 0, "rows": 0, "skipped": []})
    write_json(work / "plan.json", plan)
    return plan


def _load_plan(config: EmbedConfig, sha256: str, precision: str) -> dict[str, Any]:
    """The plan of the interrupted embed in OUT.npy.partial/, checked against this command."""
    work = work_dir(Path(config.out))
    if not (work / "plan.json").is_file():
        raise ConfigError(f"--resume: no interrupted embed at {work}; run without --resume to start one")
    plan = read_json(work / "plan.json", "embed plan")
    if plan["model_sha256"] != sha256:
        raise ModelFileError(f"{config.model}: not the model the interrupted embed used ({plan['model']}, "
                             f"SHA-256 differs); resume with that model, or --overwrite to start again")
    if Path(plan["images"]) != Path(config.images).absolute():
        raise ConfigError(f"IMAGES {config.images}: the interrupted embed read {plan['images']}; resume with "
                          f"that folder, or --overwrite to start again")
    for flag, saved, given in (("--dtype", plan["dtype"], config.dtype),
                               ("--normalize/--no-normalize", plan["normalize"], config.normalize),
                               ("--precision", plan.get("precision", precision), precision)):
        if saved != given:
            raise ConfigError(f"{flag} {given} differs from the interrupted embed's {saved}; resume with the same "
                              f"flags, or --overwrite to start again")
    return plan


def _save_progress(work: Path, rows: np.memmap, done: int, written: int, skipped: list[Skipped]) -> None:
    rows.flush()  # rows first: the record never claims rows that are not on disk
    write_json(work / "progress.json", {"done": done, "rows": written, "skipped": [s.to_json() for s in skipped]})


def _truncate_rows(path: Path, rows: int) -> None:
    """Cut a (N, D) .npy to its first `rows` rows in place: rewrite the header, shorten the file."""
    with open(path, "rb+") as handle:
        version = npy_format.read_magic(handle)
        read_header, write_header = {
            (1, 0): (npy_format.read_array_header_1_0, npy_format.write_array_header_1_0),
            (2, 0): (npy_format.read_array_header_2_0, npy_format.write_array_header_2_0)}[version]
        shape, fortran, dtype = read_header(handle)
        offset = handle.tell()
        header = io.BytesIO()
        write_header(header, {"descr": npy_format.dtype_to_descr(dtype), "fortran_order": fortran,
                              "shape": (rows, *shape[1:])})
        if len(header.getvalue()) != offset:  # numpy pads headers so the first axis can change in place
            raise RuntimeError(f"cannot shrink {path} in place")
        handle.seek(0)
        handle.write(header.getvalue())
        handle.truncate(offset + rows * int(np.prod(shape[1:])) * dtype.itemsize)


def embed_folder(config: EmbedConfig, report: Report = silent, stop_after_batches: int | None = None) -> EmbedResult:
    """Embed every image under config.images into config.out (resuming if asked); return what was done.

    `stop_after_batches` stops the run after that many batches, as Ctrl-C would (for tests).
    """
    config.validate()
    out = Path(config.out)
    if config.resume and out.is_file() and not work_dir(out).exists():
        manifest = read_json(manifest_path(out), "index manifest")
        report("message", text=f"{out} is already complete; nothing to resume")
        return EmbedResult(out, len(manifest["paths"]), len(manifest["paths"]) + len(manifest["skipped"]))
    model_path = resolve_model_path(config.model)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    backbone, info = load_encoder(model_path, device)
    sha256 = sha256_file(model_path)
    plan = (_load_plan(config, sha256, precision.name) if config.resume
            else _start(config, model_path, sha256, info, precision.name))
    work = work_dir(out)
    progress = read_json(work / "progress.json", "embed progress")
    done, written = progress["done"], progress["rows"]
    skipped = [Skipped(**s) for s in plan["skipped"] + progress["skipped"]]
    paths = plan["paths"]
    rows = npy_format.open_memmap(work / "rows.npy", mode="r+")
    workers = default_workers() if config.workers is None else config.workers
    report("message", text=f"embedding {len(paths) - done:,} images from {config.images} with {info.arch} on "
                           f"{device} ({precision.name}), {workers} loader worker(s)"
                           + (f"; resuming after {done:,}" if done else ""))
    for item in skipped:
        report("warning", text=f"skipped {item.path}: {item.reason}")
    report("embed_start", total=len(paths), done=done)

    start_time, start_done, batches, interrupted = time.monotonic(), done, 0, False
    with StopFlag() as stop:  # Ctrl-C or SIGTERM: finish the batch, save progress, stop
        try:
            for batch in iter_features(backbone, info, paths, device, precision, config.batch_size, workers,
                                       order=range(done, len(paths))):
                features = F.normalize(batch.features, dim=1) if config.normalize else batch.features  # (n, D)
                rows[written:written + len(features)] = features.numpy().astype(config.dtype)
                # One assignment, so that a second Ctrl-C never leaves the counters half updated.
                done, written, skipped = done + len(batch.indices) + len(batch.skipped), written + len(features), \
                    skipped + batch.skipped
                for item in batch.skipped:
                    report("warning", text=f"skipped {item.path}: {item.reason}")
                batches += 1
                speed = (done - start_done) / max(time.monotonic() - start_time, 1e-9)
                report("embed_progress", done=done, total=len(paths), images_per_s=speed)
                if batches % SAVE_EVERY == 0:
                    _save_progress(work, rows, done, written, skipped[len(plan["skipped"]):])
                asked = stop.signal is not None or (stop_after_batches is not None and batches >= stop_after_batches)
                if asked and done < len(paths):
                    interrupted = True
                    break
        except KeyboardInterrupt:  # a second Ctrl-C: stop now, keeping the rows of finished batches
            interrupted = True
    _save_progress(work, rows, done, written, skipped[len(plan["skipped"]):])
    del rows
    speed = (done - start_done) / max(time.monotonic() - start_time, 1e-9)
    result = EmbedResult(out, written, len(paths), skipped, interrupted, speed)
    if interrupted:
        return result

    skipped_paths = {s.path for s in skipped}
    embedded = [p for p in paths if p not in skipped_paths]
    assert len(embedded) == written, (len(embedded), written)
    manifest = Manifest(paths=embedded, model=plan["model"], model_sha256=sha256,
                        preprocessing={"image_size": info.image_size, "mean": list(info.mean), "std": list(info.std),
                                       "transform": repr(preprocessing(info)).replace("\n", " ")},
                        dim=info.feature_dim, dtype=config.dtype, normalized=config.normalize,
                        precision=precision.name, images=plan["images"], skipped=[s.to_json() for s in skipped],
                        simclr_version=__version__)
    _truncate_rows(work / "rows.npy", written)
    manifest_path(out).unlink(missing_ok=True)  # never an old manifest beside new rows, even after a crash
    os.replace(work / "rows.npy", out)
    write_manifest(out, manifest)
    shutil.rmtree(work, ignore_errors=True)
    remember_index(out)
    report("embed_done", rows=written)
    return result


def embed_queries(model_path: str | Path, paths: list[str], device: torch.device,
                  precision: str = "auto") -> tuple[torch.Tensor, list[int], list[Skipped]]:
    """Unit-length features of query images: (features (M, D), positions in `paths` (M,), skipped files).

    `precision` should be the index's, so that an image in the index finds its own row at score 1;
    where this device cannot compute it (fp16 rows from a GPU, queried on a CPU), auto is used.
    """
    backbone, info = load_encoder(model_path, device)
    try:
        chosen = resolve_precision(precision, device)
    except ConfigError:
        chosen = resolve_precision("auto", device)
    features, positions, skipped = [], [], []
    for batch in iter_features(backbone, info, paths, device, chosen, batch_size=64,
                               workers=0 if len(paths) <= 64 else None):
        features.append(F.normalize(batch.features, dim=1))  # (n, D)
        positions.extend(batch.indices.tolist())
        skipped.extend(batch.skipped)
    stacked = torch.cat(features) if features else torch.empty(0, info.feature_dim)  # (M, D)
    return stacked, positions, skipped

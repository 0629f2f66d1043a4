"""`simclr embed`: a folder of images -> an index (rows streamed into a memory-mapped .npy + manifest).

While it runs, the work lives in `OUT.npy.partial/`: `rows.npy` (one row slot per scanned image),
`plan.json` (the images, model and its hash, and settings, written once; a `--resume` given the
model at another path records that one) and the progress records. The images
are cut into blocks of consecutive positions, one or more per process (`--devices N`); a block from
position b writes the rows of its readable images from row b on, in order, so processes never write
the same rows. `progress.json` (written by the launching process) lists the blocks of this session and
what earlier ones finished; each process records how far its blocks got in `progress-G-R.json` (G: the
session, R: the process), atomically, every few batches, after its rows are flushed. `--resume`
gathers all of it and shares out what is left, on any number of devices. At the end the blocks' rows
are brought together (in place when they already follow each other, the common case) and renamed to
OUT.npy in one step. Rows of unreadable images are not written: the manifest lists the embedded
images in row order and the skipped ones apart.
"""

from __future__ import annotations

import functools
import io
import os
import shlex
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib import format as npy_format

from simclr_cli import __version__
from simclr_cli.augment import preprocessing
from simclr_cli.config import PRECISIONS, check_paths, check_sizes
from simclr_cli.data import UntilWorkerDies
from simclr_cli.errors import ConfigError, DataError, ModelFileError, WorkerDied
from simclr_cli.export import load_encoder
from simclr_cli.features import iter_features
from simclr_cli.files import (EncoderInfo, check_output_path, held, read_json, read_metadata, replace_durably,
                              resolve_model_path, write_json)
from simclr_cli.images import Skipped, require_images, scan_images
from simclr_cli.index import (DTYPES, Manifest, manifest_path, open_index, remember_index, sha256_file, work_dir,
                               write_manifest)
from simclr_cli.runtime import StopFlag, default_workers, rank, resolve_device, resolve_precision, stop_reply

Report = Callable[..., None]
SAVE_EVERY = 8  # batches between progress records
COPY_ROWS = 65536  # rows per read when the blocks' rows are brought together


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
    devices: int = 1
    resume: bool = False
    overwrite: bool = False

    def validate(self) -> "EmbedConfig":
        check_paths(self)
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size} must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"--workers {self.workers} must be 0 (load in the main process) or more")
        if self.devices < 1:
            raise ConfigError(f"--devices {self.devices} must be at least 1")
        check_sizes(self.batch_size, self.workers, self.devices)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if Path(self.out).suffix != ".npy":
            raise ConfigError(f"OUT {self.out}: the index must end in .npy (its manifest goes beside it as .json)")
        if Path(self.out).is_dir():
            raise ConfigError(f"OUT {self.out} is a folder; pass a file name for the index, e.g. photos.npy")
        check_output_path(self.out, "OUT")
        if manifest_path(self.out).is_dir():  # else found at the end, after every row: the manifest is written last
            raise ConfigError(f"{manifest_path(self.out)} is a folder, where OUT {self.out} puts its manifest; move "
                              f"it, or pass another OUT")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite both given; use one of them")
        return self

    def resume_command(self) -> str:
        """The command that continues this embed if it stops (a shell command line)."""
        flags = ((["--dtype", self.dtype] if self.dtype != "float32" else [])
                 + ([] if self.normalize else ["--no-normalize"])
                 + (["--batch-size", str(self.batch_size)] if self.batch_size != EmbedConfig.batch_size else [])
                 + (["--devices", str(self.devices)] if self.devices > 1 else [])
                 + (["--device", self.device] if self.device != "auto" else [])
                 + (["--precision", self.precision] if self.precision != "auto" else [])
                 + (["--workers", str(self.workers)] if self.workers is not None else []))
        return shlex.join(["simclr", "embed", self.model, self.images, self.out, *flags, "--resume"])


@dataclass
class EmbedResult:
    index: Path
    rows: int
    total: int  # images scanned
    skipped: list[Skipped] = field(default_factory=list)
    interrupted: bool = False
    images_per_s: float = 0.0
    complete_before: bool = False  # a --resume of an embed that had finished: nothing written


@dataclass
class Block:
    """Positions [begin, end) of the plan's images; [begin, done) are embedded or skipped, and the rows of
    the embedded ones fill rows begin .. begin + rows - 1 of rows.npy, in order. `owner`: the process
    that works on it this session (None when it is finished)."""

    begin: int
    end: int
    done: int
    rows: int = 0
    owner: int | None = None


@dataclass
class Progress:
    """Everything an embed in OUT.npy.partial/ has done: its blocks (by position) and skipped files."""

    session: int
    blocks: list[Block]
    skipped: list[Skipped]

    @property
    def done(self) -> int:
        return sum(b.done - b.begin for b in self.blocks)

    @property
    def rows(self) -> int:
        return sum(b.rows for b in self.blocks)


def _process_record(work: Path, session: int, process: int) -> Path:
    return work / f"progress-{session}-{process}.json"


def read_progress(work: Path, total: int) -> Progress:
    """The launcher's record of this session, updated by its processes' records."""
    record = read_json(work / "progress.json", "embed progress")
    try:
        skipped = [Skipped(**s) for s in record["skipped"]]
        if "session" not in record:  # written before --devices: one block, its rows from the first row on
            return Progress(0, [Block(0, total, record["done"], record["rows"])], skipped)
        blocks = {b["begin"]: Block(**b) for b in record["blocks"]}
        for process in sorted({b.owner for b in blocks.values() if b.owner is not None}):
            path = _process_record(work, record["session"], process)
            if path.is_file():
                mine = read_json(path, "embed progress")
                blocks.update((b["begin"], Block(**b)) for b in mine["blocks"])
                skipped += [Skipped(**s) for s in mine["skipped"]]
        return Progress(record["session"], sorted(blocks.values(), key=lambda b: b.begin), skipped)
    except (KeyError, TypeError, AttributeError) as error:  # a record edited or cut by hand: not one we wrote
        raise ModelFileError(f"{work}: the interrupted embed is damaged (progress record: {error!r}); run again "
                             f"with --overwrite") from None


def share_out(progress: Progress, processes: int) -> Progress:
    """The next session: what is left cut into `processes` runs of equal length, in position order.

    The first piece of a block's unfinished part stays in that block (so one process resuming one
    block goes on writing its rows where it stopped); the other pieces become new blocks.
    """
    pending = sum(b.end - b.done for b in progress.blocks)
    cuts = [pending * p // processes for p in range(processes + 1)]
    blocks, offset = [], 0  # offset: pending positions before this block
    for block in progress.blocks:
        if block.done == block.end:
            blocks.append(Block(block.begin, block.end, block.done, block.rows))
            continue
        for process in range(processes):
            low = max(block.done, block.done + cuts[process] - offset)
            high = min(block.end, block.done + cuts[process + 1] - offset)
            if low >= high:
                continue
            if low == block.done:  # the block goes on up to `high`
                blocks.append(Block(block.begin, high, block.done, block.rows, process))
            else:
                blocks.append(Block(low, high, low, 0, process))
        offset += block.end - block.done
    return Progress(progress.session + 1, blocks, progress.skipped)


def embedded_so_far(work: Path) -> tuple[int, int] | None:
    """(images embedded, images to embed) of the embed working in `work`, as its records last said (every few
    batches); None where they cannot be read (not written yet, or being replaced)."""
    try:
        progress = read_progress(work, 0)
    except ModelFileError:
        return None
    total = max((b.end for b in progress.blocks), default=0)  # the blocks cover every position
    return (progress.rows, total) if total else None


def write_progress(work: Path, progress: Progress) -> None:
    """Start a session: its record first, then the records of earlier sessions go (they no longer count)."""
    write_json(work / "progress.json", {"session": progress.session, "blocks": [asdict(b) for b in progress.blocks],
                                        "skipped": [s.to_json() for s in progress.skipped]})
    for stale in work.glob("progress-*-*.json"):
        if not stale.name.startswith(f"progress-{progress.session}-"):
            stale.unlink(missing_ok=True)


def _start(config: EmbedConfig, model_path: Path, sha256: str, info: EncoderInfo, precision: str) -> dict[str, Any]:
    """Scan the folder and write plan.json, an empty rows.npy and the first progress record; return the plan."""
    out, work = Path(config.out), work_dir(Path(config.out))
    _check_free(work)
    if work.exists() and not (work / "plan.json").is_file():
        shutil.rmtree(work)  # an embed that stopped before its plan was written: nothing to keep
    if work.exists() and not config.overwrite:
        raise ConfigError(f"{work} holds an interrupted embed; add --resume to continue it, or --overwrite "
                          f"to start again")
    if out.exists() and not config.overwrite:
        raise ConfigError(f"OUT {out} already exists; pass --overwrite to replace it, or another name")
    if manifest_path(out).exists() and not config.overwrite:  # the end replaces it: not without the user's word
        raise ConfigError(f"{manifest_path(out)} already exists, where OUT {out} puts its manifest; pass "
                          f"--overwrite to replace it, or another OUT")
    scan = require_images(scan_images(config.images, label="IMAGES",
                                      instead="pass the folder of images (MODEL is the first argument)"))
    _check_free(work)  # again: another embed of this OUT may have started during the scan
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    plan = {
        "images": os.path.abspath(config.images), "model": os.path.abspath(model_path), "model_sha256": sha256,
        "dtype": config.dtype, "normalize": config.normalize, "dim": info.feature_dim, "precision": precision,
        "paths": [os.path.abspath(p) for p in scan.paths],  # absolute and normalised, as `similar` looks them up
        "skipped": [Skipped(os.path.abspath(s.path), s.reason).to_json() for s in scan.skipped],
        "runs_note": scan.runs_note(),
    }
    npy_format.open_memmap(work / "rows.npy", mode="w+", dtype=config.dtype,
                           shape=(len(scan.paths), info.feature_dim)).flush()
    write_progress(work, Progress(0, [Block(0, len(scan.paths), 0)], []))
    write_json(work / "plan.json", plan)
    return plan


def _check_free(work: Path) -> None:
    """Refuse the work folder of an embed still running, which _start would delete."""
    if work.exists():
        with held(work, "OUT"):
            pass


def _load_plan(config: EmbedConfig, sha256: str, precision: str) -> dict[str, Any]:
    """The plan of the interrupted embed in OUT.npy.partial/, checked against this command."""
    work = work_dir(Path(config.out))
    if not (work / "plan.json").is_file():
        raise ConfigError(f"--resume: no interrupted embed at {work}; run without --resume to start one")
    plan = read_json(work / "plan.json", "embed plan")
    problem = _plan_damage(plan) or _rows_damage(work / "rows.npy", plan)
    if problem:
        raise ModelFileError(f"{work}: the interrupted embed is damaged ({problem}); run again with --overwrite")
    _check_same(config, plan, sha256, precision, "interrupted embed")
    return plan


def _follow_model(work: Path, plan: dict[str, Any], model_path: Path) -> dict[str, Any]:
    """The plan, naming `model_path` where a --resume found the model (the same by SHA-256) at another path: the
    old one may be gone, and the processes load the model, and the manifest names it, from the plan."""
    model = os.path.abspath(model_path)
    if _elsewhere(plan["model"], model):
        plan = {**plan, "model": model}
        write_json(work / "plan.json", plan)
    return plan


def _elsewhere(saved: str, given: str) -> bool:
    """Whether the file or folder at `given` (absolute) is another than the `saved` path names: not where both name
    one ("a/../a/m", a link to its folder), only where the saved path is gone or another."""
    if os.path.normpath(saved) == given:
        return False
    try:
        return not os.path.samefile(saved, given)
    except OSError:  # gone from there
        return True


def _check_same(config: EmbedConfig, saved: dict[str, Any], sha256: str, precision: str, what: str) -> None:
    """Refuse a --resume whose model, images or flags are not those the embed in OUT used."""
    if saved["model_sha256"] != sha256:
        raise ModelFileError(f"{config.model}: not the model the {what} used ({saved['model']}, SHA-256 differs); "
                             f"resume with that model, or --overwrite to start again")
    if saved["images"] and _elsewhere(saved["images"], os.path.abspath(config.images)):
        raise ConfigError(f"IMAGES {config.images}: the {what} read {saved['images']}; resume with that folder, or "
                          f"--overwrite to start again")

    def normalize(on: bool) -> str:
        return "--normalize" if on else "--no-normalize"

    for was, given in ((f"--dtype {saved['dtype']}", f"--dtype {config.dtype}"),
                       (normalize(saved["normalize"]), normalize(config.normalize)),
                       (f"--precision {saved.get('precision') or precision}", f"--precision {precision}")):
        if was != given:
            raise ConfigError(f"{given} differs from the {what}'s {was}; resume with the same flags, or "
                              f"--overwrite to start again")


def _finished(config: EmbedConfig, model_path: Path, sha256: str, precision: str, report: Report) -> EmbedResult:
    """A --resume of an embed that has finished: checked as an interrupted one is, then nothing to do but point
    the manifest at `model_path` where the model has moved (`simclr similar` loads it from there)."""
    out = Path(config.out)
    if not manifest_path(out).is_file():  # open_index would say to resume: this command
        raise ModelFileError(f"{out}: its manifest {manifest_path(out)} is gone, so what it holds is unknown; run "
                             f"again with --overwrite")
    _, manifest = open_index(out, "OUT")
    _check_same(config, {"model_sha256": manifest.model_sha256, "model": manifest.model, "images": manifest.images,
                         "dtype": manifest.dtype, "normalize": manifest.normalized, "precision": manifest.precision},
                sha256, precision, "embed that wrote OUT")
    model = os.path.abspath(model_path)
    moved = f"; its manifest now names the model at {model}" if _elsewhere(manifest.model, model) else ""
    if moved:
        write_manifest(out, replace(manifest, model=model))
    report("message", text=f"{out} is already complete; nothing to resume{moved}")
    return EmbedResult(out, len(manifest.paths), len(manifest.paths) + len(manifest.skipped),
                       [Skipped(**s) for s in manifest.skipped], complete_before=True)


PLAN_TYPES = {"images": str, "model": str, "model_sha256": str, "dtype": str, "normalize": bool, "dim": int,
              "paths": list, "skipped": list}  # what _start writes (and "precision", absent from older plans)


def _plan_damage(plan: Any) -> str | None:
    """What no plan.json that _start writes would hold, or None."""
    if not isinstance(plan, dict):
        return "plan.json is not a JSON object"
    for key, kind in PLAN_TYPES.items():
        if not isinstance(plan.get(key), kind):
            return f"plan.json has no {key}" if key not in plan else f"plan.json's {key} is {plan[key]!r:.40}"
    if plan["dtype"] not in DTYPES or not all(isinstance(path, str) for path in plan["paths"]):
        return "plan.json's dtype or paths"
    if not all(isinstance(s, dict) and set(s) == {"path", "reason"} for s in plan["skipped"]):
        return "plan.json's skipped"
    return None


def _rows_damage(path: Path, plan: dict[str, Any]) -> str | None:
    """What makes the work folder's rows.npy unlike the plan's, or None (also when it is gone: moved to OUT)."""
    if not path.exists():
        return None
    try:
        rows = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:  # EOFError: an empty file
        return f"rows.npy is not a readable .npy file: {error}"
    # Its first axis is cut to the finished rows just before the rename to OUT.
    if rows.ndim != 2 or rows.shape[0] > len(plan["paths"]) or rows.shape[1] != plan["dim"] \
            or rows.dtype != np.dtype(plan["dtype"]):
        return f"rows.npy holds {rows.shape} {rows.dtype}, not ({len(plan['paths'])}, {plan['dim']}) {plan['dtype']}"
    return None


def _embed_process(config: EmbedConfig, work: Path, report: Report = silent, stop_after_batches: int | None = None,
                   encoder: tuple[torch.nn.Module, EncoderInfo] | None = None) -> None:
    """Embed this process's blocks of the session into rows.npy, recording how far they got.

    Ctrl-C or SIGTERM (or `stop_after_batches` batches, for tests) ends it after the current batch.
    """
    plan = read_json(work / "plan.json", "embed plan")
    paths = plan["paths"]
    progress = read_progress(work, len(paths))
    done_before = progress.done  # progress.done then grows as the blocks below advance
    blocks = [b for b in progress.blocks if b.owner == rank() and b.done < b.end]
    skipped: list[Skipped] = []
    record = _process_record(work, progress.session, rank())
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    backbone, info = encoder or load_encoder(plan["model"], device)
    rows = npy_format.open_memmap(work / "rows.npy", mode="r+")
    workers = default_workers() if config.workers is None else config.workers

    def save() -> None:
        rows.flush()  # rows first: the record never claims rows that are not on disk
        write_json(record, {"blocks": [asdict(b) for b in blocks], "skipped": [s.to_json() for s in skipped]})

    start_time, batches = time.monotonic(), 0
    # Ctrl-C or SIGTERM: finish the batch, save progress, stop
    with StopFlag(functools.partial(answer_stop, report)) as stop:
        try:
            for block in blocks:
                loaded = UntilWorkerDies(iter_features(backbone, info, paths, device, precision, config.batch_size,
                                                       workers, order=range(block.done, block.end)))
                for batch in loaded:
                    features = F.normalize(batch.features, dim=1) if config.normalize else batch.features  # (n, D)
                    start = block.begin + block.rows
                    rows[start:start + len(features)] = features.numpy().astype(config.dtype)
                    # One assignment, so that a second Ctrl-C never leaves the counters half updated.
                    block.done, block.rows, skipped = block.done + len(batch.indices) + len(batch.skipped), \
                        block.rows + len(features), skipped + batch.skipped
                    for item in batch.skipped:
                        report("warning", text=f"skipped {item.path}: {item.reason}")
                    batches += 1
                    report("embed_progress", done=progress.done, total=len(paths),
                           images_per_s=(progress.done - done_before) / max(time.monotonic() - start_time, 1e-9))
                    if batches % SAVE_EVERY == 0:
                        save()
                    if stop.signal is not None or (stop_after_batches is not None and batches >= stop_after_batches):
                        return
                if loaded.died:
                    fewer = replace(config, workers=workers // 2)
                    raise WorkerDied.saying(loaded.died, f"progress is saved. Continue with fewer workers: "
                                                         f"{fewer.resume_command()}")
        except KeyboardInterrupt:  # a second Ctrl-C: stop now, keeping the rows of finished batches
            return
        finally:
            save()


def answer_stop(report: Report, name: str) -> None:
    """Answer an embed's first Ctrl-C or SIGTERM (`name`): it saves the rows after the batch under way and stops."""
    report("stopping", text=stop_reply(name, "saving the rows after this batch, then stopping",
                                       "keeping the rows of the batches before"))


def _watch(work: Path, total: int, report: Report, finished: threading.Event, warned: set[str]) -> None:
    """While other processes embed: report their progress, and skipped files not yet `warned` of."""
    start_time, start_done = time.monotonic(), None
    while not finished.wait(0.5):
        try:
            progress = read_progress(work, total)
        except ModelFileError:  # a record being replaced; read it next time
            continue
        start_done = progress.done if start_done is None else start_done
        for item in progress.skipped:
            if item.path not in warned:
                warned.add(item.path)
                report("warning", text=f"skipped {item.path}: {item.reason}")
        report("embed_progress", done=progress.done, total=total,
               images_per_s=(progress.done - start_done) / max(time.monotonic() - start_time, 1e-9))


def _finished_rows(work: Path, blocks: list[Block]) -> tuple[Path, int]:
    """A .npy of every row in position order, and how many there are.

    When each block's rows start where the previous block's end (always, unless an image was skipped
    in a block that another one follows), that is rows.npy cut to its first rows. Otherwise the rows
    are copied to gathered.npy, and rows.npy stays as it was: a crash half-way loses nothing.
    """
    blocks = sorted(blocks, key=lambda b: b.begin)
    starts = np.cumsum([0] + [b.rows for b in blocks])  # where each block's rows go
    if all(b.begin == start for b, start in zip(blocks, starts)):
        _truncate_rows(work / "rows.npy", int(starts[-1]))
        return work / "rows.npy", int(starts[-1])
    rows = npy_format.open_memmap(work / "rows.npy", mode="r")
    gathered = npy_format.open_memmap(work / "gathered.npy", mode="w+", dtype=rows.dtype,
                                      shape=(int(starts[-1]), rows.shape[1]))
    for block, target in zip(blocks, starts):
        for offset in range(0, block.rows, COPY_ROWS):
            count = min(COPY_ROWS, block.rows - offset)
            gathered[target + offset:target + offset + count] = rows[block.begin + offset:block.begin + offset + count]
    gathered.flush()
    return work / "gathered.npy", int(starts[-1])


def _rows_in(out: Path, shape: tuple[int, int], dtype: str) -> int:
    """The number of rows of a finished embed's OUT, checked against what its plan expects."""
    try:
        rows = np.load(out, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):  # EOFError: an empty file
        rows = None
    if rows is None or rows.shape != shape or rows.dtype != np.dtype(dtype):
        raise ModelFileError(f"{out}: not the rows of the interrupted embed in {work_dir(out)}; run again with "
                             f"--overwrite")
    return len(rows)


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

    With `config.devices` > 1 the work is shared among that many processes (one per GPU).
    `stop_after_batches` stops every process after that many batches, as Ctrl-C would (for tests).
    """
    from simclr_cli import distributed

    config.validate()
    out = Path(config.out)
    if distributed.launched():
        raise ConfigError("simclr embed starts its own processes: run it without torchrun, with --devices N")
    model_path = resolve_model_path(config.model)
    info = EncoderInfo.from_metadata(read_metadata(model_path, "encoder"), model_path)  # an encoder's, or an error
    if config.devices > 1:
        distributed.check_devices(config.devices, config.device)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    sha256 = sha256_file(model_path)
    if config.resume and out.is_file() and not work_dir(out).exists():
        return _finished(config, model_path, sha256, precision.name, report)
    # One process: load the encoder here and embed here. Several: each loads its own.
    encoder = load_encoder(model_path, device) if config.devices == 1 else None
    plan = (_load_plan(config, sha256, precision.name) if config.resume
            else _start(config, model_path, sha256, info, precision.name))
    work, paths = work_dir(out), plan["paths"]
    with held(work, "OUT"):  # another embed of this OUT (a --resume, an --overwrite) is refused meanwhile
        plan = _follow_model(work, plan, model_path)
        progress = share_out(read_progress(work, len(paths)), config.devices)
        write_progress(work, progress)
        workers = default_workers() if config.workers is None else config.workers
        where = (f"{device} ({precision.name}), {workers} loader worker(s)" if config.devices == 1
                 else f"{config.devices} {device.type} processes ({precision.name})")
        report("message", text=f"embedding {len(paths) - progress.done:,} images from {config.images} with {info.arch} "
                               f"on {where}" + (f"; resuming after {progress.done:,}" if progress.done else ""))
        if isinstance(plan.get("runs_note"), str):  # a plan written before simclr passed over run folders has none
            report("message", text=plan["runs_note"])
        for item in progress.skipped + [Skipped(**s) for s in plan["skipped"]]:
            report("warning", text=f"skipped {item.path}: {item.reason}")
        report("embed_start", total=len(paths), done=progress.done)

        start_time = time.monotonic()
        if progress.done == len(paths):
            pass  # every image done before it stopped: only the last step below is left
        elif config.devices == 1:
            _embed_process(config, work, report, stop_after_batches, encoder)
        else:
            finished = threading.Event()
            warned = {s.path for s in progress.skipped}
            watcher = threading.Thread(target=_watch, args=(work, len(paths), report, finished, warned), daemon=True)
            watcher.start()
            try:
                distributed.launch(_embed_process, (config, work, silent, stop_after_batches), config.devices,
                                   config.device, resume=config.resume_command,
                                   answer=functools.partial(answer_stop, report))  # the processes say nothing
            finally:
                finished.set()
                watcher.join()
        end = read_progress(work, len(paths))
        skipped = [Skipped(**s) for s in plan["skipped"]] + end.skipped
        speed = (end.done - progress.done) / max(time.monotonic() - start_time, 1e-9)
        result = EmbedResult(out, end.rows, len(paths), skipped, end.done < len(paths), speed)
        if result.interrupted:
            return result
        if end.rows == 0:
            shutil.rmtree(work, ignore_errors=True)
            raise DataError(f"IMAGES {config.images}: none of its {len(paths):,} images could be decoded (the first: "
                            f"{skipped[0].path}: {skipped[0].reason}); nothing was written")

        skipped_paths = {s.path for s in skipped}
        embedded = [p for p in paths if p not in skipped_paths]
        if (work / "rows.npy").is_file():
            rows_file, written = _finished_rows(work, end.blocks)
            manifest_path(out).unlink(missing_ok=True)  # never an old manifest beside new rows, even after a crash
            replace_durably(rows_file, out)
        else:  # stopped after the rows went to OUT, before their manifest: they are there
            written = _rows_in(out, (len(embedded), info.feature_dim), config.dtype)
        assert len(embedded) == written, (len(embedded), written)
        manifest = Manifest(paths=embedded, model=plan["model"], model_sha256=sha256,
                            preprocessing={"image_size": info.image_size, "mean": list(info.mean),
                                           "std": list(info.std),
                                           "transform": repr(preprocessing(info)).replace("\n", " ")},
                            dim=info.feature_dim, dtype=config.dtype, normalized=config.normalize,
                            precision=precision.name, images=plan["images"], skipped=[s.to_json() for s in skipped],
                            simclr_version=__version__)
        write_manifest(out, manifest)
        shutil.rmtree(work, ignore_errors=True)
        if (warning := remember_index(out)) is not None:
            report("warning", text=warning)
        report("embed_done", rows=written)
        return result


def embed_queries(model_path: str | Path, paths: list[str], device: torch.device,
                  precision: str = "auto") -> tuple[np.ndarray, list[int], list[Skipped]]:
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
    return stacked.float().cpu().numpy(), positions, skipped

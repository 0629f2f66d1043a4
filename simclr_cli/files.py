"""Writing files safely, and reading what simclr wrote, without PyTorch: atomic writes, JSON, hashes, and
what an encoder file says about itself. `simclr similar` needs nothing more, and starts without importing
torch (2-6 s on a small CPU)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shlex
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from safetensors import SafetensorError, safe_open

from simclr_cli import __version__
from simclr_cli.config import ARCHITECTURES, PATH_SETTINGS
from simclr_cli.errors import ConfigError, ModelFileError

ENCODER_FORMAT = "simclr-encoder"
# simclr's other safetensors files, as a user may pass one for MODEL
_NOT_ENCODERS = {"simclr-checkpoint": "a simclr run's checkpoint", "simclr-head": "a simclr projection head",
                 "simclr-linear": "a simclr linear probe", "simclr-features": "a simclr feature cache"}
ENCODER_FILE = "encoder.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
FINETUNED_FILE = "finetuned.safetensors"
NOT_BACKBONE = ("head.", "classifier.")  # key prefixes of an encoder file's other tensors: g, a fine-tuned classifier


def file_id(path: str | Path) -> tuple[int, int] | None:
    """(device, inode): the same file under any name, link or hard link; None for one that cannot be looked up
    (gone, or a path holding a NUL, as a manifest edited by hand may)."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


def sync_file(path: str | Path) -> None:
    """Flush a file's data to the disk: renamed over an old file before that, a power cut could leave an empty
    or partial file under the old name (file systems write data and renames in their own order)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except PermissionError:  # a file this process may write but not read: left to the system
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(source: str | Path, target: str | Path) -> None:
    """os.replace, with the data on the disk first and the rename after (the folder synced)."""
    sync_file(source)
    os.replace(source, target)
    with contextlib.suppress(OSError):  # a folder some systems cannot open or sync
        sync_file(Path(target).parent)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is synced to the disk and renamed over `path` in
    one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes the file private, and so does a writer that puts its own file at `tmp` (safetensors):
        # the usual permissions, as open() would give, so that others can read an encoder on a shared machine.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        replace_durably(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


PROBE_PREFIX = ".simclr-probe-"  # check_output_path's file, there for an instant
# What a write killed half way leaves in a run folder: atomic_path's temporary of one of its files
# (.NAME.XXXXXXXX.tmp, mkstemp's 8 characters) and the one safetensors writes and renames over it (.tmpXXXXXX,
# the Rust tempfile crate's name), as large as a checkpoint.
_TEMPORARY = re.compile(r"\.[^/]+\.(json|jsonl|safetensors|png)\.[a-z0-9_]{8}\.tmp|\.tmp[A-Za-z0-9]{6}")


def is_temporary(name: str) -> bool:
    """Whether a file name is that of a temporary an interrupted atomic write left."""
    return _TEMPORARY.fullmatch(name) is not None


def remove_temporaries(folder: Path) -> None:
    """Delete the temporaries of writes killed half way (kill -9, a lost machine) in a folder this process holds."""
    for entry in os.scandir(folder):
        if is_temporary(entry.name) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


_HELD: set[int] = set()  # the descriptors held() locks with


def _let_go_in_child() -> None:
    """A forked child (a loader worker) closes its copies of the held descriptors: the lock is the parent's."""
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_let_go_in_child)


# Tries of a folder's lock, 10 ms apart, before it counts as held: `simclr similar` takes a shared lock for an
# instant to see whether an embed is writing its index, and a `held` that met it was refused (3% of tries in a loop).
LOCK_TRIES = 10


@contextlib.contextmanager
def held(folder: str | Path, what: str) -> Iterator[None]:
    """Hold `folder` (a run's, or an embed's work) while the block runs: another simclr process asking for it
    meanwhile gets a one-line error instead of writing the same files. A lock the file system refuses (some
    network ones lock no folders) is done without. The lock ends with this process: forked children (loader
    workers, which may outlive a killed parent by seconds) do not keep it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    _HELD.add(fd)
    try:
        for attempt in range(LOCK_TRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # held, or looked at for an instant by in_use: tried again a few times first
                if attempt == LOCK_TRIES - 1:
                    raise ConfigError(f"{what} {folder} is in use by another simclr process; let it finish, or stop "
                                      f"it, then run again") from None
                time.sleep(0.01)
                continue
            except OSError:
                pass
            break
        yield
    finally:
        _HELD.discard(fd)
        os.close(fd)  # the lock goes with it


def in_use(folder: str | Path) -> bool:
    """Whether another process holds `folder` (see `held`) now; False where it is missing, or its file system locks
    no folders."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # let go at once, with the descriptor
    except BlockingIOError:
        return True
    except OSError:
        pass
    finally:
        os.close(fd)
    return False


@contextlib.contextmanager
def claimed(folder: str | Path, what: str) -> Iterator[None]:
    """`held`, for a new run's folder from before the run is set up: two runs started at once with the same
    --out both found it empty, and the second wrote its config.json over the first's before it was refused.
    The folder (and its missing parents) is made here, and removed again if the block fails leaving it empty,
    as if it had never been asked for. One that cannot be made is left for the run's own checks to name."""
    folder = Path(folder)
    missing = []  # the folder and its parents up to the first that exists, deepest first
    for level in (folder, *folder.parents):
        if level.exists():
            break
        missing.append(level)
    made = []  # the folders this process made, deepest first: one another run made meanwhile is not ours
    for level in reversed(missing):
        try:
            level.mkdir()
        except FileExistsError:
            continue
        except OSError:
            break
        made.insert(0, level)
    holding = False
    try:
        with held(folder, what):
            holding = True
            yield
    except BaseException:
        for path in made if holding else []:  # refused the lock, the folder is another run's now
            with contextlib.suppress(OSError):
                path.rmdir()  # only if still empty
        raise


def check_output_path(path: str | Path, what: str, folder: bool = False) -> None:
    """Refuse, before any work, an output file (or with `folder`, a folder to write in) that atomic_path would fail
    to write at the end: a file that is a folder, a path through a file, or a folder to write in (the nearest that
    exists) that takes no new file: read-only, not this user's, or no real folder (/proc). A file is made there
    and removed."""
    path = Path(path)
    if path.is_dir() and not folder:
        raise ConfigError(f"{what} {path}: cannot write it, it is a folder; pass a file name")
    if any(parent.exists() and not parent.is_dir() for parent in path.parents):
        raise ConfigError(f"{what} {path}: cannot write it, a folder on its path is a file; pass another path")
    where = next(where for where in ([path] if path.is_dir() else []) + [*path.absolute().parents] if where.is_dir())
    try:
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise ConfigError(f"{what} {path}: cannot write it, {where} takes no new file ({error.strerror or error}); "
                          f"pass another path") from None


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Replace a text file in one step: a crash leaves the old file or the new one."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | Path, what: str = "file") -> Any:
    try:
        return read_json_bytes(Path(path).read_bytes(), path, what)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such {what}") from None
    except OSError as error:  # a folder, or a file this user may not read
        raise ModelFileError(f"{path}: cannot read the {what} ({error.strerror})") from None


def read_json_bytes(text: bytes, path: str | Path, what: str) -> Any:
    """Parse JSON read from `path` (all of it, or a part); damage is a ModelFileError naming the file."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFileError(f"{path}: not valid JSON ({error}); the {what} is damaged") from None


def read_json_lines(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines log such as metrics.jsonl, none if it is missing; a line that does not
    parse (the last one, cut short by a crash or a full disk), or is not a record (an edit), is left out."""
    path = Path(path)
    records = []
    for line in (path.read_text().splitlines() if path.is_file() else []):
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records


def xdg_home(variable: str, default: str) -> Path:
    """An XDG base directory: $variable if it is an absolute path, else ~/`default` (XDG ignores relative ones,
    which would otherwise depend on the directory a command runs in)."""
    base = os.environ.get(variable, "")
    return Path(base) if os.path.isabs(base) else Path.home() / default


def format_bytes(nbytes: int | float) -> str:
    """A size for people: 1.5 GiB, 310.2 MiB, 5.4 KiB."""
    for unit, shift in (("GiB", 30), ("MiB", 20)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):.1f} {unit}"
    return f"{nbytes / 1024:.1f} KiB"


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file (a model's, in index manifests and feature cache keys), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_metadata(path: str | Path, what: str) -> dict[str, str]:
    """The string metadata of a safetensors file; ModelFileError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such {what} file")
    try:
        with safe_open(str(path), framework="numpy") as handle:  # the metadata only: no tensor is read
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelFileError(f"{path}: not a safetensors file ({str(error).splitlines()[0]}); "
                             f"pass the {what} that simclr wrote") from None


def shareable(config: dict[str, Any]) -> dict[str, Any]:
    """`config` (a run's settings, nested) with every local path cut to its last name: a file that leaves the
    machine says "photos", not "/home/alice/clients/acme/photos" (provenance without the directory layout)."""
    def cut(key: str, path: str) -> str:  # a model file keeps its run folder's name: "pre-digits/encoder.safetensors"
        return str(Path(*Path(path).parts[-2:])) if key == "model" and Path(path).suffix else Path(path).name

    return {key: shareable(value) if isinstance(value, dict)
            else cut(key, value) if key in PATH_SETTINGS and isinstance(value, str) else value
            for key, value in config.items()}


@dataclass(frozen=True)
class EncoderInfo:
    """What an encoder file says about itself: enough to rebuild it and its preprocessing."""

    arch: str
    stem: str
    feature_dim: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    version: str
    config: dict[str, Any]
    width: float = 1.0  # the ResNet's channel multiplier; files without it are standard ResNets

    def to_metadata(self) -> dict[str, str]:
        return {
            "format": ENCODER_FORMAT, "arch": self.arch, "stem": self.stem, "width": str(self.width),
            "feature_dim": str(self.feature_dim), "image_size": str(self.image_size),
            "mean": json.dumps(list(self.mean)), "std": json.dumps(list(self.std)),
            "simclr_version": self.version, "config": json.dumps(shareable(self.config)),
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str], path: Path) -> "EncoderInfo":
        kind = meta.get("format")
        if kind in _NOT_ENCODERS:  # simclr wrote it, so "no simclr metadata" would be wrong
            raise ModelFileError(f"{path}: {_NOT_ENCODERS[kind]}, not an encoder; pass an encoder.safetensors or "
                                 f"finetuned.safetensors, or the run folder that holds one")
        if kind not in (ENCODER_FORMAT, "simclr-finetuned"):
            raise ModelFileError(f"{path}: a safetensors file, but not a simclr encoder (no simclr metadata); "
                                 f"pass the encoder.safetensors that `simclr pretrain` wrote")
        try:
            info = cls(arch=meta["arch"], stem=meta["stem"], feature_dim=int(meta["feature_dim"]),
                       image_size=int(meta["image_size"]), mean=tuple(json.loads(meta["mean"])),
                       std=tuple(json.loads(meta["std"])), version=meta.get("simclr_version", "?"),
                       config=json.loads(meta.get("config", "{}")), width=float(meta.get("width", 1.0)))
        except (KeyError, ValueError, TypeError) as error:
            raise ModelFileError(f"{path}: simclr encoder metadata is incomplete ({error}); re-export it "
                                 f"with `simclr pretrain`") from None
        if info.arch not in ARCHITECTURES:
            raise ModelFileError(f"{path}: architecture {info.arch!r} is unknown to simclr {__version__}; "
                                 f"upgrade simclr")
        problem = info._damage()
        if problem:
            raise ModelFileError(f"{path}: simclr encoder metadata is damaged ({problem}); re-export it with "
                                 f"`simclr pretrain`")
        return info

    def weights_error(self, path: Path, error: Exception) -> ModelFileError:
        """The error for weights that the ResNet this metadata names cannot take (load_encoder and numpy_encoder)."""
        return ModelFileError(f"{path}: weights do not match a {self.arch} ({str(error).splitlines()[0]}); "
                              f"the file is damaged")

    @staticmethod
    def check_finite(path: Path, tensors: dict[str, Any]) -> None:
        """Refuse weights holding NaN or infinity: every feature computed from them would be NaN, and every
        result (a probe at chance, an index of NaN rows) meaningless."""
        import numpy as np

        for key, value in tensors.items():
            values = np.asarray(value)
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                raise ModelFileError(f"{path}: {key} holds NaN or infinite weights; the file is damaged")

    def check_feature_dim(self, path: Path, feature_dim: int) -> None:
        """Refuse weights whose features are not as wide as the metadata says."""
        if feature_dim != self.feature_dim:
            raise ModelFileError(f"{path}: its metadata gives {self.feature_dim}-d features, its {self.arch} gives "
                                 f"{feature_dim}; the file is damaged")

    def _damage(self) -> str | None:
        """What makes these values impossible for a file simclr wrote (the bounds of its flags), or None."""
        def numbers(values: tuple) -> bool:
            return len(values) == 3 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)

        if self.stem not in ("imagenet", "cifar"):
            return f"stem {self.stem!r}"
        if not 8 <= self.image_size <= 4096:  # --image-size's bounds
            return f"image_size {self.image_size}"
        if not 0.125 <= self.width <= 4:  # --width's bounds (NaN fails too)
            return f"width {self.width}"
        if self.feature_dim < 1:
            return f"feature_dim {self.feature_dim}"
        if not (numbers(self.mean) and numbers(self.std) and min(self.std) > 0):
            return f"mean {list(self.mean)}, std {list(self.std)}: three numbers each, std above 0"
        if not isinstance(self.config, dict):
            return "config is not a JSON object"
        return None


def resume_command(command: str, run_dir: str | Path, workers: int | None = None, devices: int = 1,
                   device: str | None = None) -> str:
    """`simclr COMMAND --resume RUN_DIR`, quoted for a shell, with `--workers` and `--device` if given and
    `--devices` above 1."""
    text = f"simclr {command} --resume {shlex.quote(str(run_dir))}"
    text += f" --workers {workers}" if workers is not None else ""
    text += f" --device {shlex.quote(device)}" if device is not None else ""
    return text + (f" --devices {devices}" if devices > 1 else "")


def _unfinished_run(folder: Path) -> str | None:
    """The command ("pretrain" or "finetune") whose run `folder` is, if it holds its checkpoint; else None."""
    if not (folder / CHECKPOINT_FILE).is_file():
        return None
    try:
        config = read_json(folder / "config.json", "run configuration")
    except ModelFileError:
        return None
    return None if not isinstance(config, dict) else "finetune" if "model" in config else "pretrain"


def resolve_model_path(path: str | Path) -> Path:
    """An encoder file, or a run folder holding one (a fine-tuned model first, if present)."""
    path = Path(path)
    if path.is_dir():
        for name in (FINETUNED_FILE, ENCODER_FILE):
            if (path / name).is_file():
                return path / name
        if (command := _unfinished_run(path)) is not None:
            raise ModelFileError(f"{path}: this run's folder holds no model (the run has not finished, or its model "
                                 f"was removed); `{resume_command(command, path)}` finishes it "
                                 f"and exports the model")
        raise ModelFileError(f"{path}: this folder holds no {ENCODER_FILE}; pass a run folder of "
                             f"`simclr pretrain` or the .safetensors file itself")
    if not path.exists():
        raise ModelFileError(f"{path}: no such encoder file; pass the {ENCODER_FILE} of a `simclr pretrain` run, "
                             f"or its run folder")
    return path

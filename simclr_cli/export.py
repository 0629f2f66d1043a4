"""Safetensors encoders and resumable checkpoints (safetensors + JSON; nothing is ever unpickled)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from simclr_cli import __version__
from simclr_cli.errors import ConfigError, ModelFileError
from simclr_cli.models import BACKBONES, build_backbone

ENCODER_FORMAT = "simclr-encoder"
CHECKPOINT_FORMAT = "simclr-checkpoint"
ENCODER_FILE = "encoder.safetensors"
HEAD_FILE = "head.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed over `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_output_path(path: str | Path, what: str) -> None:
    """Refuse, before any work, an output file whose path goes through a file (atomic_path would fail at the end)."""
    if any(parent.exists() and not parent.is_dir() for parent in Path(path).parents):
        raise ConfigError(f"{what} {path}: cannot write it, a folder on its path is a file; pass another path")


def check_run_dir(run_dir: Path, resume: bool) -> bool:
    """A new run needs an empty (or new) --out. Return whether to restore the checkpoint: a resumed run (its
    config.json read already) that stopped before writing its first one has none, and starts again."""
    checkpoint = run_dir / CHECKPOINT_FILE
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file; pass a folder (new or empty) for the run")
    check_output_path(run_dir, "--out")
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        hint = f"resume it with --resume {run_dir}" if checkpoint.is_file() else "choose an empty folder"
        raise ConfigError(f"--out {run_dir} already holds files; {hint}, or pass another --out")
    return resume and checkpoint.is_file()


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Replace a text file in one step: a crash leaves the old file or the new one."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | Path, what: str = "file") -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelFileError(f"{path}: not valid JSON ({error}); the {what} is damaged") from None


def read_json_lines(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines log such as metrics.jsonl, none if it is missing; a line that does not
    parse (the last one, cut short by a crash or a full disk) is left out."""
    path = Path(path)
    records = []
    for line in (path.read_text().splitlines() if path.is_file() else []):
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file (a model's, in index manifests and feature cache keys), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically (tensors made contiguous and unshared)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_metadata(path: str | Path, what: str) -> dict[str, str]:
    """The string metadata of a safetensors file; ModelFileError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such {what} file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelFileError(f"{path}: not a safetensors file ({str(error).splitlines()[0]}); "
                             f"pass the {what} that simclr wrote") from None


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
            "simclr_version": self.version, "config": json.dumps(self.config),
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str], path: Path) -> "EncoderInfo":
        if meta.get("format") not in (ENCODER_FORMAT, "simclr-finetuned"):
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
        if info.arch not in BACKBONES:
            raise ModelFileError(f"{path}: architecture {info.arch!r} is unknown to simclr {__version__}; "
                                 f"upgrade simclr")
        problem = info._damage()
        if problem:
            raise ModelFileError(f"{path}: simclr encoder metadata is damaged ({problem}); re-export it with "
                                 f"`simclr pretrain`")
        return info

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


def save_encoder(path: str | Path, backbone: nn.Module, info: EncoderInfo,
                 extra: dict[str, torch.Tensor] | None = None, metadata: dict[str, str] | None = None) -> None:
    """Write the backbone's state dict (torchvision key names) with its EncoderInfo as metadata."""
    tensors = dict(backbone.state_dict())
    tensors.update(extra or {})
    save_tensors(path, tensors, {**info.to_metadata(), **(metadata or {})})


def resolve_model_path(path: str | Path) -> Path:
    """An encoder file, or a run folder holding one (a fine-tuned model first, if present)."""
    path = Path(path)
    if path.is_dir():
        for name in ("finetuned.safetensors", ENCODER_FILE):
            if (path / name).is_file():
                return path / name
        raise ModelFileError(f"{path}: this folder holds no {ENCODER_FILE}; pass a run folder of "
                             f"`simclr pretrain` or the .safetensors file itself")
    return path


def load_encoder(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, EncoderInfo]:
    """Rebuild a backbone from an encoder file's metadata and weights, in eval mode on `device`."""
    path = resolve_model_path(path)
    info = EncoderInfo.from_metadata(read_metadata(path, "encoder"), path)
    with torch.device("meta"):  # no random initialisation of weights about to be replaced (0.1 s for resnet18)
        backbone = build_backbone(info.arch, info.stem, initialise=False, width=info.width)
    tensors = load_file(str(path))
    state = {k: v for k, v in tensors.items() if not k.startswith(("head.", "classifier."))}
    try:
        backbone.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise ModelFileError(f"{path}: weights do not match a {info.arch} ({str(error).splitlines()[0]}); "
                             f"the file is damaged") from None
    if backbone.feature_dim != info.feature_dim:
        raise ModelFileError(f"{path}: its metadata gives {info.feature_dim}-d features, its {info.arch} gives "
                             f"{backbone.feature_dim}; the file is damaged")
    return backbone.to(device).eval(), info


# Checkpoints: every tensor in one safetensors file; everything else as JSON in its metadata, so a
# checkpoint is written (and renamed into place) as a single file.

def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, entry in info["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    # JSON turned tuples (AdamW's betas) into lists; hyperparameters go back as tuples.
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in group.items()}
              for group in info["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(path: str | Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                    rng: tuple[dict[str, torch.Tensor], dict[str, Any]], progress: dict[str, Any]) -> None:
    """Write modules, optimiser state, RNG states and loop position to one file, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        tensors.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
    optim_tensors, optim_info = optimizer_tensors(optimizer)
    rng_tensors, rng_info = rng
    tensors.update(optim_tensors)
    tensors.update(rng_tensors)
    metadata = {"format": CHECKPOINT_FORMAT, "simclr_version": __version__,
                "progress": json.dumps(progress), "optimizer": json.dumps(optim_info), "rng": json.dumps(rng_info)}
    save_tensors(path, tensors, metadata)


@dataclass
class Checkpoint:
    tensors: dict[str, torch.Tensor]
    progress: dict[str, Any]
    optimizer: dict[str, Any]
    rng: dict[str, Any]

    def module_state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) + 1:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}

    def rng_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors.items() if k.startswith("rng.")}


def load_checkpoint(path: str | Path) -> Checkpoint:
    meta = read_metadata(path, "checkpoint")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ModelFileError(f"{path}: not a simclr checkpoint; pass a run folder of `simclr pretrain`")
    return Checkpoint(tensors=load_file(str(path)), progress=json.loads(meta["progress"]),
                      optimizer=json.loads(meta["optimizer"]), rng=json.loads(meta["rng"]))

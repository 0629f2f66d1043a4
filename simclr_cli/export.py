"""Safetensors encoders and resumable checkpoints (safetensors + JSON; nothing is ever unpickled)."""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from simclr_cli import __version__
from simclr_cli.config import FinetuneConfig, PretrainConfig, SavedTypeError, replace
from simclr_cli.errors import ConfigError, ModelFileError, SimclrError
from simclr_cli.files import (CHECKPOINT_FILE, ENCODER_FILE, FINETUNED_FILE, NOT_BACKBONE, PROBE_PREFIX, EncoderInfo,
                              atomic_path, check_output_path, is_temporary, read_json, read_metadata,
                              remove_temporaries, resolve_model_path, resume_command)
from simclr_cli.models import build_backbone
from simclr_cli.runtime import is_main

CHECKPOINT_FORMAT = "simclr-checkpoint"
HEAD_FILE = "head.safetensors"


# A run is also checkpointed in the middle of an epoch this long after its last save: a crash or a lost machine
# costs at most this much training, not an epoch (hours, on a large folder).
CHECKPOINT_SECONDS = 600.0


def check_run_dir(run_dir: Path, resume: bool, product: str, config_class: Any) -> bool:
    """A new run needs an empty (or new) --out. Return whether to restore the checkpoint: a resumed run (its
    config.json read already) that stopped before writing its first one has none, and starts again. One that
    finished (its `product` written) and lost its checkpoint since is refused, not trained again over it.
    `config_class`: the command's settings, which a folder of one of its runs holds in its config.json."""
    checkpoint = run_dir / CHECKPOINT_FILE
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file; pass a folder (new or empty) for the run")
    check_output_path(run_dir, "--out", folder=True)
    # Another process's check_output_path may have its probe in the folder this instant (--devices: every rank checks),
    # and a temporary of a killed write be still there for the other ranks.
    if not resume and run_dir.exists() and any(not p.name.startswith(PROBE_PREFIX) and not is_temporary(p.name)
                                               for p in run_dir.iterdir()):
        # A run stopped before its first checkpoint has its config.json, and --resume starts it again; another
        # command's run (a pretrain run given to finetune's --out) cannot be resumed by this one.
        hint = f"resume it with --resume {run_dir}" if _holds_run(run_dir, config_class) else "choose an empty folder"
        raise ConfigError(f"--out {run_dir} already holds files; {hint}, or pass another --out")
    if run_dir.exists() and is_main():  # the run's, and held by this process: a temporary here is a killed write's
        remove_temporaries(run_dir)
    if resume and not checkpoint.is_file() and (run_dir / product).is_file():
        raise ConfigError(f"--resume {run_dir}: the run finished ({product} is there) and its {CHECKPOINT_FILE} is "
                          f"gone, so there is nothing to resume from; it needs no --resume (to train on, start a "
                          f"new run with another --out)")
    return resume and checkpoint.is_file()


def read_run_config(config_class: Any, run_dir: Path, command: str, **changes: Any) -> Any:
    """The settings a `simclr {command}` run saved in run_dir/config.json, with `changes` (--resume's own
    flags: the runtime's given as device= and workers=, None where not given), validated. A folder of
    another command's run, or a config.json edited past use, is a one-line ConfigError."""
    if run_dir.is_file():  # the run's encoder, say: its folder is meant
        raise ConfigError(f"--resume {run_dir}: a file, not a run folder; pass the folder of a run that "
                          f"`simclr {command}` started" + (f" (--resume {run_dir.parent}?)"
                                                          if _holds_run(run_dir.parent, config_class) else ""))
    if not (run_dir / "config.json").is_file():
        there = "no config.json there" if run_dir.is_dir() else "no such folder"
        raise ConfigError(f"--resume {run_dir}: {there}; pass the folder of a run that `simclr {command}` started")
    device, workers = changes.pop("device", None), changes.pop("workers", None)
    try:
        config = config_class.from_json(read_json(run_dir / "config.json", "run configuration"))
        runtime = replace(config.runtime, device=device or config.runtime.device,
                          workers=workers if workers is not None else config.runtime.workers)
        # validate() in the try: an edited value of the right type may still trip a check
        return replace(config, out_dir=str(run_dir), runtime=runtime, **changes).validate()
    except ConfigError as error:  # its message names the flag, which --resume refuses: say where the value is
        raise ConfigError(f"--resume {run_dir}: {error} (a setting saved in its config.json, or one given with "
                          f"--resume)") from None
    except (TypeError, KeyError, ValueError, AttributeError) as error:  # another command's run, or an edited file
        other = _other_command(run_dir, command)
        if other is not None:
            raise ConfigError(f"--resume {run_dir}: {_other_run(run_dir, other)}") from None
        detail = f" ({error})" if isinstance(error, SavedTypeError) else ""
        raise ConfigError(f"--resume {run_dir}: its config.json is not the settings of a `simclr {command}` "
                          f"run{detail}; pass the folder of a run that `simclr {command}` started, or restore its "
                          f"config.json as the run wrote it") from None


def _other_command(run_dir: Path, command: str) -> str | None:
    """"pretrain" or "finetune" if run_dir holds the other command's run, as its settings read; else None."""
    other, config_class = ("finetune", FinetuneConfig) if command == "pretrain" else ("pretrain", PretrainConfig)
    return other if _holds_run(run_dir, config_class) else None


def _other_run(run_dir: Path, other: str) -> str:
    """What the folder of an `other` command's run is, and what to do with it: continue it, or use what it made."""
    if not (run_dir / (ENCODER_FILE if other == "pretrain" else FINETUNED_FILE)).is_file():
        return f"a `simclr {other}` run; continue it with `{resume_command(other, run_dir)}`"
    if other == "pretrain":  # finetune --resume on it: fine-tuning its encoder was meant
        return (f"a finished `simclr pretrain` run, nothing to resume; fine-tune its encoder with "
                f"`simclr finetune {shlex.quote(str(run_dir))} TRAIN`")
    return ("a finished `simclr finetune` run, nothing to resume; pass the folder of a run that `simclr pretrain` "
            "started")


def _holds_run(run_dir: Path, config_class: Any) -> bool:
    """Whether run_dir/config.json holds `config_class`'s settings."""
    try:
        config_class.from_json(read_json(run_dir / "config.json", "run configuration"))
    except (SimclrError, TypeError, KeyError, ValueError, AttributeError):
        return False
    return True


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                 ignored: tuple[str, ...] = ()) -> None:
    """Write a safetensors file atomically (tensors made contiguous and unshared), or leave `path` as it is where
    it already holds these tensors and metadata (but for the `ignored` keys); a failed write (a full disk) is an
    OSError naming `path`, as Python's own writes give."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    # safetensors writes its metadata in another order on every call (a Rust HashMap): the same weights written
    # again would be other bytes, and every index and feature cache keyed by the file's SHA-256 would go stale.
    if _holds(path, tensors, metadata, ignored):
        return
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as error:  # the Rust writer's: "I/O error: No space left on device (os error 28)"
            found = re.search(r"os error (\d+)", str(error))
            code = int(found.group(1)) if found else errno.EIO
            raise OSError(code, os.strerror(code), str(path)) from None


def _holds(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
           ignored: tuple[str, ...] = ()) -> bool:
    """Whether the file at `path` holds exactly `metadata` (but for the `ignored` keys) and `tensors`: the same
    names, dtypes, shapes and bytes."""
    if not Path(path).is_file():
        return False

    def kept(entries: dict[str, str]) -> dict[str, str]:
        return {key: value for key, value in entries.items() if key not in ignored}

    try:
        with safe_open(str(path), framework="pt") as handle:  # the header first: a checkpoint's differs at once
            if kept(handle.metadata() or {}) != kept(metadata) or set(handle.keys()) != set(tensors):
                return False
            return all(_same_bits(handle.get_tensor(name), tensor) for name, tensor in tensors.items())
    except (SafetensorError, OSError, ValueError):  # damaged, or not safetensors: written anew
        return False


def _same_bits(saved: torch.Tensor, tensor: torch.Tensor) -> bool:
    """Whether two tensors are the same bit for bit: unlike torch.equal, a NaN equals itself and -0.0 differs
    from 0.0, so a file is kept only where writing it again would give the same tensor bytes."""
    if saved.dtype != tensor.dtype or saved.shape != tensor.shape:
        return False
    return torch.equal(saved.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))


# An encoder's metadata of provenance, not of what its weights compute: the runs' settings (--workers, --device
# among them) and the simclr that wrote it. A file of the same weights is kept whatever these say: a finished run
# resumed with `--workers 0` rewrote it, and the indexes that record its SHA-256 refused it.
PROVENANCE = ("config", "finetune_config", "simclr_version")


def save_encoder(path: str | Path, backbone: nn.Module, info: EncoderInfo,
                 extra: dict[str, torch.Tensor] | None = None, metadata: dict[str, str] | None = None) -> None:
    """Write the backbone's state dict (torchvision key names) with its EncoderInfo as metadata, unless `path`
    holds these weights already (see PROVENANCE)."""
    tensors = dict(backbone.state_dict())
    tensors.update(extra or {})
    save_tensors(path, tensors, {**info.to_metadata(), **(metadata or {})}, PROVENANCE)


def load_encoder(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, EncoderInfo]:
    """Rebuild a backbone from an encoder file's metadata and weights, in eval mode on `device`."""
    path = resolve_model_path(path)
    info = EncoderInfo.from_metadata(read_metadata(path, "encoder"), path)
    with torch.device("meta"):  # no random initialisation of weights about to be replaced (0.1 s for resnet18)
        backbone = build_backbone(info.arch, info.stem, initialise=False, width=info.width)
    tensors = load_file(str(path))
    state = {k: v for k, v in tensors.items() if not k.startswith(NOT_BACKBONE)}
    expected = backbone.state_dict()  # meta tensors: each weight's dtype, no data
    for key, value in state.items():
        # assign=True keeps the file's dtype: a half copy of the weights would meet float32 images.
        if key in expected and expected[key].is_floating_point() and value.dtype != expected[key].dtype:
            if not value.is_floating_point():
                raise info.weights_error(path, TypeError(f"{key} holds {value.dtype}, not floating-point values"))
            state[key] = value.to(expected[key].dtype)
    info.check_finite(path, {key: state[key] for key in expected if key in state})  # the rest are refused below
    try:
        backbone.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise info.weights_error(path, error) from None
    info.check_feature_dim(path, backbone.feature_dim)
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
    parts = {}
    for key in ("progress", "optimizer", "rng"):
        try:
            parts[key] = json.loads(meta[key])
        except (KeyError, TypeError, ValueError):  # missing, or not JSON (json.JSONDecodeError is a ValueError)
            raise ModelFileError(f"{path}: its {key!r} entry is missing or not JSON, so the checkpoint is damaged; "
                                 f"restore the file, or start a new run with another --out") from None
    return Checkpoint(tensors=load_file(str(path)), **parts)

"""One frozen, validated dataclass per command, built from shared pieces."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simclr_cli.errors import ConfigError

# The backbones: residual block and blocks per stage (He et al. 2015, arXiv 1512.03385, Table 1).
# models.BACKBONES builds each in PyTorch, numpy_encoder.py runs it in numpy. Kept here so that
# `simclr --help` and validation need no torch import (about 2 s on a small CPU).
RESNETS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
           "resnet50": ("bottleneck", (3, 4, 6, 3)), "resnet101": ("bottleneck", (3, 4, 23, 3)),
           "resnet152": ("bottleneck", (3, 8, 36, 3))}
ARCHITECTURES = tuple(RESNETS)
OPTIMIZERS = ("lars", "sgd", "adamw")
LR_SCALINGS = ("sqrt", "linear")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STEMS = ("auto", "imagenet", "cifar")
AUGMENT_ON = ("auto", "device", "cpu", "per-image")  # auto: device on a GPU, cpu otherwise
SMALL_IMAGE_MAX = 64  # at or below this size the paper's CIFAR-10 recipe applies
BATCH_SIZE = 256
SMALL_CPU_BATCH_SIZE = 128  # small images on a CPU: twice the steps a minute (README, Quality)
# Small images on a CPU: crops from 60% with full-strength jitter, 0.9 points more kNN top-1 after 10 minutes
# on Fashion-MNIST at the same linear top-1 (README, Quality).
SMALL_CPU_CROP_MIN_SCALE = 0.6
SMALL_CPU_JITTER = 1.0

MAX_SEED = 2**63 - 1
# Upper bounds far above real use, so that a slip of the keyboard is a one-line error, not an allocation failure
# or an OverflowError mid-run (SimCLR's largest batch is 8192; 65536 is four times the widest head anyone uses).
MAX_BATCH_SIZE = 2**20
MAX_PROJ_DIM = 65536
MAX_WORKERS = 1024
MAX_DEVICES = 1024
MAX_EPOCHS = 10**6  # SimCLR's longest run is 3200 epochs
MAX_RATE = 1e30  # learning rates and L2 strengths: far above any that trains (tests diverge at 1e30 on purpose),
# below float32's overflow (3.4e38), where --lr 1e39 failed at the first step

# Hours, minutes and seconds; the seconds' unit may be left out of a bare number alone ("1h30" is refused: 90
# minutes or 30 seconds?).
_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)(s?))?\s*$")


def channels(base: int, width: float) -> int:
    """A stage's channel count at a width multiplier (SimCLRv2's 2x and 3x, or 0.5x for small CPUs)."""
    return max(1, round(base * width))


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_duration(text: str, flag: str = "--max-time") -> float:
    """Return seconds for '90s', '10m', '2h', '1h30m' or a bare number of seconds."""
    match = _DURATION.match(text or "")
    if not match or not any(match.groups()[:3]):
        raise ConfigError(f"{flag} {text!r} is not a duration; use e.g. 90s, 10m, 2h or 1h30m")
    *numbers, unit = match.groups()
    if numbers[2] and not unit and (numbers[0] or numbers[1]):
        raise ConfigError(f"{flag} {text!r} leaves the unit of its last number out; write it, as in 1h30m or 1m30s")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in numbers)
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise ConfigError(f"{flag} {text!r} must be longer than zero; use e.g. 10m")
    return total


def format_duration(seconds: float) -> str:
    """A number of seconds as parse_duration reads it back, to the second: "0m30s", "1h05m00s"."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


NOT_FLAGS = {"lr_per_256"}  # settings a --preset sets, which no flag does

# The settings that name local files or folders, and their flags.
PATH_SETTINGS = {"data_dir": "DATA_DIR", "out_dir": "--out", "cache_dir": "--cache-dir", "monitor": "--monitor",
                 "model": "MODEL", "train_dir": "TRAIN", "labels_csv": "--labels", "val_dir": "--val",
                 "images": "IMAGES", "out": "OUT.npy"}


def check_paths(config: Any) -> None:
    """No required path is "": it would be the working folder (the CLI refuses it first; this is for the API). An
    optional one (default None) given "" is off, as it always was."""
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if dataclasses.is_dataclass(value):
            check_paths(value)
        required = item.name in PATH_SETTINGS and item.default is dataclasses.MISSING
        _check(not required or not isinstance(value, str) or bool(value.strip()),
               f"{PATH_SETTINGS.get(item.name)} is empty; pass a file or folder")


def _check_finite(config: Any) -> None:
    """Every number among a command's settings is finite: `--l2 inf` or `--lr inf` pass the range checks
    below and train to NaN, and a whole number too large for a float (a 400-digit --epochs) fails mid-run."""
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            finite = abs(value) < 1e308 if isinstance(value, int) else math.isfinite(value)  # an int: float() fits
            _check(finite, f"{_setting(item.name)} {value} must be a finite number")


def _setting(name: str) -> str:
    """How messages name a setting: its flag, or its config.json key for one no flag sets."""
    return f"{name} (in config.json)" if name in NOT_FLAGS else f"--{name.replace('_', '-')}"


_JSON_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "None": (type(None),)}
_JSON_NAMES = {"str": "a string", "int": "a whole number", "float": "a number", "bool": "true or false", "None": "null"}


class SavedTypeError(TypeError):
    """A setting read back from config.json has the wrong type; the message names it."""


def check_saved_types(config: Any) -> Any:
    """`config`, a dataclass read back from JSON (a config, a checkpoint's loop state), once every field has its
    annotated type, nested ones too: a hand-edited `"epochs": "5"` would otherwise fail later, far from the file."""
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        names = [name.strip() for name in str(item.type).split("|")]
        if any(name not in _JSON_TYPES for name in names):  # a nested config
            if not dataclasses.is_dataclass(value):
                raise SavedTypeError(f"{item.name} is {value!r}, not a group of settings")
            check_saved_types(value)
            continue
        allowed = tuple(kind for name in names for kind in _JSON_TYPES[name])
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise SavedTypeError(f"{item.name} is {value!r}, not {' or '.join(_JSON_NAMES[name] for name in names)}")
    return config


def check_sizes(batch_size: int | None = None, workers: int | None = None, devices: int = 1) -> None:
    """Refuse sizes far past real use (MAX_*), for every command's --batch-size, --workers and --devices."""
    _check(batch_size is None or batch_size <= MAX_BATCH_SIZE,
           f"--batch-size {batch_size} is too large; use at most {MAX_BATCH_SIZE}")
    _check(workers is None or workers <= MAX_WORKERS,
           f"--workers {workers} is too many; use at most {MAX_WORKERS} (or leave it out for a count that suits "
           f"this machine)")
    _check(devices <= MAX_DEVICES, f"--devices {devices} is too many; use at most {MAX_DEVICES} processes")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how to compute: shared by every command."""

    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None  # None: a sensible count for this machine
    seed: int = 0

    def validate(self) -> None:
        _check(self.precision in PRECISIONS,
               f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        _check(self.workers is None or self.workers >= 0,
               f"--workers {self.workers} must be 0 (load in the main process) or more")
        check_sizes(workers=self.workers)
        # torch.manual_seed takes at most 2**64 - 1 and numpy's generators no negative seed; 2**63 - 1 is the
        # largest that fits a signed 64-bit integer, as any other library may store it.
        _check(0 <= self.seed <= MAX_SEED, f"--seed {self.seed} is out of range; use 0 to {MAX_SEED}")


@dataclass(frozen=True)
class AugmentConfig:
    """The SimCLR view pipeline (SimCLR Appendix A); None means 'the default for this image size'."""

    image_size: int = 224
    # None: by image size below, or SMALL_CPU_* for small images on a CPU (PretrainConfig.resolved_augment)
    crop_min_scale: float | None = None  # smallest crop (area fraction); 0.08 at ImageNet size, 0.2 at <= 64 px
    jitter: float | None = None  # colour-jitter strength s; 1.0 at ImageNet size, 0.5 at <= 64 px
    blur: bool | None = None  # Gaussian blur; on at ImageNet size, off at <= 64 px

    @property
    def small(self) -> bool:
        return self.image_size <= SMALL_IMAGE_MAX

    @property
    def crop_scale(self) -> float:
        """The paper's 0.08, except for small images: 0.2 there, chosen with benchmarks/sweep.py (README,
        Quality: with lr 1.2, +0.7 linear and +1.0 kNN top-1 on Fashion-MNIST after five minutes)."""
        if self.crop_min_scale is not None:
            return self.crop_min_scale
        return 0.2 if self.small else 0.08

    @property
    def jitter_strength(self) -> float:
        if self.jitter is not None:
            return self.jitter
        return 0.5 if self.small else 1.0

    @property
    def use_blur(self) -> bool:
        if self.blur is not None:
            return self.blur
        return not self.small

    def decided(self) -> "AugmentConfig":
        """This config with every None replaced by its default for the image size."""
        return replace(self, crop_min_scale=self.crop_scale, jitter=self.jitter_strength, blur=self.use_blur)

    def validate(self) -> None:
        _check(8 <= self.image_size <= 4096,
               f"--image-size {self.image_size} is out of range; use 8 to 4096 pixels (e.g. 32 or 224)")
        _check(self.crop_min_scale is None or 0 < self.crop_min_scale <= 1,
               f"--crop-min-scale {self.crop_min_scale} must be in (0, 1]; the paper uses 0.08")
        _check(self.jitter is None or 0 <= self.jitter <= 2,
               f"--jitter {self.jitter} must be in [0, 2]; the paper uses 1.0 (0.5 for CIFAR)")


@dataclass(frozen=True)
class PretrainConfig:
    """Everything `simclr pretrain` needs; saved as config.json in the run folder."""

    data_dir: str
    out_dir: str
    epochs: int = 100
    batch_size: int | None = None  # None: BATCH_SIZE, or SMALL_CPU_BATCH_SIZE (resolved_batch_size)
    arch: str = "resnet50"  # SimCLR's encoder; on a CPU the best measured at 10 and 60 minutes (README, Quality)
    stem: str = "auto"
    width: float = 1.0  # channel multiplier: SimCLRv2's 2x and 3x ResNets, or below 1 for a small CPU
    zero_init_residual: bool = True  # each residual block starts as its shortcut (models.ResNet.initialise)
    proj_layers: int = 2
    proj_dim: int = 128
    proj_out_bn: bool = True  # BatchNorm (scale only) on z, as google-research/simclr's head (models.ProjectionHead)
    temperature: float = 0.1
    optimizer: str = "lars"
    lr: float | None = None  # None: by lr_scaling from the batch size (resolved_lr)
    lr_scaling: str = "sqrt"
    lr_per_256: float | None = None  # the linear rule's rate per 256 images, set by a --preset (None: 0.3)
    weight_decay: float | None = None  # None: 1e-6 (LARS, SGD, the paper) or 0.05 (AdamW)
    warmup_epochs: float = 10.0
    max_time: float | None = None  # seconds
    devices: int = 1  # processes on this machine, one per device (torchrun sets its own)
    chunk_size: int | None = None  # images whose activations are alive at once (gradient caching)
    sync_bn: bool | None = None  # None: SyncBatchNorm when distributed on GPUs
    augment_on: str = "auto"  # where the views are made: see AUGMENT_ON and batch_augment.py
    cache: bool = False  # keep decoded images in a memory-mapped file (cache.py)
    cache_dir: str | None = None  # None: the run folder
    compile: bool = False  # torch.compile the model
    monitor: str | None = None  # a small labelled folder for a kNN after every epoch (curves.py)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def resolved_stem(self, device_type: str) -> str:
        """--stem auto: the paper's 3x3 CIFAR stem for small images on an accelerator; on a CPU the 7x7
        ImageNet stem, since the 3x3 one keeps 16x the activations (13x slower measured on
        2 cores at 32 px: in 10 minutes it would see about a quarter of Fashion-MNIST, once)."""
        if self.stem != "auto":
            return self.stem
        return "cifar" if self.augment.small and device_type != "cpu" else "imagenet"

    def resolved_batch_size(self, device_type: str) -> int:
        """--batch-size, or 256; 128 for small images on a CPU, where a 10-minute run takes about 450 steps
        at 256. Twice the steps: on Fashion-MNIST at 48 px, 87.9% linear and 84.1% kNN top-1 on average
        over three 10-minute runs, against 87.85% and 83.8% over three at 256; level within noise, with
        half the activation memory (README, Quality)."""
        if self.batch_size is not None:
            return self.batch_size
        return SMALL_CPU_BATCH_SIZE if self.augment.small and device_type == "cpu" else BATCH_SIZE

    def resolved_augment(self, device_type: str) -> AugmentConfig:
        """The views with every default decided. Small images on a CPU, where budgets are short, crop from
        60% with jitter 1.0: with batch 128 on Fashion-MNIST at 48 px, three 10-minute runs gave 85.1%
        kNN top-1 and 88.0% linear on average, against 84.1% and 87.9% over three with crops from 20%
        and jitter 0.5 (README, Quality). Elsewhere AugmentConfig's defaults by image size."""
        aug = self.augment
        if aug.small and device_type == "cpu":
            aug = replace(aug, crop_min_scale=SMALL_CPU_CROP_MIN_SCALE if aug.crop_min_scale is None
                          else aug.crop_min_scale, jitter=SMALL_CPU_JITTER if aug.jitter is None else aug.jitter)
        return aug.decided()

    @property
    def resolved_lr(self) -> float:
        """--lr, or the paper's rules for LARS (SimCLR Appendix B.1): sqrt, 0.075 x sqrt(batch), which
        it finds better at small batches and short runs; linear, 0.3 x batch / 256 (section 2.3). Both
        give 4.8 at batch 4096; at 256, 1.2 and 0.3. SGD reuses LARS's rules (the paper gives none of
        its own). AdamW: 1e-3 at 256, scaled the same way."""
        if self.lr is not None:
            return self.lr
        ratio = self.batch_size / 256  # resolved first (resolved_batch_size): the rule needs the real batch
        scale = ratio ** 0.5 if self.lr_scaling == "sqrt" else ratio
        if self.optimizer == "adamw":
            return 1e-3 * scale
        if self.lr_scaling == "sqrt":
            return 1.2 * scale  # 1.2 x sqrt(batch/256) = 0.075 x sqrt(batch)
        return (0.3 if self.lr_per_256 is None else self.lr_per_256) * scale

    @property
    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 0.05 if self.optimizer == "adamw" else 1e-6

    def with_absolute_paths(self) -> "PretrainConfig":
        """The folders as absolute paths, for config.json: a run resumes from any working directory."""
        return replace(self, data_dir=os.path.abspath(self.data_dir),
                       monitor=self.monitor and os.path.abspath(self.monitor),
                       cache_dir=self.cache_dir and os.path.abspath(self.cache_dir))

    def validate(self) -> "PretrainConfig":
        _check_finite(self)
        check_paths(self)
        _check(1 <= self.epochs <= MAX_EPOCHS, f"--epochs {self.epochs} must be 1 to {MAX_EPOCHS}")
        _check(self.batch_size is None or self.batch_size >= 2,
               f"--batch-size {self.batch_size} must be at least 2 (SimCLR needs negatives)")
        check_sizes(self.batch_size)
        _check(self.arch in ARCHITECTURES,
               f"--arch {self.arch!r} is unknown; choose one of {', '.join(ARCHITECTURES)}")
        _check(self.stem in STEMS, f"--stem {self.stem!r} is not one of {', '.join(STEMS)}")
        _check(0.125 <= self.width <= 4, f"--width {self.width} is out of range; use 0.125 to 4 (1 is the "
                                         f"standard ResNet, 2 and 3 SimCLRv2's wide ones)")
        _check(self.proj_layers in (2, 3), f"--proj-layers {self.proj_layers} must be 2 (SimCLR) or 3 (SimCLRv2)")
        _check(1 <= self.proj_dim <= MAX_PROJ_DIM,
               f"--proj-dim {self.proj_dim} is out of range; use 1 to {MAX_PROJ_DIM} (the paper uses 128)")
        _check(0.01 <= self.temperature <= 10,
               f"--temperature {self.temperature} is out of range; use 0.01 to 10 (the paper uses 0.1 to 0.5)")
        _check(self.optimizer in OPTIMIZERS, f"--optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        _check(self.lr is None or 0 < self.lr <= MAX_RATE, f"--lr {self.lr} must be positive, at most {MAX_RATE:g}")
        _check(self.lr_per_256 is None or 0 < self.lr_per_256 <= MAX_RATE,
               f"{_setting('lr_per_256')} {self.lr_per_256} must be positive, at most {MAX_RATE:g}")
        _check(self.max_time is None or self.max_time > 0,
               f"--max-time {self.max_time} must be longer than zero; use e.g. 10m (or leave it out)")
        _check(self.lr_scaling in LR_SCALINGS, f"--lr-scaling {self.lr_scaling!r} is not one of "
                                               f"{', '.join(LR_SCALINGS)}")
        _check(self.weight_decay is None or self.weight_decay >= 0, f"--weight-decay {self.weight_decay} must be >= 0")
        _check(self.warmup_epochs >= 0, f"--warmup-epochs {self.warmup_epochs} must be >= 0")
        _check(self.devices >= 1, f"--devices {self.devices} must be at least 1")
        check_sizes(devices=self.devices)
        _check(self.chunk_size is None or 1 <= self.chunk_size <= MAX_BATCH_SIZE,
               f"--chunk-size {self.chunk_size} must be 1 to {MAX_BATCH_SIZE} images (or leave it out)")
        _check(self.augment_on in AUGMENT_ON,
               f"--augment-on {self.augment_on!r} is not one of {', '.join(AUGMENT_ON)}")
        _check(self.cache or self.cache_dir is None, "--cache-dir needs --cache; add --cache or leave --cache-dir out")
        _check(self.cache_dir is None or not any(p.exists() and not p.is_dir()
                                                 for p in (Path(self.cache_dir), *Path(self.cache_dir).parents)),
               f"--cache-dir {self.cache_dir}: it, or a folder on its path, is a file; pass a folder for the "
               f"decoded cache")
        _check(self.monitor is None or Path(self.monitor).is_dir(),
               f"--monitor {self.monitor}: no such folder; pass a small folder of labelled images, one "
               f"subfolder per class")
        self.augment.validate()
        self.runtime.validate()
        return self

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "PretrainConfig":
        data = dict(data)
        data.setdefault("augment_on", "per-image")  # runs started before the batched pipeline resume on theirs
        data.setdefault("lr_scaling", "linear")  # and runs from before --lr-scaling with the rule they started on
        data.setdefault("zero_init_residual", False)  # and runs from before the flag with unit BatchNorm scales
        data.setdefault("proj_out_bn", False)  # and runs from before --proj-out-bn with a plain output layer
        # Runs saved before the views were decided at the start resume with the size defaults they began on.
        data["augment"] = AugmentConfig(**data.get("augment", {})).decided()
        data["runtime"] = RuntimeConfig(**data.get("runtime", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in data.items() if k in known})
        check_saved_types(config)
        return config


def replace(config: Any, **changes: Any) -> Any:
    """dataclasses.replace, re-exported so callers need one import."""
    return dataclasses.replace(config, **changes)


def default_run_dir(kind: str) -> Path:
    """A new timestamped folder under runs/ for a command that was given no --out."""
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / f"{kind}-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path("runs") / f"{kind}-{stamp}-{suffix}"
    return path


@dataclass(frozen=True)
class LabelledDataConfig:
    """Labelled images for linear-eval and finetune: class subfolders or a CSV, and a validation set."""

    train_dir: str
    labels_csv: str | None = None
    val_dir: str | None = None
    val_split: float | None = None  # None: 0.2 of TRAIN when no --val

    def validate(self) -> None:
        _check(self.val_split is None or 0 < self.val_split < 1,
               f"--val-split {self.val_split} must be between 0 and 1 (exclusive), e.g. 0.2")
        _check(self.val_dir is None or self.val_split is None,
               "--val and --val-split both given; use one of them")


@dataclass(frozen=True)
class LinearEvalConfig:
    """Everything `simclr linear-eval` needs; saved in linear_eval.json."""

    model: str
    data: LabelledDataConfig
    out_dir: str
    l2: float | None = None  # None: chosen on a held-out split of the training set
    batch_size: int = 256  # images per feature batch
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self) -> "LinearEvalConfig":
        _check_finite(self)
        check_paths(self)
        _check(self.l2 is None or 0 <= self.l2 <= MAX_RATE,
               f"--l2 {self.l2} must be 0 to {MAX_RATE:g} (or leave it out to search)")
        _check(self.batch_size >= 1, f"--batch-size {self.batch_size} must be at least 1")
        check_sizes(self.batch_size)
        self.data.validate()
        self.runtime.validate()
        return self

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything `simclr finetune` needs; saved as config.json in the run folder."""

    model: str
    data: LabelledDataConfig
    out_dir: str
    label_fraction: float = 1.0
    from_head_layer: int = 0  # 1: start from the first projection-head layer (SimCLRv2)
    epochs: int = 30
    batch_size: int = 256
    lr: float | None = None  # None: 0.05 x batch / 256
    weight_decay: float = 0.0  # the papers fine-tune without weight decay
    crop_min_scale: float | None = None  # None: 0.08, or 0.5 for encoders trained at <= 64 px
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else 0.05 * self.batch_size / 256

    def resolved_crop_min_scale(self, image_size: int) -> float:
        """The paper's 0.08 for ImageNet-sized images; small images lose their content in such crops
        (on the digits, 0.08 gave 64% top-1 after 4 epochs where 0.5 gave 90%)."""
        if self.crop_min_scale is not None:
            return self.crop_min_scale
        return 0.5 if image_size <= SMALL_IMAGE_MAX else 0.08

    def with_absolute_paths(self) -> "FinetuneConfig":
        """The model and data paths as absolute ones, for config.json and split.json: a run resumes from any
        working directory."""
        data = self.data
        data = replace(data, train_dir=os.path.abspath(data.train_dir),
                       labels_csv=data.labels_csv and os.path.abspath(data.labels_csv),
                       val_dir=data.val_dir and os.path.abspath(data.val_dir))
        return replace(self, model=os.path.abspath(self.model), data=data)

    def validate(self) -> "FinetuneConfig":
        _check_finite(self)
        check_paths(self)
        _check(0 < self.label_fraction <= 1,
               f"--label-fraction {self.label_fraction} must be in (0, 1]; the papers use 0.01, 0.1 or 1.0")
        _check(self.from_head_layer in (0, 1),
               f"--from-head-layer {self.from_head_layer} must be 0 (the encoder) or 1 (SimCLRv2)")
        _check(1 <= self.epochs <= MAX_EPOCHS, f"--epochs {self.epochs} must be 1 to {MAX_EPOCHS}")
        _check(self.batch_size >= 2, f"--batch-size {self.batch_size} must be at least 2 (BatchNorm needs it)")
        check_sizes(self.batch_size)
        _check(self.lr is None or 0 < self.lr <= MAX_RATE, f"--lr {self.lr} must be positive, at most {MAX_RATE:g}")
        _check(self.weight_decay >= 0, f"--weight-decay {self.weight_decay} must be >= 0")
        _check(self.crop_min_scale is None or 0 < self.crop_min_scale <= 1,
               f"--crop-min-scale {self.crop_min_scale} must be in (0, 1]")
        self.data.validate()
        self.runtime.validate()
        return self

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "FinetuneConfig":
        data = dict(data)
        data["data"] = LabelledDataConfig(**data["data"])
        data["runtime"] = RuntimeConfig(**data.get("runtime", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        config = cls(**{k: v for k, v in data.items() if k in known})
        check_saved_types(config)
        return config


# -- presets: the papers' recipes by name (`simclr pretrain --preset NAME`) ------------------------------

# Values by `simclr pretrain` parameter name; every flag the user gives overrides its preset value. Both
# start every residual block as its shortcut, as google-research/simclr's ResNet does (init_zero=True),
# and end the projection head with BatchNorm, as its `projection_head` does. `lr_per_256` is not a
# parameter: the papers' learning rates are per 256 images (google-research/simclr multiplies its
# --learning_rate by batch/256), so a preset's lr is lr_per_256 x batch / 256 for the batch that trains (a
# folder smaller than the batch trains in a smaller one), unless --lr is given or --lr-scaling sqrt.
PRESETS: dict[str, dict[str, Any]] = {
    # SimCLR (arXiv 2002.05709) section 2.3, "Default setting", the ImageNet recipe: ResNet-50, batch 4096,
    # LARS at 0.3 x batch/256 (4.8 at 4096; lr None with the linear rule, which is 0.3 per 256), weight decay
    # 1e-6, temperature 0.1, 100 epochs with 10 of linear warmup, 224 px, Appendix A's views.
    "imagenet": {"arch": "resnet50", "stem": "imagenet", "image_size": 224, "batch_size": 4096, "optimizer": "lars",
                 "lr_per_256": None, "lr_scaling": "linear", "weight_decay": 1e-6, "temperature": 0.1,
                 "epochs": 100, "warmup_epochs": 10.0, "proj_layers": 2, "proj_out_bn": True,
                 "zero_init_residual": True, "crop_min_scale": 0.08, "jitter": 1.0, "blur": True},
    # SimCLR Appendix B.9, CIFAR-10: ResNet-50 with a 3x3 stride-1 first convolution and no max-pool,
    # 32 px, colour jitter 0.5 and no blur, batch 1024, LARS at 1.0 x batch/256 = 4.0 (1.0 is the middle
    # of the 0.5/1.0/1.5 the appendix sweeps), temperature 0.5, weight decay 1e-6 ("the rest of the settings
    # are the same as our ImageNet training"); 1000 epochs, lr 1.0 per 256 and temperature 0.5 as in
    # google-research/simclr's published CIFAR-10 command (batch 512: 2.0).
    "cifar": {"arch": "resnet50", "stem": "cifar", "image_size": 32, "batch_size": 1024, "optimizer": "lars",
              "lr_per_256": 1.0, "lr_scaling": "linear", "weight_decay": 1e-6, "temperature": 0.5, "epochs": 1000,
              "warmup_epochs": 10.0, "proj_layers": 2, "proj_out_bn": True, "zero_init_residual": True,
              "crop_min_scale": 0.08, "jitter": 0.5, "blur": False},
}


def apply_preset(config: PretrainConfig, name: str, given: set[str] | frozenset[str] = frozenset()) -> PretrainConfig:
    """`config` with preset `name`'s values, except those whose flags are in `given` (parameter names)."""
    _check(name in PRESETS, f"--preset {name!r} is unknown; choose one of {', '.join(PRESETS)}")
    values = {key: value for key, value in PRESETS[name].items() if key not in given}
    lr_per_256 = values.pop("lr_per_256")
    if "optimizer" in given and config.optimizer != PRESETS[name]["optimizer"]:  # the rate and decay are LARS's
        values.pop("weight_decay", None)
    elif "lr" not in given and values.get("lr_scaling", config.lr_scaling) == "linear":
        values["lr_per_256"] = lr_per_256  # resolved_lr: x batch / 256, once the batch that trains is known
    augment_fields = {f.name for f in dataclasses.fields(AugmentConfig)}
    augment = {key: values.pop(key) for key in list(values) if key in augment_fields}
    return replace(config, **values, augment=replace(config.augment, **augment))

import math
import re

import pytest

from simclr_cli.config import (AugmentConfig, FinetuneConfig, LabelledDataConfig, LinearEvalConfig, PretrainConfig,
                               RuntimeConfig, parse_duration, replace)
from simclr_cli.embed import EmbedConfig
from simclr_cli.errors import ConfigError


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("10m", 600), ("2h", 7200), ("1h30m", 5400),
                                          ("45", 45), ("1.5m", 90)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten minutes", "10x", "0s", "-5m"])
def test_bad_durations_name_the_flag(text):
    with pytest.raises(ConfigError, match="--max-time"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["1h30", "2h5", "1m30", "1h30m20"])
def test_a_number_after_a_unit_needs_its_own(text):
    """'1h30' was read as 1 hour 30 seconds; 90 minutes is what it most likely meant."""
    with pytest.raises(ConfigError, match=re.escape(f"--max-time {text!r} leaves the unit of its last number out")):
        parse_duration(text)


@pytest.mark.parametrize("change,flag", [
    ({"arch": "vgg"}, "--arch"), ({"batch_size": 1}, "--batch-size"), ({"optimizer": "rmsprop"}, "--optimizer"),
    ({"proj_layers": 4}, "--proj-layers"), ({"temperature": 0.0}, "--temperature"), ({"epochs": 0}, "--epochs"),
    ({"augment": AugmentConfig(image_size=4)}, "--image-size"),
    ({"augment": AugmentConfig(crop_min_scale=1.5)}, "--crop-min-scale"), ({"stem": "vit"}, "--stem"),
    ({"width": 0}, "--width"), ({"width": 8}, "--width"), ({"lr_scaling": "cubic"}, "--lr-scaling"),
])
def test_validation_names_the_flag(change, flag):
    with pytest.raises(ConfigError, match=flag):
        PretrainConfig(data_dir=".", out_dir="x", **change).validate()


@pytest.mark.parametrize("seed", [-1, 2**63, 99999999999999999999999])
@pytest.mark.parametrize("command", [
    lambda runtime: PretrainConfig(data_dir=".", out_dir="x", runtime=runtime),
    lambda runtime: LinearEvalConfig(model="m", data=LabelledDataConfig("."), out_dir="x", runtime=runtime),
    lambda runtime: FinetuneConfig(model="m", data=LabelledDataConfig("."), out_dir="x", runtime=runtime),
], ids=["pretrain", "linear-eval", "finetune"])
def test_a_seed_numpy_and_torch_cannot_take_names_the_flag(command, seed):
    """numpy's generators refuse a negative seed, torch.manual_seed one of 2**64 or more: a traceback mid-run."""
    with pytest.raises(ConfigError, match=f"--seed {seed} is out of range; use 0 to {2**63 - 1}"):
        command(RuntimeConfig(seed=seed)).validate()
    command(RuntimeConfig(seed=2**63 - 1)).validate()


def _pretrain(**changes):
    return PretrainConfig(data_dir=".", out_dir="x", **changes)


def _linear_eval(**changes):
    return LinearEvalConfig(model="m", data=LabelledDataConfig("."), out_dir="x", **changes)


def _finetune(**changes):
    return FinetuneConfig(model="m", data=LabelledDataConfig("."), out_dir="x", **changes)


def _embed(**changes):
    from simclr_cli.embed import EmbedConfig

    return EmbedConfig(model="m", images=".", out="x.npy", **changes)


HUGE = 99999999999999999999


@pytest.mark.parametrize("config,message", [
    (lambda: _pretrain(batch_size=HUGE), f"--batch-size {HUGE} is too large; use at most 1048576"),
    (lambda: _pretrain(chunk_size=HUGE), f"--chunk-size {HUGE} must be 1 to 1048576"),
    (lambda: _pretrain(proj_dim=100000000000), "--proj-dim 100000000000 is out of range; use 1 to 65536"),
    (lambda: _pretrain(devices=HUGE), f"--devices {HUGE} is too many; use at most 1024"),
    (lambda: _pretrain(runtime=RuntimeConfig(workers=HUGE)), f"--workers {HUGE} is too many; use at most 1024"),
    (lambda: _linear_eval(batch_size=HUGE), f"--batch-size {HUGE} is too large"),
    (lambda: _finetune(batch_size=HUGE), f"--batch-size {HUGE} is too large"),
    (lambda: _embed(batch_size=HUGE), f"--batch-size {HUGE} is too large"),
    (lambda: _embed(workers=HUGE), f"--workers {HUGE} is too many"),
    (lambda: _embed(devices=HUGE), f"--devices {HUGE} is too many"),
    (lambda: _pretrain(epochs=10**400), "--epochs 1000000000000"),  # a float overflowed mid-run
    (lambda: _pretrain(epochs=10**7), "--epochs 10000000 must be 1 to 1000000"),
    (lambda: _finetune(epochs=10**7), "--epochs 10000000 must be 1 to 1000000"),
    (lambda: _pretrain(warmup_epochs=10**400), "--warmup-epochs 1000000000000"),
    (lambda: _pretrain(lr=1e39), "--lr 1e+39 must be positive, at most 1e+30"),  # over float32's largest
    (lambda: _finetune(lr=1e39), "--lr 1e+39 must be positive, at most 1e+30"),
    (lambda: _linear_eval(l2=1e308), "--l2 1e+308 must be 0 to 1e+30"),
    (lambda: _pretrain(lr_per_256=-1.0), "lr_per_256 (in config.json) -1.0 must be positive"),  # no flag sets it
    (lambda: _pretrain(lr_per_256=math.nan), "lr_per_256 (in config.json) nan must be a finite number"),
    (lambda: _pretrain(max_time=-5.0), "--max-time -5.0 must be longer than zero"),
    (lambda: _pretrain(max_time=0.0), "--max-time 0.0 must be longer than zero"),
], ids=["pretrain-batch", "chunk", "proj-dim", "pretrain-devices", "workers", "linear-eval-batch", "finetune-batch",
        "embed-batch", "embed-workers", "embed-devices", "epochs-overflow", "epochs", "finetune-epochs",
        "warmup-overflow", "lr", "finetune-lr", "l2", "lr-per-256", "lr-per-256-nan", "max-time", "max-time-0"])
def test_sizes_past_any_real_use_name_the_flag(config, message):
    """islice refuses a batch over sys.maxsize, and a 10**11-wide head fails to allocate, both mid-run."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        config().validate()


def test_the_largest_sizes_in_real_use_are_accepted():
    _pretrain(batch_size=65536, chunk_size=65536, proj_dim=8192, devices=64, epochs=3200, lr=100.0, lr_per_256=10.0,
              max_time=7 * 86400.0, runtime=RuntimeConfig(workers=64)).validate()
    _linear_eval(l2=1e3).validate()
    _finetune(batch_size=65536).validate()
    _linear_eval(batch_size=65536).validate()
    _embed(batch_size=65536, workers=64, devices=8).validate()


def test_small_images_default_to_cifar_stem_on_accelerators_only_and_config_round_trips():
    config = PretrainConfig(data_dir=".", out_dir="x", augment=AugmentConfig(image_size=32))
    assert config.resolved_stem("cuda") == "cifar" and config.resolved_stem("cpu") == "imagenet"
    assert PretrainConfig(data_dir=".", out_dir="x").resolved_stem("cuda") == "imagenet"  # 224 px
    assert replace(config, stem="cifar").resolved_stem("cpu") == "cifar"
    resolved = replace(config, stem="imagenet", augment=config.resolved_augment("cpu"))
    assert PretrainConfig.from_json(resolved.to_json()) == resolved


def test_default_batch_is_128_for_small_images_on_a_cpu_only_and_the_lr_follows_it():
    small = PretrainConfig(data_dir=".", out_dir="x", augment=AugmentConfig(image_size=48))
    assert (small.resolved_batch_size("cpu"), small.resolved_batch_size("cuda")) == (128, 256)
    assert PretrainConfig(data_dir=".", out_dir="x").resolved_batch_size("cpu") == 256  # 224 px
    assert replace(small, batch_size=64).resolved_batch_size("cpu") == 64
    resolved = replace(small, batch_size=small.resolved_batch_size("cpu"))
    assert resolved.resolved_lr == pytest.approx(0.075 * 128 ** 0.5)  # the sqrt rule at the resolved batch
    assert small.validate() is small


def test_small_images_on_a_cpu_crop_from_60_percent_with_full_jitter_and_old_runs_keep_their_views():
    def views(config: PretrainConfig, device: str) -> tuple[float | None, float | None, bool | None]:
        aug = config.resolved_augment(device)
        return aug.crop_min_scale, aug.jitter, aug.blur

    small = PretrainConfig(data_dir=".", out_dir="x", augment=AugmentConfig(image_size=48))
    assert views(small, "cpu") == (0.6, 1.0, False)
    assert views(small, "cuda") == (0.2, 0.5, False)  # the CIFAR-sized recipe on accelerators
    assert views(PretrainConfig(data_dir=".", out_dir="x"), "cpu") == (0.08, 1.0, True)  # 224 px: the paper's
    explicit = replace(small, augment=AugmentConfig(image_size=48, crop_min_scale=0.3, jitter=0.25, blur=True))
    assert views(explicit, "cpu") == (0.3, 0.25, True)
    # A config.json saved before the views were decided at the start holds None: it resumes as it began.
    saved = small.to_json()
    assert saved["augment"]["crop_min_scale"] is None
    assert views(PretrainConfig.from_json(saved), "cpu") == (0.2, 0.5, False)


@pytest.mark.parametrize("field", ["zero_init_residual", "proj_out_bn"])
def test_reference_model_choices_are_on_by_default_and_old_runs_resume_without(field):
    """Residual blocks starting as their shortcuts, and the head's last BatchNorm: on in new runs; a
    config.json written before the flag existed resumes as its run started, without."""
    config = PretrainConfig(data_dir=".", out_dir="x")
    assert getattr(config, field)
    saved = config.to_json()
    assert getattr(PretrainConfig.from_json(saved), field)
    del saved[field]
    assert not getattr(PretrainConfig.from_json(saved), field)


def test_finetune_crops_are_gentler_for_small_images():
    from simclr_cli.config import FinetuneConfig, LabelledDataConfig

    config = FinetuneConfig(model="m", data=LabelledDataConfig(train_dir="t"), out_dir="o")
    assert config.resolved_crop_min_scale(32) == 0.5
    assert config.resolved_crop_min_scale(224) == 0.08
    assert FinetuneConfig(model="m", data=LabelledDataConfig(train_dir="t"), out_dir="o",
                          crop_min_scale=0.2).resolved_crop_min_scale(32) == 0.2


def test_the_cli_starts_without_importing_torch():
    import subprocess
    import sys

    code = "import sys, simclr_cli.cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False", "`simclr --help` must not pay for importing torch"


@pytest.mark.parametrize("has_bf16", [True, False])
def test_auto_precision_is_bf16_only_on_cpus_that_compute_it(monkeypatch, has_bf16):
    import torch

    from simclr_cli import runtime

    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: has_bf16)
    precision = runtime.resolve_precision("auto", torch.device("cpu"))
    assert precision.dtype == (torch.bfloat16 if has_bf16 else torch.float32)
    assert runtime.resolve_precision("fp32", torch.device("cpu")).dtype == torch.float32
    with precision.autocast():
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == precision.dtype


def test_cpu_bf16_check_agrees_with_the_cpu_flags():
    from pathlib import Path

    from simclr_cli.runtime import cpu_has_bf16

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to compare with")
    flags = set(cpuinfo.read_text().split())
    assert cpu_has_bf16() == bool(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})


@pytest.mark.parametrize("make, flag", [
    (lambda: PretrainConfig(data_dir="", out_dir="run"), "DATA_DIR"),
    (lambda: PretrainConfig(data_dir="photos", out_dir=" "), "--out"),
    (lambda: FinetuneConfig(model="m", data=LabelledDataConfig(""), out_dir="run"), "TRAIN"),
    (lambda: LinearEvalConfig(model="", data=LabelledDataConfig("train"), out_dir="run"), "MODEL"),
    (lambda: EmbedConfig(model="m", images="", out="out.npy"), "IMAGES"),
])
def test_an_empty_path_is_refused_by_the_engine_too(make, flag):
    """Path("") is the working folder: a script with an unset variable trained on whatever was there."""
    with pytest.raises(ConfigError, match=f"^{flag} is empty; pass a file or folder$"):
        make().validate()


def test_an_empty_optional_path_is_off_as_it_always_was():
    """A run started through the API with monitor="" could not be resumed once empty paths were refused."""
    assert PretrainConfig(data_dir="photos", out_dir="run", monitor="").validate().monitor == ""


def test_a_bare_command_prints_the_help_and_usage_errors_point_to_their_commands_help():
    """A bare `simclr` printed its whole help as an `error:` line with exit 1; an option missing its value pointed
    to the top-level help (its command had no context yet)."""
    import subprocess
    import sys

    bare = subprocess.run([sys.executable, "-m", "simclr_cli"], capture_output=True, text=True)
    assert bare.returncode == 0 and bare.stdout.startswith("Usage:") and "pretrain" in bare.stdout, bare
    assert bare.stderr == ""
    missing = subprocess.run([sys.executable, "-m", "simclr_cli", "pretrain", "x", "--epochs"], capture_output=True,
                             text=True)
    assert missing.returncode == 1 and missing.stderr.strip() == (
        "error: Option '--epochs' requires an argument. (see `simclr pretrain --help`)")

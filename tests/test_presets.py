"""`simclr pretrain --preset imagenet|cifar`: the papers' settings by name, every given flag overriding them."""

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from simclr_cli import cli
from simclr_cli.cli import app
from simclr_cli.config import PRESETS, PretrainConfig, apply_preset
from simclr_cli.errors import ConfigError

runner = CliRunner()


def _config_from_cli(monkeypatch, tmp_path, folder, *flags: str) -> PretrainConfig:
    """The PretrainConfig that `simclr pretrain FOLDER *flags` hands to the engine (which is not run)."""
    handed = []
    monkeypatch.setattr(cli, "_pretrain_process", lambda config, resume, quiet: handed.append(config))
    result = runner.invoke(app, ["pretrain", str(folder), "--out", str(tmp_path / "run"), *flags])
    assert result.exit_code == 0, result.output
    assert len(handed) == 1
    return handed[0]


def test_imagenet_preset_is_the_papers_default_setting():
    config = apply_preset(PretrainConfig(data_dir="x", out_dir="y"), "imagenet").validate()
    assert (config.arch, config.resolved_stem("cpu"), config.augment.image_size) == ("resnet50", "imagenet", 224)
    assert (config.batch_size, config.optimizer, config.epochs, config.warmup_epochs) == (4096, "lars", 100, 10)
    assert config.resolved_lr == pytest.approx(4.8)  # 0.3 x 4096 / 256
    assert config.temperature == 0.1 and config.resolved_weight_decay == 1e-6
    assert config.augment.jitter_strength == 1.0 and config.augment.use_blur
    assert config.zero_init_residual, "google-research/simclr's ResNet zeroes each block's last BatchNorm"
    assert config.proj_out_bn, "and its projection head ends with BatchNorm"


def test_cifar_preset_is_appendix_b9():
    config = apply_preset(PretrainConfig(data_dir="x", out_dir="y"), "cifar").validate()
    assert (config.arch, config.resolved_stem("cpu"), config.augment.image_size) == ("resnet50", "cifar", 32)
    # The appendix's lr 1.0 is per 256 images, as google-research/simclr's --learning_rate: x batch/256
    assert (config.batch_size, config.optimizer, config.resolved_lr, config.temperature) == (1024, "lars", 4.0, 0.5)
    assert config.augment.jitter_strength == 0.5 and not config.augment.use_blur
    google = apply_preset(PretrainConfig(data_dir="x", out_dir="y", batch_size=512), "cifar", {"batch_size"})
    assert google.resolved_lr == 2.0, "its published CIFAR-10 command: batch 512, --learning_rate 1.0, linear"
    given = apply_preset(PretrainConfig(data_dir="x", out_dir="y", lr=0.5), "cifar", {"lr"})
    assert given.resolved_lr == 0.5, "--lr wins"


def test_a_presets_rate_follows_the_batch_that_trains():
    """A folder of 200 images trains --preset cifar in batches of 200 (PretrainRun lowers the batch): at
    1.0 x 200/256, not at the 4.0 of the preset's 1,024. config.json keeps the rule for --resume."""
    config = apply_preset(PretrainConfig(data_dir="x", out_dir="y"), "cifar")
    small = dataclasses.replace(config, batch_size=200)
    assert small.resolved_lr == pytest.approx(200 / 256)
    assert PretrainConfig.from_json(json.loads(json.dumps(small.to_json()))).resolved_lr == pytest.approx(200 / 256)
    sqrt = apply_preset(PretrainConfig(data_dir="x", out_dir="y", lr_scaling="sqrt"), "cifar", {"lr_scaling"})
    assert sqrt.resolved_lr == pytest.approx(1.2 * 2), "--lr-scaling sqrt: the sqrt rule, 1.2 x sqrt(1024/256)"
    linear = apply_preset(PretrainConfig(data_dir="x", out_dir="y", lr_scaling="linear"), "cifar", {"lr_scaling"})
    assert linear.resolved_lr == pytest.approx(4.0), "--lr-scaling linear: the preset's rate per 256"


def test_given_flags_override_the_preset_and_nothing_else_changes():
    base = PretrainConfig(data_dir="x", out_dir="y", batch_size=512, temperature=0.2, epochs=7)
    config = apply_preset(base, "imagenet", {"batch_size", "temperature"})
    assert (config.batch_size, config.temperature, config.epochs) == (512, 0.2, 100)
    assert config.resolved_lr == pytest.approx(0.6), "the paper's rule, 0.3 x batch/256, follows the given batch"
    assert apply_preset(base, "imagenet").lr_scaling == "linear", "not the CLI's sqrt default"
    assert (config.data_dir, config.out_dir) == ("x", "y")
    assert set(PRESETS["imagenet"]) == set(PRESETS["cifar"]), "both presets set the same things"


def test_another_optimizer_keeps_its_own_lr_and_weight_decay_not_the_presets_lars_ones():
    base = PretrainConfig(data_dir="x", out_dir="y", optimizer="adamw")
    for name in PRESETS:
        config = apply_preset(base, name, {"optimizer"})
        assert config.optimizer == "adamw" and config.lr is None and config.weight_decay is None
        assert config.resolved_weight_decay == 0.05 and config.resolved_lr == pytest.approx(
            1e-3 * config.batch_size / 256), "AdamW's defaults, by the preset's linear rule"


def test_naming_the_presets_own_optimizer_changes_nothing():
    """Any --optimizer counted as another one: `--preset cifar --optimizer lars` trained at 1.2, not 4.0."""
    base = PretrainConfig(data_dir="x", out_dir="y", optimizer="lars")
    for name in PRESETS:
        assert apply_preset(base, name, {"optimizer"}) == apply_preset(base, name)
    assert apply_preset(base, "cifar", {"optimizer"}).resolved_lr == pytest.approx(4.0)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"--preset 'resnet' is unknown; choose one of imagenet, cifar"):
        apply_preset(PretrainConfig(data_dir="x", out_dir="y"), "resnet")


def test_cli_preset_with_flags_that_override_it(monkeypatch, tmp_path, small_digits_folder):
    # --epochs 100 is the command's default value: given explicitly, it still beats the preset's 1000.
    config = _config_from_cli(monkeypatch, tmp_path, small_digits_folder, "--preset", "cifar", "--epochs", "100",
                              "--batch-size", "256", "--lr", "0.5", "--arch", "resnet18")
    assert (config.epochs, config.batch_size, config.lr, config.arch) == (100, 256, 0.5, "resnet18")
    assert (config.temperature, config.augment.image_size, config.resolved_stem("cpu")) == (0.5, 32, "cifar")
    assert config.zero_init_residual and config.proj_out_bn
    config = _config_from_cli(monkeypatch, tmp_path, small_digits_folder, "--preset", "cifar",
                              "--no-zero-init-residual", "--no-proj-out-bn")
    assert not config.zero_init_residual, "--no-zero-init-residual beats the preset"
    assert not config.proj_out_bn, "--no-proj-out-bn beats the preset"


def test_cli_without_preset_keeps_the_defaults(monkeypatch, tmp_path, small_digits_folder):
    config = _config_from_cli(monkeypatch, tmp_path, small_digits_folder, "--image-size", "32")
    assert (config.arch, config.temperature, config.epochs) == ("resnet50", 0.1, 100)
    assert config.zero_init_residual, "on by default, as in SimCLR's reference ResNet"
    assert config.proj_out_bn, "on by default, as in SimCLR's reference head"
    without = _config_from_cli(monkeypatch, tmp_path, small_digits_folder, "--no-zero-init-residual",
                               "--no-proj-out-bn")
    assert not without.zero_init_residual and not without.proj_out_bn
    assert config.batch_size is None, "left to the engine, which knows the device"
    assert (config.resolved_batch_size("cpu"), config.resolved_batch_size("cuda")) == (128, 256)


def test_cli_unknown_preset_is_one_line_and_exit_1(tmp_path, small_digits_folder):
    result = runner.invoke(app, ["pretrain", str(small_digits_folder), "--out", str(tmp_path / "run"),
                                 "--preset", "imagenet21k"])
    assert result.exit_code == 1, result.output
    assert "--preset 'imagenet21k' is unknown; choose one of imagenet, cifar" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()

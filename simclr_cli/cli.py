"""The `simclr` command line: options -> config -> engine call -> rich output. Typer only."""

from __future__ import annotations

import contextlib
import functools
import inspect
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from typer.core import TyperGroup

from simclr_cli import __version__
from simclr_cli.config import (ARCHITECTURES, OPTIMIZERS, PRECISIONS, PRESETS, STEMS, AugmentConfig, PretrainConfig,
                               RuntimeConfig, apply_preset, check_sizes, default_run_dir, parse_duration)
from simclr_cli.errors import ConfigError, Interrupted, SimclrError, WorkerDied, os_error_message
from simclr_cli.files import resume_command
from simclr_cli.progress import Reporter, console, err_console, labelled


# Typer 0.29 vendors click, older releases use click itself: find click's UsageError through typer.
_UsageError = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "UsageError")


class _Group(TyperGroup):
    """Turns every usage error into one line and exit code 1 (click's default is a box and 2)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            result = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                  standalone_mode=False, **extra)
        except _UsageError as error:
            if type(error).__name__ == "NoArgsIsHelpError":  # a bare `simclr`: the help, as --help prints it
                typer.echo(error.format_message())
                sys.exit(0)
            # An option's missing value fails before its command has a context: the command is the first word.
            first = (sys.argv[1:] if args is None else list(args))[:1]
            command = error.ctx.command_path if error.ctx else " ".join(["simclr", *set(first) & set(self.commands)])
            err_console.print(labelled("error:", "red", f"{error.format_message()} (see `{command} --help`)"))
            sys.exit(1)
        except typer.Abort:
            err_console.print("aborted")
            sys.exit(130)
        code = result if isinstance(result, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


def _path(value: str) -> Path:
    """Every path argument and option: "" (an unset shell variable, "$DATA") is refused, where Path("") would be the
    working folder: `simclr pretrain ""` trained on whatever was there."""
    if not value.strip():
        raise typer.BadParameter("is empty (an unset shell variable?); pass a file or folder")
    return Path(value)


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Train an image encoder on a folder of unlabeled images with SimCLR, then use it.")


def _fail_cleanly(command: Callable[..., Any]) -> Callable[..., Any]:
    """The one place where a SimclrError, an OSError no check foresaw (a folder this user cannot write, a full
    disk), or a dead loader worker, becomes a red line on stderr and exit code 1."""

    fewer = ("with fewer --workers " if "workers" in inspect.signature(command).parameters
             else "")  # `similar` has no --workers to lower

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except Interrupted as stop:  # --devices N: the processes saved their progress
            err_console.print(str(stop))
            raise typer.Exit(130) from None
        except KeyboardInterrupt:  # a second Ctrl-C or SIGTERM, or one where nothing is saved: typer says nothing
            err_console.print("stopped at once; whatever was saved before is kept (a pretrain, finetune or embed "
                              "that had saved progress continues from it with --resume)")
            raise typer.Exit(130) from None
        except SimclrError as error:
            err_console.print(labelled("error:", "red", str(error)))
            raise typer.Exit(1) from None
        except RuntimeError as error:  # a loader worker killed where no loop saves and says so (features, a monitor)
            how = WorkerDied.how(error)
            if how is None:
                raise
            then = (f"run the command again {fewer}(a pretrain, finetune or embed continues from what it saved "
                    f"with --resume)")
            err_console.print(labelled("error:", "red", str(WorkerDied.saying(how, then))))
            raise typer.Exit(1) from None
        except OSError as error:
            err_console.print(labelled("error:", "red", os_error_message(error)))
            raise typer.Exit(1) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        console.print(f"simclr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Train an image encoder on a folder of unlabeled images with SimCLR, then use it."""


# Options shared by several commands.
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps. auto picks a GPU when there is one.")]
WorkersOpt = Annotated[Optional[int], typer.Option(
    help="Image-loading processes. Default: one fewer than the CPU cores, at most 8.", show_default=False)]
SeedOpt = Annotated[int, typer.Option(help="Random seed: the same seed, data, CPU and thread count give the "
                                             "same run (unless less free memory shrinks the batch or chunk, "
                                             "said in a warning).")]
PrecisionOpt = Annotated[str, typer.Option(
    help=f"{', '.join(PRECISIONS)}. auto: bf16 on CUDA and on CPUs with bf16 instructions, fp32 elsewhere.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only warnings, errors and the result.")]


@app.command()
@_fail_cleanly
def pretrain(
    ctx: typer.Context,
    data_dir: Annotated[Optional[Path], typer.Argument(
        metavar="DATA_DIR", parser=_path, help="Folder of images, searched at every depth (optional with --resume).",
        show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option(
        parser=_path, help="Run folder for the encoder, checkpoint and logs. Default: runs/pretrain-<timestamp>.",
        show_default=False)] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the data (the run also ends at --max-time).")] = 100,
    batch_size: Annotated[Optional[int], typer.Option(
        help="Images per step; each gives two views. Default: 256, or 128 at <= 64 px on a CPU.",
        show_default=False)] = None,
    image_size: Annotated[int, typer.Option(help="Training resolution in pixels. <= 64 px uses the paper's "
                                                 "CIFAR settings.")] = 224,
    arch: Annotated[str, typer.Option(help=f"Encoder: {', '.join(ARCHITECTURES)}. resnet18 trains about twice "
                                           "as many images a minute as resnet50.")] = "resnet50",
    stem: Annotated[str, typer.Option(help=f"{', '.join(STEMS)}. auto: 3x3 'cifar' stem at <= 64 px on a GPU, "
                                                  f"'imagenet' on a CPU (13x faster there).")] = "auto",
    width: Annotated[float, typer.Option(help="Channel multiplier of the ResNet: 1 is the standard one, 2 and 3 "
                                              "SimCLRv2's wide ones, 0.5 about a quarter of the compute.")] = 1.0,
    zero_init_residual: Annotated[bool, typer.Option(
        "--zero-init-residual/--no-zero-init-residual",
        help="Start the last BatchNorm scale of every residual block at 0, so each block starts as its "
             "shortcut, as SimCLR's reference ResNet does; --no-zero-init-residual: torchvision's unit "
             "scales.")] = True,
    temperature: Annotated[float, typer.Option(help="NT-Xent temperature tau.")] = 0.1,
    lr: Annotated[Optional[float], typer.Option(
        help="Peak learning rate. Default: by --lr-scaling from the batch size.", show_default=False)] = None,
    lr_scaling: Annotated[str, typer.Option(
        help="The default --lr (LARS, SGD): sqrt, 0.075 x sqrt(batch) (1.2 at 256; the paper's choice for small "
             "batches and short runs), or linear, 0.3 x batch/256 (0.3 at 256); both 4.8 at 4096. AdamW: "
             "0.001 at 256, scaled alike.")] = "sqrt",
    optimizer: Annotated[str, typer.Option(help=f"{'|'.join(OPTIMIZERS)}. LARS as in the paper.")] = "lars",
    weight_decay: Annotated[Optional[float], typer.Option(
        help="Default: 1e-6 (LARS, SGD) or 0.05 (AdamW); never on biases and BatchNorm.",
        show_default=False)] = None,
    warmup_epochs: Annotated[float, typer.Option(help="Linear warmup, capped at 10% of the run.")] = 10.0,
    proj_layers: Annotated[int, typer.Option(help="Projection head depth: 2 (SimCLR) or 3 (SimCLRv2).")] = 2,
    proj_dim: Annotated[int, typer.Option(help="Projection (z) dimension.")] = 128,
    proj_out_bn: Annotated[bool, typer.Option(
        "--proj-out-bn/--no-proj-out-bn",
        help="BatchNorm (a learned scale, no shift) on the head's output z, as SimCLR's reference head; "
             "--no-proj-out-bn: a plain linear output layer with a bias.")] = True,
    crop_min_scale: Annotated[Optional[float], typer.Option(
        help="Smallest crop, as a fraction of the image area. Default: 0.08; at <= 64 px 0.2, or 0.6 on a CPU.",
        show_default=False)] = None,
    jitter: Annotated[Optional[float], typer.Option(
        help="Colour-jitter strength s. Default: 1.0, or 0.5 at <= 64 px on a GPU.", show_default=False)] = None,
    blur: Annotated[Optional[bool], typer.Option(
        "--blur/--no-blur", help="Gaussian blur. Default: on, off at <= 64 px.", show_default=False)] = None,
    max_time: Annotated[Optional[str], typer.Option(
        help="Time budget, e.g. 90s, 10m, 2h: the run ends within it, its schedule annealed.",
        show_default=False)] = None,
    resume: Annotated[Optional[Path], typer.Option(
        parser=_path, help="Continue the run in this folder from its checkpoint, with its saved settings.",
        show_default=False)] = None,
    devices: Annotated[int, typer.Option(
        help="Processes on this machine, one per GPU (or per CPU share with --device cpu); --batch-size is "
             "the global batch. Under torchrun, torchrun decides. Also applies to --resume.")] = 1,
    chunk_size: Annotated[Optional[int], typer.Option(
        help="Gradient caching: keep only this many images' activations in memory per device, with the "
             "whole batch's gradients. Default: the whole batch at once.", show_default=False)] = None,
    sync_bn: Annotated[Optional[bool], typer.Option(
        "--sync-bn/--no-sync-bn", help="BatchNorm statistics over all devices (SimCLR's global BN). "
                                       "Default: on with several GPUs.", show_default=False)] = None,
    augment_on: Annotated[str, typer.Option(
        help="Where views are made: device (crops in the loader, colour and blur in batches on the GPU), cpu "
             "(all in batches in the loader workers), per-image (torchvision, one image at a time), or auto "
             "(device on a GPU, else cpu).")] = "auto",
    cache: Annotated[bool, typer.Option(
        "--cache/--no-cache", help="Keep every decoded image (at 1.15x --image-size) in one memory-mapped file, "
                                   "so epochs after the first skip decoding.")] = False,
    cache_dir: Annotated[Optional[Path], typer.Option(
        parser=_path, help="Folder for the --cache file, shareable between runs on the same images. Default: the run "
             "folder.", show_default=False)] = None,
    compile: Annotated[bool, typer.Option(
        "--compile/--no-compile", help="torch.compile the model (slow to start; faster steps on a GPU).")] = False,
    preset: Annotated[Optional[str], typer.Option(
        help=f"The papers' settings by name ({', '.join(PRESETS)}): imagenet is ResNet-50, batch 4096, LARS "
             f"4.8, temperature 0.1, 100 epochs, 224 px; cifar is ResNet-50 with the 3x3 stem, 32 px, batch "
             f"1024, LARS 4.0 (1.0 per 256 images), temperature 0.5. Flags you give override it.",
        show_default=False)] = None,
    monitor: Annotated[Optional[Path], typer.Option(
        parser=_path,
        help="A small folder of labelled images (one subfolder per class): kNN top-1 on it after every epoch, "
             "in metrics.jsonl and curves.png (with --resume: the folder's new place, if it moved).",
        show_default=False)] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    workers: WorkersOpt = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Pretrain an encoder with SimCLR on a folder of unlabeled images; export encoder.safetensors."""
    from simclr_cli import distributed

    config, resumed, again = None, None, {}
    if resume is not None:
        _refuse_changes_on_resume(ctx, resume, {"data_dir", "monitor", "device", "workers", "devices", "quiet"})
        again = _runtime_given(ctx, device, workers)
        resumed = {"run_dir": resume, "data_dir": str(data_dir) if data_dir else None,
                   "monitor": str(monitor) if monitor else None, **again}
    else:
        if data_dir is None:
            raise typer.BadParameter("give the folder of images (or --resume RUN_DIR)", param_hint="DATA_DIR")
        config = PretrainConfig(
            data_dir=str(data_dir), out_dir=str(out or default_run_dir("pretrain")), epochs=epochs,
            batch_size=batch_size, arch=arch, stem=stem, width=width, zero_init_residual=zero_init_residual,
            proj_layers=proj_layers, proj_dim=proj_dim, proj_out_bn=proj_out_bn,
            temperature=temperature, optimizer=optimizer, lr=lr, lr_scaling=lr_scaling, weight_decay=weight_decay,
            warmup_epochs=warmup_epochs, max_time=parse_duration(max_time) if max_time is not None else None,
            devices=devices, chunk_size=chunk_size, sync_bn=sync_bn, augment_on=augment_on, cache=cache,
            cache_dir=str(cache_dir) if cache_dir else None, compile=compile,
            monitor=str(monitor) if monitor else None,
            augment=AugmentConfig(image_size=image_size, crop_min_scale=crop_min_scale, jitter=jitter,
                                  blur=blur),
            runtime=RuntimeConfig(device=device, precision=precision, workers=workers, seed=seed),
        )
        if preset is not None:
            config = apply_preset(config, preset, _flags_given(ctx))
        config = config.validate()
    job = (config, resumed, quiet)
    if distributed.launched():  # started by torchrun: this process is one of many
        result = distributed.run_in_group(_pretrain_process, *job, device=_run_device(config, resumed))
    elif devices > 1:
        check_sizes(devices=devices)  # the flag first, before a resumed run's saved settings are read
        run_device = _run_device(config, resumed)
        distributed.check_devices(devices, run_device)
        run_dir = Path(resumed["run_dir"] if resumed else config.out_dir)
        result = distributed.launch(_pretrain_process, job, devices, run_device,
                                    resume=functools.partial(_resume_command, run_dir, devices, **again))
    elif devices < 1:
        raise typer.BadParameter(f"{devices} must be at least 1", param_hint="--devices")
    else:
        result = _pretrain_process(*job)
    if result is None:  # not rank 0: rank 0 reports
        return
    if result.interrupted:
        err_console.print(f"interrupted after step {result.state.step}; checkpoint saved. Continue with: "
                          f"{_resume_command(result.run_dir, 1 if distributed.launched() else devices, **again)}")
        raise typer.Exit(130)
    if result.skipped:
        err_console.print(f"{len(result.skipped):,} unreadable file(s) skipped; listed in "
                          f"{result.run_dir / 'skipped.json'}")
    # The mean over the last epoch's steps, as its epoch line gives ("final loss" read as the last step's, which is
    # noisier and often far from it); where a time budget cut that epoch short (its steps still counted in the
    # state, not reset by an end of epoch), it has no line: its steps are said.
    loss, cut = "", result.state.loss_steps
    if result.final_loss is not None and cut:
        loss = (f", mean loss {result.final_loss:.4f} over the {_counted(cut, 'step')} of epoch "
                f"{result.state.epoch + 1} the time budget left")
    elif result.final_loss is not None:
        loss = f", last epoch's mean loss {result.final_loss:.4f}"
    console.print(f"encoder saved to {result.encoder_path} ({_counted(result.state.step, 'step')}, "
                  f"{result.state.images_seen:,} images{loss})")  # a short budget can end at one step
    encoder = shlex.quote(str(result.encoder_path))
    _next(quiet, f"simclr linear-eval {encoder} LABELLED_FOLDER  (measure it)",
          f"simclr embed {encoder} IMAGES OUT.npy  (embeddings for a folder)")


def _counted(count: int, noun: str) -> str:
    """"1 step", "2 steps"."""
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def _flags_given(ctx: typer.Context) -> set[str]:
    """Names of the parameters the user set (command line or environment), not left at their defaults."""
    sources = {name: ctx.get_parameter_source(name) for name in ctx.params}
    return {name for name, source in sources.items() if source is not None
            and source.name not in ("DEFAULT", "DEFAULT_MAP")}


def _given(ctx: typer.Context, name: str, value: Any) -> Any:
    """`value` if the user set the parameter, else None: on --resume, None keeps the saved setting (an explicit
    `--device auto` replaces a saved `--device cuda` on a machine without one)."""
    return value if name in _flags_given(ctx) else None


def _refuse_changes_on_resume(ctx: typer.Context, resume: Path, allowed: set[str]) -> None:
    """A resumed run keeps the settings it saved: a flag that would change one is refused, not silently ignored."""
    ignored = _flags_given(ctx) - allowed - {"resume"}
    if ignored:
        names = [param.opts[0] if param.param_type_name == "option" else param.metavar or param.name.upper()
                 for param in ctx.command.params if param.name in ignored]
        raise ConfigError(f"{', '.join(names)} with --resume: the run keeps the settings it started with "
                          f"({resume / 'config.json'}); leave {'it' if len(names) == 1 else 'them'} out, or start "
                          f"a new run with another --out")


def _resume_command(run_dir: Path, devices: int, **again: Any) -> str | None:
    """The command that continues a pretrain run on as many processes (under torchrun, 1: torchrun's own), with
    the runtime flags `again` (_runtime_given), or None where the run has not written its settings yet (stopped
    while its processes started): there is nothing to resume."""
    if not (Path(run_dir) / "config.json").is_file():
        return None
    return resume_command("pretrain", run_dir, devices=devices, **again)


def _runtime_given(ctx: typer.Context, device: str, workers: Optional[int]) -> dict[str, Any]:
    """--device and --workers as given to a --resume, for the command that continues it: unlike a new run's, they
    are not saved in its config.json, and the next --resume would go back to the saved ones."""
    return {"device": _given(ctx, "device", device), "workers": workers}


def _run_device(config: PretrainConfig | None, resumed: dict[str, Any] | None) -> str:
    """The run's --device: the one given, or the one a resumed run saved (a `--device cpu` run stays on the CPU)."""
    if config is not None:
        return config.runtime.device
    from simclr_cli.export import read_run_config

    moved = {name: resumed[name] for name in ("data_dir", "monitor") if resumed[name]}  # new places, as resume takes
    return read_run_config(PretrainConfig, resumed["run_dir"], "pretrain", device=resumed["device"],
                           **moved).runtime.device


def _pretrain_process(config: PretrainConfig | None, resume: dict[str, Any] | None, quiet: bool) -> Any:
    """Pretrain (or resume) in this process; rank 0 alone draws progress and returns the result."""
    from simclr_cli.runtime import is_main
    from simclr_cli.train import pretrain as run_pretrain, resume_pretrain, silent

    main = is_main()
    with Reporter(quiet=quiet) if main else contextlib.nullcontext(silent) as report:
        result = resume_pretrain(report=report, **resume) if resume else run_pretrain(config, report)
    return result if main else None


def _labelled_data(train: Path, labels: Optional[Path], val: Optional[Path], val_split: Optional[float]) -> Any:
    from simclr_cli.config import LabelledDataConfig

    return LabelledDataConfig(train_dir=str(train), labels_csv=str(labels) if labels else None,
                              val_dir=str(val) if val else None, val_split=val_split)


def _print_accuracy(results: dict[str, Any], title: str) -> None:
    """The headline numbers, then accuracy per class, as rich tables."""
    from rich.table import Table

    summary = Table(title=title, title_justify="left")
    summary.add_column("metric")
    summary.add_column("validation", justify="right")
    summary.add_row("top-1", f"{results['top1']:.2%}")
    summary.add_row(f"top-{min(5, len(results['classes']))}", f"{results['top5']:.2%}")
    for k, value in results["knn"].items():
        if k.startswith("k"):
            summary.add_row(f"kNN top-1 ({k[1:]} neighbours)", f"{value:.2%}")
    console.print(summary)
    per_class = Table(title="per class", title_justify="left")
    for column in ("class", "images", "top-1"):
        per_class.add_column(column, justify="left" if column == "class" else "right")
    for name, figures in results["per_class"].items():
        accuracy = "-" if figures["accuracy"] is None else f"{figures['accuracy']:.2%}"
        per_class.add_row(name, str(figures["count"]), accuracy)
    console.print(per_class)


ValOpt = Annotated[Optional[Path], typer.Option(
    "--val", parser=_path, help="Validation folder, one subfolder per class. Default: --val-split of TRAIN.",
    show_default=False)]
ValSplitOpt = Annotated[Optional[float], typer.Option(
    help="Fraction of each class of TRAIN held out for validation, seeded (default 0.2 without --val).",
    show_default=False)]
LabelsOpt = Annotated[Optional[Path], typer.Option(
    "--labels", parser=_path, show_default=False,
    help="CSV of path,label rows (paths relative to TRAIN, or absolute) instead of class subfolders.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the results as one JSON object, for scripts.")]


@app.command("linear-eval")
@_fail_cleanly
def linear_eval(
    model: Annotated[Path, typer.Argument(
        metavar="MODEL", parser=_path, help="encoder.safetensors, or a run folder that holds one.",
        show_default=False)],
    train: Annotated[Path, typer.Argument(
        metavar="TRAIN", parser=_path, help="Labelled images: one subfolder per class (or any folder with --labels).",
        show_default=False)],
    val: ValOpt = None,
    val_split: ValSplitOpt = None,
    labels: LabelsOpt = None,
    out: Annotated[Optional[Path], typer.Option(
        parser=_path, help="Folder for the results and the feature cache. Default: runs/linear-eval-<timestamp>.",
        show_default=False)] = None,
    l2: Annotated[Optional[float], typer.Option(
        help="L2 strength of the probe. Default: chosen on 20% of TRAIN from 1e-6 to 1.", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass when computing features.")] = 256,
    as_json: JsonOpt = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    workers: WorkersOpt = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Measure a frozen encoder: a linear probe and weighted kNN on labelled images."""
    import json

    from simclr_cli.config import LinearEvalConfig
    from simclr_cli.evaluate import linear_eval as run_linear_eval

    config = LinearEvalConfig(
        model=str(model), data=_labelled_data(train, labels, val, val_split),
        out_dir=str(out or default_run_dir("linear-eval")), l2=l2, batch_size=batch_size,
        runtime=RuntimeConfig(device=device, precision=precision, workers=workers, seed=seed))
    with Reporter(quiet=quiet or as_json) as reporter:
        result = run_linear_eval(config, reporter)
    if as_json:
        typer.echo(json.dumps({**result.results, "out": str(result.out_dir)}, indent=2))
        return
    _print_accuracy(result.results, f"linear evaluation of {result.results['model']} (L2 {result.results['l2']:g})")
    console.print(f"results in {result.out_dir} ({_present(result.out_dir, 'linear_eval.json', 'linear.safetensors')})")


class _FinetuneReporter(Reporter):
    def on_start(self, **fields: Any) -> None:
        super().on_start(**fields)
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, description="finetune")


@app.command()
@_fail_cleanly
def finetune(
    ctx: typer.Context,
    model: Annotated[Optional[Path], typer.Argument(
        metavar="MODEL", parser=_path,
        help="encoder.safetensors, or a run folder that holds one (optional with --resume).",
        show_default=False)] = None,
    train: Annotated[Optional[Path], typer.Argument(
        metavar="TRAIN", parser=_path, help="Labelled images: one subfolder per class (or any folder with --labels).",
        show_default=False)] = None,
    val: ValOpt = None,
    val_split: ValSplitOpt = None,
    labels: LabelsOpt = None,
    label_fraction: Annotated[float, typer.Option(
        help="Train on a class-balanced, seeded subset of TRAIN: 0.01 and 0.1 as in the papers.")] = 1.0,
    from_head_layer: Annotated[int, typer.Option(
        help="1: start from the first projection-head layer (SimCLRv2); needs head.safetensors beside MODEL.")] = 0,
    epochs: Annotated[int, typer.Option(help="Passes over the (subset of the) training images.")] = 30,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 256,
    lr: Annotated[Optional[float], typer.Option(
        help="Peak learning rate (SGD, Nesterov momentum 0.9, cosine decay). Default: 0.05 x batch/256.",
        show_default=False)] = None,
    weight_decay: Annotated[float, typer.Option(help="Weight decay; never on biases and BatchNorm.")] = 0.0,
    crop_min_scale: Annotated[Optional[float], typer.Option(
        help="Smallest random crop, as a fraction of the image. Default: 0.08, or 0.5 for encoders trained at "
             "<= 64 px.", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option(
        parser=_path, help="Run folder. Default: runs/finetune-<timestamp>.", show_default=False)] = None,
    resume: Annotated[Optional[Path], typer.Option(
        parser=_path, help="Continue the run in this folder from its checkpoint, with its saved settings.",
        show_default=False)] = None,
    as_json: JsonOpt = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    workers: WorkersOpt = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune an encoder and a new linear head end to end on (a fraction of) labelled images."""
    import json

    from simclr_cli.config import FinetuneConfig
    from simclr_cli.finetune import finetune as run_finetune, resume_finetune

    again = {}
    with _FinetuneReporter(quiet=quiet or as_json) as reporter:
        if resume is not None:
            _refuse_changes_on_resume(ctx, resume, {"device", "workers", "quiet", "as_json"})
            again = _runtime_given(ctx, device, workers)
            result = resume_finetune(resume, reporter, **again)
        else:
            if model is None or train is None:
                raise typer.BadParameter("give MODEL and TRAIN (or --resume RUN_DIR)", param_hint="MODEL TRAIN")
            config = FinetuneConfig(
                model=str(model), data=_labelled_data(train, labels, val, val_split),
                out_dir=str(out or default_run_dir("finetune")), label_fraction=label_fraction,
                from_head_layer=from_head_layer, epochs=epochs, batch_size=batch_size, lr=lr,
                weight_decay=weight_decay, crop_min_scale=crop_min_scale,
                runtime=RuntimeConfig(device=device, precision=precision, workers=workers, seed=seed))
            result = run_finetune(config, reporter)
    if result.interrupted:
        err_console.print(f"interrupted at epoch {result.state.epoch + 1}; checkpoint saved. Continue with: "
                          f"{resume_command('finetune', result.run_dir, **again)}")
        raise typer.Exit(130)
    if as_json:
        typer.echo(json.dumps({**result.results, "out": str(result.run_dir)}, indent=2))
        return
    _print_accuracy(result.results, f"fine-tuned model after {_counted(result.results['epoch'], 'epoch')}")
    console.print(f"model saved to {result.model_path}; results in {result.run_dir} (finetune.json, "
                  f"{_present(result.run_dir, 'metrics.jsonl')})")


class _EmbedReporter(Reporter):
    """Draws `simclr embed` progress: images done of the total, and images/s."""

    _next_plain = 0

    def on_embed_start(self, total: int, done: int = 0) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self._next_plain = min(done + max(1, total // 10), total)  # the next count to print without a live bar
        if self.quiet or not self.live:
            return
        self.progress = Progress(TextColumn("[bold]embed"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[speed]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console)
        self.progress.start()
        self.task = self.progress.add_task("embed", total=total, completed=done, speed="")

    def on_embed_progress(self, done: int, total: int, images_per_s: float) -> None:
        speed = f"{images_per_s:,.0f} images/s"
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=done, speed=speed)
        elif not self.quiet and done >= self._next_plain:
            console.print(f"{done:,}/{total:,} images  {speed}")
            self._next_plain = min(done + max(1, total // 10), total) if done < total else total + 1

    def on_embed_done(self, **_: Any) -> None:
        self.close()


@app.command()
@_fail_cleanly
def embed(
    model: Annotated[Path, typer.Argument(
        metavar="MODEL", parser=_path, help="encoder.safetensors, or a run folder that holds one.",
        show_default=False)],
    images: Annotated[Path, typer.Argument(
        metavar="IMAGES", parser=_path, help="Folder of images, searched at every depth.", show_default=False)],
    out: Annotated[Path, typer.Argument(
        metavar="OUT.npy", parser=_path,
        help="The index to write, e.g. photos.npy; its manifest goes beside it (photos.json).",
        show_default=False)],
    dtype: Annotated[str, typer.Option(help="float32, or float16 for half the size.")] = "float32",
    normalize: Annotated[bool, typer.Option("--normalize/--no-normalize",
                                            help="L2-normalise every row (raw features with --no-normalize).")] = True,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 256,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted embed into OUT, "
                                                          "with the same arguments.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT, or an interrupted embed of it.")] = False,
    devices: Annotated[int, typer.Option(
        help="Processes sharing the images, one per GPU (or per CPU share with --device cpu). Also applies to "
             "--resume, whatever the number before.")] = 1,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    workers: WorkersOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Write one embedding per image of a folder to OUT.npy, with a manifest beside it (OUT.json)."""
    from simclr_cli.embed import EmbedConfig, embed_folder

    config = EmbedConfig(model=str(model), images=str(images), out=str(out), dtype=dtype, normalize=normalize,
                         batch_size=batch_size, device=device, precision=precision, workers=workers, devices=devices,
                         resume=resume, overwrite=overwrite)
    with _EmbedReporter(quiet=quiet) as reporter:
        result = embed_folder(config, reporter)
    if result.interrupted:
        err_console.print(f"interrupted with {result.rows:,} of {result.total:,} images embedded; progress saved. "
                          f"Continue with: {config.resume_command()}")
        raise typer.Exit(130)
    if result.skipped:
        err_console.print(f"{len(result.skipped):,} unreadable file(s) skipped; listed in the manifest")
    done = "are in" if result.complete_before else "written to"
    console.print(f"{result.rows:,} embeddings {done} {out} (manifest {out.with_suffix('.json')})")
    _next(quiet, f"simclr similar QUERY.jpg{_index_flag(out)}  (the nearest images in this index)")


def _index_flag(out: Path) -> str:
    """` --index OUT`, unless `simclr similar` would search OUT without it (not where $SIMCLR_INDEX names another
    index, or the state directory could not record OUT)."""
    from simclr_cli.index import choose_index

    try:
        default = choose_index(None)[0]
    except (ConfigError, OSError):  # none remembered, or a state directory that cannot be read: the embed succeeded
        default = None
    return "" if default is not None and default.absolute() == out.absolute() else f" --index {shlex.quote(str(out))}"


def _next(quiet: bool, *commands: str) -> None:
    """What to run next, on stderr (not mixed into what a script reads from stdout); not with --quiet."""
    if not quiet:
        err_console.print("next: " + "\n  or: ".join(commands), style="dim", highlight=False)


def _present(folder: Path, *names: str) -> str:
    """`names` and the confusion matrix, where it was drawn (not past evaluate.MAX_DRAWN_CLASSES)."""
    return ", ".join([*names, *(["confusion_matrix.png"] if (Path(folder) / "confusion_matrix.png").exists() else [])])


def _shown(path: str) -> str:
    """A path relative to the working folder when it lies under it, else as it is."""
    import os

    relative = os.path.relpath(path)
    shown = path if relative.startswith("..") else relative
    # A name that is not UTF-8 holds surrogates (Python's escapes for its bytes), which a strict UTF-8
    # stdout refuses: shown as \xe9 and the like.
    return shown.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@app.command()
@_fail_cleanly
def similar(
    query: Annotated[list[Path], typer.Argument(
        metavar="QUERY", parser=_path, help="Image file(s), or folder(s) of images, to look up.", show_default=False)],
    index: Annotated[Optional[Path], typer.Option(
        parser=_path, help="The OUT.npy of `simclr embed`. Default: $SIMCLR_INDEX, else the index embedded last.",
        show_default=False)] = None,
    top_k: Annotated[int, typer.Option("-k", "--top-k", help="Hits per query.")] = 10,
    exclude_self: Annotated[bool, typer.Option(
        "--exclude-self", help="Leave a query out of its own hits when it is in the index.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON, for scripts.")] = False,
    grid: Annotated[Optional[Path], typer.Option(
        parser=_path, help="Also write a contact sheet (e.g. results.png): each query, then its hits with scores.",
        show_default=False)] = None,
    device: Annotated[str, typer.Option(help="Device that embeds the queries; the CPU is quickest for a few.")] = "cpu",
) -> None:
    """Find the images of an index nearest to each query image (exact cosine similarity)."""
    import json

    global _exit_quickly
    _exit_quickly = True

    from rich.table import Table

    from simclr_cli.index import check_grid_path, contact_sheet, search

    if grid is not None:
        check_grid_path(grid)
    result = search(query, index, top_k, exclude_self, device, grid)
    if grid is not None:  # refused before the results are printed, as above
        check_grid_path(grid, len(result.queries), max(len(hits) for hits in result.hits))
    err_console.print(f"index {result.index} ({result.size:,} images), from {result.source}")
    for item in result.skipped:
        err_console.print(labelled("warning:", "yellow", f"skipped query {item.path}: {item.reason}"))
    if grid is not None:  # first: a reader of the results that stops early (`| head`) must not cost the file
        contact_sheet([(q, [(hit.path, hit.score) for hit in hits]) for q, hits in zip(result.queries, result.hits)],
                      grid)
        err_console.print(f"contact sheet written to {grid}")
    if as_json:
        typer.echo(json.dumps({"index": str(result.index), "results": [
            {"query": q, "hits": [vars(hit) for hit in hits]} for q, hits in zip(result.queries, result.hits)]},
            indent=2))
    else:
        for query_path, hits in zip(result.queries, result.hits):
            table = Table(title=f"nearest to {_shown(query_path)}", title_justify="left")
            table.add_column("rank", justify="right")
            table.add_column("score", justify="right")
            table.add_column("path", overflow="fold")
            for hit in hits:
                table.add_row(str(hit.rank), f"{hit.score:.4f}", _shown(hit.path))
            console.print(table)


def main() -> None:
    try:
        app()
    except SystemExit as stop:
        if not _exit_quickly:
            raise
        _exit_now(stop.code)


# `simclr similar` sets this: it leaves nothing open, and Python's own teardown of a process that imported
# PyTorch (freeing every module, running C++ destructors) took 1-1.3 s on a 2-core CPU, a quarter of the command.
_exit_quickly = False


def _exit_now(code: Any) -> None:
    """Exit with `code` as `sys.exit` would, but skip the interpreter's teardown: run the atexit
    handlers (temporary files, child processes), flush the output, and end the process."""
    import atexit
    import os

    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)

"""The pretraining loop: schedule, checkpoints, JSON-lines log, interrupts and time budgets."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from simclr_cli import __version__, distributed
from simclr_cli.augment import IMAGENET_MEAN, IMAGENET_STD, TwoViews, simclr_augmentation
from simclr_cli.batch_augment import AugmentInLoader, BatchAugment, ViewSampler, resolve_augment_on
from simclr_cli.cache import DecodedCache, WorkingImages, working_side
from simclr_cli.config import PretrainConfig, check_saved_types, format_duration, replace
from simclr_cli.curves import CurvesWriter, KnnMonitor
from simclr_cli.data import (ImageDataset, UntilWorkerDies, collate, epoch_order, even_batch, in_flight_bytes,
                             make_loader, to_device_ahead)
from simclr_cli.errors import ConfigError, DataError, ModelFileError, SimclrError, WorkerDied
from simclr_cli.export import (CHECKPOINT_FILE, CHECKPOINT_SECONDS, HEAD_FILE, check_run_dir, load_checkpoint,
                               load_optimizer, read_run_config, save_checkpoint, save_encoder, save_tensors)
from simclr_cli.files import (ENCODER_FILE, EncoderInfo, check_output_path, claimed, held, read_json, read_json_lines,
                              resume_command, write_json, write_text)
from simclr_cli.gradcache import cached_backward, chunk_count, paired_chunks
from simclr_cli.images import Skipped, UnreadableImage, load_rgb, note_skipped, require_images, scan_images
from simclr_cli.loss import global_nt_xent
from simclr_cli.memory import batch_shortfall, fitting_workers
from simclr_cli.models import SimCLR
from simclr_cli.optim import build_optimizer, set_lr, warmup_cosine
from simclr_cli.run_state import LoopState, PretrainResult
from simclr_cli.runtime import (StopFlag, default_workers, is_main, precision_change, resolve_device,
                                resolve_precision, rng_state, seed_everything, set_rng_state, stop_reply,
                                world_size)

Report = Callable[..., None]  # report(kind, **fields): the CLI draws these; the engine never prints


def silent(kind: str, **fields: Any) -> None:
    """A Report that ignores everything."""


class TrainingDiverged(SimclrError):
    """The loss became NaN or infinite."""

    @classmethod
    def at(cls, value: float, step: int, run_dir: Path, fix: str) -> "TrainingDiverged":
        """The error, saying whether a checkpoint was kept. A resume would keep the settings that diverged,
        so `fix` says what to change for a new run."""
        return cls._saying(f"the loss became {value} at step {step}", run_dir, fix)

    @classmethod
    def in_weights(cls, step: int, run_dir: Path, fix: str) -> "TrainingDiverged":
        """The error for weights found NaN or infinite as they were about to be saved."""
        return cls._saying(f"the weights became NaN or infinite by step {step} (each loss is taken before its "
                           f"step's update)", run_dir, fix)

    @classmethod
    def _saying(cls, what: str, run_dir: Path, fix: str) -> "TrainingDiverged":
        checkpoint = run_dir / CHECKPOINT_FILE
        kept = (f"the last good checkpoint is kept in {checkpoint}" if checkpoint.is_file()
                else "no checkpoint had been written yet")
        return cls(f"{what}; {kept}. {fix} and run again with another --out")


def finite_weights(model: torch.nn.Module) -> bool:
    """Whether every parameter is finite. A loss is taken before its step's update, so the last update before a
    save can make the weights NaN or infinite with every logged loss finite: such weights are never saved."""
    flags = [torch.isfinite(p).all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


RECENT_STEPS = 5  # steps whose times set the time budget's reserve


def use_even_batch(images: int, batch: int, report: Report, lr_follows: bool, minimum: int = 2) -> int:
    """data.even_batch, if it is at least `minimum`, said in a message."""
    even = even_batch(images, batch)
    if even == batch or even < minimum:
        return batch
    report("message", text=f"using batch size {even} instead of {batch}: an epoch of {images // even:,} steps leaves "
                           f"{images % even:,} of the {images:,} images out, where {batch} would leave "
                           f"{images % batch:,}"
                           + (" (the learning rate follows the batch)" if lr_follows else ""))
    return even


class PretrainRun:
    """One pretraining run in one folder: built fresh, or from its checkpoint when resuming."""

    def __init__(self, config: PretrainConfig, report: Report = silent, resume: bool = False,
                 device_given: str | None = None):
        """`device_given`: a --device given to a --resume, which config.json does not save: the command printed to
        continue the run repeats it."""
        self.report = report
        self.device_given = device_given
        self.run_dir = Path(config.out_dir)
        self.device = resolve_device(config.runtime.device)
        # Decided once and saved in config.json, so a resumed run keeps its architecture, batch and views.
        self.config = config = replace(config.with_absolute_paths(), stem=config.resolved_stem(self.device.type),
                                       batch_size=config.resolved_batch_size(self.device.type),
                                       augment=config.resolved_augment(self.device.type))
        self.precision = resolve_precision(config.runtime.precision, self.device)
        self.workers = config.runtime.workers if config.runtime.workers is not None else default_workers()
        self._created = time.monotonic()
        self.state = LoopState()
        self._recent_steps: collections.deque[float] = collections.deque(maxlen=RECENT_STEPS)
        self._first_step: float | None = None  # seconds of this session's first step, once made
        self._worker_died: str | None = None  # how a loader worker died, which stops the run as a signal does
        restore = check_run_dir(self.run_dir, resume, ENCODER_FILE, PretrainConfig)
        if config.cache_dir:  # refused now, by its flag, not by an OSError once the folder is scanned
            check_output_path(config.cache_dir, "--cache-dir", folder=True)
        if resume and not restore:  # stopped in its first epoch (a crash, a lost machine): start it again as saved
            report("message", text=f"{self.run_dir} stopped before its first checkpoint: starting it again")
        settled, resume = resume, restore  # settled: the batch below was decided when the run began
        distributed.barrier()  # every rank has looked at the folder before rank 0 writes to it
        seed_everything(config.runtime.seed)

        # A run folder inside its data (`simclr pretrain .`) holds curves.png: not an image to train on.
        scan = require_images(scan_images(config.data_dir, exclude=self.run_dir, label="DATA_DIR",
                                          instead="pass the folder of images; to continue a pretrain run, pass "
                                                  "--resume RUN"))
        if len(scan.paths) < 2:
            raise DataError(f"{config.data_dir}: only one image; SimCLR contrasts each image with the others in "
                            f"its batch, so it needs at least 2 (a few hundred to learn anything)")
        # Every process scans for itself; ones that found other files would batch differently, and wait
        # for each other's steps for ever.
        self.listing = _listing_digest(config.data_dir, scan.paths)  # the same when the folder has moved
        if world_size() > 1:
            listings = distributed.gather_objects([(len(scan.paths), self.listing)])
            if len(set(listings)) > 1:
                raise DataError(f"{config.data_dir}: the processes found different images (by rank: "
                                f"{', '.join(str(count) for count, _ in listings)}); give every process the same "
                                f"files")
        self.paths = scan.paths
        self.skipped: dict[str, Skipped] = {s.path: s for s in scan.skipped}
        aug = config.augment
        self.batch_size = min(config.batch_size, len(self.paths))
        if self.batch_size < config.batch_size:
            report("warning", text=f"only {len(self.paths):,} images: using batch size {self.batch_size} "
                                   f"instead of {config.batch_size}")
        if not settled:  # a resumed run keeps the batch its steps were counted in
            self.batch_size = use_even_batch(len(self.paths), self.batch_size, report, lr_follows=config.lr is None,
                                             minimum=world_size())
        if self.batch_size != config.batch_size:
            # the learning-rate rule and config.json follow the batch that trains, not the one asked for
            self.config = config = replace(config, batch_size=self.batch_size)
        if self.batch_size < world_size():
            # --resume refuses --batch-size: a resumed run can only take fewer processes
            fix = (f"resume with --devices {self.batch_size} or fewer" if settled
                   else f"use --devices {len(self.paths)} or fewer, or add images" if len(self.paths) < world_size()
                   else f"use --batch-size {world_size()} or more, or fewer --devices")
            raise ConfigError(f"--batch-size {self.batch_size} is smaller than the {world_size()} processes: each "
                              f"needs an image per step; {fix}")
        self.steps_per_epoch = max(1, len(self.paths) // self.batch_size)
        self.total_steps = config.epochs * self.steps_per_epoch
        if aug.small:
            blur = "on" if aug.use_blur else "off"
            report("message", text=f"{aug.image_size} px images: small-image views (crops from "
                                   f"{aug.crop_scale:.0%}, jitter strength {aug.jitter_strength:g}, blur {blur}), "
                                   f"{config.stem} stem"
                                   + (" (the 3x3 cifar stem is about 13x slower on a CPU; --stem cifar forces it)"
                                      if config.stem == "imagenet" and self.device.type == "cpu" else ""))

        self.model = SimCLR(config.arch, config.stem, config.proj_layers, config.proj_dim, config.width,
                            config.zero_init_residual, config.proj_out_bn)
        self.sync_bn = distributed.use_sync_bn(config.sync_bn, self.device)
        if self.sync_bn:
            self.model = distributed.convert_sync_bn(self.model)
        self.model.to(self.device, memory_format=torch.channels_last)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest convolutions once
        self.optimizer = build_optimizer(config.optimizer, self.model, config.resolved_lr,
                                         config.resolved_weight_decay)
        self.scaler = self.precision.grad_scaler()
        self.augment_on = resolve_augment_on(config.augment_on, self.device)
        if self.device.type == "cpu" and world_size() == 1:
            batch_bytes = self.batch_size * self._loader_image_bytes()
            self.workers = fitting_workers(self.workers, in_flight_bytes(1, batch_bytes), report)
        if config.chunk_size is None and self.device.type == "cpu" and world_size() == 1:
            # A batch whose activations do not fit in free memory would get the process killed mid-step.
            loader_bytes = in_flight_bytes(self.workers, self.batch_size * self._loader_image_bytes())
            shortfall = batch_shortfall(self.model, config.augment.image_size, self.precision, self.batch_size,
                                        loader_bytes=loader_bytes)
            if shortfall is not None:
                self.config = config = replace(config, chunk_size=shortfall.images)  # config.json records it
                report("warning", text=f"{shortfall.describe(self.batch_size)}: gradient caching, "
                                       f"{shortfall.images} images' activations at a time (the loss is still over "
                                       f"the whole batch; BatchNorm statistics per chunk); --chunk-size sets it")
        # The --monitor folder is read before the decoded cache goes into the run folder: a refused folder
        # leaves --out as it was, free for the corrected command.
        self.monitor = (KnnMonitor(config.monitor, self.device, self.precision, config.runtime.seed, self.workers,
                                   report, self.run_dir) if config.monitor and is_main() else None)
        self._monitor_seconds = 0.0  # the latest measurement's, as rank 0 counts them: kept free in a time budget
        self.cache = self._prepare_cache(scan.root) if config.cache else None
        self.dataset, self.collate, self.batch_augment = self._pipeline()
        self.curves = CurvesWriter(self.run_dir, report, monitored=bool(config.monitor))
        if resume:
            self._restore()
            saved = read_json(self.run_dir / "config.json", "run configuration")
            moved = {key: getattr(config, key) for key in ("data_dir", "monitor")
                     if saved.get(key) != getattr(config, key)}
            if is_main() and moved:  # DATA_DIR or --monitor given to --resume: the folder moved
                write_json(self.run_dir / "config.json", {**saved, **moved})
        elif is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.run_dir / "config.json", config.to_json())
            (self.run_dir / "metrics.jsonl").write_text("")
        report("message", text=f"{len(self.paths):,} images in {config.data_dir}"
                               + (f", {len(self.skipped):,} unreadable file(s) skipped" if self.skipped else "")
                               + f"; {config.arch} on {self.device} ({self.precision.name}), batch "
                               f"{self.batch_size}, lr {config.resolved_lr:g}, {self.workers} loader worker(s)")
        if scan.runs_note():
            report("message", text=scan.runs_note())
        for skipped in scan.skipped:
            report("warning", text=f"skipped {skipped.path}: {skipped.reason}")
        where = _PIPELINES[self.augment_on]
        where = where.replace("the loader workers", "the main process") if self.workers == 0 else where
        report("message", text=f"views: {where}")
        # self.model stays unwrapped: it is what checkpoints and exports hold (DDP adds "module.",
        # torch.compile "_orig_mod."); the compiled module shares its parameters.
        self.parallel_model = distributed.wrap_ddp(torch.compile(self.model) if config.compile else self.model,
                                                   self.device)
        if world_size() > 1:
            report("message", text=f"{world_size()} processes share each batch of {self.batch_size}: NT-Xent over "
                                   f"the global batch, " + ("SyncBatchNorm" if self.sync_bn else
                                                           "BatchNorm statistics per process"))
        if config.chunk_size:
            report("message", text=f"gradient caching: at most {config.chunk_size} images' activations at a time "
                                   f"per process (BatchNorm statistics per chunk)")

    # -- set-up -----------------------------------------------------------------------------

    def _prepare_cache(self, root: Path) -> DecodedCache:
        """Rank 0 creates or checks the decoded cache; the other ranks open it after."""
        directory = self.config.cache_dir or self.run_dir
        side = working_side(self.config.augment.image_size)
        if is_main():
            cache, summary = DecodedCache.prepare(directory, root, self.paths, side,
                                                  shared=self.config.cache_dir is not None)
            self.report("message", text=summary)
        distributed.barrier()
        return cache if is_main() else DecodedCache.locate(directory, root, len(self.paths), side)

    def _loader_image_bytes(self) -> int:
        """The bytes of an image's two views as the loader yields them: uint8 crops where the training device
        augments them, float32 views otherwise (the parameter table, 52 bytes a view, left out)."""
        size = self.config.augment.image_size
        return 2 * 3 * size * size * (1 if self.augment_on == "device" else 4)

    def _pipeline(self) -> tuple[ImageDataset, Callable[[list], Any], BatchAugment | None]:
        """The dataset, the loader's collate function, and the augmentation left for the device."""
        aug, seed = self.config.augment, self.config.runtime.seed
        decode = WorkingImages(working_side(aug.image_size), self.cache) if self.config.cache else None
        if self.augment_on == "per-image":  # min_side applies when there is no cache to decode from
            views = TwoViews(simclr_augmentation(aug))
            return ImageDataset(self.paths, views, min_side=aug.image_size, seed=seed, decode=decode), collate, None
        decode = decode or WorkingImages(working_side(aug.image_size))
        dataset = ImageDataset(self.paths, ViewSampler(aug), seed=seed, decode=decode)
        if self.augment_on == "cpu":
            return dataset, AugmentInLoader(BatchAugment(aug)), None
        return dataset, collate, BatchAugment(aug)

    def _restore(self) -> None:
        path = self.run_dir / CHECKPOINT_FILE
        checkpoint = load_checkpoint(path)
        saved = checkpoint.progress
        try:
            self.model.backbone.load_state_dict(checkpoint.module_state("backbone"))
            self.model.head.load_state_dict(checkpoint.module_state("head"))
            load_optimizer(self.optimizer, checkpoint.tensors, checkpoint.optimizer)
            set_rng_state(checkpoint.rng_tensors(), checkpoint.rng)
            if self.scaler is not None and saved.get("scaler"):  # fp16: the loss scale it had reached
                self.scaler.load_state_dict(saved["scaler"])
            self.state = check_saved_types(LoopState(**saved["state"]))
            earlier = [Skipped(**entry) for entry in saved.get("skipped", [])]
        except (TypeError, KeyError, ValueError, RuntimeError, AttributeError, IndexError):  # RuntimeError: shapes
            raise ModelFileError(f"{path}: does not fit the run's config.json (an --arch or head edited in it?) or "
                                 f"is damaged; restore both files as the run wrote them, or start a new run with "
                                 f"another --out") from None
        if (change := precision_change(saved.get("precision"), self.precision)) is not None:
            self.report("warning", text=change)
        if "past_epoch_steps" not in saved["state"]:  # an older checkpoint: its epochs had its folder's steps
            images = saved.get("num_images") or len(self.paths)
            self.state.past_epoch_steps = self.state.epoch * max(1, images // min(self.config.batch_size, images))
        # The epochs done keep their steps and the rest have this folder's: counted all in this folder's steps, the
        # schedule of a folder that gained or lost images ended before (or after) the last epoch, not at it.
        epochs_left = self.config.epochs - self.state.epoch
        self.total_steps = self.state.past_epoch_steps + epochs_left * self.steps_per_epoch
        if saved.get("num_images") != len(self.paths):
            self.report("warning", text=f"the folder now holds {len(self.paths):,} images, not "
                                        f"{_count(saved.get('num_images'))}: the data order differs from the first run")
        elif saved.get("listing", self.listing) != self.listing:  # from checkpoints that record it
            self.report("warning", text=f"{self.config.data_dir} holds other images than the run's first session, as "
                                        f"many: the rest of the run trains on these")
        # Files skipped in an earlier session that the scan now finds readable and that decode have been mended:
        # this session trains on them, so they leave skipped.json (a truncated file passes the scan's header check).
        # A folder that could not be listed is this session's scan's to report, or not.
        readable = {str(path) for path in self.paths}
        self.skipped.update({s.path: s for s in earlier if not os.path.isdir(s.path)
                             and (s.path not in readable or not _decodes(s.path))})
        self._truncate_metrics(self.state.step)
        if not self.state.finished:  # a finished run is only exported again: run() says so
            self.report("message", text=f"resuming {self.run_dir} at epoch {self.state.epoch + 1}, "
                                        f"step {self.state.step}")

    def _truncate_metrics(self, step: int) -> None:
        """Drop log lines written after the checkpoint, so a resumed log has no duplicates."""
        if not is_main():
            return
        path = self.run_dir / "metrics.jsonl"
        kept = [record for record in read_json_lines(path) if record.get("step", 0) <= step]
        write_text(path, "".join(json.dumps(record) + "\n" for record in kept))

    # -- schedule ---------------------------------------------------------------------------

    def _progress(self, elapsed: float) -> float:
        """Fraction of the run done, by steps or by the time budget, whichever is further along.

        By time, the reserve for one more step and the export counts as spent, so the last step
        that fits in the budget runs at a learning rate near zero: the run ends annealed.
        """
        by_steps = (self.state.step + 0.5) / self.total_steps
        # By the typical step alone (a first step's compilation counted here would push the schedule ahead for
        # good), and the monitor's measurement; as that changes, never let it move the schedule backwards.
        reserve = max(1.0, 2 * self.state.step_seconds) + self._monitor_seconds
        by_time = (elapsed + reserve) / self.config.max_time if self.config.max_time else 0.0
        self.state.time_progress = max(self.state.time_progress, by_time)
        return min(1.0, max(by_steps, self.state.time_progress))

    def _reserve(self) -> float:
        """Seconds to keep free at the end of a time budget: one more step, the monitor's measurement at the end of
        an epoch, and the export, by the typical step, or until one is measured, by this session's first (the
        budget is not to be overrun on a guess)."""
        return max(1.0, 2 * (self.state.step_seconds or self._first_step or 0.0)) + self._monitor_seconds

    def _note_step(self, seconds: float) -> None:
        """Set the typical step time, the lower median of the latest RECENT_STEPS, leaving out each session's
        first step (torch.compile, cuDNN's autotuning, cold caches). Reserved from the latest step alone, one
        slow step pushed the schedule ahead for good: an 8 s first step of a 40 s budget skipped the warmup
        and the peak, the rate never above a fifth of it."""
        if self._first_step is None:
            self._first_step = seconds
            return
        self._recent_steps.append(seconds)
        self.state.step_seconds = sorted(self._recent_steps)[(len(self._recent_steps) - 1) // 2]

    def _budget_note(self, elapsed: float) -> str:
        """Why the time budget ends the run here: the reserve _out_of_time keeps (_reserve), and what it is for."""
        reserve, monitor = self._reserve(), self._monitor_seconds
        typical = "a typical step's time" if self.state.step_seconds else "the first step's time"
        why = "at least 1 s" if reserve - monitor <= 1.0 else f"twice {typical}"
        work = "one more step and the export"
        if monitor:
            work = "one more step, the kNN measurement and the export"
            why += f", and the last measurement's {monitor:.1f} s"
        at = (f"time budget: stopping after step {self.state.step} of up to {self.total_steps}, at "
              f"{format_duration(elapsed)} of {format_duration(self.config.max_time)}")
        if elapsed >= self.config.max_time:  # past it already (a slow end of epoch): no reserve to explain
            return f"{at}: the budget is spent"
        return f"{at}: the {reserve:.1f} s it keeps for {work} ({why}) would pass it"

    def _warmup_fraction(self) -> float:
        """--warmup-epochs of the run, capped at a tenth of it (short runs warm up for 10%)."""
        return min(0.1, self.config.warmup_epochs / self.config.epochs)

    def _out_of_time(self, elapsed: float) -> bool:
        return bool(self.config.max_time) and elapsed + self._reserve() >= self.config.max_time

    # -- the loop ---------------------------------------------------------------------------

    def train_one_epoch(self, stop: StopFlag, clock: Callable[[], float]) -> dict[str, float]:
        """Train until the epoch ends, the budget is spent or a stop is requested; return mean metrics."""
        config, state, device = self.config, self.state, self.device
        self.model.train()
        self.dataset.epoch = state.epoch
        order = epoch_order(len(self.paths), config.runtime.seed, state.epoch)
        # This rank's slice of each remaining global batch (one process: the whole batches, in order).
        order, local_batch = distributed.shard_order(order, self.batch_size, state.step_in_epoch)
        loader = make_loader(self.dataset, local_batch, order, self.workers, drop_last=True,
                             pin_memory=device.type == "cuda", collate_fn=self.collate)
        steps, images = 0, 0
        pending: list[tuple[dict[str, Any], torch.Tensor]] = []
        epoch_start, last = clock(), None
        batches = UntilWorkerDies(to_device_ahead(loader, device))
        for batch in batches:
            arrived = clock()
            if distributed.any_rank(self._out_of_time(arrived)):  # ranks stop together, or deadlock
                break
            # A step's time runs from the batch before's end, the wait for this one included, but the first
            # step's from its batch's arrival: the loader's start (workers, first decodes) is no step's time,
            # and counted in one it made the time budget's reserve for one more step seconds too long.
            last = arrived if last is None else last
            self._note_skipped(batch.skipped)
            sizes = distributed.gather_sizes(len(batch))  # every rank's images in this global batch
            # A rank whose images were all unreadable, or one image in all (no negatives: a loss of exactly 0):
            # every rank skips the step.
            if min(sizes) == 0 or sum(sizes) < 2:
                state.step_in_epoch += 1  # past it, or the epoch never ends
                continue
            lr = config.resolved_lr * warmup_cosine(self._progress(clock()), self._warmup_fraction())
            set_lr(self.optimizer, lr)
            loss = self._step(self._views(batch), sizes)
            now = clock()
            state.step += 1
            state.step_in_epoch += 1
            state.images_seen += sum(sizes)
            state.elapsed = now
            steps, images = steps + 1, images + sum(sizes)
            record = {"step": state.step, "epoch": state.epoch + 1, "lr": lr,
                      "images_per_s": sum(sizes) / max(now - last, 1e-9), "time": round(now, 3)}
            pending.append((record, loss.detach()))
            # Reading the loss forces a device sync: on a GPU do it every 10 steps, not every step.
            if device.type == "cpu" or len(pending) >= 10:
                self._flush(pending)
            self.report("step", **{"loss": None, **record}, total_steps=self.total_steps,
                        progress=self._progress(now), steps_per_epoch=self.steps_per_epoch,
                        step_in_epoch=state.step_in_epoch)
            self._note_step(now - last)
            last = now
            if distributed.any_rank(stop.signal is not None) or state.step >= self.total_steps:
                break
            # Rank 0's clock: every rank saves at the same step. Not at the epoch's end, saved next anyway; and the
            # save is no step's time.
            if now - self._saved_at >= CHECKPOINT_SECONDS and state.step_in_epoch < self.steps_per_epoch:
                self._flush(pending)
                self.save_checkpoint()
                self._saved_at = last = clock()
        self._flush(pending)
        self._worker_died = batches.died
        if batches.died and world_size() > 1:  # the others wait in this step's collectives: no saving together
            raise WorkerDied.saying(batches.died, f"what the run last saved is kept. Continue with fewer workers: "
                                                  f"{self._resume_command()}")
        seconds = max(clock() - epoch_start, 1e-9)
        # The epoch's mean loss, over the steps it took before an interrupt too.
        return {"loss": state.loss_sum / max(state.loss_steps, 1), "images_per_s": images / seconds, "steps": steps}

    def _note_skipped(self, skipped: list[Skipped]) -> None:
        """Record a batch's unreadable files; rank 0 warns of every rank's (the others report nothing)."""
        new = [item for item in skipped if item.path not in self.skipped]
        note_skipped(self.skipped, new, self.report)
        # A small CPU message each step; the files themselves only when some rank found new ones.
        if world_size() > 1 and distributed.any_rank(bool(new)):
            note_skipped(self.skipped, distributed.gather_objects(new), self.report)

    def _step(self, samples: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """One optimiser step on a batch of two-view samples (N, 2, C, H, W); returns the global loss.

        `sizes` holds every rank's number of images in this step ([N] in one process).
        """
        views = samples.to(self.device, non_blocking=True)
        n = views.shape[0]
        temperature = self.config.temperature
        if self.config.chunk_size:
            self.optimizer.zero_grad(set_to_none=True)
            loss = cached_backward(self.parallel_model, self._embed, views.flatten(0, 1),  # (2N, C, H, W) in pairs
                                   lambda z: global_nt_xent(z[0::2], z[1::2], temperature, sizes),
                                   paired_chunks(n, chunk_count(sizes, self.config.chunk_size), self.device),
                                   scale=self.scaler.scale if self.scaler is not None else lambda loss: loss)
        else:
            with self.precision.autocast():
                projections = self.parallel_model(_two_view_images(views))  # (2N, D)
            loss = global_nt_xent(projections[:n], projections[n:], temperature, sizes)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return distributed.mean_over_ranks(loss.detach())

    def _views(self, batch) -> torch.Tensor:
        """The batch's two-view samples (N, 2, C, H, W), augmented on the device if it was left to it."""
        if batch.params is None:
            return batch.samples
        return self.batch_augment(batch.samples.to(self.device, non_blocking=True), batch.params)

    def _embed(self, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Projections (r, D) of views (r, C, H, W): for gradient caching."""
        with self.precision.autocast():
            return model(images.contiguous(memory_format=torch.channels_last))  # (r, D)

    def _flush(self, pending: list[tuple[dict[str, Any], torch.Tensor]]) -> None:
        """Write pending step records to metrics.jsonl; stop the run on a non-finite loss."""
        if not pending:
            return
        losses = torch.stack([loss for _, loss in pending]).tolist()
        lines = []
        for (record, _), value in zip(pending, losses):
            if not math.isfinite(value):
                if is_main():  # the steps before it, and their curves, are what the user needs to see
                    self._log(lines)
                    self.curves.draw(final=True)
                raise TrainingDiverged.at(value, record["step"], self.run_dir, "Lower --lr or raise --temperature")
            record["loss"] = value
            lines.append(json.dumps(record) + "\n")
        self.state.loss_sum += sum(losses)
        self.state.loss_steps += len(losses)
        if is_main():
            self._log(lines)
        pending.clear()

    def _log(self, lines: list[str]) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as log:
            log.writelines(lines)

    # -- outputs ----------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        if distributed.any_rank(not finite_weights(self.model)):
            if is_main():
                self.curves.draw(final=True)
            raise TrainingDiverged.in_weights(self.state.step, self.run_dir, "Lower --lr or raise --temperature")
        for item in distributed.gather_objects(list(self.skipped.values())):  # other ranks' unreadable files
            self.skipped.setdefault(item.path, item)
        if not is_main():
            return
        progress = {"state": asdict(self.state), "num_images": len(self.paths), "listing": self.listing,
                    "precision": self.precision.name,
                    "skipped": [s.to_json() for s in self.skipped.values()],
                    "scaler": self.scaler.state_dict() if self.scaler is not None else None}
        save_checkpoint(self.run_dir / CHECKPOINT_FILE, {"backbone": self.model.backbone, "head": self.model.head},
                        self.optimizer, rng_state(), progress)
        write_json(self.run_dir / "skipped.json", [s.to_json() for s in self.skipped.values()])

    def _resume_command(self) -> str:
        """The command that continues this run with half its loader workers (on as many processes)."""
        return resume_command("pretrain", self.run_dir, self.workers // 2, world_size(), self.device_given)

    def encoder_info(self) -> EncoderInfo:
        return EncoderInfo(arch=self.config.arch, stem=self.config.stem, width=self.config.width,
                           feature_dim=self.model.backbone.feature_dim, image_size=self.config.augment.image_size,
                           mean=IMAGENET_MEAN, std=IMAGENET_STD, version=__version__, config=self.config.to_json())

    def export(self) -> Path:
        """Write encoder.safetensors (backbone only) and head.safetensors; return the encoder path."""
        info = self.encoder_info()
        path = self.run_dir / ENCODER_FILE
        if not is_main():
            return path
        save_encoder(path, self.model.backbone, info)
        head_meta = {"format": "simclr-head", "layers": str(self.config.proj_layers),
                     "out_bn": str(self.config.proj_out_bn).lower(),
                     "out_dim": str(self.config.proj_dim), "in_dim": str(info.feature_dim)}
        save_tensors(self.run_dir / HEAD_FILE, self.model.head.state_dict(), head_meta)
        return path

    def run(self) -> PretrainResult:
        """Train to the end (epochs or time budget), checkpointing every epoch; export the encoder."""
        state, offset = self.state, self.state.elapsed
        session_start = self._created  # the budget counts the scan and set-up too

        def clock() -> float:  # seconds of training over all sessions of this run, as rank 0 counts them
            return distributed.from_rank0(offset + time.monotonic() - session_start)

        if state.step >= self.total_steps and not state.finished:  # resumed on a folder that lost images
            self.report("warning", text=f"{self.config.data_dir} now gives {self.total_steps} steps in "
                                        f"{self.config.epochs} epochs, and the run has taken {state.step}: it "
                                        f"ends here")
            state.finished = True
        elif state.finished:
            self.report("message", text=f"{self.run_dir} had already finished; exporting its encoder again")
        # Nothing to train: no "training for 0 steps", nor a time budget's count of steps it will not take.
        nothing_to_train = state.finished
        if not nothing_to_train:
            self.report("start", total_steps=self.total_steps, start_step=state.step, epochs=self.config.epochs,
                        steps_per_epoch=self.steps_per_epoch, max_time=self.config.max_time)
        final_loss: float | None = None
        interrupted = False
        self._saved_at = clock()
        with StopFlag(lambda name: answer_stop(self.report, name, "the encoder" if state.finished else None)) as stop:
            while not state.finished:
                metrics = self.train_one_epoch(stop, clock)
                if metrics["steps"]:
                    final_loss = metrics["loss"]
                epoch_done = state.step_in_epoch >= self.steps_per_epoch
                if epoch_done and state.step == 0:  # every batch skipped: training on would export a random encoder
                    raise DataError(f"{self.config.data_dir}: no batch of a whole epoch held two images that could "
                                    f"be decoded (see the warnings above), and SimCLR contrasts each image with the "
                                    f"others in its batch; fix or replace the images, then run again with --resume")
                if epoch_done:
                    state.epoch += 1
                    state.past_epoch_steps += self.steps_per_epoch
                    state.step_in_epoch, state.loss_sum, state.loss_steps = 0, 0.0, 0
                    self.report("epoch", epoch=state.epoch, epochs=self.config.epochs, **metrics)
                    if self.config.monitor:  # measured on rank 0; every rank reserves its time alike
                        started = clock()
                        if self.monitor is not None:
                            knn = self.monitor.log_epoch(self.run_dir, self.model.backbone, self.encoder_info(),
                                                         state.epoch, state.step)
                            if knn is None:  # nothing to measure (warned): not tried again in this session
                                self.monitor = None
                            else:
                                self.report("message", text=f"epoch {state.epoch}: kNN top-1 {knn:.1%} on "
                                                            f"{self.config.monitor}")
                        self._monitor_seconds = clock() - started
                out_of_time, elapsed = False, 0.0
                if not (state.epoch >= self.config.epochs or state.step >= self.total_steps):
                    elapsed = clock()
                    out_of_time = distributed.any_rank(self._out_of_time(elapsed))
                state.finished = state.epoch >= self.config.epochs or state.step >= self.total_steps or out_of_time
                if state.finished and state.step == 0:  # the budget went on set-up: the encoder would be random
                    raise ConfigError(f"--max-time {self.config.max_time:g}s was spent before the first step "
                                      f"(set-up took {clock():.0f} s: the scan, the model, the loader); give a "
                                      f"longer --max-time, with another --out or after deleting {self.run_dir}")
                if out_of_time:  # else the run ends thousands of steps short of its count, and nothing says why
                    self.report("budget", text=self._budget_note(elapsed))
                if (distributed.any_rank(stop.signal is not None) or self._worker_died) and not state.finished:
                    interrupted = True
                self.save_checkpoint()
                self._saved_at = clock()
                if is_main():
                    self.curves.draw()  # at most once a minute; always at the end
                if interrupted:
                    break
            # Still inside: a signal now is too late to stop anything, and would leave an encoder without its head
            # (a second one stops at once).
            if is_main():
                self.curves.draw(final=True)
            if state.finished and final_loss is None and state.step and not nothing_to_train:
                self.report("message", text=f"{self.run_dir} had already finished; exporting its encoder again")
            encoder = None if interrupted else self.export()
        if interrupted and self._worker_died:
            raise WorkerDied.saying(self._worker_died, f"the run is saved at step {state.step}. Continue with fewer "
                                                       f"workers: {self._resume_command()}")
        if not interrupted:
            self.report("done", encoder=str(encoder), steps=state.step, images_seen=state.images_seen,
                        elapsed=state.elapsed, loss=final_loss)
        return PretrainResult(self.run_dir, encoder, state, final_loss, list(self.skipped.values()), interrupted)


def answer_stop(report: Report, name: str, outputs: str | None) -> None:
    """Answer a run's first Ctrl-C or SIGTERM (`name`): it saves after this step and stops, or after its last step
    (`outputs`: what it writes then) writes those first."""
    if outputs:
        text = stop_reply(name, f"training is over; writing {outputs} first", "and `--resume` finishes the run")
    else:
        text = stop_reply(name, "saving the run after this step, then stopping", "losing the steps since the last save")
    report("stopping", text=text)


def _count(saved: Any) -> str:
    """An image count from a saved file as the messages write counts (1,797), or as it is where not a number."""
    return f"{saved:,}" if isinstance(saved, int) else str(saved)


def _decodes(path: str) -> bool:
    try:
        load_rgb(path)
    except UnreadableImage:
        return False
    return True


def _listing_digest(root: str, paths: Sequence[str | Path]) -> str:
    """A digest of the paths below `root`: the same for the same files in a folder that has moved."""
    root = os.path.join(root, "")
    relative = [p[len(root):] if p.startswith(root) else os.path.relpath(p, root) for p in map(str, paths)]
    return hashlib.blake2b("\n".join(relative).encode(errors="surrogateescape"), digest_size=8).hexdigest()


_PIPELINES = {
    "device": "crops in the loader workers, colour and blur in batches on the training device",
    "cpu": "crops, colour and blur in batches in the loader workers",
    "per-image": "torchvision's per-image pipeline in the loader workers",
}


def _two_view_images(views: torch.Tensor) -> torch.Tensor:
    """Two-view samples (N, 2, C, H, W) as one batch of images (2N, C, H, W): all a views, then all b."""
    images = views.transpose(0, 1).reshape(2 * len(views), *views.shape[2:])  # (2N, C, H, W)
    return images.contiguous(memory_format=torch.channels_last)


def pretrain(config: PretrainConfig, report: Report = silent) -> PretrainResult:
    """Pretrain a new run in config.out_dir, held against a `--resume` of it meanwhile."""
    config = config.validate()
    with claimed(config.out_dir, "--out") if is_main() else contextlib.nullcontext():  # rank 0 holds it for all
        return PretrainRun(config, report).run()


def resume_pretrain(run_dir: str | Path, report: Report = silent, data_dir: str | None = None,
                    device: str | None = None, workers: int | None = None,
                    monitor: str | None = None) -> PretrainResult:
    """Continue the run in `run_dir` from its checkpoint, with its saved configuration."""
    run_dir = Path(run_dir)
    moved = {name: path for name, path in (("data_dir", data_dir), ("monitor", monitor)) if path}  # new places
    config = read_run_config(PretrainConfig, run_dir, "pretrain", device=device, workers=workers, **moved)
    if data_dir is None and not Path(config.data_dir).is_dir():
        raise DataError(f"--resume {run_dir}: the run's images ({config.data_dir}, saved in its config.json) are not "
                        f"there; if they moved, pass their new place: simclr pretrain NEW_DIR --resume {run_dir}")
    with held(run_dir, "--resume") if is_main() else contextlib.nullcontext():  # rank 0 holds it for the others
        return PretrainRun(config, report, resume=True, device_given=device).run()

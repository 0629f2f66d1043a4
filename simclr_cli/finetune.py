"""Fine-tuning: the encoder and a new linear head trained end to end on labelled images for a fixed number
of epochs, as in the papers, validated after each; resumable and interrupt-safe like pretraining."""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torchvision import transforms as T

from simclr_cli import __version__
from simclr_cli.augment import preprocessing
from simclr_cli.config import FinetuneConfig, check_saved_types, replace
from simclr_cli.data import ImageDataset, UntilWorkerDies, epoch_order, in_flight_bytes, make_loader
from simclr_cli.errors import ConfigError, ModelFileError, WorkerDied
from simclr_cli.evaluate import (CONFUSION_FILE, classification_report, draw_confusion, knn_report, report_data,
                                 split_features)
from simclr_cli.export import (CHECKPOINT_FILE, CHECKPOINT_SECONDS, HEAD_FILE, PROVENANCE, check_run_dir,
                               load_checkpoint, load_encoder, load_optimizer, read_run_config, save_checkpoint,
                               save_tensors)
from simclr_cli.features import compute_features, eval_dataset
from simclr_cli.files import (FINETUNED_FILE, NOT_BACKBONE, EncoderInfo, claimed, held, read_json, read_json_lines,
                              read_metadata, resolve_model_path, resume_command, shareable, write_json, write_text)
from simclr_cli.images import Skipped, UnreadableImage, load_rgb, note_skipped
from simclr_cli.labels import LabelledData, LabelledSet, balanced_subset, check_decoded, load_labelled
from simclr_cli.memory import batch_shortfall, fitting_workers
from simclr_cli.models import build_backbone
from simclr_cli.optim import build_optimizer, set_lr, warmup_cosine
from simclr_cli.runtime import (StopFlag, default_workers, precision_change, resolve_device, resolve_precision,
                                rng_state, seed_everything, set_rng_state)
from simclr_cli.train import Report, TrainingDiverged, answer_stop, finite_weights, silent, use_even_batch

FINETUNED_FORMAT = "simclr-finetuned"
RESULTS_FILE = "finetune.json"
SPLIT_FILE = "split.json"


def finetune_augmentation(info: EncoderInfo, crop_min_scale: float = 0.08) -> T.Compose:
    """Random resized crop and horizontal flip only, as SimCLR fine-tunes (arXiv 2002.05709, B.6)."""
    return T.Compose([
        T.RandomResizedCrop(info.image_size, scale=(crop_min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC,
                            antialias=True),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(info.mean, info.std),
    ])


def first_head_layer(model_path: Path, feature_dim: int) -> nn.Module:
    """The first Linear-BN-ReLU layer of the projection head saved beside the encoder (SimCLRv2, arXiv
    2006.10029, section 2: fine-tuning from the middle of a 3-layer head beats fine-tuning from h). Its
    input width is checked against the encoder's `feature_dim` here, before the run writes anything."""
    head_path = model_path.parent / HEAD_FILE
    if not head_path.is_file():
        raise ConfigError(f"--from-head-layer 1: no {HEAD_FILE} beside {model_path}; pass the run folder of "
                          f"`simclr pretrain` (it writes one), or use --from-head-layer 0")
    if read_metadata(head_path, "projection head").get("format") != "simclr-head":
        raise ModelFileError(f"{head_path}: not a simclr projection head; pass the run folder of `simclr pretrain`")
    tensors = load_file(str(head_path))
    if "layers.0.weight" not in tensors or "layers.1.running_mean" not in tensors:
        raise ModelFileError(f"{head_path}: the head has no Linear-BN first layer; use --from-head-layer 0")
    weight = tensors["layers.0.weight"]
    if weight.ndim != 2 or weight.shape[1] != feature_dim:
        raise ModelFileError(f"{head_path}: its first layer takes {weight.shape[1] if weight.ndim == 2 else '?'} "
                             f"features, but the encoder {model_path} gives {feature_dim}; the head belongs to another "
                             f"encoder: put the one its run saved beside it, or use --from-head-layer 0")
    hidden, width = weight.shape
    layer = head_layer(width, hidden)
    try:
        layer.load_state_dict({k: v for k, v in tensors.items() if k.startswith(("layers.0.", "layers.1."))})
    except RuntimeError:  # a BatchNorm of another width than the Linear before it
        raise ModelFileError(f"{head_path}: its first layer's Linear and BatchNorm do not fit together; the file "
                             f"is damaged: use the head.safetensors its run saved, or --from-head-layer 0") from None
    return layer


def head_layer(width: int, hidden: int) -> nn.Module:
    """An untrained Linear-BN-ReLU layer, keyed as the projection head's first (layers.0, layers.1)."""
    layer = nn.Sequential(OrderedDict(layers=nn.Sequential(
        nn.Linear(width, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True))))
    layer.out_dim = hidden
    return layer


class Classifier(nn.Module):
    """The encoder f, optionally the first projection-head layer, and a new linear classifier."""

    def __init__(self, backbone: nn.Module, num_classes: int, head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.classifier = nn.Linear(head.out_dim if head is not None else backbone.feature_dim, num_classes)
        nn.init.zeros_(self.classifier.weight)  # as SimCLR's code does: every class starts equally likely
        nn.init.zeros_(self.classifier.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)  # (N, D)
        if self.head is not None:
            features = self.head(features)  # (N, hidden)
        return self.classifier(features)  # (N, C)

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """Backbone keys as torchvision names them, then head.* and classifier.*."""
        tensors = dict(self.backbone.state_dict())
        if self.head is not None:
            tensors.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        tensors.update({f"classifier.{k}": v for k, v in self.classifier.state_dict().items()})
        return tensors

    def load_export(self, tensors: dict[str, torch.Tensor]) -> None:
        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.backbone.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(NOT_BACKBONE)})
        if self.head is not None:
            self.head.load_state_dict(part("head."))
        self.classifier.load_state_dict(part("classifier."))


@dataclass
class FinetuneState:
    """Where the loop is; saved in every checkpoint."""

    epoch: int = 0  # epochs completed
    step: int = 0
    step_in_epoch: int = 0
    elapsed: float = 0.0
    loss_sum: float = 0.0  # the current epoch's running sums, kept across an interrupt
    correct: int = 0
    seen: int = 0


@dataclass
class FinetuneResult:
    run_dir: Path
    model_path: Path | None
    state: FinetuneState
    results: dict[str, Any] = field(default_factory=dict)
    skipped: list[Skipped] = field(default_factory=list)
    interrupted: bool = False


class FinetuneRun:
    """One fine-tuning run in one folder: built fresh, or from its checkpoint when resuming."""

    def __init__(self, config: FinetuneConfig, report: Report = silent, resume: bool = False,
                 device_given: str | None = None):
        """`device_given`: as PretrainRun's."""
        self.config = config = config.with_absolute_paths()
        self.report = report
        self.device_given = device_given
        self.run_dir = Path(config.out_dir)
        restore = check_run_dir(self.run_dir, resume, FINETUNED_FILE, FinetuneConfig)
        if resume and not restore:  # stopped in its first epoch (a crash, a lost machine): start it again as saved
            report("message", text=f"{self.run_dir} stopped before its first checkpoint: starting it again")
        settled, resume = resume, restore  # settled: the batch below was decided when the run began
        self.device = resolve_device(config.runtime.device)
        self.precision = resolve_precision(config.runtime.precision, self.device)
        self.workers = config.runtime.workers if config.runtime.workers is not None else default_workers()
        self._worker_died: str | None = None  # how a loader worker died, which stops the run as a signal does
        seed_everything(config.runtime.seed)
        self.checkpoint = load_checkpoint(self.run_dir / CHECKPOINT_FILE) if resume else None
        backbone, head, self.info = self._encoder()
        # The encoder file itself (MODEL may be its run folder), in config.json and the report, resumed or not.
        self.config = config = replace(config, model=str(self.model_path))
        self.data = self._read_split() if resume else self._load_data()
        self.skipped: dict[str, Skipped] = {s.path: s for s in self.data.skipped}
        train = self.data.train
        # channels_last, as pretrain and compute_features use: faster convolutions, and the same kernels as the
        # exported encoder runs
        self.model = Classifier(backbone, len(self.data.classes), head).to(self.device,
                                                                          memory_format=torch.channels_last)
        self.batch_size = min(config.batch_size, len(train))
        if self.batch_size < config.batch_size:
            report("warning", text=f"only {len(train):,} training images: using batch size {self.batch_size} "
                                   f"instead of {config.batch_size}")
        if self.device.type == "cpu" and not resume:  # a resumed run keeps the batch its steps were counted in
            # A batch whose activations do not fit in free memory would get the process killed mid-step.
            batch_bytes = self.batch_size * 3 * self.info.image_size ** 2 * 4  # as the loader yields it: float32
            self.workers = fitting_workers(self.workers, in_flight_bytes(1, batch_bytes), report)
            shortfall = batch_shortfall(self.model, self.info.image_size, self.precision, self.batch_size,
                                        views_per_image=1, loader_bytes=in_flight_bytes(self.workers, batch_bytes))
            if shortfall is not None:
                fitting = max(2, shortfall.images)  # BatchNorm needs two
                report("warning", text=f"{shortfall.describe(self.batch_size)}: using batch size {fitting} "
                                       f"(the learning rate follows it); --batch-size sets it")
                self.batch_size = fitting
        if not settled:
            self.batch_size = use_even_batch(len(train), self.batch_size, report, lr_follows=config.lr is None)
        if self.batch_size != config.batch_size:
            # the learning-rate rule and config.json follow the batch that trains, not the one asked for
            self.config = config = replace(config, batch_size=self.batch_size)
        self.steps_per_epoch = max(1, len(train) // self.batch_size)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.optimizer = build_optimizer("sgd", self.model, config.resolved_lr, config.weight_decay)
        self.scaler = self.precision.grad_scaler()
        crops = finetune_augmentation(self.info, config.resolved_crop_min_scale(self.info.image_size))
        self.train_set = ImageDataset(train.paths, crops, train.labels, min_side=self.info.image_size,
                                      seed=config.runtime.seed)
        self.val_set = eval_dataset(self.info, self.data.val.paths, self.data.val.labels)
        self.state = FinetuneState()
        if resume:
            self._restore()
            self.checkpoint = None  # its tensors are in the model and optimiser now
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.run_dir / "config.json", config.to_json())
            (self.run_dir / "metrics.jsonl").write_text("")
        report("message", text=f"fine-tuning {self.info.arch} from {self.model_path} on {len(train):,} labelled "
                               f"images ({len(self.data.classes)} classes), {len(self.data.val):,} for validation; "
                               f"{self.device} ({self.precision.name}), batch {self.batch_size}, "
                               f"lr {config.resolved_lr:g}")

    # -- set-up -----------------------------------------------------------------------------

    def _encoder(self) -> tuple[nn.Module, nn.Module | None, EncoderInfo]:
        """The encoder to fine-tune, and the head layer with --from-head-layer 1: read from MODEL, or on resume
        built from what the checkpoint says of them (its weights replace theirs), so MODEL may have moved. Sets
        `model_path`, the encoder file."""
        saved = self.checkpoint.progress.get("encoder") if self.checkpoint is not None else None
        if saved is None:  # a new run, or a checkpoint from before the checkpoint said
            self.model_path = resolve_model_path(self.config.model)
            backbone, info = load_encoder(self.model_path)
            head = first_head_layer(self.model_path, backbone.feature_dim) if self.config.from_head_layer else None
            return backbone, head, info
        try:
            info = EncoderInfo.from_metadata(saved["metadata"], self.run_dir / CHECKPOINT_FILE)
            head = head_layer(info.feature_dim, saved["head_width"]) if saved["head_width"] else None
        except (KeyError, TypeError, ValueError, RuntimeError):  # RuntimeError: a width torch refuses
            raise ModelFileError(f"{self.run_dir / CHECKPOINT_FILE}: its description of the encoder is damaged; "
                                 f"restore the file as the run wrote it, or start a new run with another "
                                 f"--out") from None
        self.model_path = Path(self.config.model)
        backbone = build_backbone(info.arch, info.stem, initialise=False, width=info.width)
        return backbone, head, info

    def _load_data(self) -> LabelledData:
        """The labelled images, the training set cut to --label-fraction; saved to split.json."""
        config, d = self.config, self.config.data
        data = load_labelled(d.train_dir, d.labels_csv, d.val_dir, d.val_split, config.runtime.seed,
                             out_dir=self.run_dir)
        if config.label_fraction < 1:
            total, broken = len(data.train), {}
            self.report("message", text=f"drawing the --label-fraction {config.label_fraction:g} subset of {total:,} "
                                        f"training images (each image drawn is decoded once, to pass over broken ones)")

            def decodes(index: int) -> bool:  # a share of one image per class must not be a broken file
                try:
                    load_rgb(data.train.paths[index], min_side=self.info.image_size)
                except UnreadableImage as error:
                    broken[index] = Skipped(str(data.train.paths[index]), str(error))
                    return False
                return True

            data.train = data.train.subset(balanced_subset(data.train.labels, config.label_fraction,
                                                           config.runtime.seed, decodes))
            data.skipped += [broken[index] for index in sorted(broken)]
            self.report("message", text=f"--label-fraction {config.label_fraction:g}: {len(data.train):,} of "
                                        f"{total:,} training images, class-balanced"
                                        + (f", passing over {len(broken):,} that could not be decoded" if broken
                                           else ""))
        report_data(data, self.report)
        if config.label_fraction < 1:  # every image of a class's share was drawn past the broken ones: it has none
            check_decoded(data.classes, data.train.labels)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.run_dir / SPLIT_FILE, {"classes": data.classes, "train": data.train.to_json(),
                                               "val": data.val.to_json(),
                                               "skipped": [s.to_json() for s in data.skipped]})
        return data

    def _read_split(self) -> LabelledData:
        path = self.run_dir / SPLIT_FILE
        split = read_json(path, "list of training and validation images")
        try:
            return LabelledData(split["classes"], LabelledSet.from_json(split["train"]),
                                LabelledSet.from_json(split["val"]), [Skipped(**s) for s in split["skipped"]])
        except (TypeError, KeyError, ValueError, AttributeError):  # edited, or another program's file
            raise ConfigError(f"{path}: not the list of training and validation images this run wrote; restore "
                              f"the file, or start a new run with another --out") from None

    def _restore(self) -> None:
        path, checkpoint = self.run_dir / CHECKPOINT_FILE, self.checkpoint
        try:
            self.model.load_state_dict(checkpoint.module_state("model"))
            load_optimizer(self.optimizer, checkpoint.tensors, checkpoint.optimizer)
            set_rng_state(checkpoint.rng_tensors(), checkpoint.rng)
            if self.scaler is not None and checkpoint.progress.get("scaler"):  # fp16: the loss scale it had reached
                self.scaler.load_state_dict(checkpoint.progress["scaler"])
            known = {item.name for item in fields(FinetuneState)}  # earlier versions kept best_top1 and best_epoch too
            self.state = check_saved_types(FinetuneState(**{k: v for k, v in checkpoint.progress["state"].items()
                                                            if k in known}))
            self.skipped.update({s["path"]: Skipped(**s) for s in checkpoint.progress.get("skipped", [])})
        except (TypeError, KeyError, ValueError, RuntimeError, AttributeError, IndexError):  # RuntimeError: shapes
            raise ModelFileError(f"{path}: does not fit the run's config.json and {SPLIT_FILE} (edited?) or is "
                                 f"damaged; restore the files as the run wrote them, or start a new run with another "
                                 f"--out") from None
        if (change := precision_change(checkpoint.progress.get("precision"), self.precision)) is not None:
            self.report("warning", text=change)
        log = self.run_dir / "metrics.jsonl"
        write_text(log, "".join(json.dumps(record) + "\n" for record in read_json_lines(log)
                                if record["epoch"] <= self.state.epoch))
        if self.state.epoch >= self.config.epochs:  # "at epoch 4" of 3 said nothing true
            self.report("message", text=f"{self.run_dir} had finished training; writing its model and report again")
        else:
            self.report("message", text=f"resuming {self.run_dir} at epoch {self.state.epoch + 1}, "
                                        f"step {self.state.step}")

    # -- the loop ---------------------------------------------------------------------------

    def train_one_epoch(self, stop: StopFlag, clock) -> None:
        """Train until the epoch ends or a stop is requested; running sums go to the state."""
        config, state, device = self.config, self.state, self.device
        self.model.train()
        self.train_set.epoch = state.epoch
        order = epoch_order(len(self.train_set), config.runtime.seed, state.epoch)
        start = state.step_in_epoch * self.batch_size
        loader = make_loader(self.train_set, self.batch_size, order[start:], self.workers, drop_last=True,
                             pin_memory=device.type == "cuda")
        last = clock()
        batches = UntilWorkerDies(loader)
        for batch in batches:
            note_skipped(self.skipped, batch.skipped, self.report)
            if batch.samples is None or len(batch) < 2:  # BatchNorm needs two images
                state.step_in_epoch += 1  # past it, or the epoch never ends
                continue
            lr = config.resolved_lr * warmup_cosine(state.step / self.total_steps, 0.0)
            set_lr(self.optimizer, lr)
            images = batch.samples.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            labels = batch.labels.to(device, non_blocking=True)
            with self.precision.autocast():
                logits = self.model(images)  # (N, C)
            loss = nn.functional.cross_entropy(logits.float(), labels)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            value = loss.item()
            if not math.isfinite(value):
                raise TrainingDiverged.at(value, state.step + 1, self.run_dir, "Lower --lr")
            now = clock()
            state.step += 1
            state.step_in_epoch += 1
            state.elapsed = now
            state.loss_sum += value * len(batch)
            state.correct += (logits.argmax(1) == labels).sum().item()
            state.seen += len(batch)
            self.report("step", step=state.step, epoch=state.epoch + 1, lr=lr, loss=value,
                        images_per_s=len(batch) / max(now - last, 1e-9), total_steps=self.total_steps,
                        progress=state.step / self.total_steps)
            last = now
            if stop.signal is not None:
                break
            # Not at the epoch's end, saved next anyway; and the save is no step's time.
            if now - self._saved_at >= CHECKPOINT_SECONDS and state.step_in_epoch < self.steps_per_epoch:
                self.save_checkpoint()
                self._saved_at = last = clock()
        self._worker_died = batches.died

    @torch.inference_mode()
    def predict(self, dataset: ImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, C), labels (N,)) of the readable images of a dataset, in eval mode."""
        self.model.eval()
        logits, labels = [], []
        loader = make_loader(dataset, self.config.batch_size, None, self.workers,
                             pin_memory=self.device.type == "cuda")
        for batch in loader:
            note_skipped(self.skipped, batch.skipped, self.report)
            if batch.samples is None:
                continue
            with self.precision.autocast():
                images = batch.samples.to(self.device).contiguous(memory_format=torch.channels_last)
                logits.append(self.model(images).float().cpu())  # (n, C)
            labels.append(batch.labels)
        if not logits:
            return torch.zeros(0, len(self.data.classes)), torch.zeros(0, dtype=torch.long)
        return torch.cat(logits), torch.cat(labels)  # (N, C), (N,)

    def end_epoch(self) -> None:
        """Validate, log, and reset the running sums. The epoch is counted once validated: a loader worker that dies
        validating leaves a state that a checkpoint saves, and a resume validates again."""
        state = self.state
        logits, labels = self.predict(self.val_set)
        state.epoch += 1
        state.step_in_epoch = 0
        top1 = (logits.argmax(1) == labels).double().mean().item() if len(labels) else 0.0
        record = {"epoch": state.epoch, "step": state.step, "loss": state.loss_sum / max(state.seen, 1),
                  "train_top1": state.correct / max(state.seen, 1), "val_top1": top1,
                  "val_loss": nn.functional.cross_entropy(logits, labels).item() if len(labels) else None,
                  "time": round(state.elapsed, 3)}
        with open(self.run_dir / "metrics.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")
        state.loss_sum, state.correct, state.seen = 0.0, 0, 0
        self.report("message", text=f"epoch {state.epoch}/{self.config.epochs}: loss {record['loss']:.4f}, "
                                    f"train top-1 {record['train_top1']:.1%}, val top-1 {top1:.1%}")

    # -- outputs ----------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        if not finite_weights(self.model):
            raise TrainingDiverged.in_weights(self.state.step, self.run_dir, "Lower --lr")
        progress = {"state": asdict(self.state), "skipped": [s.to_json() for s in self.skipped.values()],
                    "precision": self.precision.name,
                    "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                    # enough to rebuild the model without MODEL, which a resume may no longer find
                    "encoder": {"metadata": self.info.to_metadata(),
                                "head_width": self.model.head.out_dim if self.model.head is not None else None}}
        save_checkpoint(self.run_dir / CHECKPOINT_FILE, {"model": self.model}, self.optimizer, rng_state(), progress)

    def export(self) -> Path:
        """Write finetuned.safetensors: an encoder file (simclr embed reads it) with head and classifier, unless it
        holds these weights already (see export.PROVENANCE)."""
        info = self.info
        resize = preprocessing(info).resize
        metadata = {
            **info.to_metadata(), "format": FINETUNED_FORMAT, "classes": json.dumps(self.data.classes),
            "num_classes": str(len(self.data.classes)), "from_head_layer": str(self.config.from_head_layer),
            "preprocessing": json.dumps({"resize": resize, "center_crop": info.image_size,
                                         "interpolation": "bicubic", "mean": list(info.mean),
                                         "std": list(info.std)}),
            "epoch": str(self.state.epoch),
            "finetune_config": json.dumps(shareable(self.config.to_json())), "simclr_version": __version__,
        }
        path = self.run_dir / FINETUNED_FILE
        save_tensors(path, self.model.export_tensors(), metadata, PROVENANCE)
        return path

    def final_report(self) -> dict[str, Any]:
        """Export the last epoch's model, then measure the file on the validation set: linear-eval's report,
        kNN on its encoder. The last epoch, not the best: choosing the epoch by the accuracy it reports would
        overstate it, and with --val TEST would choose the model on the test set."""
        self.model.load_export(load_file(str(self.export())))
        logits, labels = self.predict(self.val_set)
        results = classification_report(logits, labels, self.data.classes)
        self.report("message", text="kNN on the fine-tuned encoder's features")
        paths = self.data.train.paths + self.data.val.paths
        features, kept, skipped = compute_features(self.model.backbone, self.info, paths, self.device,
                                                   self.precision, self.batch_size, self.workers)
        note_skipped(self.skipped, skipped, self.report)
        results.update(knn_report(*split_features(self.data, features, kept), len(self.data.classes)))
        results.update({
            "epoch": self.state.epoch, "epochs": self.config.epochs,
            "num_train": int((kept < len(self.data.train)).sum()),  # decoded, as num_val
            "num_val": len(labels), "label_fraction": self.config.label_fraction, "classes": self.data.classes,
            "model": str(self.run_dir / FINETUNED_FILE), "pretrained": str(self.model_path),
            "skipped": [s.to_json() for s in self.skipped.values()], "config": self.config.to_json(),
        })
        draw_confusion(self.run_dir / CONFUSION_FILE, results["confusion"], self.data.classes, self.report)
        write_json(self.run_dir / RESULTS_FILE, results)
        return results

    def run(self) -> FinetuneResult:
        """Train to the last epoch, validating and checkpointing after each; export and report the last."""
        state, offset, session_start = self.state, self.state.elapsed, time.monotonic()

        def clock() -> float:  # seconds of training over all sessions of this run
            return offset + time.monotonic() - session_start

        if state.epoch < self.config.epochs:  # a finished run only writes its outputs again: no "training for 0 steps"
            self.report("start", total_steps=self.total_steps, start_step=state.step, epochs=self.config.epochs)
        interrupted = False
        self._saved_at = clock()

        def answer(name: str) -> None:
            answer_stop(self.report, name, "the model and its report" if state.epoch >= self.config.epochs else None)

        with StopFlag(answer) as stop:
            while state.epoch < self.config.epochs:
                self.train_one_epoch(stop, clock)
                train = self.data.train  # every image not skipped so far decoded, or is still to come
                decoded = [label for path, label in zip(train.paths, train.labels) if str(path) not in self.skipped]
                check_decoded(self.data.classes, decoded, ", then run again with another --out")
                if state.step_in_epoch >= self.steps_per_epoch:
                    try:
                        self.end_epoch()
                    except RuntimeError as error:  # a loader worker died validating: the epoch's steps are saved
                        if (how := WorkerDied.how(error)) is None:
                            raise
                        self._worker_died = how
                stopped = stop.signal is not None or self._worker_died is not None
                interrupted = stopped and state.epoch < self.config.epochs
                self.save_checkpoint()
                self._saved_at = clock()
                if interrupted:
                    break
            self.report("done")
            if interrupted and self._worker_died:
                fewer = resume_command("finetune", self.run_dir, self.workers // 2, device=self.device_given)
                raise WorkerDied.saying(self._worker_died, f"the run is saved at step {state.step}. Continue with "
                                                           f"fewer workers: {fewer}")
            if interrupted:
                return FinetuneResult(self.run_dir, None, state, skipped=list(self.skipped.values()), interrupted=True)
            # Still inside: a signal now is too late to stop anything, and would leave the model without its report
            # (a second one stops at once).
            results = self.final_report()
        return FinetuneResult(self.run_dir, self.run_dir / FINETUNED_FILE, state, results,
                              list(self.skipped.values()))


def finetune(config: FinetuneConfig, report: Report = silent) -> FinetuneResult:
    """Fine-tune a new run in config.out_dir, held against a `--resume` of it meanwhile."""
    config = config.validate()
    with claimed(config.out_dir, "--out"):
        return FinetuneRun(config, report).run()


def resume_finetune(run_dir: str | Path, report: Report = silent, device: str | None = None,
                    workers: int | None = None) -> FinetuneResult:
    """Continue the fine-tuning run in `run_dir` from its checkpoint, with its saved configuration."""
    run_dir = Path(run_dir)
    config = read_run_config(FinetuneConfig, run_dir, "finetune", device=device, workers=workers)
    with held(run_dir, "--resume"):
        return FinetuneRun(config, report, resume=True, device_given=device).run()

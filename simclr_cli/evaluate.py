"""Linear evaluation of a frozen encoder: cached features, an L2-regularised logistic-regression probe,
weighted kNN, and the accuracy report (JSON and a confusion-matrix image) shared with finetune."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors import SafetensorError
from safetensors.torch import load_file

from simclr_cli.config import LinearEvalConfig
from simclr_cli.errors import ConfigError, DataError, ModelFileError
from simclr_cli.export import load_encoder, save_tensors
from simclr_cli.features import compute_features
from simclr_cli.files import (EncoderInfo, atomic_path, check_output_path, read_metadata, resolve_model_path,
                              sha256_file, write_json)
from simclr_cli.images import Skipped
from simclr_cli.labels import LabelledData, check_decoded, load_labelled, stratified_split
from simclr_cli.runtime import Precision, resolve_device, resolve_precision, seed_everything
from simclr_cli.train import Report, silent

RESULTS_FILE = "linear_eval.json"
LINEAR_FILE = "linear.safetensors"
CONFUSION_FILE = "confusion_matrix.png"
L2_GRID = tuple(10.0**exponent for exponent in range(-6, 1))  # 1e-6 ... 1, on the mean cross-entropy
UNSEARCHED_L2 = 1e-3  # with one training image per class there is nothing to search on: the usual choice
# The gradient at which a float32 fit stops. 1e-7 reached the float64 optimum within 1% at l2 = 1e-6 on
# 10,000 x 512 separable features, in 2.6x the time of 1e-4 (a quarter of float64's).
FLOAT32_TOLERANCE = 1e-7
KNN_KS = (20, 200)
KNN_TEMPERATURE = 0.07


# -- features, computed once per (model, files, preprocessing) ------------------------------------

# Bumped whenever the features of the same files and model change (2: large JPEGs decoded at the resize side,
# not the crop size, f89beab; 3: PNG colour keys composited as transparency; 4: those of bilevel, 2-, 4- and
# 16-bit grey images too, and multi-picture JPEGs decoded in draft mode), so caches written before are not reused.
FEATURES_VERSION = 4


def feature_cache_key(model_sha256: str, paths: Sequence[Path], info: EncoderInfo, precision: Precision) -> str:
    """A digest of the model, the files (path, size, modification and change times) and the preprocessing.

    The change time (ctime) catches a file replaced by one of the same size and modification time, as
    `cp -p` or `rsync -a` restore them; it moves with chmod too, which costs only a recomputation."""
    files = []
    for path in paths:
        stat = os.stat(path)
        files.append([str(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns])
    preprocessing = [info.image_size, list(info.mean), list(info.std), precision.name]
    text = json.dumps([model_sha256, files, preprocessing, FEATURES_VERSION])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_features(backbone: torch.nn.Module, info: EncoderInfo, paths: Sequence[Path], device: torch.device,
                    precision: Precision, cache_path: Path, batch_size: int = 256, workers: int | None = None,
                    report: Report = silent) -> tuple[torch.Tensor, torch.Tensor, list[Skipped]]:
    """compute_features, stored in (or read back from) `cache_path`."""
    if cache_path.is_file():
        try:
            tensors = load_file(str(cache_path))
            skipped = [Skipped(**s) for s in json.loads(read_metadata(cache_path, "feature cache")["skipped"])]
            report("message", text=f"features read from the cache {cache_path}")
            return tensors["features"], tensors["indices"], skipped
        except (SafetensorError, OSError, KeyError, ValueError):
            report("warning", text=f"{cache_path} is damaged; computing the features again")
    report("message", text=f"computing features of {len(paths):,} images")
    features, indices, skipped = compute_features(backbone, info, paths, device, precision, batch_size, workers)
    save_tensors(cache_path, {"features": features, "indices": indices},
                 {"format": "simclr-features", "skipped": json.dumps([s.to_json() for s in skipped])})
    return features, indices, skipped


# -- the linear probe -----------------------------------------------------------------------------

@dataclass
class LinearProbe:
    """Multinomial logistic regression on standardised features: logits = ((h - mean) / std) W^T + b."""

    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)
    l2: float

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        standardised = (features.double() - self.mean) / self.std
        return standardised @ self.weight.T + self.bias  # (N, D) x (D, C) -> (N, C)

    def folded(self) -> dict[str, torch.Tensor]:
        """Weight and bias that apply to raw features, as float32."""
        weight = self.weight / self.std  # (C, D)
        bias = self.bias - weight @ self.mean  # (C,)
        return {"weight": weight.float(), "bias": bias.float()}


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float,
                 max_iter: int = 300, start: tuple[torch.Tensor, torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (C, D), bias (C,)) minimising mean cross-entropy + l2/2 ||W||^2, full batch, with L-BFGS,
    in the dtype of `features`, from zeros or from `start` (a nearby solution: warm start).

    The objective is scikit-learn's LogisticRegression with C = 1 / (l2 N) (bias not penalised).
    """
    dtype = features.dtype
    weight0, bias0 = start if start is not None else (torch.zeros(num_classes, features.shape[1]),
                                                      torch.zeros(num_classes))
    weight = weight0.to(dtype).clone().requires_grad_(True)
    bias = bias0.to(dtype).clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-9 if dtype == torch.float64 else FLOAT32_TOLERANCE,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = features @ weight.T + bias  # (N, D) x (D, C) -> (N, C)
        loss = torch.nn.functional.cross_entropy(logits, labels) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    # L-BFGS makes thousands of tiny vector operations; on a busy CPU, threads only add waiting.
    threads = torch.get_num_threads()
    if features.numel() < 1 << 22:
        torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            optimizer.step(closure)
    finally:
        torch.set_num_threads(threads)
    return weight.detach(), bias.detach()


def train_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float | None = None,
                       seed: int = 0) -> tuple[LinearProbe, list[dict[str, float]]]:
    """The probe on all training features, its L2 strength chosen (when not given) by accuracy on a
    stratified 20% of them, as in SimCLR's linear evaluation; also the search's (l2, accuracy) pairs.

    The search runs in float32 (2.4x faster than float64 on a CPU) with warm starts: from the strongest
    penalty to the weakest, each fit starting from the last solution. The final fit runs in float64,
    from the chosen float32 solution, to converge where float32 stalls (weak penalties). On 60,000 x 512
    features that takes about two minutes on 2 cores instead of 14 (all float64, from zeros). The float32
    fits stop at a gradient of FLOAT32_TOLERANCE: at 1e-4, fits at weak penalties on separable features
    stopped at 10-30x their optimum, and the search compared models stopped early.
    """
    features = features.double()
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    standardised = (features - mean) / std
    search: list[dict[str, float]] = []
    start = None
    if l2 is None:
        kept, held = stratified_split(labels.tolist(), 0.2, seed)
        if not held:  # one image per class: nothing to hold out, nothing to choose by
            l2 = UNSEARCHED_L2
        else:
            kept_x, held_x = standardised[kept].float(), standardised[held].float()
            kept_y, held_y = labels[kept], labels[held]
            best, previous = -1.0, None
            for candidate in sorted(L2_GRID, reverse=True):  # on ties the stronger penalty wins
                previous = fit_logistic(kept_x, kept_y, num_classes, candidate, start=previous)
                weight, bias = previous
                accuracy = ((held_x @ weight.T + bias).argmax(1) == held_y).double().mean().item()  # (n_held,)
                search.append({"l2": candidate, "holdout_top1": accuracy})
                if accuracy > best:
                    best, l2, start = accuracy, candidate, previous
    weight, bias = fit_logistic(standardised, labels, num_classes, l2, start=start)
    return LinearProbe(weight, bias, mean, std, l2), search


# -- weighted kNN ---------------------------------------------------------------------------------

def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
               num_classes: int, k: int = 20, temperature: float = KNN_TEMPERATURE,
               chunk: int = 1024) -> torch.Tensor:
    """(Q, C) class votes: each of the k most cosine-similar training images votes exp(sim / T) for
    its class (Wu et al. 2018, arXiv 1805.01978, the kNN monitor of the SSL literature)."""
    bank = torch.nn.functional.normalize(train_features.float(), dim=1)  # (N, D)
    queries = torch.nn.functional.normalize(query_features.float(), dim=1)  # (Q, D)
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, queries.shape[0], chunk):
        similarity = queries[start:start + chunk] @ bank.T  # (q, D) x (D, N) -> (q, N)
        top_similarity, top_index = similarity.topk(k, dim=1)  # (q, k)
        weights = (top_similarity / temperature).exp()  # (q, k)
        votes = torch.zeros(similarity.shape[0], num_classes)
        scores.append(votes.scatter_add_(1, train_labels[top_index], weights))  # (q, C)
    return torch.cat(scores) if scores else torch.zeros(0, num_classes)  # (Q, C)


# -- the report -----------------------------------------------------------------------------------

def classification_report(scores: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """top1, top5 (top-k with k = min(5, classes)), per-class accuracy and the confusion matrix."""
    num_classes = len(classes)
    predicted = scores.argmax(1)  # (N,)
    # A stable sort breaks ties toward the lower class index, as argmax does, so the top-1 prediction is
    # always among the top k (topk breaks ties its own way: a top-1 hit could be a top-5 miss).
    top5 = scores.sort(dim=1, descending=True, stable=True).indices[:, :min(5, num_classes)]  # (N, k)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)  # rows: true class
    per_class = {}
    for index, name in enumerate(classes):
        count = int(confusion[index].sum())
        per_class[name] = {"accuracy": confusion[index, index].item() / count if count else None, "count": count}
    return {
        "top1": (predicted == labels).double().mean().item(),
        "top5": (top5 == labels[:, None]).any(1).double().mean().item(),
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }


def knn_report(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
               val_labels: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """knn_top1 (k = 20) and the accuracy at each k in KNN_KS, keyed by the neighbours that voted: with 150
    training images, k = 200 is all of them, "k150" (and 20 of 12 images once, "k12")."""
    accuracy = {}
    for k in KNN_KS:
        k = min(k, len(train_features))
        scores = knn_scores(train_features, train_labels, val_features, num_classes, k)
        accuracy[f"k{k}"] = (scores.argmax(1) == val_labels).double().mean().item()
    return {"knn_top1": next(iter(accuracy.values())), "knn": {**accuracy, "temperature": KNN_TEMPERATURE}}


MAX_DRAWN_CLASSES = 1000


def draw_confusion(path: str | Path, confusion: list[list[int]], classes: list[str], report: Report = silent) -> None:
    """A confusion-matrix PNG: rows are true classes, columns predictions, shaded by row fraction. Not past
    MAX_DRAWN_CLASSES (said in a message): 1,000 classes take 5 s and 8,000 px a side, 10,000 would take hours and
    gigabytes, for a picture no one could read."""
    count = len(classes)
    if count > MAX_DRAWN_CLASSES:
        Path(path).unlink(missing_ok=True)  # an earlier run's, of other results
        report("message", text=f"{count:,} classes: no {Path(path).name} (drawn for up to {MAX_DRAWN_CLASSES:,}); the "
                               f"counts are under \"confusion\" in the report")
        return
    font = ImageFont.load_default()
    cell = max(8, min(48, 640 // count))
    names = [name[:16] for name in classes]
    label_width = max(64, max(int(font.getlength(name)) for name in names) + 8)  # room for "true \\ pred"
    size = label_width + cell * count + 4
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for row, values in enumerate(confusion):
        total = max(sum(values), 1)
        for column, value in enumerate(values):
            shade = value / total
            colour = (round(255 * (1 - shade)), round(255 * (1 - 0.7 * shade)), 255)
            x, y = label_width + column * cell, label_width + row * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour, outline=(220, 220, 220))
            if cell >= 24 and value:
                draw.text((x + cell / 2, y + cell / 2), str(value), anchor="mm", font=font,
                          fill="white" if shade > 0.5 else "black")
    for index, name in enumerate(names):
        centre = label_width + index * cell + cell / 2
        draw.text((label_width - 4, centre), name, anchor="rm", font=font, fill="black")
        tag = Image.new("RGB", (label_width, cell), "white")
        ImageDraw.Draw(tag).text((4, cell / 2), name, anchor="lm", font=font, fill="black")
        image.paste(tag.rotate(90, expand=True), (label_width + index * cell, 0))
    draw.text((2, 2), "true \\ pred", font=font, fill="grey")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


# -- the command ----------------------------------------------------------------------------------

@dataclass
class EvalResult:
    out_dir: Path
    results: dict[str, Any]
    skipped: list[Skipped]


def from_sorted(paths: Sequence[Path], features: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (M, D) of the decoded files among `sorted(paths, key=str)`, at positions `kept` (M,) of that list,
    as the features of `paths` in their own order: (features (M, D), positions in `paths` (M,), ascending)."""
    order = torch.as_tensor(sorted(range(len(paths)), key=lambda i: str(paths[i])), dtype=torch.long)
    kept = order[kept]  # (M,)
    return features[kept.argsort()], kept.sort().values


def split_features(data: LabelledData, features: torch.Tensor, kept: torch.Tensor,
                   sets: tuple[str, str] = ("training", "validation")) -> tuple[torch.Tensor, ...]:
    """(train features, train labels, val features, val labels) from features of train + val paths; `sets`
    names the two in the error when one has no readable image."""
    labels = torch.tensor(data.train.labels + data.val.labels, dtype=torch.long)[kept]  # (M,)
    is_train = kept < len(data.train)
    if not is_train.any() or is_train.all():
        which = sets[0] if not is_train.any() else sets[1]
        raise DataError(f"no readable {which} image; every file was skipped (see the warnings above)")
    return features[is_train], labels[is_train], features[~is_train], labels[~is_train]


def report_data(data: LabelledData, report: Report, prefix: str = "",
                sets: tuple[str, str] = ("training", "validation")) -> None:
    for note in data.notes:
        report("warning", text=prefix + note)
    for skipped in data.skipped:
        report("warning", text=f"{prefix}skipped {skipped.path}: {skipped.reason}")
    report("message", text=f"{prefix}{len(data.classes)} classes, {len(data.train):,} {sets[0]} and {len(data.val):,} "
                           f"{sets[1]} images")


def _written_here(name: str) -> bool:
    """Whether linear-eval writes files of this name (its report, probe, plot and features cache), or they may be
    there anyway: hidden files (a .DS_Store; temporaries of a killed write, probes of check_output_path)."""
    return (name in (RESULTS_FILE, LINEAR_FILE, CONFUSION_FILE) or name.startswith(".")
            or re.fullmatch(r"features-[0-9a-f]{16}\.safetensors", name) is not None)


def linear_eval(config: LinearEvalConfig, report: Report = silent) -> EvalResult:
    """Features of the frozen encoder, a linear probe and kNN on them; write the report to config.out_dir."""
    config.validate()
    seed_everything(config.runtime.seed)
    out_dir = Path(config.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; pass a folder for the results")
    check_output_path(out_dir, "--out", folder=True)
    device = resolve_device(config.runtime.device)
    precision = resolve_precision(config.runtime.precision, device)
    model_path = resolve_model_path(config.model)
    backbone, info = load_encoder(model_path, device)
    d = config.data
    data = load_labelled(d.train_dir, d.labels_csv, d.val_dir, d.val_split, config.runtime.seed,
                         out_dir=out_dir)
    others = sorted(p.name for p in out_dir.iterdir() if not _written_here(p.name)) if out_dir.is_dir() else []
    if others:  # a folder of photos (whose next scan would train on the plot), another command's run
        raise ConfigError(f"--out {out_dir} holds files linear-eval does not write ({others[0]}"
                          f"{f' and {len(others) - 1} more' if len(others) > 1 else ''}); choose an empty folder, or "
                          f"one an earlier linear-eval wrote (its features are reused)")
    report_data(data, report)
    out_dir.mkdir(parents=True, exist_ok=True)

    model_sha256 = sha256_file(model_path)
    paths = data.train.paths + data.val.paths
    # The features of the files in sorted order, so that one cache serves every split of them (another --seed or
    # --val-split); then in the order of `paths`.
    files = sorted(paths, key=str)
    cache = out_dir / f"features-{feature_cache_key(model_sha256, files, info, precision)}.safetensors"
    features, kept, skipped = cached_features(backbone, info, files, device, precision, cache, config.batch_size,
                                              config.runtime.workers, report)
    features, kept = from_sorted(paths, features, kept)
    for item in skipped:
        report("warning", text=f"skipped {item.path}: {item.reason}")
    unusable = (~torch.isfinite(features).all(1)).nonzero().flatten()  # one would make the probe NaN
    if len(unusable):
        raise ModelFileError(f"{model_path} gives features that are not finite for {paths[int(kept[unusable[0]])]}; "
                             f"evaluate a sound encoder, at --precision fp32 if it overflowed")
    train_x, train_y, val_x, val_y = split_features(data, features, kept)
    # A class with no training image left would get a probe that never saw it (and a single training image
    # left gives NaN standard deviations, so a NaN probe).
    check_decoded(data.classes, train_y.tolist())

    report("message", text="training the linear probe" + (" (choosing its L2 strength)" if config.l2 is None else ""))
    probe, search = train_linear_probe(train_x, train_y, len(data.classes), config.l2, config.runtime.seed)
    results = classification_report(probe.logits(val_x), val_y, data.classes)
    results.update(knn_report(train_x, train_y, val_x, val_y, len(data.classes)))
    results.update({
        "l2": probe.l2, "l2_search": search, "num_train": len(train_y), "num_val": len(val_y),
        "classes": data.classes, "model": str(model_path), "model_sha256": model_sha256,
        "skipped": [s.to_json() for s in data.skipped + skipped], "config": config.to_json(),
    })
    metadata = {"format": "simclr-linear", "classes": json.dumps(data.classes), "l2": str(probe.l2),
                "model_sha256": model_sha256, "feature_dim": str(info.feature_dim)}
    save_tensors(out_dir / LINEAR_FILE, {**probe.folded(), "feature_mean": probe.mean.float(),
                                         "feature_std": probe.std.float()}, metadata)
    draw_confusion(out_dir / CONFUSION_FILE, results["confusion"], data.classes, report)
    write_json(out_dir / RESULTS_FILE, results)
    return EvalResult(out_dir, results, data.skipped + skipped)

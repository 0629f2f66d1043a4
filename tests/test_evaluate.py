"""linear-eval: kNN and the logistic-regression probe against references, the report, and the command end
to end on the digits (features cached, results consistent, user errors)."""

import json
import math
import os
import signal
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from simclr_cli import evaluate
from simclr_cli.cli import app
from simclr_cli.data import ImageDataset
from simclr_cli.evaluate import (KNN_TEMPERATURE, L2_GRID, MAX_DRAWN_CLASSES, UNSEARCHED_L2, classification_report,
                                 draw_confusion, fit_logistic, from_sorted, knn_report, knn_scores, split_features,
                                 train_linear_probe)
from simclr_cli.labels import load_labelled

runner = CliRunner()
FAST = ["--device", "cpu", "--workers", "0"]


def knn_reference(train, train_labels, queries, num_classes, k, temperature):
    """Weighted kNN written out one query at a time (Wu et al. 2018, eq. for the kNN classifier)."""
    scores = torch.zeros(len(queries), num_classes)
    for q, query in enumerate(queries):
        similarities = [float(torch.dot(query, row) / (query.norm() * row.norm())) for row in train]
        nearest = sorted(range(len(train)), key=lambda i: -similarities[i])[:k]
        for i in nearest:
            scores[q, train_labels[i]] += math.exp(similarities[i] / temperature)
    return scores


@pytest.mark.parametrize("n,dim,k,temperature", [(30, 4, 5, 0.07), (50, 16, 20, 0.5), (12, 3, 200, 0.1)])
def test_knn_scores_match_the_reference(n, dim, k, temperature):
    generator = torch.Generator().manual_seed(n)
    train, queries = torch.randn(n, dim, generator=generator), torch.randn(7, dim, generator=generator)
    labels = torch.randint(0, 3, (n,), generator=generator)
    fast = knn_scores(train, labels, queries, 3, k, temperature, chunk=3)
    assert torch.allclose(fast, knn_reference(train, labels, queries, 3, k, temperature), rtol=1e-4)



@pytest.mark.parametrize("n,expected", [(300, ("k20", "k200")), (30, ("k20", "k30")), (12, ("k12",))])
def test_the_knn_report_names_the_neighbours_that_voted(n, expected):
    """With fewer training images than k, all of them vote: 30 images report "k30", not a "k200" that never ran."""
    generator = torch.Generator().manual_seed(n)
    train, queries = torch.randn(n, 4, generator=generator), torch.randn(9, 4, generator=generator)
    labels = torch.randint(0, 3, (n,), generator=generator)
    query_labels = torch.randint(0, 3, (9,), generator=generator)
    report = knn_report(train, labels, queries, query_labels, 3)
    assert tuple(key for key in report["knn"] if key != "temperature") == expected
    for key in expected:
        votes = knn_reference(train, labels, queries, 3, int(key[1:]), KNN_TEMPERATURE)
        assert report["knn"][key] == pytest.approx((votes.argmax(1) == query_labels).double().mean().item())
    assert report["knn_top1"] == report["knn"][expected[0]]


@pytest.mark.parametrize("l2", [1e-3, 1e-1])
def test_logistic_regression_matches_scikit_learn(l2):
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 6))
    labels = rng.integers(0, 4, 300)
    features = centres[labels] + 1.5 * rng.normal(size=(300, 6))
    weight, bias = fit_logistic(torch.tensor(features), torch.tensor(labels), 4, l2)
    reference = LogisticRegression(C=1 / (l2 * len(labels)), tol=1e-10, max_iter=10_000).fit(features, labels)
    assert np.allclose(weight.numpy(), reference.coef_, atol=1e-4)
    assert np.allclose(bias.numpy(), reference.intercept_, atol=1e-4)


@pytest.mark.parametrize("l2", [1e-6, 1e-4])
def test_float32_fits_at_weak_penalties_reach_the_float64_optimum(l2):
    """The L2 search's float32 fits stopped at a gradient of 1e-4: on separable features at l2 = 1e-6, at 30x
    the optimum objective, so the search compared models stopped early."""
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 64, generator=generator)
    labels = torch.randint(0, 5, (400,), generator=generator)
    features = centers[labels] + 0.5 * torch.randn(400, 64, generator=generator).double()  # separable

    def objective(weight: torch.Tensor, bias: torch.Tensor) -> float:
        weight, bias = weight.double(), bias.double()
        loss = torch.nn.functional.cross_entropy(features @ weight.T + bias, labels)
        return float(loss + 0.5 * l2 * weight.pow(2).sum())

    best = objective(*fit_logistic(features, labels, 5, l2, max_iter=5000))
    assert objective(*fit_logistic(features.float(), labels, 5, l2)) == pytest.approx(best, rel=0.05)


def test_classification_report_counts_top1_top5_and_classes():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4], [0.1, 0.2, 0.7]])
    labels = torch.tensor([0, 1, 2, 2])
    report = classification_report(scores, labels, ["a", "b", "c"])
    assert report["top1"] == 0.75 and report["top5"] == 1.0  # top-3 of 3 classes
    assert report["per_class"] == {"a": {"accuracy": 1.0, "count": 1}, "b": {"accuracy": 1.0, "count": 1},
                                   "c": {"accuracy": 0.5, "count": 2}}
    assert report["confusion"] == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    scores = torch.eye(6)[[1, 2, 3, 4, 5, 0]]  # the true class ties with four others below the prediction
    many = classification_report(scores, torch.arange(6), list("abcdef"))
    assert many["top1"] == 0 and many["top5"] == topk_reference(scores, torch.arange(6), 5)


def topk_reference(scores, labels, k):
    """Top-k accuracy written out row by row: the k highest scores, ties going to the lower class index
    (as argmax breaks them, so top-1 is the prediction and every top-1 hit is a top-k hit)."""
    hits = 0
    for row, label in zip(scores.tolist(), labels.tolist()):
        ranked = sorted(range(len(row)), key=lambda c: (-row[c], c))
        hits += label in ranked[:k]
    return hits / len(labels)


@pytest.mark.parametrize("num_classes", [3, 8, 12])
def test_top1_and_top5_with_tied_scores_match_the_reference(num_classes):
    generator = torch.Generator().manual_seed(num_classes)
    scores = torch.randint(0, 2, (60, num_classes), generator=generator).double()  # many ties
    scores[:10] = 0  # rows where every class ties (a zero-initialised head, a collapsed encoder)
    labels = torch.randint(0, num_classes, (60,), generator=generator)
    labels[:10] = 0  # argmax's choice on a full tie: a top-1 hit, so a top-5 hit as well
    report = classification_report(scores, labels, [str(c) for c in range(num_classes)])
    assert report["top1"] == topk_reference(scores, labels, 1)
    assert report["top5"] == topk_reference(scores, labels, min(5, num_classes))


def test_too_many_classes_to_draw_are_said_not_drawn(tmp_path):
    """10,000 classes would have taken hours and gigabytes for an image no one could read."""
    count = MAX_DRAWN_CLASSES + 1
    said = []
    (tmp_path / "c.png").write_bytes(b"an earlier run's")
    draw_confusion(tmp_path / "c.png", [[0] * count for _ in range(count)], [f"c{i}" for i in range(count)],
                   lambda kind, **fields: said.append(fields["text"]))
    assert not (tmp_path / "c.png").exists()
    assert said == [f"{count:,} classes: no c.png (drawn for up to 1,000); the counts are under \"confusion\" in "
                    f"the report"]


def test_the_last_line_lists_the_confusion_matrix_only_where_it_was_drawn(tiny_encoder, small_digits_folder, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(evaluate, "MAX_DRAWN_CLASSES", 3)
    result = runner.invoke(app, ["linear-eval", str(tiny_encoder), str(small_digits_folder), "--out",
                                 str(tmp_path / "eval"), "--l2", "0.01", *FAST])
    assert result.exit_code == 0, result.output
    last = " ".join(result.output.split()).rsplit("results in", 1)[1]
    assert "linear_eval.json" in last and "confusion_matrix.png" not in last, last
    assert not (tmp_path / "eval" / "confusion_matrix.png").exists()


def test_a_killed_loader_worker_is_one_line_and_other_runtime_errors_are_not(tiny_encoder, small_digits_folder,
                                                                             tmp_path, monkeypatch):
    """Outside the loops that save and say how to go on (pretrain, finetune, embed), a killed loader worker still
    ends the command with one line, not PyTorch's 290-line traceback; any other RuntimeError is no such death."""
    real = ImageDataset.__getitem__

    def getitem(dataset, index):
        if torch.utils.data.get_worker_info() is None:
            raise RuntimeError("a bug")
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would
        return real(dataset, index)

    monkeypatch.setattr(ImageDataset, "__getitem__", getitem)
    command = ["linear-eval", str(tiny_encoder), str(small_digits_folder), "--device", "cpu", "--l2", "0.01"]
    result = runner.invoke(app, [*command, "--out", str(tmp_path / "killed"), "--workers", "1"])
    assert result.exit_code == 1, result.output
    assert " ".join(result.output.split()).endswith(
        "error: a loader worker died (killed by signal: Killed), perhaps out of memory; run the command again with "
        "fewer --workers (a pretrain, finetune or embed continues from what it saved with --resume)"), result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, [*command, "--out", str(tmp_path / "bug"), "--workers", "0"])
    assert isinstance(result.exception, RuntimeError) and str(result.exception) == "a bug"


@pytest.mark.parametrize("workers", [True, False])
def test_a_worker_death_names_workers_only_for_a_command_that_has_them(capsys, workers):
    """`similar` embeds many queries with loader workers but has no --workers: the advice failed as given."""
    import typer

    from simclr_cli.cli import _fail_cleanly

    def with_workers(workers: int = 2):
        raise RuntimeError("DataLoader worker (pid 12) is killed by signal: Killed. ")

    def without_workers():
        raise RuntimeError("DataLoader worker (pid 12) is killed by signal: Killed. ")

    with pytest.raises(typer.Exit):
        _fail_cleanly(with_workers if workers else without_workers)()
    text = " ".join(capsys.readouterr().err.split())
    assert text.startswith("error: a loader worker died (killed by signal: Killed)"), text
    assert ("fewer --workers" in text) == workers, text


def test_confusion_image_shades_the_diagonal(tmp_path):
    draw_confusion(tmp_path / "c.png", [[9, 1], [0, 10]], ["cat", "dog"])
    image = Image.open(tmp_path / "c.png").convert("RGB")
    assert image.size[0] == image.size[1] > 2 * 48
    first = image.size[0] - 4 - 2 * 48  # cells are 48 px, the grid ends 4 px from the edge

    def corner(row, column):  # a cell's corner, clear of the count written in its middle
        return sum(image.getpixel((first + column * 48 + 3, first + row * 48 + 3)))

    assert corner(1, 1) < corner(0, 0) < corner(0, 1) < corner(1, 0) == 3 * 255, "darker with a larger share"


@pytest.fixture(scope="module")
def evaluated(tiny_encoder, digits_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("linear") / "eval"
    result = runner.invoke(app, ["linear-eval", str(tiny_encoder), str(digits_folder), "--out", str(out),
                                 "--json", *FAST])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), out


def test_linear_eval_reports_accuracy_well_above_chance(evaluated):
    results, out = evaluated
    for key in ("top1", "top5", "knn_top1"):
        assert 0 <= results[key] <= 1
    assert results["top1"] > 0.6 and results["knn_top1"] > 0.6, "chance is 0.1"
    assert results["top5"] >= results["top1"]
    assert results["num_train"] + results["num_val"] == 1797
    assert results["l2"] in L2_GRID
    assert results["l2"] == max(results["l2_search"], key=lambda s: s["holdout_top1"])["l2"]
    assert set(results["per_class"]) == {str(d) for d in range(10)}


def test_linear_eval_files_agree_with_the_printed_results(evaluated):
    results, out = evaluated
    saved = json.loads((out / "linear_eval.json").read_text())
    assert saved == {k: v for k, v in results.items() if k != "out"}
    confusion = np.array(saved["confusion"])
    assert confusion.sum() == saved["num_val"]
    assert math.isclose(np.trace(confusion) / confusion.sum(), saved["top1"])
    assert [figures["count"] for figures in saved["per_class"].values()] == confusion.sum(1).tolist()
    assert Image.open(out / "confusion_matrix.png").format == "PNG"

    # linear.safetensors applied to the cached raw features gives the reported accuracy
    [cache] = out.glob("features-*.safetensors")
    tensors = load_file(str(cache))
    data = load_labelled(saved["config"]["data"]["train_dir"], seed=0)
    paths = data.train.paths + data.val.paths
    _, _, val_x, val_y = split_features(data, *from_sorted(paths, tensors["features"], tensors["indices"]))
    linear = load_file(str(out / "linear.safetensors"))
    predicted = (val_x @ linear["weight"].T + linear["bias"]).argmax(1)  # (N, D) x (D, C) -> (N, C)
    assert math.isclose((predicted == val_y).double().mean().item(), saved["top1"], abs_tol=1 / len(val_y))


def test_linear_probe_agrees_with_scikit_learn_on_the_same_features(evaluated):
    from sklearn.linear_model import LogisticRegression

    results, out = evaluated
    [cache] = out.glob("features-*.safetensors")
    tensors = load_file(str(cache))
    data = load_labelled(results["config"]["data"]["train_dir"], seed=0)
    features = from_sorted(data.train.paths + data.val.paths, tensors["features"], tensors["indices"])
    train_x, train_y, val_x, val_y = (t.double().numpy() for t in split_features(data, *features))
    mean, std = train_x.mean(0), np.maximum(train_x.std(0, ddof=1), 1e-6)
    reference = LogisticRegression(C=1 / (results["l2"] * len(train_y)), tol=1e-8, max_iter=5000)  # converged
    reference.fit((train_x - mean) / std, train_y)
    assert abs(reference.score((val_x - mean) / std, val_y) - results["top1"]) <= 0.005


def test_a_second_evaluation_reuses_the_cached_features(evaluated, tiny_encoder, digits_folder):
    results, out = evaluated
    (out / ".DS_Store").write_bytes(b"\0")  # a file browser's, beside the earlier evaluation's own
    again = runner.invoke(app, ["linear-eval", str(tiny_encoder), str(digits_folder), "--out", str(out),
                                "--l2", "0.01", *FAST])
    assert again.exit_code == 0, again.output
    assert "features read from the cache" in again.output
    assert len(list(out.glob("features-*.safetensors"))) == 1
    assert json.loads((out / "linear_eval.json").read_text())["l2"] == 0.01
    assert "top-1" in again.output and "kNN" in again.output
    reseeded = runner.invoke(app, ["linear-eval", str(tiny_encoder), str(digits_folder), "--out", str(out),
                                   "--seed", "1", "--val-split", "0.3", "--json", *FAST])
    assert reseeded.exit_code == 0, reseeded.output
    assert len(list(out.glob("features-*.safetensors"))) == 1, "the same files, split another way: one cache"
    fresh = runner.invoke(app, ["linear-eval", str(tiny_encoder), str(digits_folder), "--out", str(out / "fresh"),
                                "--seed", "1", "--val-split", "0.3", "--json", *FAST])
    assert fresh.exit_code == 0, fresh.output
    assert [p.name for p in out.glob("features-*")] == [p.name for p in (out / "fresh").glob("features-*")]
    drop = {"out", "config"}
    assert {k: v for k, v in json.loads(reseeded.stdout).items() if k not in drop} == \
        {k: v for k, v in json.loads(fresh.stdout).items() if k not in drop}


@pytest.mark.parametrize("args,message", [
    (["{encoder}", "{missing}"], "no such folder"),
    (["{encoder}", "{encoder}"], "TRAIN {encoder}: a simclr run folder, not a folder of images; pass a folder of "
                                 "labelled images, one subfolder per class (MODEL is the first argument)"),
    (["{encoder}", "{one_class}"], "only one class ('a')"),
    (["{encoder}", "{empty_class}"], "class 'b' has no readable images"),
    (["{encoder}", "{flat}", "--labels", "{csv}"], "1 file(s) it names do not exist"),
    (["{encoder}", "{two}", "--val-split", "1.5"], "--val-split 1.5 must be between 0 and 1"),
    (["{encoder}", "{two}", "--val", "{two}", "--val-split", "0.3"], "--val and --val-split"),
    (["{encoder}", "{two}", "--l2", "-1"], "--l2 -1.0 must be 0 to 1e+30"),
    (["{encoder}", "{two}", "--l2", "inf"], "--l2 inf must be a finite number"),
    (["{two}", "{two}"], "holds no encoder.safetensors"),
    (["{encoder}", "{two}", "--batch-size", "lots"], "--batch-size"),
    (["{encoder}", "{two}", "--out", "{csv}"], "is a file; pass a folder"),
    (["{encoder}", "{two}", "--out", "{csv}/results"], "a folder on its path is a file"),
    (["{encoder}", "{two}", "--out", "{two}/runs/eval"], "inside TRAIN {two}, where the next run would read its "
                                                        "files as images of a class 'runs'"),
    (["{encoder}", "{two}", "--val", "{val}", "--out", "{val}/a/eval"], "inside --val {val}"),
    (["{encoder}", "{two}", "--out", "{link}/eval"], "inside TRAIN {two}"),  # through a link to it
    (["{encoder}", "{two}", "--val", "{link}"], "--val {link} is TRAIN itself"),  # reported 100% as validation
    (["{encoder}", "{two}", "--val", "{shared}"], "--val {shared} shares 1 of its 1 images with TRAIN"),
    (["{encoder}", "{two}", "--out", "{two}"], "is TRAIN {two} itself"),
    (["{encoder}", "{two}", "--out", "{val}"], "--out {val} holds files linear-eval does not write (a and 1 more); "
                                               "choose an empty folder, or one an earlier linear-eval wrote"),
])
def test_user_errors_exit_1_with_one_clear_line(tiny_encoder, tmp_path, args, message):
    folders = {"one_class": {"a": 2}, "empty_class": {"a": 2, "b": 0}, "two": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}}
    for folder, counts in folders.items():
        for name, count in counts.items():
            (tmp_path / folder / name).mkdir(parents=True)
            for index in range(count):
                Image.new("RGB", (8, 8), (index * 50, 0, 0)).save(tmp_path / folder / name / f"{index}.png")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    (tmp_path / "labels.csv").write_text("a.png,x\nb.png,y\n")
    paths = {name: str(tmp_path / name) for name in ("missing", "flat", *folders)}
    (tmp_path / "link").symlink_to(tmp_path / "two")
    (tmp_path / "shared" / "b").mkdir(parents=True)  # a validation image that is a training image
    (tmp_path / "shared" / "b" / "0.png").symlink_to(tmp_path / "two" / "b" / "1.png")
    paths.update(encoder=str(tiny_encoder), csv=str(tmp_path / "labels.csv"), link=str(tmp_path / "link"),
                 shared=str(tmp_path / "shared"))
    result = runner.invoke(app, ["linear-eval", *[a.format(**paths) for a in args], *FAST])
    assert result.exit_code == 1, result.output
    assert message.format(**paths) in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_a_class_whose_training_images_all_fail_to_decode_is_a_one_line_error(tiny_encoder, tmp_path, cut_image):
    """The scan reads headers only, so class 'b' is found; none of its training images decodes. The probe
    would never see it (with one training image left in all, it came out NaN): refused, nothing written."""
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8), (100, 0, 0)).save(tmp_path / split / name / "0.png")
    (tmp_path / "train" / "b" / "0.png").unlink()
    for index in range(3):
        cut_image(tmp_path / "train" / "b" / f"{index}.png", index)
    out = tmp_path / "out"
    result = runner.invoke(app, ["linear-eval", str(tiny_encoder), str(tmp_path / "train"), "--val",
                                 str(tmp_path / "val"), "--out", str(out), *FAST])
    assert result.exit_code == 1, result.output
    assert "class 'b' has no training image that could be decoded" in " ".join(result.output.split())
    assert "Traceback" not in result.output and not (out / "linear.safetensors").exists()


@pytest.mark.parametrize("damage", ["weights", "features"])
def test_an_encoder_giving_nan_is_a_one_line_error_not_a_probe_at_chance(tiny_encoder, tmp_path, monkeypatch,
                                                                          damage):
    """An encoder with one NaN weight made every feature NaN: L-BFGS ended in a traceback, or (with --l2)
    the probe predicted class 0 for everything and reported it. Finite weights can still give non-finite
    features (a half-precision overflow) for an image: refused too, naming it."""
    for split in ("train", "val"):
        for name, colour in (("a", (200, 0, 0)), ("b", (0, 0, 200))):
            (tmp_path / split / name).mkdir(parents=True)
            for index in range(3):
                Image.new("RGB", (8, 8), tuple(c + 10 * index for c in colour)).save(
                    tmp_path / split / name / f"{index}.png")
    model = tmp_path / "encoder.safetensors"
    if damage == "weights":
        from safetensors import safe_open
        from safetensors.torch import save_file

        with safe_open(str(tiny_encoder / "encoder.safetensors"), "pt") as handle:
            tensors, metadata = {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()
        tensors["layer4.1.bn2.weight"][0] = float("nan")
        save_file(tensors, str(model), metadata=metadata)
        expected = f"{model}: layer4.1.bn2.weight holds NaN or infinite weights; the file is damaged"
    else:
        model = tiny_encoder
        real_features = evaluate.cached_features

        def cached_features(*args, **kwargs):
            features, kept, skipped = real_features(*args, **kwargs)
            features[4, 1] = float("inf")
            return features, kept, skipped

        monkeypatch.setattr(evaluate, "cached_features", cached_features)
        image = tmp_path / "train" / "b" / "1.png"  # row 4: a/0, a/1, a/2, b/0, b/1
        expected = f"{model / 'encoder.safetensors'} gives features that are not finite for {image}"
    result = runner.invoke(app, ["linear-eval", str(model), str(tmp_path / "train"), "--val", str(tmp_path / "val"),
                                 "--out", str(tmp_path / "out"), "--l2", "0.001", *FAST])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert expected in " ".join(result.output.split())


def test_one_training_image_per_class_leaves_nothing_to_search_the_l2_on():
    probe, search = train_linear_probe(torch.randn(2, 8, generator=torch.Generator().manual_seed(0)),
                                       torch.tensor([0, 1]), 2)
    assert probe.l2 == UNSEARCHED_L2 and search == []


def test_the_feature_cache_key_changes_with_the_features_version(tmp_path, monkeypatch):
    """Features cached by an earlier version (other preprocessing code, same files and model) are not reused."""
    from simclr_cli.files import EncoderInfo
    from simclr_cli.runtime import resolve_precision

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    info = EncoderInfo(arch="resnet18", stem="imagenet", feature_dim=512, image_size=32, mean=(0.5,) * 3,
                       std=(0.25,) * 3, version="test", config={})
    fp32 = resolve_precision("fp32", torch.device("cpu"))

    def key() -> str:
        return evaluate.feature_cache_key("ab" * 32, [tmp_path / "a.png"], info, fp32)

    now = key()
    monkeypatch.setattr(evaluate, "FEATURES_VERSION", evaluate.FEATURES_VERSION - 1)
    assert key() != now
    monkeypatch.undo()
    assert key() == now


def test_the_feature_cache_key_changes_with_a_file_restored_at_the_same_size_and_time(tmp_path):
    """`cp -p` of another image of the same size keeps the size and the modification time: the stale features
    were reused. The change time moves."""
    from simclr_cli.files import EncoderInfo
    from simclr_cli.runtime import resolve_precision

    image = tmp_path / "a.bmp"  # uncompressed: the same size in any colour
    Image.new("RGB", (8, 8), "red").save(image)
    info = EncoderInfo(arch="resnet18", stem="imagenet", feature_dim=512, image_size=32, mean=(0.5,) * 3,
                       std=(0.25,) * 3, version="test", config={})
    fp32 = resolve_precision("fp32", torch.device("cpu"))
    before = evaluate.feature_cache_key("ab" * 32, [image], info, fp32)
    stat = image.stat()
    time.sleep(0.01)  # past the file system's timestamp granularity
    Image.new("RGB", (8, 8), "blue").save(tmp_path / "b.bmp")
    assert (tmp_path / "b.bmp").stat().st_size == stat.st_size
    (tmp_path / "b.bmp").replace(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (image.stat().st_size, image.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert evaluate.feature_cache_key("ab" * 32, [image], info, fp32) != before

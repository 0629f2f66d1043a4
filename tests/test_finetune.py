"""finetune end to end on the digits: accuracy, exported model and report, label-fraction subsets, the
SimCLRv2 head layer, interrupt and resume, `simclr embed` of a fine-tuned model, user errors."""

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from simclr_cli.cli import app
from simclr_cli.config import FinetuneConfig, LabelledDataConfig, RuntimeConfig
from simclr_cli.data import ImageDataset
from simclr_cli.errors import ConfigError
from simclr_cli.export import load_checkpoint, load_encoder
from simclr_cli.features import compute_features
from simclr_cli.files import held, read_metadata
from simclr_cli.finetune import FINETUNED_FILE, finetune, resume_finetune
from simclr_cli.labels import balanced_subset, load_labelled
from simclr_cli.runtime import Precision, resolve_precision

runner = CliRunner()
FAST = ["--device", "cpu", "--workers", "0"]
SHORT = ["--epochs", "2", "--batch-size", "16", "--lr", "0.01", "--crop-min-scale", "0.5", *FAST]


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finetuned(tiny_encoder, digits_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune") / "run"
    result = runner.invoke(app, ["finetune", str(tiny_encoder), str(digits_folder), "--label-fraction", "0.2",
                                 "--out", str(out), "--json", *SHORT])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), out


def test_finetune_learns_and_reports_the_last_epoch(finetuned):
    """The last epoch, as in the papers: the best by validation accuracy would overstate the accuracy it
    reports (and with --val TEST, choose the model on the test set)."""
    results, out = finetuned
    assert {"top1", "top5", "knn_top1", "per_class"} <= set(results)
    assert all(0 <= results[key] <= 1 for key in ("top1", "top5", "knn_top1"))
    assert results["top1"] > 0.35 and results["knn_top1"] > 0.5, "chance is 0.1"
    log = records(out)
    assert [r["epoch"] for r in log] == [1, 2]
    assert results["epoch"] == 2 and math.isclose(results["top1"], log[-1]["val_top1"])


def test_label_fraction_draws_a_balanced_subset(finetuned):
    results, out = finetuned
    split = json.loads((out / "split.json").read_text())
    counts = Counter(label for _, label in split["train"])
    assert set(counts.values()) == {round(0.2 * 1438 / 10)} and len(counts) == 10
    assert results["num_train"] == len(split["train"]) and results["num_val"] == len(split["val"]) == 359
    assert not {path for path, _ in split["train"]} & {path for path, _ in split["val"]}


def test_finetuned_model_file_and_report_are_consistent(finetuned, tiny_encoder, digits_folder, tmp_path):
    results, out = finetuned
    assert json.loads((out / "finetune.json").read_text()) == {k: v for k, v in results.items() if k != "out"}
    assert (out / "confusion_matrix.png").is_file()
    meta = read_metadata(out / "finetuned.safetensors", "model")
    assert meta["format"] == "simclr-finetuned" and json.loads(meta["classes"]) == [str(d) for d in range(10)]
    assert json.loads(meta["preprocessing"])["center_crop"] == 32 and int(meta["epoch"]) == results["epoch"] == 2
    saved = {**json.loads(meta["finetune_config"]), **json.loads(meta["finetune_config"])["data"]}
    assert (saved["train_dir"], saved["out_dir"]) == (digits_folder.name, out.name), "names, not local paths"
    assert saved["model"] == f"{tiny_encoder.name}/encoder.safetensors", "the model file keeps its run's name"
    assert str(out.parent.parent) not in str(meta), "no path under the tests' temporary folder"
    tensors = load_file(str(out / "finetuned.safetensors"))
    assert tensors["classifier.weight"].shape == (10, 512) and "conv1.weight" in tensors

    # the exported encoder and classifier reproduce the reported accuracy, at the run's precision (auto)
    backbone, info = load_encoder(out)  # a run folder: finetuned.safetensors first
    split = json.loads((out / "split.json").read_text())
    paths, labels = [p for p, _ in split["val"]], torch.tensor([label for _, label in split["val"]])
    features, kept, _ = compute_features(backbone, info, paths, torch.device("cpu"),
                                         resolve_precision("auto", torch.device("cpu")), workers=0)
    logits = features @ tensors["classifier.weight"].T + tensors["classifier.bias"]  # (N, D) x (D, C)
    # The two paths run bf16 kernels at other batch sizes, and the classifier in bf16 or in float32, so a
    # near tie may break the other way: one image of the 359 at most.
    accuracy = (logits.argmax(1) == labels[kept]).double().mean().item()
    assert math.isclose(accuracy, results["top1"], abs_tol=1 / len(kept) + 1e-9)

    # `simclr embed` takes the fine-tuned model and embeds with its encoder
    embedded = runner.invoke(app, ["embed", str(out / "finetuned.safetensors"), str(digits_folder / "3"),
                                   str(tmp_path / "threes.npy"), "--no-normalize", *FAST])
    assert embedded.exit_code == 0, embedded.output
    rows = np.load(tmp_path / "threes.npy", allow_pickle=False)
    assert rows.shape == (len(list((digits_folder / "3").iterdir())), 512)


def _config(data, model, out, **changes):
    settings = dict(model=str(model), data=LabelledDataConfig(str(data)), out_dir=str(out), epochs=2,
                    batch_size=16, lr=0.01, runtime=RuntimeConfig(device="cpu", workers=0, seed=1))
    return FinetuneConfig(**{**settings, **changes})


def test_a_crash_mid_epoch_resumes_from_the_last_timed_checkpoint(tiny_encoder, small_digits_folder, tmp_path,
                                                                  monkeypatch):
    """A checkpoint is also written every CHECKPOINT_SECONDS (here: after every step), not only at epoch ends."""
    from simclr_cli import finetune as finetune_module

    finetune(_config(small_digits_folder, tiny_encoder, tmp_path / "straight", epochs=1))
    monkeypatch.setattr(finetune_module, "CHECKPOINT_SECONDS", 0.0)

    def crash_at_step_3(kind, **fields):
        if kind == "step" and fields["step"] == 3:
            raise MemoryError("out of memory")

    with pytest.raises(MemoryError):
        finetune(_config(small_digits_folder, tiny_encoder, tmp_path / "crashed", epochs=1), crash_at_step_3)
    saved = load_checkpoint(tmp_path / "crashed" / "checkpoint.safetensors").progress["state"]
    assert saved["step"] == saved["step_in_epoch"] == 2
    resume_finetune(tmp_path / "crashed")
    a = load_file(str(tmp_path / "straight" / FINETUNED_FILE))
    b = load_file(str(tmp_path / "crashed" / FINETUNED_FILE))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_of_a_finished_finetune_says_it_had_finished(tiny_encoder, small_digits_folder, tmp_path):
    """And leaves finetuned.safetensors's bytes as they were: written again, the same weights had a new SHA-256
    (safetensors orders its metadata anew on every write), and every index built from the file was refused."""
    finetune(_config(small_digits_folder, tiny_encoder, tmp_path / "run", epochs=1))
    model = tmp_path / "run" / FINETUNED_FILE
    before = hashlib.sha256(model.read_bytes()).hexdigest()
    messages, kinds = [], []

    def report(kind, **fields):
        kinds.append(kind)
        if kind == "message":
            messages.append(fields["text"])

    resume_finetune(tmp_path / "run", report)
    assert f"{tmp_path / 'run'} had finished training; writing its model and report again" in messages
    assert not any(text.startswith("resuming") for text in messages), messages  # it said "at epoch 2" of 1
    assert "start" not in kinds, kinds  # plain output printed "training for 0 steps"
    assert hashlib.sha256(model.read_bytes()).hexdigest() == before
    # Given --workers or --device, the resumed run's settings differ: the file, of the same weights, is kept.
    resume_finetune(tmp_path / "run", report, device="cpu", workers=1)
    assert hashlib.sha256(model.read_bytes()).hexdigest() == before
    assert json.loads(read_metadata(model, "model")["finetune_config"])["runtime"]["workers"] == 0


def test_a_signal_during_the_final_report_lets_it_finish(tiny_encoder, small_digits_folder, tmp_path, monkeypatch):
    """Ctrl-C during the last kNN came too late to stop the training, and left the model without finetune.json,
    silently: the report now finishes, and the run with it."""
    from simclr_cli import finetune as finetune_module

    def interrupted_features(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return compute_features(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "compute_features", interrupted_features)
    replies = []
    result = finetune(_config(small_digits_folder, tiny_encoder, tmp_path / "run", epochs=1),
                      lambda kind, **fields: kind == "stopping" and replies.append(fields["text"]))
    assert not result.interrupted and (tmp_path / "run" / "finetune.json").is_file()
    assert replies == ["Ctrl-C: training is over; writing the model and its report first (Ctrl-C again stops at "
                       "once, and `--resume` finishes the run)"]


def test_interrupted_finetune_resumes_to_the_same_model(tiny_encoder, small_digits_folder, tmp_path, monkeypatch):
    # fp16 (CUDA) scales the loss: a CPU GradScaler that doubles every step stands in, to check that a resumed run
    # goes on from the scale it had reached
    monkeypatch.setattr(Precision, "grad_scaler",
                        lambda self: torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1))
    straight = finetune(_config(small_digits_folder, tiny_encoder, tmp_path / "straight"))

    def interrupt_at_step_12(kind, **fields):  # a Ctrl-C in the second epoch (10 steps each)
        if kind == "step" and fields["step"] == 12:
            os.kill(os.getpid(), signal.SIGINT)

    replies = []

    def report(kind, **fields):
        interrupt_at_step_12(kind, **fields)
        if kind == "stopping":
            replies.append(fields["text"])

    stopped = finetune(_config(small_digits_folder, tiny_encoder, tmp_path / "stopped"), report)
    assert stopped.interrupted and stopped.state.step == 12 and stopped.state.step_in_epoch == 2
    assert replies == ["Ctrl-C: saving the run after this step, then stopping (Ctrl-C again stops at once, losing "
                       "the steps since the last save)"]
    assert len(records(tmp_path / "stopped")) == 1
    # as earlier versions wrote it: the best epoch so far in the loop state
    checkpoint = tmp_path / "stopped" / "checkpoint.safetensors"
    metadata = read_metadata(checkpoint, "checkpoint")
    progress = json.loads(metadata["progress"])
    progress["state"].update(best_top1=0.5, best_epoch=1)
    save_file(load_file(str(checkpoint)), str(checkpoint), {**metadata, "progress": json.dumps(progress)})

    cli = runner.invoke(app, ["finetune", "--resume", str(tmp_path / "stopped"), "--workers", "0"])
    assert cli.exit_code == 0, cli.output
    assert "resuming" in cli.output
    untimed = [{k: v for k, v in r.items() if k != "time"} for r in records(tmp_path / "straight")]
    assert untimed == [{k: v for k, v in r.items() if k != "time"} for r in records(tmp_path / "stopped")]
    a = load_file(str(tmp_path / "straight" / "finetuned.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "finetuned.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    scales = [load_checkpoint(tmp_path / run / "checkpoint.safetensors").progress["scaler"]["scale"]
              for run in ("straight", "stopped")]
    assert scales == [2.0 ** 20, 2.0 ** 20], "20 steps, each doubling the scale"
    log = (tmp_path / "stopped" / "metrics.jsonl").read_text()
    (tmp_path / "stopped" / "metrics.jsonl").write_text(log + '{"epoch": 3, "lo')  # a crash in the middle of a write
    assert resume_finetune(tmp_path / "stopped").results["top1"] == straight.results["top1"]
    assert (tmp_path / "stopped" / "metrics.jsonl").read_text() == log, "the cut line is dropped"


def _finetune_one_worker(encoder, folder, out, batch: int):
    """A one-epoch fine-tune with one loader worker, which the caller's patched dataset kills: it exits 1."""
    result = runner.invoke(app, ["finetune", str(encoder), str(folder), "--out", str(out), "--epochs", "1",
                                 "--batch-size", str(batch), "--device", "cpu", "--workers", "1"])
    assert result.exit_code == 1, result.output
    return result


def test_a_killed_loader_worker_saves_the_run_and_says_how_to_go_on(tiny_encoder, small_digits_folder, tmp_path,
                                                                    monkeypatch):
    """A loader worker killed (out of memory) ended the run with PyTorch's traceback and no checkpoint: the steps
    since the last one were lost. Now they are saved, and one line says how to go on."""
    served, real = [], ImageDataset.__getitem__

    def getitem(dataset, index):
        if torch.utils.data.get_worker_info() is not None:  # the worker's own copy of `served`
            served.append(index)
            if len(served) > 16:  # its second batch: killed, as by the kernel's OOM killer
                os.kill(os.getpid(), signal.SIGKILL)
        return real(dataset, index)

    monkeypatch.setattr(ImageDataset, "__getitem__", getitem)
    out = tmp_path / "killed"
    result = _finetune_one_worker(tiny_encoder, small_digits_folder, out, batch=16)
    step = load_checkpoint(out / "checkpoint.safetensors").progress["state"]["step"]
    assert step <= 1
    text = " ".join(result.output.split())
    assert text.endswith(f"error: a loader worker died (killed by signal: Killed), perhaps out of memory; the run is "
                         f"saved at step {step}. Continue with fewer workers: simclr finetune --resume {out} "
                         f"--workers 0"), text
    assert "Traceback" not in result.output
    # Again, in a resume given --device (not saved in config.json): the command repeats it.
    result = runner.invoke(app, ["finetune", "--resume", str(out), "--workers", "1", "--device", "cpu"])
    assert " ".join(result.output.split()).endswith(f"--resume {out} --workers 0 --device cpu"), result.output
    result = runner.invoke(app, ["finetune", "--resume", str(out), "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert (out / FINETUNED_FILE).is_file()


def test_a_loader_worker_killed_validating_keeps_the_epochs_steps(tiny_encoder, small_digits_folder, tmp_path,
                                                                  monkeypatch):
    """Validation's loader had no such care: the run ended with nothing saved, its epoch's steps lost."""
    real = ImageDataset.__getitem__

    def getitem(dataset, index):
        if torch.utils.data.get_worker_info() is not None and len(dataset) == 40:  # the validation set's worker
            os.kill(os.getpid(), signal.SIGKILL)
        return real(dataset, index)

    monkeypatch.setattr(ImageDataset, "__getitem__", getitem)
    out = tmp_path / "killed"
    result = _finetune_one_worker(tiny_encoder, small_digits_folder, out, batch=80)
    state = load_checkpoint(out / "checkpoint.safetensors").progress["state"]
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (2, 0, 2), "trained, not yet validated"
    assert "the run is saved at step 2" in " ".join(result.output.split())
    monkeypatch.setattr(ImageDataset, "__getitem__", real)
    result = runner.invoke(app, ["finetune", "--resume", str(out), "--workers", "0"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in records if "val_top1" in r] == [(1, 2)], "validated once, on resume"
    assert (out / FINETUNED_FILE).is_file()


def test_a_resume_needs_no_model_file_the_checkpoint_holds_the_model(tiny_encoder, small_digits_folder, tmp_path):
    """The pretraining run may be moved or deleted while a fine-tuning run from it is stopped."""
    pretrained = tmp_path / "pretrained"
    shutil.copytree(tiny_encoder, pretrained)
    straight = finetune(_config(small_digits_folder, pretrained, tmp_path / "straight", from_head_layer=1))

    def interrupt_at_step_12(kind, **fields):  # a Ctrl-C in the second epoch
        if kind == "step" and fields["step"] == 12:
            os.kill(os.getpid(), signal.SIGINT)

    stopped = finetune(_config(small_digits_folder, pretrained, tmp_path / "stopped", from_head_layer=1),
                       interrupt_at_step_12)
    assert stopped.interrupted
    shutil.rmtree(pretrained)
    cli = runner.invoke(app, ["finetune", "--resume", str(tmp_path / "stopped"), "--workers", "0"])
    assert cli.exit_code == 0, cli.output
    a, b = load_file(str(straight.model_path)), load_file(str(tmp_path / "stopped" / FINETUNED_FILE))
    assert "head.layers.0.weight" in b and all(torch.equal(a[k], b[k]) for k in a)
    metadata = [read_metadata(path, "model") for path in (straight.model_path, tmp_path / "stopped" / FINETUNED_FILE)]
    first, second = ({k: v for k, v in meta.items() if k != "finetune_config"} for meta in metadata)  # --out differs
    assert first == second
    reports = [json.loads((tmp_path / run / "finetune.json").read_text()) for run in ("straight", "stopped")]
    assert [report["pretrained"] for report in reports] == [str(pretrained / "encoder.safetensors")] * 2


def test_a_finetune_that_crashed_before_its_first_checkpoint_resumes_from_the_start(tiny_encoder, small_digits_folder,
                                                                                    tmp_path):
    """A crash in the first epoch leaves config.json and split.json but no checkpoint: --resume starts the run
    again with its saved settings (it said the folder was no run of `simclr finetune`)."""
    finetune(_config(small_digits_folder, tiny_encoder, tmp_path / "straight", epochs=1))

    def crash_at_step_2(kind, **fields):  # the process dies in the first epoch: no checkpoint is written
        if kind == "step" and fields["step"] == 2:
            raise MemoryError("out of memory")

    with pytest.raises(MemoryError):
        finetune(_config(small_digits_folder, tiny_encoder, tmp_path / "crashed", epochs=1), crash_at_step_2)
    assert not (tmp_path / "crashed" / "checkpoint.safetensors").exists()

    cli = runner.invoke(app, ["finetune", "--resume", str(tmp_path / "crashed")])
    assert cli.exit_code == 0, cli.output
    untimed = [{k: v for k, v in r.items() if k != "time"} for r in records(tmp_path / "straight")]
    assert untimed == [{k: v for k, v in r.items() if k != "time"} for r in records(tmp_path / "crashed")]
    a = load_file(str(tmp_path / "straight" / "finetuned.safetensors"))
    b = load_file(str(tmp_path / "crashed" / "finetuned.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_from_head_layer_fine_tunes_through_the_first_head_layer(tiny_encoder, small_digits_folder, tmp_path):
    result = finetune(_config(small_digits_folder, tiny_encoder, tmp_path / "v2", epochs=1, from_head_layer=1))
    tensors = load_file(str(result.model_path))
    head = load_file(str(tiny_encoder / "head.safetensors"))
    assert tensors["head.layers.0.weight"].shape == head["layers.0.weight"].shape
    assert not torch.equal(tensors["head.layers.0.weight"], head["layers.0.weight"]), "trained end to end"
    assert tensors["classifier.weight"].shape == (10, head["layers.0.weight"].shape[0])
    assert "head.layers.3.weight" not in tensors, "only the first layer is kept"
    load_encoder(result.model_path)  # still an encoder file for embed


def test_a_head_of_another_width_is_refused_before_the_run_writes_anything(tiny_encoder, small_digits_folder,
                                                                           tmp_path):
    model = shutil.copytree(tiny_encoder, tmp_path / "model")
    head = load_file(str(model / "head.safetensors"))
    hidden, width = head["layers.0.weight"].shape
    head["layers.0.weight"] = torch.zeros(hidden, width // 2)  # the head of a narrower encoder
    save_file(head, str(model / "head.safetensors"), read_metadata(model / "head.safetensors", "head"))
    out = tmp_path / "out"
    result = runner.invoke(app, ["finetune", str(model), str(small_digits_folder), "--from-head-layer", "1",
                                 "--out", str(out), *SHORT])
    assert result.exit_code == 1, result.output
    assert f"head.safetensors: its first layer takes {width // 2} features, but the encoder" in " ".join(
        result.output.split())
    assert "Traceback" not in result.output
    assert not out.exists() or not any(out.iterdir()), "the same --out is free for the next try"


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_a_file_given_to_resume_names_its_folder_only_where_that_is_a_run_of_the_command(
        tiny_encoder, small_digits_folder, tmp_path, command):
    """`--resume RUN/encoder.safetensors`: "a file, not a run folder", and "(--resume RUN?)" where RUN is a run of
    this command; the folder of the other command's run was suggested too, and then refused."""
    tuned = tmp_path / "tuned"  # the folder of a finetune run
    tuned.mkdir()
    (tuned / "config.json").write_text(json.dumps(FinetuneConfig(
        model=str(tiny_encoder), data=LabelledDataConfig(str(small_digits_folder)), out_dir=str(tuned)).to_json()))
    (tuned / FINETUNED_FILE).write_bytes(b"")
    for run, name in ((tiny_encoder, "encoder.safetensors"), (tuned, FINETUNED_FILE)):
        result = runner.invoke(app, [command, "--resume", str(run / name)])
        said = " ".join(result.output.split())
        assert result.exit_code == 1 and said.startswith(f"error: --resume {run / name}: a file, not a run folder; "
                                                         f"pass the folder of a run that `simclr {command}` started")
        ours = (run == tiny_encoder) == (command == "pretrain")
        assert said.endswith(f"started (--resume {run}?)" if ours else "started"), said


@pytest.mark.parametrize("args,message", [
    (["{encoder}", "{digits}", "--label-fraction", "0"], "--label-fraction 0.0 must be in (0, 1]"),
    (["{encoder}", "{digits}", "--from-head-layer", "2"], "--from-head-layer 2 must be 0"),
    (["{bare}", "{digits}", "--from-head-layer", "1"], "no head.safetensors beside"),
    (["{encoder}", "{digits}", "--epochs", "0"], "--epochs 0 must be 1 to 1000000"),
    (["{encoder}", "{digits}", "--lr", "inf"], "--lr inf must be a finite number"),
    (["{encoder}", "{digits}", "--out", "{encoder}"], "already holds files"),
    (["{encoder}", "{digits}", "--out", "{encoder}/encoder.safetensors"], "is a file; pass a folder"),
    (["{encoder}", "{digits}", "--out", "{encoder}/encoder.safetensors/run"], "a folder on its path is a file"),
    (["{encoder}", "{digits}", "--out", "{digits}/runs/ft"], "inside TRAIN"),
    (["{encoder}", "{digits}", "--val", "{digits}/"], "is TRAIN itself: an accuracy on the training images"),
    (["{encoder}", "{missing}"], "no such folder"),
    (["--resume", "{digits}"], "no config.json there"),
    (["--resume", "{encoder}"], "tiny: a finished `simclr pretrain` run, nothing to resume; fine-tune its encoder "
                                "with `simclr finetune {encoder} TRAIN`"),
    (["--resume", "{unfinished}"], "a `simclr pretrain` run; continue it with `simclr pretrain --resume {unfinished}`"),
    (["--resume", "{missing}"], "missing: no such folder; pass the folder of a run that `simclr finetune` started"),
    (["{encoder}", "--resume", "{encoder}", "--label-fraction", "0.1"],
     "MODEL, --label-fraction with --resume: the run keeps the settings it started with"),
    (["{encoder}"], "give MODEL and TRAIN"),
])
def test_user_errors_exit_1_with_one_clear_line(tiny_encoder, small_digits_folder, tmp_path, args, message):
    (tmp_path / "bare").mkdir()
    shutil.copy(tiny_encoder / "encoder.safetensors", tmp_path / "bare")
    unfinished = shutil.copytree(tiny_encoder, tmp_path / "unfinished", ignore=shutil.ignore_patterns("encoder.*"))
    paths = {"encoder": str(tiny_encoder), "digits": str(small_digits_folder), "bare": str(tmp_path / "bare"),
             "missing": str(tmp_path / "missing"), "unfinished": str(unfinished)}
    result = runner.invoke(app, ["finetune", *[a.format(**paths) for a in args], *FAST])
    assert result.exit_code == 1, result.output
    assert message.format(**paths) in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (small_digits_folder / "runs").exists()


def test_a_diverging_run_says_to_lower_the_lr_not_to_resume(tiny_encoder, small_digits_folder, tmp_path):
    """A resume keeps the settings that diverged, and before the first epoch ends there is no checkpoint."""
    out = tmp_path / "diverged"
    result = runner.invoke(app, ["finetune", str(tiny_encoder), str(small_digits_folder), "--out", str(out),
                                 "--epochs", "2", "--batch-size", "16", "--lr", "1e30", *FAST])
    assert result.exit_code == 1, result.output
    assert "the loss became" in result.output and "no checkpoint had been written yet" in result.output
    assert "Lower --lr and run again with another --out" in result.output and "--resume" not in result.output
    assert "Traceback" not in result.output and not (out / "checkpoint.safetensors").exists()


def test_a_fine_tune_never_saves_non_finite_weights(tiny_encoder, small_digits_folder, tmp_path, monkeypatch):
    """As in pretrain: the loss is read before the update, so weights an epoch's last update made infinite were
    checkpointed, and the next step's error called that checkpoint good."""
    from simclr_cli import finetune as finetune_module

    train_one_epoch = finetune_module.FinetuneRun.train_one_epoch

    def and_break_a_weight(self, *args, **kwargs):
        train_one_epoch(self, *args, **kwargs)
        with torch.no_grad():
            next(self.model.parameters()).fill_(float("inf"))

    monkeypatch.setattr(finetune_module.FinetuneRun, "train_one_epoch", and_break_a_weight)
    out = tmp_path / "broken"
    result = runner.invoke(app, ["finetune", str(tiny_encoder), str(small_digits_folder), "--out", str(out),
                                 "--epochs", "1", "--batch-size", "80", *FAST])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "the weights became NaN or infinite by step 2" in text and "Lower --lr" in text, text
    assert not (out / "checkpoint.safetensors").exists() and not (out / FINETUNED_FILE).exists()


def test_batches_without_two_readable_images_are_skipped_and_the_run_ends(tiny_encoder, tmp_path, cut_image):
    """Batches of 2 that hold a file that fails to decode (a PNG cut in half) are skipped, and the epochs
    still end (the run looped for ever on a skipped last batch). Each class keeps an image that decodes."""
    for folder, counts in (("train", {"a": (1, 1), "b": (1, 2)}), ("val", {"a": (2, 0), "b": (2, 0)})):
        for name, (good, cut) in counts.items():
            (tmp_path / folder / name).mkdir(parents=True)
            for index in range(good + cut):
                path = tmp_path / folder / name / f"{index}.png"
                if index < good:
                    Image.fromarray(np.random.default_rng(index).integers(0, 255, (40, 40, 3), np.uint8)).save(path)
                else:
                    cut_image(path, index)
    try:
        done = subprocess.run([sys.executable, "-m", "simclr_cli", "finetune", str(tiny_encoder),
                               str(tmp_path / "train"), "--val", str(tmp_path / "val"), "--out", str(tmp_path / "run"),
                               "--epochs", "2", "--batch-size", "2", "--quiet", *FAST],
                              capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("2 epochs of 2 steps were still running after 300 s")
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "run" / "finetune.json").read_text())
    assert results["epochs"] == 2
    assert (results["num_train"], results["num_val"]) == (2, 4)  # the images that decoded, as linear-eval counts
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in epochs] == [1, 2] and epochs[-1]["step"] < 2 * 2, epochs  # some skipped


def test_a_training_set_smaller_than_the_batch_fine_tunes_at_the_learning_rate_of_its_real_batch(
        tiny_encoder, small_digits_folder, tmp_path):
    """A 10% label fraction of 200 digits is a few dozen images, under the default batch of 256: the batch is
    all of them, and the lr rule (0.05 x batch / 256) and config.json follow that batch."""
    out = tmp_path / "few"
    result = runner.invoke(app, ["finetune", str(tiny_encoder), str(small_digits_folder), "--label-fraction", "0.1",
                                 "--epochs", "1", "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    train = len(json.loads((out / "split.json").read_text())["train"])
    assert 2 <= train < 256
    assert f"using batch size {train} instead of 256" in result.output
    assert f"batch {train}, lr {0.05 * train / 256:g}" in result.output
    assert json.loads((out / "config.json").read_text())["batch_size"] == train
    assert "fine-tuned model after 1 epoch\n" in result.output  # not "1 epochs"



def test_batches_are_evened_out_so_that_each_epoch_trains_on_every_image(tiny_encoder, small_digits_folder, tmp_path):
    """20 training images at --batch-size 16 trained on 16 an epoch (the last, incomplete batch is dropped); two
    batches of 10 train on all 20, and the lr rule and config.json follow that batch."""
    for split, files in (("train", slice(0, 10)), ("val", slice(10, 14))):
        for label in ("0", "1"):
            (tmp_path / split / label).mkdir(parents=True)
            for path in sorted((small_digits_folder / label).iterdir())[files]:
                shutil.copy(path, tmp_path / split / label / path.name)
    out = tmp_path / "run"
    result = runner.invoke(app, ["finetune", str(tiny_encoder), str(tmp_path / "train"), "--val", str(tmp_path / "val"),
                                 "--out", str(out), "--epochs", "2", "--batch-size", "16", *FAST])
    assert result.exit_code == 0, result.output
    assert ("using batch size 10 instead of 16: an epoch of 2 steps leaves 0 of the 20 images out, where 16 would "
            "leave 4 (the learning rate follows the batch)") in " ".join(result.output.split())
    assert f"batch 10, lr {0.05 * 10 / 256:g}" in result.output
    assert json.loads((out / "config.json").read_text())["batch_size"] == 10
    assert [record["step"] for record in records(out)] == [2, 4]


def test_a_run_started_with_relative_paths_resumes_from_another_working_directory(tiny_encoder, small_digits_folder,
                                                                                   tmp_path, monkeypatch):
    """config.json keeps MODEL and TRAIN as absolute paths, and split.json its images: `--resume` from another
    directory found neither when they were given relative."""
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(start)
    result = runner.invoke(app, ["finetune", os.path.relpath(tiny_encoder, start),
                                 os.path.relpath(small_digits_folder, start), "--out", "run", "--epochs", "1",
                                 "--batch-size", "32", *FAST])
    assert result.exit_code == 0, result.output
    saved = json.loads((start / "run" / "config.json").read_text())
    assert (saved["model"], saved["data"]["train_dir"]) == (str(tiny_encoder / "encoder.safetensors"),
                                                           str(small_digits_folder))  # the file in MODEL's folder
    assert all(os.path.isabs(path) for path, _ in json.loads((start / "run" / "split.json").read_text())["val"])
    monkeypatch.chdir(elsewhere)
    resumed = runner.invoke(app, ["finetune", "--resume", str(start / "run"), "--workers", "0"])
    assert resumed.exit_code == 0, resumed.output


def test_a_class_whose_training_images_all_fail_to_decode_is_a_one_line_error(tiny_encoder, small_digits_folder,
                                                                              tmp_path, cut_image):
    """The scan reads headers only: a class of images cut in half was learnt by no one, and the run reported
    100% top-1 over the classes left."""
    data = tmp_path / "data"
    shutil.copytree(small_digits_folder / "0", data / "0")
    shutil.copytree(small_digits_folder / "1", data / "1")
    for seed, path in enumerate(sorted((data / "1").iterdir())):
        cut_image(path, seed)
    result = runner.invoke(app, ["finetune", str(tiny_encoder), str(data), "--out", str(tmp_path / "run"),
                                 "--val-split", "0.2", *SHORT])
    assert result.exit_code == 1, result.output
    assert "error: class '1' has no training image that could be decoded" in " ".join(result.output.split())
    assert not (tmp_path / "run" / FINETUNED_FILE).exists()


def test_a_label_fraction_draws_its_share_past_images_that_do_not_decode(tiny_encoder, small_digits_folder, tmp_path,
                                                                        cut_image):
    """A share of one image per class could be a broken file: after an epoch the run stopped, telling the user to
    add images to a class that had plenty."""
    data = tmp_path / "data"
    shutil.copytree(small_digits_folder / "0", data / "0")
    shutil.copytree(small_digits_folder / "1", data / "1")
    labelled = load_labelled(data, seed=0)  # the split and the draw the run below makes
    cut = [labelled.train.paths[i] for i in balanced_subset(labelled.train.labels, 0.05, seed=0)]
    for seed, path in enumerate(cut):  # the draw's first choice in each class
        cut_image(path, seed)
    result = runner.invoke(app, ["finetune", str(tiny_encoder), str(data), "--out", str(tmp_path / "run"),
                                 "--label-fraction", "0.05", "--epochs", "1", *SHORT[2:]])
    assert result.exit_code == 0, result.output
    train = json.loads((tmp_path / "run" / "split.json").read_text())["train"]
    assert Counter(label for _, label in train) == {0: 1, 1: 1}
    assert not {Path(path) for path, _ in train} & set(cut)
    assert "passing over" in " ".join(result.output.split())


def test_a_new_run_is_held_against_a_resume_while_it_trains(tiny_encoder, small_digits_folder, tmp_path):
    out, answers = tmp_path / "run", []

    def report(kind, **fields):
        if kind == "step" and not answers:
            try:
                resume_finetune(out)
                answers.append("resumed")
            except ConfigError as error:
                answers.append(str(error))
    finetune(_config(small_digits_folder, tiny_encoder, out, epochs=1), report)
    assert answers == [f"--resume {out} is in use by another simclr process; let it finish, or stop it, then run "
                       f"again"]


def test_a_run_in_use_is_refused_to_a_second_resume(finetuned, tmp_path):
    run = shutil.copytree(finetuned[1], tmp_path / "run")
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    with held(run, "--resume"):
        result = runner.invoke(app, ["finetune", "--resume", str(run), "--workers", "0"])
    assert result.exit_code == 1 and f"--resume {run} is in use by another simclr process" in result.output
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == before


def _edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("damage,message", [
    (lambda run: (run / "split.json").write_text("{}"), "split.json: not the list of training and validation images"),
    (lambda run: _edit_json(run / "config.json", lambda c: c.update(epochs="5")),
     "config.json is not the settings of a `simclr finetune` run (epochs is '5', not a whole number)"),
    (lambda run: _edit_json(run / "config.json", lambda c: c["runtime"].update(seed=10 ** 30)),
     f"--seed {10 ** 30} is out of range"),
    (lambda run: (run / "checkpoint.safetensors").unlink(),  # was taken for a run stopped in its first epoch
     "the run finished (finetuned.safetensors is there) and its checkpoint.safetensors is gone"),
], ids=["empty-split", "epochs-text", "huge-seed", "finished-without-checkpoint"])
def test_resuming_a_damaged_or_edited_run_folder_is_a_one_line_error(finetuned, tmp_path, damage, message):
    run = shutil.copytree(finetuned[1], tmp_path / "run")
    damage(run)
    result = runner.invoke(app, ["finetune", "--resume", str(run), "--quiet"])
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_device_auto_on_resume_replaces_a_saved_device_this_machine_lacks(finetuned, tmp_path):
    run = shutil.copytree(finetuned[1], tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["runtime"]["device"] = "cuda"
    (run / "config.json").write_text(json.dumps(config))
    if not torch.cuda.is_available():
        kept = runner.invoke(app, ["finetune", "--resume", str(run), "--workers", "0"])
        assert kept.exit_code == 1 and "--device cuda: no CUDA GPU is visible here" in kept.output, kept.output
    result = runner.invoke(app, ["finetune", "--resume", str(run), "--device", "auto", "--workers", "0"])
    assert result.exit_code == 0, result.output


def test_a_new_run_holds_its_folder_before_it_sets_up(tiny_encoder, small_digits_folder, tmp_path):
    """The lock comes before the split and config.json are written, not after: a second run started at once
    with the same --out wrote them over the first's."""
    out = tmp_path / "run"
    out.mkdir()
    with held(out, "--out"):
        result = runner.invoke(app, ["finetune", str(tiny_encoder), str(small_digits_folder), "--out", str(out),
                                     *SHORT])
    assert result.exit_code == 1 and f"--out {out} is in use by another simclr process" in result.output, result.output
    assert list(out.iterdir()) == []
    missing = tmp_path / "runs" / "new"
    result = runner.invoke(app, ["finetune", str(tiny_encoder), str(tmp_path / "nowhere"), "--out", str(missing),
                                 *SHORT])
    assert result.exit_code == 1 and not (tmp_path / "runs").exists(), result.output

"""Encoder files load into torchvision; checkpoints round-trip; writes are atomic; nothing is unpickled."""

import contextlib
import errno
import hashlib
import json
import math
import multiprocessing
import os
import re
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file

from simclr_cli import export
from simclr_cli.config import PretrainConfig
from simclr_cli.errors import ConfigError, ModelFileError
from simclr_cli.export import load_checkpoint, load_encoder, save_checkpoint, save_encoder, save_tensors
from simclr_cli.files import PROBE_PREFIX, EncoderInfo, atomic_path, claimed, held, read_metadata
from simclr_cli.models import SimCLR, build_backbone
from simclr_cli.optim import build_optimizer
from simclr_cli.runtime import rng_state, set_rng_state


def info_for(arch="resnet18", stem="imagenet"):
    return EncoderInfo(arch=arch, stem=stem, feature_dim=512, image_size=32, mean=(0.5, 0.5, 0.5),
                       std=(0.25, 0.25, 0.25), version="test", config={"batch_size": 8})


def test_encoder_round_trip_and_torchvision_loading(tmp_path):
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", "imagenet").eval()
    path = tmp_path / "encoder.safetensors"
    save_encoder(path, backbone, info_for())
    loaded, info = load_encoder(path)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(images), backbone(images))
    assert info == info_for()
    assert load_encoder(tmp_path)[1] == info, "a run folder holding encoder.safetensors works too"

    plain = torchvision.models.resnet18()
    from safetensors.torch import load_file

    result = plain.load_state_dict(load_file(str(path)), strict=False)
    assert set(result.missing_keys) == {"fc.weight", "fc.bias"} and not result.unexpected_keys
    plain.fc = torch.nn.Identity()
    torch.testing.assert_close(plain.eval()(images), backbone(images))


def test_a_narrow_encoder_round_trips_and_files_without_a_width_are_standard(tmp_path):
    torch.manual_seed(0)
    narrow = build_backbone("resnet18", "cifar", width=0.5).eval()
    path = tmp_path / "narrow.safetensors"
    save_encoder(path, narrow, replace(info_for(stem="cifar"), feature_dim=256, width=0.5))
    loaded, info = load_encoder(path)
    assert (info.width, info.feature_dim, loaded.feature_dim) == (0.5, 256, 256)
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(images), narrow(images))

    older = tmp_path / "older.safetensors"  # written before --width existed: no "width" in the metadata
    metadata = info_for().to_metadata()
    del metadata["width"]
    save_file(build_backbone("resnet18", "imagenet").state_dict(), str(older), metadata=metadata)
    assert load_encoder(older)[1].width == 1.0


def test_foreign_and_broken_files_are_clear_errors(tmp_path):
    with pytest.raises(ModelFileError, match="no such encoder"):
        load_encoder(tmp_path / "missing.safetensors")
    pickle_file = tmp_path / "model.pt"
    torch.save({"a": torch.zeros(1)}, pickle_file)
    with pytest.raises(ModelFileError, match="not a safetensors file"):
        load_encoder(pickle_file)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"a": torch.zeros(1)}, str(foreign))
    with pytest.raises(ModelFileError, match="not a simclr encoder"):
        load_encoder(foreign)
    with pytest.raises(ModelFileError, match="holds no encoder"):
        load_encoder(tmp_path)
    incomplete = tmp_path / "incomplete.safetensors"
    save_file({"a": torch.zeros(1)}, str(incomplete), metadata={"format": "simclr-encoder", "arch": "resnet18"})
    with pytest.raises(ModelFileError, match="incomplete"):
        load_encoder(incomplete)


def test_simclrs_other_files_given_as_model_are_named_for_what_they_are(tmp_path):
    """A checkpoint, head, probe or feature cache passed for MODEL was said to hold "no simclr metadata"."""
    model = SimCLR("resnet18", "imagenet")
    checkpoint = tmp_path / "checkpoint.safetensors"
    save_checkpoint(checkpoint, {"backbone": model.backbone}, build_optimizer("lars", model, lr=0.1,
                                                                               weight_decay=1e-6), rng_state(), {})
    with pytest.raises(ModelFileError, match="checkpoint.safetensors: a simclr run's checkpoint, not an encoder; "
                                             "pass an encoder.safetensors or finetuned.safetensors, or the run "
                                             "folder that holds one"):
        load_encoder(checkpoint)
    for kind, said in (("head", "projection head"), ("linear", "linear probe"), ("features", "feature cache")):
        save_file({"a": torch.zeros(1)}, str(tmp_path / f"{kind}.safetensors"), metadata={"format": f"simclr-{kind}"})
        with pytest.raises(ModelFileError, match=f"{kind}.safetensors: a simclr {said}, not an encoder"):
            load_encoder(tmp_path / f"{kind}.safetensors")


@pytest.mark.parametrize("config, command", [({"data_dir": "photos"}, "pretrain"),
                                             ({"model": "encoder.safetensors"}, "finetune")])
def test_an_unfinished_run_as_model_says_how_to_finish_it(tmp_path, config, command):
    """After Ctrl-C, or a kill during export, a run's folder holds no model yet: "pass a run folder of
    `simclr pretrain`" was no help, since it is one."""
    run = tmp_path / "my run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match="holds no encoder"):  # no checkpoint: no run to finish
        load_encoder(run)
    (run / "checkpoint.safetensors").write_bytes(b"")
    with pytest.raises(ModelFileError, match=re.escape(f"this run's folder holds no model (the run has not finished, "
                                                       f"or its model was removed); `simclr {command} --resume "
                                                       f"'{run}'` finishes it")):
        load_encoder(run)


@pytest.mark.parametrize("key, value, message", [
    ("mean", "5", "incomplete"),  # was a TypeError traceback
    ("std", "[1, 2]", "damaged .*three numbers each"),
    ("mean", '["a", "b", "c"]', "damaged .*three numbers each"),
    ("std", "[0.2, 0, 0.2]", "damaged .*std above 0"),
    ("stem", "foo", "damaged .*stem 'foo'"),  # was a ValueError traceback
    ("width", "nan", "damaged .*width nan"),  # was a ValueError traceback
    ("image_size", "0", "damaged .*image_size 0"),
    ("feature_dim", "-1", "damaged .*feature_dim -1"),
    ("feature_dim", "2048", "metadata gives 2048-d features, its resnet18 gives 512"),
    ("config", "[]", "damaged .*config is not a JSON object"),
])
def test_damaged_encoder_metadata_is_a_clear_error(tmp_path, key, value, message):
    path = tmp_path / "encoder.safetensors"
    metadata = {**info_for().to_metadata(), key: value}
    save_file(build_backbone("resnet18", "imagenet").state_dict(), str(path), metadata=metadata)
    with pytest.raises(ModelFileError, match=message):
        load_encoder(path)


def test_checkpoint_round_trip_restores_model_optimizer_and_rng(tmp_path):
    torch.manual_seed(0)
    model = SimCLR("resnet18", "imagenet")
    for name in ("lars", "adamw"):
        optimizer = build_optimizer(name, model, lr=0.1, weight_decay=1e-6)
        model(torch.randn(4, 3, 32, 32)).sum().backward()
        optimizer.step()
        path = tmp_path / f"{name}.safetensors"
        save_checkpoint(path, {"backbone": model.backbone, "head": model.head}, optimizer, rng_state(),
                        {"state": {"step": 3}})
        expected_random = torch.rand(3)

        other = SimCLR("resnet18", "imagenet")
        other_optimizer = build_optimizer(name, other, lr=0.1, weight_decay=1e-6)
        checkpoint = load_checkpoint(path)
        other.backbone.load_state_dict(checkpoint.module_state("backbone"))
        other.head.load_state_dict(checkpoint.module_state("head"))
        export.load_optimizer(other_optimizer, checkpoint.tensors, checkpoint.optimizer)
        set_rng_state(checkpoint.rng_tensors(), checkpoint.rng)
        assert torch.equal(torch.rand(3), expected_random)
        assert checkpoint.progress == {"state": {"step": 3}}
        for a, b in zip(model.state_dict().values(), other.state_dict().values()):
            assert torch.equal(a, b)
        saved, restored = optimizer.state_dict(), other_optimizer.state_dict()
        assert saved["param_groups"] == restored["param_groups"]
        for index, entry in saved["state"].items():
            for key, value in entry.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(restored["state"][index][key]))


def test_atomic_path_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"], "no temporary file is left behind"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names open files through /proc")
def test_atomic_path_syncs_the_data_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """Renamed before its data reached the disk, a file can be empty after a power cut, under the old name."""
    events = []
    fsync, replace_file = os.fsync, os.replace

    def recorded_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recorded_replace(source, target):
        events.append(("replace", str(source), str(target)))
        replace_file(source, target)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    target = tmp_path / "out.json"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert events == [("fsync", str(tmp)), ("replace", str(tmp), str(target)), ("fsync", str(tmp_path))]
    assert target.read_text() == "new"


def test_a_full_disk_while_writing_safetensors_is_an_oserror_naming_the_file(tmp_path):
    """safetensors' writer raises its own SafetensorError on ENOSPC, which the CLI showed as a traceback. A
    file-size limit makes the real writer fail the same way (EFBIG), in a process of its own."""
    path = tmp_path / "checkpoint.safetensors"
    script = f"""
import resource, signal, torch
from simclr_cli.export import save_tensors
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
try:
    save_tensors({str(path)!r}, {{"w": torch.zeros(10000)}}, {{}})
except OSError as error:
    print(error.errno, error.filename)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(errno.EFBIG), str(path)]
    assert list(tmp_path.iterdir()) == [], "the temporary is removed"


def test_the_same_tensors_and_metadata_written_again_leave_the_files_bytes(tmp_path):
    """safetensors writes its metadata in another order on every call, so a re-export of the same weights had a
    new SHA-256, and every index built from the encoder was refused. A file is kept only when it holds the
    same tensors bit for bit and the same metadata; any difference is written."""
    path = tmp_path / "encoder.safetensors"
    tensors = {"weight": torch.arange(6.0).reshape(2, 3), "steps": torch.tensor(3), "nan": torch.tensor([math.nan])}
    metadata = {f"key{i}": str(i) for i in range(12)}  # twelve entries: orders enough for every write to differ

    def digest() -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    def holds(expected: dict[str, torch.Tensor], expected_metadata: dict[str, str]) -> bool:
        saved = load_file(str(path))
        return (read_metadata(path, "test file") == expected_metadata and saved.keys() == expected.keys()
                and all(saved[name].dtype == tensor.dtype and saved[name].shape == tensor.shape
                        and saved[name].numpy().tobytes() == tensor.numpy().tobytes()
                        for name, tensor in expected.items()))

    save_tensors(path, tensors, metadata)
    first = digest()
    for _ in range(3):
        save_tensors(path, {name: tensor.clone() for name, tensor in tensors.items()}, dict(reversed(metadata.items())))
        assert digest() == first, "the same tensors and metadata: the file is left as it was"
    changes = [({**tensors, "weight": tensors["weight"] + 1}, metadata),
               ({**tensors, "steps": torch.tensor(3.0)}, metadata),  # the same value in another dtype
               ({**tensors, "weight": tensors["weight"].reshape(3, 2)}, metadata),
               ({**tensors, "extra": torch.zeros(1)}, metadata),
               ({name: tensor for name, tensor in tensors.items() if name != "nan"}, metadata),
               ({**tensors, "nan": torch.tensor([-0.0])}, metadata),
               (tensors, {**metadata, "key0": "changed"})]
    for changed, changed_metadata in changes:
        save_tensors(path, changed, changed_metadata)
        assert holds(changed, changed_metadata)
        save_tensors(path, tensors, metadata)
        assert holds(tensors, metadata)
    save_tensors(path, {**tensors, "nan": torch.tensor([0.0])}, metadata)
    save_tensors(path, {**tensors, "nan": torch.tensor([-0.0])}, metadata)
    assert torch.signbit(load_file(str(path))["nan"]).all(), "-0.0 is written over 0.0 (torch.equal calls them equal)"

    # Keys `ignored` may differ in a file kept as it is; nothing else may.
    save_tensors(path, tensors, metadata)
    before = digest()
    save_tensors(path, tensors, {**metadata, "key0": "another run's setting"}, ignored=("key0",))
    assert digest() == before and holds(tensors, metadata)
    save_tensors(path, tensors, {**metadata, "key1": "changed"}, ignored=("key0",))
    assert holds(tensors, {**metadata, "key1": "changed"})
    save_tensors(path, {**tensors, "weight": tensors["weight"] + 1}, {**metadata, "key1": "changed"}, ignored=("key1",))
    assert holds({**tensors, "weight": tensors["weight"] + 1}, {**metadata, "key1": "changed"})


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_have_the_usual_permissions(tmp_path, umask):
    """What open() would give under the user's umask: safetensors wrote encoders readable by their owner
    alone (0600), which no one else on a shared machine could load."""
    backbone = build_backbone("resnet18", "imagenet")
    previous = os.umask(umask)
    try:
        save_encoder(tmp_path / "encoder.safetensors", backbone, info_for())
        with atomic_path(tmp_path / "out.json") as tmp:
            tmp.write_text("{}")
        (tmp_path / "plain.txt").write_text("")
    finally:
        os.umask(previous)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["encoder.safetensors", "out.json", "plain.txt"], 0o666 & ~umask)


def test_no_code_path_unpickles():
    import pathlib
    import re

    source = "\n".join(p.read_text() for p in pathlib.Path(export.__file__).parent.glob("*.py"))
    assert not re.search(r"pickle\.loads?\(|torch\.load\(|allow_pickle=True", source)


def test_an_empty_out_is_new_whatever_another_process_checks_in_it_meanwhile(tmp_path):
    """Under --devices every process checks --out: one's probe file, there for an instant, is not a file of the
    run's (one check in 40 refused an empty folder when two processes checked it at once)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / f"{PROBE_PREFIX}abc123").touch()
    assert export.check_run_dir(run_dir, False, "encoder.safetensors", PretrainConfig) is False
    (run_dir / "config.json").touch()
    with pytest.raises(ConfigError, match="already holds files"):
        export.check_run_dir(run_dir, False, "encoder.safetensors", PretrainConfig)


def test_the_temporaries_of_killed_writes_are_removed_and_leave_a_folder_empty(tmp_path):
    """kill -9 during a write leaves atomic_path's temporary and safetensors' own (as large as a checkpoint):
    nothing removed them, and a folder holding only them was refused as not empty."""
    from simclr_cli.files import atomic_path

    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(run_dir / "config.json") as tmp:
            left = tmp.name  # its real name; a kill -9 runs no except clause, so the file stays (made again below)
            raise KeyboardInterrupt
    (run_dir / left).write_text("{")
    (run_dir / ".tmpAb3xZ9").write_bytes(b"\0" * 100)  # safetensors' save_file writes this, then renames it
    (run_dir / ".keep.tmp").touch()  # not a name either writer makes
    export.check_run_dir(run_dir, True, "encoder.safetensors", PretrainConfig)
    assert not (run_dir / left).exists() and not (run_dir / ".tmpAb3xZ9").exists()
    assert (run_dir / ".keep.tmp").exists()
    (run_dir / ".keep.tmp").unlink()
    (run_dir / ".tmpQ7w2Lk").touch()
    # empty, as it is
    assert export.check_run_dir(run_dir, False, "encoder.safetensors", PretrainConfig) is False
    assert not (run_dir / ".tmpQ7w2Lk").exists()


def test_a_folder_refused_as_not_empty_keeps_every_file(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    names = ["notes.txt", ".tmpAb3xZ9", ".draft.2024_q01.tmp", ".config.json.abcd1234.tmp"]
    for name in names:
        (folder / name).touch()
    with pytest.raises(ConfigError, match="already holds files"):
        export.check_run_dir(folder, False, "encoder.safetensors", PretrainConfig)
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


def test_a_look_at_a_folder_for_an_instant_does_not_refuse_its_holder(tmp_path):
    """`in_use` (simclr similar, asking whether an embed writes its index) takes a shared lock for an instant: a
    `held` that came upon it then was refused, "in use by another simclr process", with no other process there."""
    import fcntl
    import threading

    looked = threading.Event()

    def look() -> None:  # what in_use does, held a little longer so that `held` surely meets it
        fd = os.open(tmp_path, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        looked.set()
        time.sleep(0.03)
        os.close(fd)

    looker = threading.Thread(target=look)
    looker.start()
    looked.wait()
    with held(tmp_path, "OUT"):  # not refused: taken once the look ended
        assert not looker.is_alive()
    looker.join()
    with held(tmp_path, "OUT"):  # and a real holder is still refused
        with pytest.raises(ConfigError, match="is in use by another simclr process"):
            with held(tmp_path, "OUT"):
                pass


def test_a_held_folder_is_let_go_with_its_process_not_its_forked_children(tmp_path):
    """A loader worker forked inside held() outlives a parent killed outright by seconds: it must not keep the
    lock (the next --resume was refused meanwhile)."""
    context = multiprocessing.get_context("fork")
    started = context.Event()

    def run() -> None:
        started.set()  # after the fork's own clean-up, which is what this test is about
        time.sleep(60)

    with held(tmp_path, "--resume"):
        child = context.Process(target=run)
        child.start()
        assert started.wait(30)
    try:
        with held(tmp_path, "--resume"):  # the child still has its copy of the descriptor, closed
            pass
    finally:
        child.kill()
        child.join()


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_refused_claim_removes_no_folder_another_run_holds(tmp_path, monkeypatch, when):
    """Two new runs with the same --out: the other makes and holds the folder just before this one makes it, or
    just after. Refused, this one must not remove the folder: the other's lock would be on a deleted folder, and a
    third run could take the same --out."""
    folder = tmp_path / "runs" / "run"
    mkdir = Path.mkdir
    with contextlib.ExitStack() as other:
        taken = []

        def take() -> None:  # the other run holds the folder, once
            if not taken:
                taken.append(other.enter_context(held(folder, "--out")))

        def racing_mkdir(self, *args, **kwargs):
            if self == folder and when == "before" and not folder.exists():
                os.makedirs(folder)
                take()
            mkdir(self, *args, **kwargs)
            if self == folder and when == "after":
                take()

        monkeypatch.setattr(Path, "mkdir", racing_mkdir)
        with pytest.raises(ConfigError, match="is in use by another simclr process"):
            with claimed(folder, "--out"):
                pass
        assert folder.is_dir()
    monkeypatch.undo()
    with pytest.raises(RuntimeError), claimed(tmp_path / "new" / "run", "--out"):  # set-up failed, the lock its own
        raise RuntimeError("the images could not be read")
    assert not (tmp_path / "new").exists(), "the folders made for it are removed"

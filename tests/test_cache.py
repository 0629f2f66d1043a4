"""The decoded cache: working resolution, slots filled once, stale files decoded again, same views."""

import copy
import errno
import gc
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from simclr_cli import cache as cache_module
from simclr_cli.cache import (DecodedCache, WorkingImages, load_working, slot_shape, to_working_resolution,
                               working_side)
from simclr_cli.cli import app
from simclr_cli.config import AugmentConfig, PretrainConfig, RuntimeConfig
from simclr_cli.errors import DataError
from simclr_cli.images import UnreadableImage
from simclr_cli.train import pretrain

runner = CliRunner()


def gradient(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([(x * rng.uniform(0.1, 1) + y * rng.uniform(0.1, 1) + rng.uniform(0, 255)) % 256
                      for _ in range(3)], axis=-1)
    return Image.fromarray(array.astype(np.uint8))


def write_folder(root: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, size in enumerate(sizes):
        path = root / f"{i:03d}.png"
        gradient(*size, seed=i).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("size, expected", [
    ((400, 300), (37, 49)),  # 4:3 landscape: shorter side 37
    ((300, 400), (49, 37)),  # portrait
    ((600, 400), (33, 50)),  # 3:2: the longer side fills the slot, the shorter one is 0.89 x 37
    ((800, 200), (12, 50)),  # a panorama, whole, at the slot's length
    ((30, 20), (20, 30)),  # smaller than the slot: not enlarged, all of it kept
])
def test_working_resolution_keeps_the_whole_image_at_1_15x_or_the_slot_length(size, expected):
    side = working_side(32)
    assert side == 37 and slot_shape(side) == (37, 50)
    array = to_working_resolution(gradient(*size), side)
    assert array.shape[:2] == expected and array.dtype == np.uint8
    short, long = slot_shape(side)
    assert min(array.shape[:2]) <= short and max(array.shape[:2]) <= long


def test_working_resolution_is_a_bicubic_resize_of_the_whole_image():
    image = gradient(800, 200)
    expected = np.asarray(image.resize((50, 12), Image.Resampling.BICUBIC))
    assert np.array_equal(to_working_resolution(image, 37), expected)


def test_random_resized_crops_of_a_wide_photo_reach_its_edges_in_the_working_image():
    """A 16:9 photo with a red left and a blue right edge: the crops may lie anywhere on the image
    (RandomResizedCrop's boxes leave its central 4:3 in about 46% of draws), so both edges must survive
    the working resolution (they were cut off with the central 4:3)."""
    array = np.full((900, 1600, 3), 128, np.uint8)
    array[:, :150] = (255, 0, 0)
    array[:, -150:] = (0, 0, 255)
    working = to_working_resolution(Image.fromarray(array), working_side(224))
    assert slot_shape(working_side(224)) == (258, 344) and working.shape[:2] == (round(900 * 344 / 1600), 344)
    assert (working[:, 0] == (255, 0, 0)).all() and (working[:, -1] == (0, 0, 255)).all()


def test_slots_are_filled_once_and_read_back_without_decoding(tmp_path, monkeypatch):
    paths = write_folder(tmp_path / "images", [(120, 90), (90, 120), (60, 60)])
    cache, summary = DecodedCache.prepare(tmp_path / "cache", tmp_path / "images", paths, 37)
    assert "created" in summary and Path(f"{cache.base}.u8").stat().st_size == 3 * 37 * 50 * 3
    decode = WorkingImages(37, copy.deepcopy(cache))  # through __getstate__, as a loader worker gets it
    first = [np.asarray(decode(i, str(p))) for i, p in enumerate(paths)]
    assert [a.shape[:2] for a in first] == [(37, 49), (49, 37), (37, 37)]

    def no_decoding(*args):
        raise AssertionError("decoded a file the cache holds")

    monkeypatch.setattr(cache_module, "load_working", no_decoding)
    again, summary = DecodedCache.prepare(tmp_path / "cache", tmp_path / "images", paths, 37)
    assert "3 of 3 images stored" in summary
    second = [np.asarray(WorkingImages(37, again)(i, str(p))) for i, p in enumerate(paths)]
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_uncached_decoding_gives_the_same_pixels(tmp_path):
    paths = write_folder(tmp_path / "images", [(200, 150)])
    cache, _ = DecodedCache.prepare(tmp_path, tmp_path / "images", paths, 37)
    assert np.array_equal(np.asarray(WorkingImages(37, cache)(0, str(paths[0]))),
                          np.asarray(WorkingImages(37)(0, str(paths[0]))))


def test_changed_files_are_decoded_again_and_a_new_file_list_starts_over(tmp_path):
    paths = write_folder(tmp_path / "images", [(120, 90), (120, 90)])
    cache, _ = DecodedCache.prepare(tmp_path, tmp_path / "images", paths, 37)
    decode = WorkingImages(37, cache)
    old = [np.asarray(decode(i, str(p))) for i, p in enumerate(paths)]
    gradient(100, 100, seed=99).save(paths[1])  # new content, size and mtime
    os.utime(paths[1], ns=(1, 1))
    cache, summary = DecodedCache.prepare(tmp_path, tmp_path / "images", paths, 37)
    assert "1 of 2 images stored, 1 changed since" in summary
    decode = WorkingImages(37, cache)
    assert np.array_equal(np.asarray(decode(0, str(paths[0]))), old[0])
    assert np.asarray(decode(1, str(paths[1]))).shape == (37, 37, 3)
    manifest = json.loads(Path(f"{cache.base}.json").read_text())
    assert manifest["stats"][1][1] == 1

    extra = write_folder(tmp_path / "images", [(120, 90)] * 3)[2:]
    cache, summary = DecodedCache.prepare(tmp_path, tmp_path / "images", paths + extra, 37)
    assert "created" in summary



def test_a_run_whose_shared_cache_another_run_started_over_decodes_its_own_files(tmp_path):
    """Two runs share --cache-dir; the folder gains an image between their starts, so the second starts the cache
    over. The first run's workers, made anew each epoch, must not read the second's slots as their images."""
    paths = write_folder(tmp_path / "images", [(120, 90)] * 3)
    first, _ = DecodedCache.prepare(tmp_path / "shared", tmp_path / "images", paths, 37)
    expected = [np.asarray(WorkingImages(37, copy.deepcopy(first))(i, str(p))) for i, p in enumerate(paths)]
    added = tmp_path / "images" / "000-added.png"  # sorts first: every later image moves one slot down
    gradient(120, 90, seed=99).save(added)
    second, summary = DecodedCache.prepare(tmp_path / "shared", tmp_path / "images", [added, *paths], 37)
    assert "created" in summary and second.base == first.base
    [WorkingImages(37, copy.deepcopy(second))(i, str(p)) for i, p in enumerate([added, *paths])]
    worker = WorkingImages(37, copy.deepcopy(first))  # the first run's next epoch
    assert all(np.array_equal(np.asarray(worker(i, str(p))), expected[i]) for i, p in enumerate(paths))


def test_runs_starting_together_on_a_shared_cache_take_turns(tmp_path, monkeypatch):
    """The second run's prepare ran between the first's creating the files and recording them: both recorded
    the second's files, so the first read the second's images as its own (one image off, in every slot)."""
    paths = write_folder(tmp_path / "images", [(120, 90)] * 3)
    added = tmp_path / "images" / "000-added.png"
    gradient(120, 90, seed=99).save(added)
    second = []
    real_write_json = cache_module.write_json

    def write_json(*args):  # the first run, about to write its manifest: the second run starts
        if not second:
            thread = threading.Thread(target=lambda: second.append(
                DecodedCache.prepare(tmp_path / "shared", tmp_path / "images", [added, *paths], 37)[0]))
            second.append(thread)
            thread.start()
            thread.join(1.0)  # it waits for the first run's lock (before, it ran through meanwhile)
        real_write_json(*args)

    monkeypatch.setattr(cache_module, "write_json", write_json)
    first, _ = DecodedCache.prepare(tmp_path / "shared", tmp_path / "images", paths, 37)
    second[0].join()
    for cache, files in ((first, paths), (second[1], [added, *paths])):
        decode = WorkingImages(37, copy.deepcopy(cache))
        for i, path in enumerate(files):
            assert np.array_equal(np.asarray(decode(i, str(path))), np.asarray(WorkingImages(37)(i, str(path))))


def _filled(tmp_path) -> tuple[DecodedCache, list[Path]]:
    paths = write_folder(tmp_path / "images", [(120, 90), (90, 120)])
    cache, _ = DecodedCache.prepare(tmp_path / "cache", tmp_path / "images", paths, 37)
    decode = WorkingImages(37, copy.deepcopy(cache))
    [decode(i, str(p)) for i, p in enumerate(paths)]
    return cache, paths


@pytest.mark.parametrize("damage", ["pixels", "slot sides", "short slots file", "state unreadable"])
def test_damaged_slots_are_decoded_again_never_read_as_pixels(tmp_path, monkeypatch, damage):
    """A crash of the machine can keep written pixels from the disk and not their slot's state; a damaged
    .slots gave a ZeroDivisionError or a reshape error in the loader; damaged pixels were trained on."""
    cache, paths = _filled(tmp_path)
    expected = [np.asarray(WorkingImages(37)(i, str(p))) for i, p in enumerate(paths)]
    if damage == "pixels":
        with open(f"{cache.base}.u8", "r+b") as handle:
            handle.seek(cache.slot_bytes + 100)
            handle.write(bytes(500))
    elif damage in ("slot sides", "state unreadable"):  # a good image skipped for good, in the second case
        slots = np.memmap(f"{cache.base}.slots", dtype=np.uint32, mode="r+", shape=(2, cache_module.SLOT_FIELDS))
        if damage == "slot sides":
            slots[1, 1:3] = (400, 400)
        else:
            slots[1, 0] = cache_module.UNREADABLE
        slots.flush()
    else:
        os.truncate(f"{cache.base}.slots", 20)
    again, summary = DecodedCache.prepare(tmp_path / "cache", tmp_path / "images", paths, 37)
    assert ("created" in summary) == (damage == "short slots file"), summary
    decoded = []
    monkeypatch.setattr(cache_module, "load_working", lambda *args: decoded.append(args) or load_working(*args))
    decode = WorkingImages(37, copy.deepcopy(again))
    assert all(np.array_equal(np.asarray(decode(i, str(p))), expected[i]) for i, p in enumerate(paths))
    assert len(decoded) == (2 if damage == "short slots file" else 1)


def test_the_files_of_a_cache_are_closed_with_it(tmp_path):
    """Its writes go through descriptors, which nothing closed: a process running one pretrain after another
    (the API, the tests) kept two more open for each."""
    cache, paths = _filled(tmp_path)
    open_files = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        again, _ = DecodedCache.prepare(tmp_path / "cache", tmp_path / "images", paths, 37)
        WorkingImages(37, again)(0, str(paths[0]))
        del again
        gc.collect()
    assert len(os.listdir("/proc/self/fd")) == open_files


def test_a_run_refused_for_its_cache_leaves_its_out_free_for_the_next(small_digits_folder, tmp_path, monkeypatch):
    """The cache's lock file stayed in the run folder after "--cache needs ... free": the same command with
    --no-cache was then refused, --out holding files."""
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 10})())
    out = tmp_path / "run"
    args = ["pretrain", str(small_digits_folder), "--out", str(out), "--epochs", "1", "--batch-size", "64",
            "--arch", "resnet18", "--image-size", "32", "--workers", "0", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--cache"])
    assert result.exit_code == 1 and "--cache needs" in result.output, result.output
    assert not out.exists()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("manifest", [None, [], {"stats": "missing"}, {"paths": "not a list"}])
def test_a_manifest_of_another_shape_starts_the_cache_over(tmp_path, manifest):
    cache, paths = _filled(tmp_path)
    if isinstance(manifest, dict):
        old = json.loads(Path(f"{cache.base}.json").read_text())
        manifest = {**old, "paths": manifest["paths"]} if "paths" in manifest else {k: v for k, v in old.items()
                                                                                   if k != "stats"}
    Path(f"{cache.base}.json").write_text(json.dumps(manifest))
    _, summary = DecodedCache.prepare(tmp_path / "cache", tmp_path / "images", paths, 37)
    assert "created" in summary


def test_a_full_disk_stops_storing_with_one_warning_not_the_worker(tmp_path, monkeypatch, capsys):
    """The pixels were written through the memory map: a page the disk had no room for killed the loader
    worker with SIGBUS. Writes now fail as writes, and the images are decoded instead."""
    paths = write_folder(tmp_path / "images", [(120, 90)] * 3)
    cache, _ = DecodedCache.prepare(tmp_path / "cache", tmp_path / "images", paths, 37)
    decode = WorkingImages(37, copy.deepcopy(cache))
    decode(0, str(paths[0]))

    def no_space(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache_module.os, "pwrite", no_space)
    assert all(np.array_equal(np.asarray(decode(i, str(p))), np.asarray(WorkingImages(37)(i, str(p))))
               for i, p in enumerate(paths))
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and "cannot grow (No space left on device)" in warnings[0], warnings
    _, summary = DecodedCache.prepare(tmp_path / "cache", tmp_path / "images", paths, 37)
    assert "1 of 3 images stored" in summary


def test_a_file_gone_since_the_scan_is_skipped_not_fatal(tmp_path):
    paths = write_folder(tmp_path / "images", [(64, 64)] * 2)
    paths[1].unlink()  # a sync tool, while a big folder was scanned
    cache, _ = DecodedCache.prepare(tmp_path, tmp_path / "images", paths, 37)
    decode = WorkingImages(37, cache)
    assert np.asarray(decode(0, str(paths[0]))).shape == (37, 37, 3)
    with pytest.raises(UnreadableImage, match="FileNotFoundError"):
        decode(1, str(paths[1]))


def test_a_file_restored_at_the_same_size_and_time_is_decoded_again(tmp_path):
    """`cp -p` of another image of the same size keeps the size and modification time; its change time moves."""
    paths = write_folder(tmp_path / "images", [(120, 90)])
    DecodedCache.prepare(tmp_path, tmp_path / "images", paths, 37)
    stat = paths[0].stat()
    time.sleep(0.01)  # past the file system's timestamp granularity
    shutil.copyfile(paths[0], tmp_path / "copy.png")
    (tmp_path / "copy.png").replace(paths[0])
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (paths[0].stat().st_size, paths[0].stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    _, summary = DecodedCache.prepare(tmp_path, tmp_path / "images", paths, 37)
    assert "1 changed since" in summary, summary


def test_unreadable_files_are_recorded_and_not_read_again(tmp_path):
    paths = write_folder(tmp_path / "images", [(64, 64)])
    broken = tmp_path / "images" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    cache, _ = DecodedCache.prepare(tmp_path, tmp_path / "images", paths + [broken], 37)
    decode = WorkingImages(37, cache)
    with pytest.raises(UnreadableImage, match="unreadable"):
        decode(1, str(broken))
    broken.chmod(0)  # not opened a second time
    with pytest.raises(UnreadableImage, match="recorded in the decoded cache"):
        decode(1, str(broken))
    broken.chmod(0o644)


def test_not_enough_disk_space_is_a_clear_error(tmp_path, monkeypatch):
    paths = write_folder(tmp_path / "images", [(64, 64)])
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 10})())
    with pytest.raises(DataError, match=r"--cache needs 5.4 KiB in .* but only 0.0 KiB is free; pass --cache-dir on "):
        DecodedCache.prepare(tmp_path / "cache", tmp_path / "images", paths, 37)


def _config(data, out, **changes):
    runtime = RuntimeConfig(device="cpu", workers=changes.pop("workers", 0), seed=3)
    return PretrainConfig(data_dir=str(data), out_dir=str(out), epochs=2, batch_size=16, arch="resnet18",
                          stem="imagenet", augment=AugmentConfig(image_size=32), runtime=runtime, **changes)


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_cached_run_on_the_device_path_resumes_to_the_plain_runs_curve(small_digits_folder, tmp_path):
    import shutil
    import signal

    from simclr_cli.train import resume_pretrain

    images = tmp_path / "images"  # 48 digits: 3 steps an epoch
    images.mkdir()
    for path in sorted(small_digits_folder.rglob("*.png"))[:48]:
        shutil.copy(path, images / f"{path.parent.name}-{path.name}")
    plain = tmp_path / "plain"
    pretrain(_config(images, plain, augment_on="cpu"))

    def interrupt_at_step_2(kind, **fields):
        if kind == "step" and fields["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    cached = tmp_path / "cached"
    result = pretrain(_config(images, cached, augment_on="device", cache=True, cache_dir=str(tmp_path / "c"),
                              workers=1), interrupt_at_step_2)
    assert result.interrupted and len(_losses(cached)) == 2
    assert list((tmp_path / "c").glob("decoded-37px-*.u8"))
    resume_pretrain(cached)
    assert len(_losses(plain)) == 6
    assert _losses(cached) == _losses(plain), ("the cache (half filled at the interrupt), the workers and where "
                                               "the batch is augmented change nothing")


@pytest.mark.parametrize("args, message", [
    (["--cache-dir", "somewhere"], "--cache-dir needs --cache"),
    (["--augment-on", "gpu"], "--augment-on 'gpu' is not one of auto, device, cpu, per-image"),
    (["--cache", "--cache-dir", "{file}"], "or a folder on its path, is a file"),
    (["--cache", "--cache-dir", "{file}/cache"], "or a folder on its path, is a file"),
    (["--cache", "--cache-dir", "/proc/simclr-cache"], "--cache-dir /proc/simclr-cache: cannot write it, /proc takes"),
])
def test_bad_cache_and_augment_flags_are_one_line_errors(small_digits_folder, tmp_path, args, message):
    (tmp_path / "file").write_text("not a folder")
    args = [arg.format(file=tmp_path / "file") for arg in args]
    result = runner.invoke(app, ["pretrain", str(small_digits_folder), "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists(), "refused before any work"


def test_a_cache_of_the_earlier_layout_is_made_again(tmp_path):
    """Version 1 caches hold only the central 4:3 of wide images: reusing them would change the views."""
    paths = write_folder(tmp_path / "images", [(160, 90), (90, 120)])
    cache, summary = DecodedCache.prepare(tmp_path / "cache", tmp_path / "images", paths, 37)
    WorkingImages(37, cache)(0, str(paths[0]))  # fill a slot
    _, summary = DecodedCache.prepare(tmp_path / "cache", tmp_path / "images", paths, 37)
    assert "1 of 2 images stored" in summary
    manifest = json.loads(Path(f"{cache.base}.json").read_text())
    Path(f"{cache.base}.json").write_text(json.dumps({**manifest, "version": 1}))
    _, summary = DecodedCache.prepare(tmp_path / "cache", tmp_path / "images", paths, 37)
    assert "created" in summary, summary

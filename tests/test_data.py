"""Scanning folders, decoding every mode to RGB, skipping bad files."""

import errno
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclr_cli import data, images
from simclr_cli.augment import IMAGENET_MEAN, IMAGENET_STD, EvalTransform
from simclr_cli.data import ImageDataset, collate, epoch_order, even_batch
from simclr_cli.errors import DataError
from simclr_cli.features import compute_features
from simclr_cli.files import EncoderInfo
from simclr_cli.images import (NEUTRAL_BACKGROUND, Skipped, UnreadableImage, load_rgb, require_images, scan_images,
                               to_rgb)
from simclr_cli.runtime import resolve_precision


def relative(paths, root):
    return sorted(Path(p).relative_to(root).as_posix() for p in paths)


def test_scan_finds_every_good_image_at_every_depth_and_skips_broken_ones(mixed_folder):
    root, expected = mixed_folder
    scan = scan_images(root)
    found = [Path(p).relative_to(root).as_posix() for p in scan.paths]
    assert found == sorted(found), "the scan must be sorted"
    # Header checks catch empty, foreign and dangling files; the truncated JPEG has a valid header.
    assert relative(scan.skipped and [s.path for s in scan.skipped], root) == sorted(
        ["empty.png", "not_an_image.jpg", "dangling.png"])
    assert sorted(found) == sorted(expected["good"] + ["truncated.jpg"])
    assert not any(name.startswith(".") or name.endswith(".txt") for name in found)
    assert not any("/loop/" in name for name in found), "a link loop must not be followed twice"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_pipe_named_like_an_image_is_skipped_as_what_it_is_without_waiting(tmp_path):
    """It was skipped as an "empty file" (its size reads 0); where the size was not checked first, reading its
    header would wait for a writer for ever."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    os.mkfifo(tmp_path / "b.png")
    scan = scan_images(tmp_path)
    assert [Path(p).name for p in scan.paths] == ["a.png"]
    assert [(Path(s.path).name, s.reason) for s in scan.skipped] == [
        ("b.png", "not a regular file (a pipe, a socket or a device)")]
    assert images.first_skipped(scan.skipped)[1] == "move it out of the folder", "not a damaged file to replace"


def test_scan_follows_links_to_folders(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    Image.new("RGB", (8, 8)).save(target / "a.png")
    root = tmp_path / "root"
    root.mkdir()
    (root / "linked").symlink_to(target)
    assert relative(scan_images(root).paths, root) == ["linked/a.png"]


def test_scan_passes_over_the_folders_of_simclr_runs(tmp_path):
    """`simclr pretrain .` twice from the photos: the second run trained on the first's curves.png. A folder with
    a pretrain or finetune config.json and a metrics.jsonl, or linear-eval's report and probe, is a run's, at any
    depth below the root, and is named in the scan; files of those names written by other tools are not."""
    config = json.dumps({"out_dir": "runs/pretrain-1", "runtime": {"seed": 0}})
    files = {"a.png": None, "album/b.png": None, "album/config.json": config,  # no metrics.jsonl
             "tool/c.png": None, "tool/config.json": "{}", "tool/metrics.jsonl": "",  # not simclr's config
             "runs/pretrain-1/curves.png": None, "runs/pretrain-1/config.json": config,
             "runs/pretrain-1/metrics.jsonl": "", "runs/pretrain-1/inner/d.png": None,
             "evals/linear/confusion_matrix.png": None, "evals/linear/linear_eval.json": "{}",
             "evals/linear/linear.safetensors": "", "evals/report/e.png": None, "evals/report/linear_eval.json": "{}"}
    root = tmp_path / "photos"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            Image.new("RGB", (8, 8)).save(path)
        else:
            path.write_text(text)
    scan = scan_images(root)
    assert relative(scan.paths, root) == ["a.png", "album/b.png", "evals/report/e.png", "tool/c.png"]
    assert relative(scan.runs, root) == ["evals/linear", "runs/pretrain-1"]
    assert scan.runs_note() == (f"passed over 2 folder(s) of simclr runs in {root}: {root / 'evals/linear'} and 1 "
                                f"more (their plots are no photos)")
    run = root / "runs" / "pretrain-1"
    with pytest.raises(DataError, match=f"^IMAGES {run}: a simclr run folder, not a folder of images; pass another$"):
        scan_images(run, label="IMAGES", instead="pass another")  # its curves.png would be the only image
    assert scan_images(root / "runs").runs == [run], "a folder that holds runs is no run's"


def test_every_good_image_decodes_to_rgb(mixed_folder):
    root, expected = mixed_folder
    for name in expected["good"]:
        image = load_rgb(root / name)
        assert image.mode == "RGB", name
        assert min(image.size) > 0


def test_broken_files_raise_unreadable(mixed_folder):
    root, _ = mixed_folder
    for name in ["empty.png", "truncated.jpg", "not_an_image.jpg"]:
        with pytest.raises(UnreadableImage):
            load_rgb(root / name)


def test_a_system_error_is_described_without_a_dangling_colon_and_with_its_own_fix(tmp_path):
    """The file name was cut from "[Errno 2] No such file or directory: '...'", leaving the colon, and a file this
    user could not read was called damaged."""
    with pytest.raises(UnreadableImage) as raised:
        load_rgb(tmp_path / "gone.png")  # removed between the listing and the read
    assert str(raised.value) == "unreadable: FileNotFoundError: No such file or directory"
    denied = PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "a.png"))
    assert images._described(denied, tmp_path / "a.png") == "PermissionError: Permission denied"
    assert images.first_skipped([Skipped(str(tmp_path / "a.png"), "unreadable: PermissionError: Permission denied")]) \
        == (f"{tmp_path / 'a.png'}: unreadable: PermissionError: Permission denied", "let this user read it")
    assert images.first_skipped([Skipped("b.png", "unreadable: FileNotFoundError: No such file or directory")])[1] \
        == "keep the files in place while the command runs"
    damaged = "unreadable: UnidentifiedImageError: cannot identify image file"
    assert images.first_skipped([Skipped("c.png", damaged)]) == (f"c.png: {damaged}",
                                                                 "replace or remove the damaged files")


def test_exif_orientation_is_applied(mixed_folder):
    root, _ = mixed_folder
    with Image.open(root / "nested/deeper/rotated.jpg") as raw:
        assert raw.size == (60, 30)
    assert load_rgb(root / "nested/deeper/rotated.jpg").size == (30, 60)


def test_transparency_is_composited_on_a_neutral_colour_not_black():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (255, 0, 0, 255))  # one opaque red pixel
    rgb = to_rgb(rgba)
    assert rgb.getpixel((1, 1)) == NEUTRAL_BACKGROUND
    assert rgb.getpixel((0, 0)) == (255, 0, 0)
    la = to_rgb(Image.new("LA", (2, 2), (200, 0)))
    assert la.getpixel((0, 0)) == NEUTRAL_BACKGROUND
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((0, 0)) == NEUTRAL_BACKGROUND


@pytest.mark.parametrize("mode,key,other,expected", [
    ("RGB", (255, 0, 255), (10, 200, 30), (10, 200, 30)), ("L", 0, 180, (180,) * 3),
    ("1", 1, 0, (0, 0, 0)), ("1", 0, 1, (255,) * 3), ("I;16", 1000, 65535, (255,) * 3)])
def test_a_colour_key_is_transparent_too(tmp_path, mode, key, other, expected):
    """PNG's tRNS chunk in an RGB, grey, bilevel or 16-bit grey image names one colour as transparent: those
    pixels were kept as that colour (often magenta), not composited like every other kind of transparency."""
    image = Image.new(mode, (4, 4), key)
    image.putpixel((0, 0), other)
    image.save(tmp_path / "keyed.png", transparency=key)
    assert Image.open(tmp_path / "keyed.png").mode == mode
    rgb = load_rgb(tmp_path / "keyed.png")
    assert rgb.getpixel((1, 1)) == NEUTRAL_BACKGROUND
    assert rgb.getpixel((0, 0)) == expected


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


@pytest.mark.parametrize("bits, row, key", [(2, [0b01110100], 1), (4, [0x5F, 0x50], 5)])  # pixels 1, 3 (15), 1, 0
def test_the_colour_key_of_a_two_or_four_bit_grey_png_is_transparent(tmp_path, bits, row, key):
    """Pillow gives the key at the file's depth and the pixels at 8 bits: no pixel matched it."""
    header = (4).to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes([bits, 0, 0, 0, 0])  # 4 x 1, grey
    (tmp_path / "keyed.png").write_bytes(PNG_SIGNATURE + png_chunk(b"IHDR", header) +
                                         png_chunk(b"tRNS", key.to_bytes(2, "big")) +
                                         png_chunk(b"IDAT", zlib.compress(bytes([0, *row]))) + png_chunk(b"IEND", b""))
    assert np.asarray(load_rgb(tmp_path / "keyed.png")).reshape(4, 3).tolist() == [
        list(NEUTRAL_BACKGROUND), [255] * 3, list(NEUTRAL_BACKGROUND), [0] * 3]


def test_the_colour_key_depth_is_read_from_a_tile_of_any_pillow(tmp_path):
    """Pillow 10 (which pyproject allows) keeps tiles as plain tuples, without names: reading `.args` made every grey
    PNG unreadable there."""
    header = (4).to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes([2, 0, 0, 0, 0])  # 4 x 1, 2-bit grey
    (tmp_path / "keyed.png").write_bytes(PNG_SIGNATURE + png_chunk(b"IHDR", header) +
                                         png_chunk(b"tRNS", (1).to_bytes(2, "big")) +
                                         png_chunk(b"IDAT", zlib.compress(bytes([0, 0b01110100]))) +
                                         png_chunk(b"IEND", b""))
    with Image.open(tmp_path / "keyed.png") as image:
        image.tile = [tuple(tile) for tile in image.tile]  # as Pillow 10 holds them
        images._scale_grey_key(image)
        assert image.info["transparency"] == 85


def test_pillows_own_warnings_stay_off_the_terminal(tmp_path):
    """A decompression bomb is reported in one line of ours, and an image with a corrupt EXIF block decodes: Pillow's
    two-line Python warnings about them added nothing, once per loader worker."""
    header = (10_000).to_bytes(4, "big") + (9_000).to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])  # 90 MP, grey
    (tmp_path / "bomb.png").write_bytes(PNG_SIGNATURE + png_chunk(b"IHDR", header) +
                                        png_chunk(b"IDAT", zlib.compress(b"\0" * 10)) + png_chunk(b"IEND", b""))
    cut_exif = b"Exif\0\0MM\0*\0\0\0\x08\0\x03" + b"\x01\x12\0\x03\0\0\0\x01\0\x06\0\0"  # 3 entries, holds 1
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "exif.jpg", exif=cut_exif)
    script = (f"from simclr_cli.images import load_rgb, probe\n"
              f"assert 'decompression bomb' in probe({str(tmp_path / 'bomb.png')!r})\n"
              f"try:\n    load_rgb({str(tmp_path / 'bomb.png')!r})\nexcept Exception as error:\n    print(error)\n"
              f"print(load_rgb({str(tmp_path / 'exif.jpg')!r}).size)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.splitlines() == ["decompression bomb: 10000x9000 pixels: refused", "(16, 16)"]


def test_a_folder_that_cannot_be_listed_is_reported_not_dropped(tmp_path, unlistable):
    for name in ("open/a.png", "locked/b.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    unlistable.add("locked")
    scan = scan_images(tmp_path)
    assert relative(scan.paths, tmp_path) == ["open/a.png"]
    assert [(Path(s.path).name, s.reason.split(";")[0]) for s in scan.skipped] == [
        ("locked", "unreadable folder: Permission denied")]


def test_only_files_pillow_can_decode_are_images(tmp_path):
    """MPEG videos and Pillow's stub formats (WMF, HDF5, ...) are identified but never decoded: other files, not
    unreadable images to warn about."""
    assert images.is_image_name("a.JPG") and images.is_image_name("b.mpo")
    assert not any(images.is_image_name(name) for name in ("clip.mpg", "clip.MPEG", "chart.wmf", "data.h5"))
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "clip.mpg").write_bytes(b"\x00\x00\x01\xb3" + bytes(64))  # an MPEG sequence header
    scan = scan_images(tmp_path)
    assert relative(scan.paths, tmp_path) == ["a.png"] and scan.skipped == []


def test_a_multi_picture_jpeg_is_decoded_in_draft_mode_too(tmp_path):
    """Cameras save MPO files (a JPEG and its previews) under .jpg names; Pillow names their format MPO."""
    path = tmp_path / "camera.jpg"
    first, preview = Image.new("RGB", (2000, 1600), (90, 120, 150)), Image.new("RGB", (200, 160))
    first.save(path, format="MPO", save_all=True, append_images=[preview])
    assert Image.open(path).format == "MPO"
    small = load_rgb(path, min_side=224)
    assert small.size == (500, 400) and small.getpixel((10, 10)) == load_rgb(path).getpixel((40, 40))


def test_sixteen_bit_and_float_greys_are_scaled_to_eight_bits():
    values = np.array([[0, 65535], [32896, 257]], dtype=np.uint16)
    rgb = np.asarray(to_rgb(Image.fromarray(values)))
    assert rgb[..., 0].tolist() == [[0, 255], [128, 1]]
    assert (rgb[..., 0] == rgb[..., 2]).all()
    floats = Image.fromarray(np.array([[0.0, 1.0]], dtype=np.float32))
    assert np.asarray(to_rgb(floats))[..., 0].tolist() == [[0, 255]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NaN cast to uint8 warned ("invalid value encountered in cast")
        floats = Image.fromarray(np.array([[0.0, np.nan, 1.0, np.inf, -np.inf]], dtype=np.float32))
        assert np.asarray(to_rgb(floats))[..., 0].tolist() == [[0, 0, 255, 255, 0]]


def test_cmyk_and_one_bit_become_rgb():
    assert to_rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("1", (2, 2), 1)).getpixel((0, 0)) == (255, 255, 255)


def test_large_jpeg_is_decoded_in_draft_mode(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (2000, 1600), (90, 120, 150)).save(path, quality=80)
    small = load_rgb(path, min_side=224)
    assert small.size == (500, 400), "1/4 scale is the smallest whose sides are >= 224"
    assert min(small.size) >= 224
    assert load_rgb(path).size == (2000, 1600)


def test_features_never_scale_a_draft_decoded_jpeg_back_up(tmp_path, monkeypatch):
    """224 px encoders resize to 256 before the centre crop: the draft decode must keep 256, not 224."""
    path = tmp_path / "big.jpg"
    Image.new("RGB", (2400, 1800), (90, 120, 150)).save(path, quality=80)  # 1/8 would give 300x225
    decoded = []

    def recording_load_rgb(file, min_side=None):
        decoded.append(real_load_rgb(file, min_side))
        return decoded[-1]

    real_load_rgb = data.load_rgb
    monkeypatch.setattr(data, "load_rgb", recording_load_rgb)
    info = EncoderInfo("resnet18", "imagenet", 3 * 224 * 224, 224, IMAGENET_MEAN, IMAGENET_STD, "test", {})
    device = torch.device("cpu")
    features, _, _ = compute_features(torch.nn.Flatten(), info, [str(path)], device,
                                      resolve_precision("fp32", device), workers=0)
    assert features.shape == (1, 3 * 224 * 224)
    assert decoded[0].size == (600, 450), "1/4 scale: the smallest whose sides are >= 256"
    assert min(decoded[0].size) >= EvalTransform(224).resize == 256


def test_decompression_bombs_are_refused(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("L", (200, 200)).save(path)
    monkeypatch.setattr(images, "MAX_PIXELS", 100 * 100)
    assert "decompression bomb" in images.probe(path)
    with pytest.raises(UnreadableImage, match="decompression bomb"):
        load_rgb(path)


def test_empty_folder_and_folder_without_readable_images_are_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no image files"):
        require_images(scan_images(empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "b.png").write_text("nope")
    (broken / "c.jpg").write_bytes(b"")
    with pytest.raises(DataError) as error:  # it named no file, and said to put images in it
        require_images(scan_images(broken, label="IMAGES"))
    assert str(error.value) == (f"IMAGES {broken}: 2 unreadable file(s), no readable image, the first {broken}/b.png: "
                                f"unreadable: UnidentifiedImageError: cannot identify image file; replace or remove "
                                f"the damaged files, or add readable JPEG, PNG, WebP, BMP, GIF or TIFF images")
    with pytest.raises(DataError, match="no such folder"):
        scan_images(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(DataError, match="is a file"):
        scan_images(tmp_path / "file.png")


def test_dataset_skips_bad_files_and_collate_reports_them(mixed_folder):
    root, _ = mixed_folder
    paths = [root / "rgb.png", root / "truncated.jpg", root / "grey.png"]
    dataset = ImageDataset(paths, lambda img: torch.zeros(3, 4, 4))
    items = [dataset[i] for i in range(3)]
    assert isinstance(items[1], Skipped) and items[1].path.endswith("truncated.jpg")
    batch = collate(items)
    assert batch.samples.shape == (2, 3, 4, 4)
    assert batch.indices.tolist() == [0, 2]
    assert [s.path for s in batch.skipped] == [str(root / "truncated.jpg")]
    assert collate([items[1]]).samples is None


def test_augmentation_randomness_depends_on_seed_epoch_and_index_only(mixed_folder):
    root, expected = mixed_folder
    paths = [root / name for name in expected["good"][:3]]
    transform = lambda img: torch.rand(3)  # noqa: E731 -- any use of torch's RNG
    dataset = ImageDataset(paths, transform, seed=7)
    first = [dataset[i][0] for i in range(3)]
    torch.manual_seed(123)  # the global RNG must not matter
    again = [dataset[i][0] for i in reversed(range(3))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    dataset.epoch = 1
    assert not torch.equal(dataset[0][0], first[0])


def test_epoch_order_is_a_seeded_permutation():
    order = epoch_order(50, seed=3, epoch=0)
    assert sorted(order) == list(range(50))
    assert order == epoch_order(50, seed=3, epoch=0)
    assert order != epoch_order(50, seed=3, epoch=1)
    assert order != epoch_order(50, seed=4, epoch=0)



def test_even_batch_leaves_the_fewest_images_out_in_the_same_number_of_steps():
    """Against a search over every smaller batch: where `batch` leaves more than a tenth of the images out of an
    epoch, of the sizes that take ceil(images / batch) full steps, the one that leaves the fewest out, if it leaves
    fewer than `batch` does; else `batch`."""
    for count, batch in itertools.product(range(2, 260), range(2, 70)):
        steps = math.ceil(count / batch)
        fits = [size for size in range(2, batch + 1) if count // size == steps]
        best = min(fits, key=lambda size: (count % size, -size), default=batch)
        expected = best if count % best < count % batch and count % batch > count / 10 else batch
        assert even_batch(count, batch) == expected, (count, batch)
    assert even_batch(700, 512) == 350 and even_batch(2000, 512) == 500  # two and four steps, none left out
    assert even_batch(514, 512) == 512 and even_batch(1_281_167, 4096) == 4096  # 2 and 3,215 left out: kept
    assert even_batch(1024, 512) == 512 and even_batch(100, 512) == 100


class _Slow(torch.utils.data.Dataset):
    """Item i after `seconds[i]`; each item says whether its worker blocks SIGTERM and has the thread waiting for it."""

    def __init__(self, seconds: list[float]):
        self.seconds = seconds

    def __len__(self) -> int:
        return len(self.seconds)

    def __getitem__(self, index: int):
        time.sleep(self.seconds[index])
        blocked = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        waiting = any(thread.name == "simclr-sigterm" for thread in threading.enumerate())
        return index, blocked and waiting


needs_sigwaitinfo = pytest.mark.skipif(not data.SIGNALS_BY_SENDER, reason="signals by sender: Linux")


@needs_sigwaitinfo
def test_a_loader_worker_outlives_a_sigterm_sent_to_every_process():
    """SIGTERM to the whole process group or job (Slurm, systemd) reaches the workers too: they must leave the
    stopping to the main process, and go on serving it until it stops them."""
    loader = data.make_loader(_Slow([0.0] + [0.3] * 5), 1, None, workers=1, collate_fn=lambda items: items[0])
    it = iter(loader)
    assert next(it) == (0, True), "SIGTERM blocked in the worker, and a thread waiting for it"
    subprocess.run(["kill", "-TERM", str(it.batches._workers[0].pid)], check=True)  # not its parent
    assert list(it) == [(i, True) for i in range(1, 6)]


@needs_sigwaitinfo
def test_a_stuck_loader_worker_is_still_ended_by_its_parent():
    """The DataLoader stops a worker that does not finish within 5 s with SIGTERM, and so does multiprocessing
    at exit: a worker that ignored every SIGTERM kept the process alive until its item was done."""
    loader = data.make_loader(_Slow([0.0, 600.0]), 1, None, workers=1, collate_fn=lambda items: items[0])
    it = iter(loader)
    assert next(it)[0] == 0
    worker = it.batches._workers[0]
    time.sleep(0.5)  # the worker is into its 600 s item
    it.batches._shutdown_workers()  # as when the loop is left early: a join of 5 s, then its SIGTERM
    worker.join(timeout=10)
    alive = worker.is_alive()
    if alive:
        os.kill(worker.pid, signal.SIGKILL)  # or the test process would wait for it at exit
    assert not alive


ORPHAN_SCRIPT = """
import time, torch
from simclr_cli import data
class Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 2
    def __getitem__(self, index):
        time.sleep(600 * index)
        return index
it = iter(data.make_loader(Slow(), 1, None, workers=1, collate_fn=lambda items: items[0]))
assert next(it) == 0
print(it.batches._workers[0].pid, flush=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] in ("Z", "X")  # exited
    except (FileNotFoundError, IndexError):
        return True


@needs_sigwaitinfo
def test_a_loader_worker_whose_parent_was_killed_obeys_anyones_sigterm(tmp_path):
    """Its parent gone (SIGKILL), a worker stuck in an item is an orphan nobody else may stop with SIGTERM."""
    parent = subprocess.Popen([sys.executable, "-c", ORPHAN_SCRIPT], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    time.sleep(0.5)  # into its 600 s item
    parent.kill()
    parent.wait()
    os.kill(worker, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while not _gone(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    gone = _gone(worker)
    if not gone:
        os.kill(worker, signal.SIGKILL)
    assert gone


FORKSERVER_SCRIPT = """
import multiprocessing, os, signal, torch
from simclr_cli import data

class Parent(torch.utils.data.Dataset):
    def __len__(self):
        return 1
    def __getitem__(self, index):
        return os.getppid(), signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])

def first(items):
    return items[0]

if __name__ == "__main__":
    multiprocessing.set_start_method("forkserver", force=True)  # Python 3.14's default on Linux
    print(os.getpid(), *next(iter(data.make_loader(Parent(), 1, None, workers=1, collate_fn=first))))
"""


@needs_sigwaitinfo
def test_loader_workers_are_forked_whatever_the_default_start_method(tmp_path):
    """Started by a forkserver, a worker was the forkserver's child with SIGTERM not blocked: `kill -- -PGID` ended it
    and the run with a traceback, no checkpoint."""
    script = tmp_path / "forkserver.py"  # a file: a forkserver imports the main module from it
    script.write_text(FORKSERVER_SCRIPT)
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr
    main, parent, blocked = done.stdout.split()
    assert parent == main, "the worker's parent is the main process"
    assert blocked == "True", "SIGTERM blocked in the worker from its start"


def test_more_workers_than_cores_are_not_warned_of_in_pytorchs_words():
    """PyTorch's two multi-line warnings ("This DataLoader will create 2 worker processes in total. Our suggested
    max number ...") with its site-packages paths said nothing the user had not chosen."""
    script = ("import torch._utils\n"
              "torch._utils.cpu_count = lambda: 1  # one core, two workers\n"
              "from simclr_cli import data\n"
              "print(list(data.make_loader(list(range(4)), 2, None, workers=2, collate_fn=sum)))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.strip() == "[1, 5]"


class _DiesOnCue(torch.utils.data.Dataset):
    """Item 0 is its worker's pid; item 1 waits for the file `cue`, then its worker is killed, as by the kernel's
    OOM killer. `raises`: item 1 raises instead (its own error)."""

    def __init__(self, cue: Path, raises: bool = False):
        self.cue, self.raises = cue, raises

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        if index == 0:
            return os.getpid()
        if self.raises:
            raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Killed.")  # its words, not PyTorch's
        while not self.cue.exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc to see the worker end")
def test_a_worker_killed_as_the_batches_are_left_raises_nothing_later(tmp_path):
    """A worker died while the loop's body ran (its SIGCHLD noted, not handed on), then the loop left the batches:
    the dead worker stayed registered with PyTorch's SIGCHLD handler, and the next SIGCHLD of the process, anywhere,
    raised "DataLoader worker ... is killed by signal" (in CI, inside pytest's own code)."""
    cue = tmp_path / "cue"
    kept = iter(data.make_loader(_DiesOnCue(cue), 1, None, workers=1, collate_fn=lambda items: items[0]))
    batches = iter(data.UntilWorkerDies(kept))  # `kept`: the loader is not collected, as a reference cycle keeps it
    worker = next(batches)
    cue.touch()  # the worker dies now, in the middle of this "step"
    deadline = time.monotonic() + 30
    while not _gone(worker) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # its SIGCHLD is noted meanwhile
    batches.close()  # the loop leaves (a break, a time budget)
    os.kill(os.getpid(), signal.SIGCHLD)  # another child of the process ends
    time.sleep(0.2)  # handled here, raising nothing


class _LostAsTheWorkerDies:
    """A loader's batches where the worker is killed with a batch on its way: the connection that hands over the
    batch's shared memory is lost (an OSError) before the worker can be seen dead."""

    def __init__(self, cue: Path):
        self.cue = cue

    def __next__(self):
        self.cue.touch()  # the worker kills itself now
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")


@pytest.mark.skipif(not hasattr(signal, "SIGCHLD"), reason="PyTorch learns of a dead worker from SIGCHLD")
def test_a_connection_lost_to_a_dying_worker_ends_the_batches_as_its_death(tmp_path):
    """`embed --workers 1` with a worker killed at its third batch ended, one run in five, with "Connection reset by
    peer" from PyTorch's loader, then the worker's SIGCHLD raised in the middle of saving the progress: no line said
    the worker died, nor how to go on. The lost connection now waits for the death, and ends as PyTorch tells it."""
    cue = tmp_path / "cue"
    kept = iter(data.make_loader(_DiesOnCue(cue), 1, None, workers=1, collate_fn=lambda items: items[0]))
    next(kept)  # the worker's first item; it waits for the cue at its second
    try:
        with pytest.raises(RuntimeError, match=r"^DataLoader worker \(pid \d+\) is killed by signal: Killed") as raised:
            next(data._DeathsTold(_LostAsTheWorkerDies(cue)))
        assert isinstance(raised.value.__context__, ConnectionResetError)
    finally:
        kept.batches._shutdown_workers()  # its dead worker no longer PyTorch's, to raise at a later SIGCHLD


def test_a_lost_connection_with_no_worker_dying_goes_on_as_itself(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEATH_GRACE_SECONDS", 0.1)
    with pytest.raises(ConnectionResetError):
        next(data._DeathsTold(_LostAsTheWorkerDies(tmp_path / "cue")))


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc to see the worker end")
def test_a_killed_worker_ends_the_batches_between_two_not_in_the_middle_of_one(tmp_path):
    """PyTorch's SIGCHLD handler raised its "killed by signal" error wherever the main thread was: in the middle
    of a training step, some parameters updated and some not, saved as the step before. It now waits until the
    next batch is asked for, and ends the batches there, saying how the worker died."""
    cue = tmp_path / "cue"
    batches = data.UntilWorkerDies(data.make_loader(_DiesOnCue(cue), 1, None, workers=1,
                                                    collate_fn=lambda items: items[0]))
    seen = []
    for worker in batches:
        seen.append(worker)
        cue.touch()  # the worker dies now, in the middle of this "step"
        deadline = time.monotonic() + 30
        while not _gone(worker) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # its SIGCHLD is handled meanwhile
        seen.append("step done")
    assert seen == [worker, "step done"] and batches.died == "killed by signal: Killed"

    raising = data.UntilWorkerDies(data.make_loader(_DiesOnCue(cue, raises=True), 1, None, workers=1,
                                                    collate_fn=lambda items: items[0]))
    with pytest.raises(RuntimeError, match="Caught RuntimeError in DataLoader worker"):
        list(raising)  # a worker's own error is no death: it goes on to the caller as it was

"""Labelled data: class subfolders, label CSVs, validation splits, label-fraction subsets, errors."""

import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simclr_cli.errors import ConfigError, DataError
from simclr_cli.labels import balanced_subset, load_labelled, read_class_folders, read_label_csv, stratified_split


def make_classes(root: Path, counts: dict[str, int]) -> Path:
    """root/<class>/<i>.png, a tiny distinct image each."""
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            Image.new("RGB", (8, 8), (index * 7 % 256, len(name) * 40, 90)).save(root / name / f"{index}.png")
    return root


def test_class_folders_are_sorted_classes_and_broken_files_are_skipped(tmp_path):
    root = make_classes(tmp_path / "train", {"dog": 3, "cat": 2, "zebra": 1})
    (root / "cat" / "nested").mkdir()
    Image.new("L", (8, 8)).save(root / "cat" / "nested" / "deep.png")
    (root / "dog" / "broken.jpg").write_text("not a jpeg")
    Image.new("RGB", (8, 8)).save(root / "loose.png")
    (root / ".hidden").mkdir()

    classes, data, skipped, notes = read_class_folders(root)
    assert classes == ["cat", "dog", "zebra"]
    assert Counter(data.labels) == {0: 3, 1: 3, 2: 1}
    assert all(root / classes[label] in path.parents for path, label in zip(data.paths, data.labels))
    assert [Path(s.path).name for s in skipped] == ["broken.jpg"]
    assert "1 image(s) directly in" in notes[0]


@pytest.mark.parametrize("counts,message", [
    ({"cat": 2, "dog": 0}, "class 'dog' has no readable images"),
    ({"cat": 3}, r"only one class \('cat'\)"),
])
def test_unusable_class_folders_are_refused(tmp_path, counts, message):
    root = make_classes(tmp_path / "train", counts)
    with pytest.raises(DataError, match=message):
        load_labelled(root)


def test_a_class_of_damaged_files_names_the_first(tmp_path):
    """It said 'no readable images; add images to it or remove it', naming no file, in TRAIN and in --val."""
    root = make_classes(tmp_path / "train", {"cat": 2, "dog": 0})
    (root / "dog" / "b.png").write_bytes(b"\x00garbage")
    (root / "dog" / "c.jpg").write_bytes(b"")
    expected = (f"class 'dog' has no readable images, 2 unreadable file(s), the first {root}/dog/b.png: unreadable: "
                f"UnidentifiedImageError: cannot identify image file; replace or remove the damaged files, or remove "
                f"the class")
    for load, flag in ((lambda: load_labelled(root), "TRAIN"),
                       (lambda: load_labelled(make_classes(tmp_path / "other", {"cat": 2, "dog": 2}), val_dir=root),
                        "--val")):
        with pytest.raises(DataError) as error:
            load()
        assert str(error.value) == f"{flag} {root}: {expected}"


def test_a_folder_without_class_subfolders_is_refused(tmp_path):
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match="no class subfolders.*--labels"):
        load_labelled(tmp_path / "flat")


def test_label_csv_over_any_folder(tmp_path):
    root = tmp_path / "pile"
    root.mkdir()
    for index in range(6):
        Image.new("RGB", (8, 8), (index * 30, 0, 0)).save(root / f"{index}.png")
    (root / "5.png").write_bytes(b"")  # empty: skipped, not fatal
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n0.png,b\n1.png,a\n2.png,b\n\n3.png,a\n5.png,a\n" + f"{root / '4.png'},b\n")
    classes, data, skipped = read_label_csv(csv, root)
    assert classes == ["a", "b"]
    assert dict(zip((p.name for p in data.paths), data.labels)) == {"0.png": 1, "1.png": 0, "2.png": 1,
                                                                  "3.png": 0, "4.png": 1}
    assert [Path(s.path).name for s in skipped] == ["5.png"]


@pytest.mark.parametrize("before", ["", "\n\n", "\r\n  \r\n", ",\n \t, \n"], ids=["first", "blank-lines",
                                                                                 "crlf-spaces", "blank-cells"])
def test_the_header_row_is_the_first_one_that_is_not_blank(tmp_path, before):
    root = tmp_path / "pile"
    root.mkdir()
    for index in range(4):
        Image.new("RGB", (8, 8), (index * 30, 0, 0)).save(root / f"{index}.png")
    csv = tmp_path / "labels.csv"
    csv.write_text(before + "Path, Label\n0.png,a\n1.png,b\n2.png,a\n3.png,b\n", newline="")
    classes, data, _ = read_label_csv(csv, root)
    assert classes == ["a", "b"] and len(data.paths) == 4


def test_a_file_listed_twice_under_two_spellings_is_one_image(tmp_path):
    root = make_classes(tmp_path / "pile", {"x": 0})
    for index in range(4):
        Image.new("RGB", (8, 8), (index * 30, 0, 0)).save(root / f"{index}.png")
    csv = tmp_path / "labels.csv"
    csv.write_text(f"0.png,a\n{root / '0.png'},a\n./x/../0.png,a\n1.png,a\n2.png,b\n3.png,b\n")
    classes, data, _ = read_label_csv(csv, root)
    assert sorted(p.name for p in data.paths) == ["0.png", "1.png", "2.png", "3.png"], data.paths
    csv.write_text(f"0.png,a\n{root / '0.png'},b\n1.png,a\n2.png,b\n")
    with pytest.raises(DataError, match="labelled both 'a' and 'b'"):
        read_label_csv(csv, root)


@pytest.mark.parametrize("rows,message", [
    ("0.png,a\nmissing.png,b\n", r"1 file\(s\) it names do not exist, e.g. .*missing.png"),
    ("0.png,a\n0.png,b\n", "labelled both 'a' and 'b'"),
    ("0.png,a,extra\n", "line 1: expected two fields"),
    ("0.png,a\n1.png,a\n", "only one class"),
    ("", "no rows"),
    ('0.png,a\n"1.png,b\n' + "".join(f"{i}.png,a\n" for i in range(20_000)), "not a valid CSV .*unclosed quote"),
])
def test_bad_label_csvs_are_refused(tmp_path, rows, message):
    root = make_classes(tmp_path, {"x": 0})
    for index in range(2):
        Image.new("RGB", (8, 8)).save(root / f"{index}.png")
    (tmp_path / "labels.csv").write_text(rows)
    with pytest.raises(DataError, match=message):
        read_label_csv(tmp_path / "labels.csv", root)


def test_validation_folder_must_use_training_classes(tmp_path):
    train = make_classes(tmp_path / "train", {"cat": 2, "dog": 2})
    val = make_classes(tmp_path / "val", {"dog": 1})
    data = load_labelled(train, val_dir=val)
    assert data.val.labels == [1] and len(data.train) == 4
    make_classes(val, {"emu": 1})
    with pytest.raises(DataError, match="--val .*class 'emu' is not among the training classes"):
        load_labelled(train, val_dir=val)
    with pytest.raises(ConfigError, match="--val and --val-split"):
        load_labelled(train, val_dir=val, val_split=0.5)


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5])
def test_stratified_split_holds_out_each_class_in_proportion(fraction):
    labels = [0] * 50 + [1] * 30 + [2] * 10 + [3] * 1
    kept, held = stratified_split(labels, fraction, seed=0)
    assert sorted(kept + held) == list(range(len(labels)))
    held_counts = Counter(labels[i] for i in held)
    for label, count in Counter(labels).items():
        expected = 0 if count == 1 else min(max(round(fraction * count), 1), count - 1)
        assert held_counts.get(label, 0) == expected
    assert stratified_split(labels, fraction, seed=0) == (kept, held)
    assert stratified_split(labels, fraction, seed=1) != (kept, held)


def test_balanced_subsets_are_balanced_reproducible_and_nested():
    rng = np.random.default_rng(0)
    labels = rng.permutation([0] * 200 + [1] * 150 + [2] * 120 + [3] * 12).tolist()
    small, large = balanced_subset(labels, 0.04, seed=5), balanced_subset(labels, 0.2, seed=5)
    assert Counter(labels[i] for i in small) == {0: 5, 1: 5, 2: 5, 3: 5}  # round(0.04 * 482 / 4)
    assert Counter(labels[i] for i in large) == {0: 24, 1: 24, 2: 24, 3: 12}  # class 3 has only 12
    assert balanced_subset(labels, 0.04, seed=5) == small
    assert balanced_subset(labels, 0.04, seed=6) != small
    assert set(small) <= set(large), "one seed draws each class in one order: 1% lies inside 10%"
    assert balanced_subset(labels, 1.0, seed=5) == list(range(len(labels)))
    assert Counter(labels[i] for i in balanced_subset(labels, 0.001, seed=0)) == {0: 1, 1: 1, 2: 1, 3: 1}


def test_a_balanced_subset_passes_over_images_that_do_not_decode():
    """At 1% a class's share can be one image: a broken one left the class with none, and the run failed after an
    epoch, telling the user to add images to a class that had plenty."""
    rng = np.random.default_rng(0)
    labels = rng.permutation([0] * 100 + [1] * 100 + [2] * 3).tolist()
    plain = balanced_subset(labels, 0.03, seed=2)
    broken = set(plain[::2]) | {i for i, label in enumerate(labels) if label == 2}
    checked = []
    chosen = balanced_subset(labels, 0.03, seed=2, usable=lambda i: checked.append(i) or i not in broken)
    assert not broken & set(chosen)
    assert Counter(labels[i] for i in chosen) == {0: 2, 1: 2}, "the same share of each class, none of class 2"
    assert set(plain) - broken <= set(chosen), "the next images in the same seeded order: still nested"
    larger = balanced_subset(labels, 0.3, seed=2, usable=lambda i: i not in broken)
    assert set(chosen) <= set(larger)
    assert len(checked) < 20, "only as many images are decoded as the shares need"


def test_simclr_run_folders_inside_the_class_folders_are_no_classes(tmp_path):
    """`simclr pretrain .` in a folder of class subfolders leaves runs/ (or --out myrun) there: it became a class
    of plots, or stopped the command as a class with no images."""
    root = make_classes(tmp_path / "train", {"cat": 3, "dog": 3})
    for run in (root / "myrun", root / "runs" / "pretrain-1"):
        run.mkdir(parents=True)
        (run / "config.json").write_text('{"out_dir": "x", "runtime": {}}')
        (run / "metrics.jsonl").write_text("")
        Image.new("RGB", (8, 8)).save(run / "curves.png")
    data = load_labelled(root, val_split=0.34)
    assert data.classes == ["cat", "dog"] and len(data.train) + len(data.val) == 6
    assert any("passed over 2 folder(s) of simclr runs" in note for note in data.notes), data.notes
    val = make_classes(tmp_path / "val", {"cat": 1, "dog": 1})
    shutil.copytree(root / "myrun", val / "myrun")
    assert len(load_labelled(root, val_dir=val).val) == 2
    # `simclr linear-eval MODEL runs`: no class subfolders, because every one was a run's
    with pytest.raises(DataError) as error:
        load_labelled(root / "runs")
    assert str(error.value).startswith(f"TRAIN {root / 'runs'}: no class subfolders; passed over 1 folder(s) of "
                                       f"simclr runs in {root / 'runs'}: {root / 'runs' / 'pretrain-1'} "), error.value


def test_a_class_folder_that_cannot_be_listed_says_so(tmp_path, unlistable):
    """It said the class had no readable images and should be filled or removed."""
    root = make_classes(tmp_path / "train", {"cat": 3, "dog": 3})
    unlistable.add("dog")
    with pytest.raises(DataError, match=r"class folder 'dog' cannot be listed \(unreadable folder: Permission "
                                        r"denied\); let this user read it"):
        load_labelled(root)


def test_a_file_under_two_names_is_one_image_and_never_on_both_sides_of_a_split(tmp_path):
    root = make_classes(tmp_path / "train", {"cat": 6, "dog": 6})
    (root / "cat" / "again").symlink_to(root / "cat")  # a link, not a loop: the scan follows it once
    os.link(root / "dog" / "0.png", root / "dog" / "hard.png")
    rows = [f"{name}/{i}.png,{name}" for name in ("cat", "dog") for i in range(6)]
    (tmp_path / "labels.csv").write_text("\n".join(rows + [f"cat/again/{i}.png,cat" for i in range(6)]))
    for data in (load_labelled(root, val_split=0.5, seed=1),
                 load_labelled(root, labels_csv=tmp_path / "labels.csv", val_split=0.5, seed=1)):
        ids = [{(os.stat(p).st_ino) for p in split.paths} for split in (data.train, data.val)]
        assert len(data.train) + len(data.val) == 12 and not ids[0] & ids[1]
        assert any("other names (links)" in note for note in data.notes), data.notes
    val = make_classes(tmp_path / "val", {"cat": 2, "dog": 2})
    os.link(val / "cat" / "0.png", val / "cat" / "again.png")
    data = load_labelled(root, val_dir=val)
    assert len(data.val) == 4 and any(note.startswith(f"--val {val}: 1 image(s)") for note in data.notes)
    os.link(root / "dog" / "1.png", root / "cat" / "dog-too.png")
    with pytest.raises(DataError, match="are one file, labelled both 'cat' and 'dog'"):
        load_labelled(root, val_split=0.5)


@pytest.mark.parametrize("out,refused", [
    ("train/runs/eval", "inside TRAIN .*a class 'runs'"),
    ("train/cat/eval", "inside TRAIN .*a class 'cat'"),  # its files would join cat's images
    ("train", "is TRAIN .* itself"),
    ("train/.eval", None),  # hidden: scans skip it
    ("train/cat/.runs/eval", None),
    ("train2/eval", None),  # a name that begins as TRAIN's does
    ("elsewhere", None),
])
def test_an_out_inside_the_class_folders_is_refused(tmp_path, out, refused):
    make_classes(tmp_path / "train", {"cat": 3, "dog": 3})
    if refused is None:
        assert load_labelled(tmp_path / "train", out_dir=tmp_path / out).classes == ["cat", "dog"]
    else:
        with pytest.raises(ConfigError, match=refused):
            load_labelled(tmp_path / "train", out_dir=tmp_path / out)


def test_a_val_folder_sharing_files_with_train_is_refused_by_file_identity(tmp_path):
    """Hard links, symbolic links and --labels rows reach the same file under other names; an accuracy on them
    is partly an accuracy on training images. A copy is another file, and is not found."""
    train = make_classes(tmp_path / "train", {"cat": 3, "dog": 3})
    val = make_classes(tmp_path / "val", {"cat": 1, "dog": 1})
    assert len(load_labelled(train, val_dir=val).val) == 2
    os.link(train / "cat" / "0.png", val / "cat" / "linked.png")
    (val / "dog" / "symlink.png").symlink_to(train / "dog" / "1.png")
    shutil.copy(train / "dog" / "2.png", val / "dog" / "copy.png")
    os.link(train / "cat" / "0.png", val / "cat" / "linked-again.png")  # one file with linked.png: counted once
    shared = r"--val .*val shares 2 of its 5 images with TRAIN \(e\.g\. .*(linked|symlink)"
    with pytest.raises(ConfigError, match=shared):
        load_labelled(train, val_dir=val)
    (val / "cat" / "linked-again.png").unlink()
    (tmp_path / "labels.csv").write_text("path,label\ncat/0.png,cat\ncat/1.png,cat\ndog/0.png,dog\n"
                                         "../val/dog/0.png,dog\n")
    (val / "cat" / "linked.png").unlink()
    (val / "dog" / "symlink.png").unlink()
    with pytest.raises(ConfigError, match="shares 1 of its 3 images with TRAIN"):
        load_labelled(train, labels_csv=tmp_path / "labels.csv", val_dir=val)

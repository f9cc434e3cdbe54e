"""The built-in procedural data set and the image-folder data set."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from model.training.data import (
    CLASSES,
    NUM_CLASSES,
    ImageFolderSet,
    ProceduralShapes,
    batches,
    held_out_set,
    open_source,
)


def test_at_least_ten_classes_with_names():
    assert NUM_CLASSES >= 10
    assert len(set(CLASSES)) == NUM_CLASSES


def test_deterministic_per_seed_and_independent_of_size_and_order():
    a = ProceduralShapes(50, seed=3, image_size=64)
    b = ProceduralShapes(5000, seed=3, image_size=64)
    xa, ya = a.batch([4, 17, 33])
    xb, yb = b.batch([33, 4, 17])
    assert torch.equal(xa, xb[[1, 2, 0]])
    assert torch.equal(ya, yb[[1, 2, 0]])
    single, label = a[17]
    assert torch.equal(single, xa[1]) and label == int(ya[1])


def test_other_seed_gives_other_images():
    x0, _ = ProceduralShapes(20, seed=0).batch(range(20))
    x1, _ = ProceduralShapes(20, seed=1).batch(range(20))
    assert (x0 - x1).abs().flatten(1).amax(1).min() > 0.1


def test_images_shape_range_labels_and_variety():
    ds = ProceduralShapes(40, seed=0, image_size=64)
    x, y = ds.batch(range(40))
    assert x.shape == (40, 3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert sorted(set(y.tolist())) == list(range(NUM_CLASSES))
    # Random colours, positions and sizes: no two images of a class are alike.
    for c in range(NUM_CLASSES):
        imgs = x[y == c]
        assert (imgs[0] - imgs[1]).abs().mean() > 0.05
    # Every image has a visible foreground: not a near-flat picture.
    assert (x.flatten(2).std(-1).amax(1) > 0.05).all()


def test_other_sizes_render():
    x, _ = ProceduralShapes(10, image_size=96).batch(range(10))
    assert x.shape == (10, 3, 96, 96)


def test_out_of_range_index_is_an_error():
    ds = ProceduralShapes(5)
    try:
        ds.batch([5])
    except IndexError:
        return
    raise AssertionError("index 5 of a 5-image set was accepted")


def test_batches_resume_exactly():
    ds = ProceduralShapes(30, seed=0, image_size=32)
    full = batches(ds, 8, seed=5)
    seen = [next(full)[1] for _ in range(6)]  # crosses an epoch boundary (3 per epoch)
    resumed = batches(ds, 8, seed=5, start_step=4)
    assert torch.equal(next(resumed)[1], seen[4])
    assert torch.equal(next(resumed)[1], seen[5])


def test_image_folder_set(tmp_path):
    colours = {"cats": (200, 10, 10), "dogs": (10, 10, 200)}
    for name, rgb in colours.items():
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (40 + i, 30), rgb).save(tmp_path / name / f"{i}.png")
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    src = open_source(str(tmp_path), image_size=32)
    assert src.classes == ("cats", "dogs") and src.num_classes == 2
    ds = src.dataset
    assert isinstance(ds, ImageFolderSet) and len(ds) == 6
    x, y = ds.batch(range(6))
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [0, 1, 0, 1, 0, 1]  # classes in turns
    assert x[0, 0].mean() > 0.5 and x[5, 2].mean() > 0.5  # red cats, blue dogs


def test_what_a_notebook_or_a_mac_leaves_in_a_folder_is_not_data(tmp_path):
    """Hidden entries (".ipynb_checkpoints", macOS's "._x.png" resource forks) and the
    "__MACOSX" folder of an unpacked archive are neither classes nor images."""
    for name in ("cats", "dogs", ".ipynb_checkpoints", "__MACOSX/cats"):
        (tmp_path / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / name / "0.png")
    (tmp_path / "cats" / "._0.png").write_bytes(b"\x00\x05\x16\x07 a resource fork")
    (tmp_path / "dogs" / ".thumbs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "dogs" / ".thumbs" / "0.png")
    ds = ImageFolderSet(tmp_path, 8)
    assert ds.classes == ("cats", "dogs")
    assert [p.relative_to(tmp_path).as_posix() for p, _ in ds.files] == ["cats/0.png", "dogs/0.png"]
    assert ds.unreadable() == []


def test_a_class_folder_without_images_is_refused(tmp_path):
    """It would be a label the generator never learns: named, not trained on."""
    for name in ("cats", "dogs", "birds"):
        (tmp_path / name).mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cats" / "0.png")
    (tmp_path / "dogs" / "readme.txt").write_text("no images yet")
    with pytest.raises(ValueError, match="without images: birds, dogs"):
        ImageFolderSet(tmp_path, 8)


def test_image_folder_without_classes_is_an_error(tmp_path):
    try:
        ImageFolderSet(tmp_path)
    except ValueError as e:
        assert "no class sub-folders" in str(e)
        return
    raise AssertionError("an empty folder was accepted")


def test_a_folder_holds_every_tenth_image_of_a_class_out(tmp_path):
    """Every training stage reads a folder's training split; evaluate-demo its held-out split,
    every 10th image of a class by file name: the two never share an image."""
    for name, count in {"a": 25, "b": 9}.items():
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.new("RGB", (8, 8), (i * 9, 0, 0)).save(tmp_path / name / f"{i:02d}.png")
    train = open_source(str(tmp_path), image_size=8).dataset  # the trainers' default
    held_out = held_out_set(str(tmp_path), image_size=8, size=1000)
    everything = ImageFolderSet(tmp_path, image_size=8, split="all")
    assert [(f.parent.name, f.name) for f, _ in held_out.files] == [
        ("a", "09.png"),
        ("a", "19.png"),
    ]
    assert len(train) == 32 and len(everything) == 34
    assert not {f for f, _ in train.files} & {f for f, _ in held_out.files}
    assert held_out.classes == train.classes == ("a", "b")  # ids agree across the splits
    x, y = held_out.batch(range(2))
    assert y.tolist() == [0, 0] and x.shape == (2, 3, 8, 8)
    # No class with ten images: nothing to hold out, said in one line.
    for f in (tmp_path / "a").glob("*.png"):
        if f.name >= "09":
            f.unlink()
    with pytest.raises(ValueError, match="no held-out images"):
        held_out_set(str(tmp_path), image_size=8, size=10)
    with pytest.raises(ValueError, match="split"):
        ImageFolderSet(tmp_path, split="test")


def test_a_damaged_image_is_named_when_read(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "good.png")
    (tmp_path / "a" / "bad.png").write_text("not an image")
    ds = ImageFolderSet(tmp_path, image_size=8)
    assert [b.split(":")[0] for b in ds.unreadable()] == [str(tmp_path / "a" / "bad.png")]
    with pytest.raises(ValueError, match="bad.png: cannot read this image"):
        ds.batch(range(2))

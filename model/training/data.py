"""Training data: the built-in procedural shapes set and a folder-of-class-folders set.

Both yield ``(image, label)`` with image (3, S, S) float32 in [-1, 1] and label an int.

The procedural set draws each image's parameters from its own random stream seeded by
(seed, index), so image i is the same whatever the set's size or the order it is read in, and
renders whole batches at once in torch (signed distances -> anti-aliased coverage), which is
fast enough to make fresh images on the fly during training.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..images import load_image

# Class id -> name. Shapes are centred anywhere in the frame; stripes fill the frame.
CLASSES: tuple[str, ...] = (
    "circle",  # filled disc
    "square",  # filled square, tilted up to 20 degrees
    "triangle",  # filled equilateral triangle, pointing up (+-20 degrees)
    "ring",  # annulus
    "plus",  # upright cross (+-15 degrees)
    "x-cross",  # diagonal cross: the plus turned 45 degrees (+-15)
    "star",  # five-pointed star, any rotation
    "frame",  # hollow square outline (+-20 degrees)
    "h-stripes",  # stripes across the whole image, near horizontal
    "v-stripes",  # stripes across the whole image, near vertical
)
NUM_CLASSES = len(CLASSES)
IMAGE_EXTENSIONS = tuple(".png .jpg .jpeg .bmp .gif .webp .tif .tiff .avif .heic .heif".split())
# A folder's held-out split: every tenth image of a class. The built-in set has no split: its
# held-out images are drawn from seeds no model trains on.
HELD_OUT_EVERY = 10
SPLITS = ("train", "held_out", "all")
HELD_OUT_SEED = 1_000_000  # the built-in set's held-out images (the demo models train on seed 0)


def _held_out(index_in_class: int) -> bool:
    return index_in_class % HELD_OUT_EVERY == HELD_OUT_EVERY - 1


def _listed(name: str) -> bool:
    """Not a hidden entry (".ipynb_checkpoints", ".git", macOS's "._photo.jpg" resource forks)
    nor the "__MACOSX" folder an archive made on a Mac unpacks: none of them is a class or an
    image a person put there."""
    return not name.startswith(".") and name != "__MACOSX"


def _class_images(folder: Path) -> list[Path]:
    """The image files of one class folder (sub-folders included), in file-name order."""
    return [
        f
        for f in sorted(folder.rglob("*"))
        if f.is_file()
        and f.suffix.lower() in IMAGE_EXTENSIONS
        and all(_listed(part) for part in f.relative_to(folder).parts)
    ]


# Params per image, in this order (all in units of the image side, angles in radians).
_P = (
    "cx",
    "cy",
    "r",
    "theta",
    "fg_r",
    "fg_g",
    "fg_b",
    "bg_r",
    "bg_g",
    "bg_b",
    "grad_dx",
    "grad_dy",
    "period",
    "phase",
)


# A shape's size r (its radius, in image sides) is drawn uniformly from this range. At 32 px the
# smallest shapes of the first range (0.14-0.32) were a few pixels across, below what a 4-pixel
# patch tokenizer keeps; 0.22-0.38 lifted the 64-token chain's judged reconstructions from
# 75.8 % to 95 % at the same budget (docs/DEMO_MODELS_LOG.md, sixth pass).
RADIUS_RANGE = (0.22, 0.38)


def draw_params(seed: int, index: int, label: int) -> np.ndarray:
    """One image's random parameters (len(_P),) from the stream (seed, index)."""
    rng = np.random.default_rng([seed, index])
    r = rng.uniform(*RADIUS_RANGE)
    cx, cy = rng.uniform(r * 0.8, 1 - r * 0.8, size=2)
    if label in (6,):  # star: any rotation
        theta = rng.uniform(0, 2 * math.pi)
    elif label in (4, 5, 8, 9):
        theta = rng.uniform(-0.26, 0.26)
    else:
        theta = rng.uniform(-0.35, 0.35)
    bg = rng.uniform(0, 1, size=3)
    # The foreground must stand out from the background: redraw until far enough apart.
    for _ in range(100):
        fg = rng.uniform(0, 1, size=3)
        if np.linalg.norm(fg - bg) > 0.45:
            break
    grad = rng.normal(0, 0.15, size=2)  # background brightness change across the frame
    period = rng.uniform(0.22, 0.4)  # stripe period, in image sides
    phase = rng.uniform(0, 2 * math.pi)
    return np.array([cx, cy, r, theta, *fg, *bg, *grad, period, phase], dtype=np.float32)


def _box(px: torch.Tensor, py: torch.Tensor, hx, hy) -> torch.Tensor:
    """Signed distance to an axis-aligned box with half sides (hx, hy)."""
    qx, qy = px.abs() - hx, py.abs() - hy
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0)


def _triangle(px: torch.Tensor, py: torch.Tensor, r) -> torch.Tensor:
    """Signed distance (exact inside, slightly under outside the corners) to an equilateral
    triangle of circumradius r, apex up (image y grows down): the largest of the three edge
    half-plane distances; each edge lies at the inradius r / 2 along its outward normal."""
    c = math.sqrt(3.0) / 2
    d = torch.maximum(torch.maximum(py, c * px - 0.5 * py), -c * px - 0.5 * py)
    return d - r / 2


def signed_distance(
    label: int, px: torch.Tensor, py: torch.Tensor, p: torch.Tensor
) -> torch.Tensor:
    """Signed distance (negative inside) of class ``label`` for a batch.

    px, py (B, S, S): pixel centres relative to each image's centre, rotated into the shape's
    frame, in image sides. p (B, len(_P)) params. Returns (B, S, S).
    """
    r = p[:, 2, None, None]
    if label == 0:
        return torch.sqrt(px**2 + py**2) - r
    if label == 1:
        return _box(px, py, r * 0.8, r * 0.8)
    if label == 2:
        return _triangle(px, py, r * 1.1)
    if label == 3:
        return (torch.sqrt(px**2 + py**2) - r * 0.75).abs() - r * 0.25
    if label in (4, 5):
        if label == 5:  # the plus turned by 45 degrees
            c = math.sqrt(0.5)
            px, py = c * (px + py), c * (py - px)
        w = r * 0.28
        return torch.minimum(_box(px, py, r, w), _box(px, py, w, r))
    if label == 6:
        angle = torch.atan2(py, px)
        # Radius swings between inner and outer every 72 degrees; a triangle wave gives points.
        tri = (angle * 5 / (2 * math.pi)) % 1.0
        tri = (tri - 0.5).abs() * 2  # 1 at the tips, 0 between them
        radius = r * (0.45 + 0.65 * tri)
        return (torch.sqrt(px**2 + py**2) - radius) * 0.8
    if label == 7:
        return _box(px, py, r * 0.8, r * 0.8).abs() - r * 0.14
    if label in (8, 9):
        coord = py if label == 8 else px
        period = p[:, 12, None, None]
        phase = p[:, 13, None, None]
        wave = torch.sin(2 * math.pi * coord / period + phase)
        # sin's zero crossings are the edges; near an edge this is half the distance, so the
        # stripes get soft edges about 3 pixels wide (whole-frame patterns are the hardest
        # thing to reconstruct; this keeps them learnable by a small tokenizer).
        return -wave * period / (4 * math.pi)
    raise ValueError(f"unknown class {label}")


def pixel_centres(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x and y (S, S) of each pixel's centre, in image sides (float32)."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    return gx, gy


# Anti-aliased coverage: a ramp this many pixels wide across a shape's edge (soft enough to be
# learnable by a tiny tokenizer, sharp enough to look crisp).
EDGE_PX = 1.6


def render(
    labels: torch.Tensor, params: torch.Tensor, size: int, edge_px: float = EDGE_PX
) -> torch.Tensor:
    """labels (B,), params (B, len(_P)) -> images (B, 3, size, size) float32 in [-1, 1].
    Differentiable in ``params``; ``edge_px`` widens the edge ramp (shape_fit anneals it)."""
    B = labels.shape[0]
    gx, gy = pixel_centres(size)
    dx = gx[None] - params[:, 0, None, None]
    dy = gy[None] - params[:, 1, None, None]
    th = params[:, 3, None, None]
    px = torch.cos(th) * dx + torch.sin(th) * dy
    py = -torch.sin(th) * dx + torch.cos(th) * dy
    sdf = torch.empty(B, size, size)
    for label in labels.unique().tolist():
        m = labels == label
        sdf[m] = signed_distance(label, px[m], py[m], params[m])
    soft = edge_px / size  # the edge ramp's width in image sides
    alpha = (0.5 - sdf / soft).clamp(0, 1)[:, None]  # (B, 1, S, S)
    fg = params[:, 4:7, None, None]
    bg = params[:, 7:10, None, None]
    ramp = params[:, 10, None, None] * (gx[None] - 0.5) + params[:, 11, None, None] * (
        gy[None] - 0.5
    )
    bg = (bg + ramp[:, None]).clamp(0, 1)
    img = alpha * fg + (1 - alpha) * bg
    return img * 2 - 1


class ProceduralShapes(Dataset):
    """``size`` images of the built-in classes; image i has label i % NUM_CLASSES and
    parameters from the stream (seed, i). Deterministic per seed, any size."""

    classes = CLASSES

    def __init__(self, size: int, seed: int = 0, image_size: int = 64):
        self.size = int(size)
        self.seed = int(seed)
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return self.size

    def label(self, index: int) -> int:
        return index % NUM_CLASSES

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Render many images at once: (B, 3, S, S), labels (B,)."""
        indices = [int(i) for i in indices]
        for i in indices:
            if not 0 <= i < self.size:
                raise IndexError(f"index {i} out of range for {self.size} images")
        labels = torch.tensor([self.label(i) for i in indices], dtype=torch.long)
        params = torch.from_numpy(
            np.stack([draw_params(self.seed, i, int(lab)) for i, lab in zip(indices, labels)])
        )
        return render(labels, params, self.image_size), labels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images, labels = self.batch([index])
        return images[0], int(labels[0])


class ImageFolderSet(Dataset):
    """A folder of class sub-folders of images (any PIL-readable format).

    Class ids follow the sorted sub-folder names. Images are resized (shorter side) and
    centre-cropped to ``image_size``; decoded images are kept in memory as uint8. The
    classes take turns in the set's order (as the built-in set's do), so its first images,
    which measure a tokenizer's latent statistics, hold every class.

    ``split``: every ``HELD_OUT_EVERY``-th image of each class by file name (the 10th, 20th,
    ...) is held out: "train" leaves them out (what every training stage reads), "held_out"
    is only them (what ``evaluate-demo`` measures a folder run on), "all" is both.
    """

    def __init__(self, root: str | Path, image_size: int = 64, split: str = "all"):
        root = Path(root)
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: one of {', '.join(SPLITS)}")
        if not root.is_dir():
            raise ValueError(f"{root}: not a directory")
        self.classes = tuple(
            sorted(d.name for d in root.iterdir() if d.is_dir() and _listed(d.name))
        )
        if not self.classes:
            raise ValueError(f"{root}: no class sub-folders")
        images = {name: _class_images(root / name) for name in self.classes}
        empty = [name for name, files in images.items() if not files]
        if empty and len(empty) < len(self.classes):
            # A class without images would be a label the generator never learns.
            raise ValueError(
                f"{root}: class folder(s) without images: {', '.join(empty)}"
                f" (add images, or move the folder out)"
            )
        per_class = [
            [
                (f, cid)
                for i, f in enumerate(images[name])
                if split == "all" or (split == "held_out") == _held_out(i)
            ]
            for cid, name in enumerate(self.classes)
        ]
        # Round robin: one image of each class in turn, while a class has images left.
        turns = itertools.zip_longest(*per_class)
        self.files: list[tuple[Path, int]] = [f for turn in turns for f in turn if f]
        if not self.files:
            if split == "held_out":
                raise ValueError(
                    f"{root}: no held-out images (every {HELD_OUT_EVERY}th image of a class"
                    f" is held out: a class needs {HELD_OUT_EVERY} images or more)"
                )
            raise ValueError(f"{root}: no images found in its class sub-folders")
        self.image_size = int(image_size)
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.files)

    def label(self, index: int) -> int:
        return self.files[index][1]

    def unreadable(self) -> list[str]:
        """ "path: why" for each file PIL cannot identify or finds damaged (its structural
        check, without decoding: a second or so per thousand files), so that a run refuses a
        bad file before training rather than failing on it hours in."""
        bad = []
        for path, _ in self.files:
            try:
                with Image.open(path) as img:
                    img.verify()
            except Exception as e:  # PIL raises many kinds: any of them makes the file unusable
                bad.append(f"{path}: {e}")
        return bad

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index not in self._cache:
            path = self.files[index][0]
            try:
                img = load_image(str(path), self.image_size)
            except Exception as e:  # damaged past what ``unreadable`` checks: name the file
                raise ValueError(f"{path}: cannot read this image ({e})") from e
            self._cache[index] = ((img + 1) * 127.5).round().to(torch.uint8)
        return self._cache[index].float() / 127.5 - 1.0, self.files[index][1]

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self[int(i)] for i in indices]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


@dataclass
class DataSource:
    """What the trainers read: a set, its class names, and the image size."""

    dataset: Dataset
    classes: tuple[str, ...]
    image_size: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def data_set_meta(data: str) -> dict:
    """What a trained model's training.json records about its data. The built-in set's
    parameters changed between recipe passes (``RADIUS_RANGE``), so a bundled model has to
    say which version it saw, for the recipe check of tests/test_demo_quality.py."""
    if data == "shapes":
        return {"name": "shapes", "radius_range": list(RADIUS_RANGE)}
    return {"name": "folder", "path": str(Path(data).resolve())}


def open_source(
    data: str, image_size: int, size: int = 50_000, seed: int = 0, split: str = "train"
) -> DataSource:
    """``data`` is "shapes" (the built-in set; ``size`` images from ``seed``) or a folder, of
    which the trainers read the "train" ``split`` (``ImageFolderSet``)."""
    if data == "shapes":
        ds = ProceduralShapes(size, seed=seed, image_size=image_size)
    else:
        ds = ImageFolderSet(data, image_size=image_size, split=split)
    return DataSource(ds, tuple(ds.classes), image_size)


def held_out_set(data: str, image_size: int, size: int, seed: int = HELD_OUT_SEED) -> Dataset:
    """Real images no model of ``data`` trained on: ``size`` fresh built-in images from
    ``seed``, or a folder's held-out split (all of it; ``size`` and ``seed`` do not apply)."""
    if data == "shapes":
        return ProceduralShapes(size, seed=seed, image_size=image_size)
    return ImageFolderSet(data, image_size=image_size, split="held_out")


def batches(dataset: Dataset, batch_size: int, seed: int, start_step: int = 0):
    """Endless batches in a shuffled order that depends only on (seed, epoch): resuming at
    ``start_step`` yields exactly the batches an uninterrupted run would have seen."""
    n = len(dataset)
    per_epoch = max(1, n // batch_size)
    step = start_step
    while True:
        epoch, k = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g)
        idx = order[k * batch_size : (k + 1) * batch_size]
        if len(idx) < batch_size:  # a set smaller than one batch: wrap around
            idx = order.repeat(batch_size // n + 1)[:batch_size]
        yield dataset.batch(idx.tolist())
        step += 1

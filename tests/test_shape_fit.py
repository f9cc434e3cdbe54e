"""The outline score (model/training/shape_fit.py): clean shapes of every class score 1, the
wrong class's shape and a shape with its points cut off score lower, the fitted render is the
image's own shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.images import psnr
from model.training.data import CLASSES, ProceduralShapes, draw_params, render
from model.training.shape_fit import outline_iou

STAR, CIRCLE = CLASSES.index("star"), CLASSES.index("circle")


@pytest.fixture(scope="module")
def real():
    # Two images of every class, 32 px as the demo models; seed never trained on.
    return ProceduralShapes(20, seed=4242, image_size=32).batch(range(20))


def test_real_images_of_every_class_fit_their_clean_shape(real):
    images, labels = real
    iou, fitted = outline_iou(images, labels)
    assert iou.shape == (20,) and fitted.shape == images.shape
    assert float(iou.min()) >= 0.95, dict(zip(labels.tolist(), iou.tolist(), strict=True))
    # The fitted render is the image's shape with its colours: close to the image itself.
    assert min(psnr(fitted, images)) > 30


def blunted_stars(seed: int, indices: list[int]) -> torch.Tensor:
    """The stars ``indices`` of ProceduralShapes(seed) with their points cut off by a disc of
    0.62 times their size: the same colours and background, the outline of a lumpy pentagon."""
    labels = torch.full((len(indices),), STAR)
    params = torch.from_numpy(np.stack([draw_params(seed, i, STAR) for i in indices]))
    star = render(labels, params, 32)
    disc = params.clone()
    disc[:, 2] *= 0.62
    disc = render(torch.full_like(labels, CIRCLE), disc, 32)
    empty = params.clone()
    empty[:, 2] = -1.0  # a circle of negative radius: background only
    background = render(torch.full_like(labels, CIRCLE), empty, 32)
    # Each pixel from whichever render is nearer the background: inside both shapes only.
    nearer = (star - background).abs().sum(1, keepdim=True) < (disc - background).abs().sum(
        1, keepdim=True
    )
    return torch.where(nearer, star, disc)


def test_the_wrong_class_and_a_blunted_star_score_lower(real):
    images, labels = real
    stars = images[labels == STAR]
    clean, _ = outline_iou(stars, torch.full((2,), STAR))
    as_circles, _ = outline_iou(stars, torch.full((2,), CIRCLE))
    assert float(as_circles.max()) < 0.85 < float(clean.min())
    # Still "star" to a lenient classifier, a blotch to a person.
    blunt = blunted_stars(4242, (labels == STAR).nonzero().squeeze(1).tolist())
    blunted, _ = outline_iou(blunt, torch.full((2,), STAR))
    assert float(blunted.max()) < float(clean.min()) - 0.05


def test_labels_outside_the_built_in_classes_are_refused(real):
    images, _ = real
    with pytest.raises(ValueError, match="class ids"):
        outline_iou(images[:1], torch.tensor([len(CLASSES)]))

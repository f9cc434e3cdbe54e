"""How clean a shape is: fit the labelled class's procedural shape to an image, compare outlines.

The judge and the teacher answer "which class is this?", and both name a lumpy star with four
uneven points "star". What a person sees is the outline. For an image of the built-in set and
its class, this module finds the clean shape of that class (``data.signed_distance``: centre,
size, rotation, and for stripes period and phase) whose render best explains the image, then
measures how well the image's own silhouette matches it:

- geometry by gradient descent through ``data.render`` from several starts (rotations over
  the class's symmetry, three sizes; stripes: three periods, four phases), its edge ramp
  widened at first (5 px, so an edge far from the start still pulls) and narrowed to the data
  set's 1.6 px;
- colours in closed form at every step: foreground, background and the background's linear
  brightness ramp, the data set's colour model, by least squares from sums over the pixels;
- the silhouette: pixels whose colour lies past halfway from the fitted background towards the
  fitted foreground; the score is its intersection over union with the fitted shape's inside.

Real images score 1.0 (200 held-out: lowest 0.971, a frame), the tokenizers' reconstructions
of them 0.82-0.98 by class (medians); docs/DEMO_MODELS.md ("Outlines") has the generators'. No
network is involved, so the score can be read beside the judge without sharing its blind
spots.
"""

from __future__ import annotations

import math

import torch

from .data import CLASSES, EDGE_PX, pixel_centres, render

# Rotational symmetry period of each class's shape (0: rotation does not matter, or is fixed
# as for the stripes, whose direction the class names).
SYMMETRY = {
    "circle": 0.0,
    "square": math.pi / 2,
    "triangle": 2 * math.pi / 3,
    "ring": 0.0,
    "plus": math.pi / 2,
    "x-cross": math.pi / 2,
    "star": 2 * math.pi / 5,
    "frame": math.pi / 2,
    "h-stripes": 0.0,
    "v-stripes": 0.0,
}
STRIPES = ("h-stripes", "v-stripes")
ROTATIONS = 4  # starts per image: ROTATIONS x START_SIZES (stripes: phases x periods)
START_SIZES = (0.24, 0.30, 0.36)  # shape radius, or stripe period, in image sides
STARTS = ROTATIONS * len(START_SIZES)


def _coverage(labels: torch.Tensor, geo: torch.Tensor, size: int, edge_px: float):
    """labels (N,), geo (N, 6) = cx, cy, r, theta, period, phase -> coverage (N, S, S): the
    data set's own render of a white shape on black."""
    white, black = geo.new_ones(len(geo), 3), geo.new_zeros(len(geo), 5)  # fg; bg and its ramp
    params = torch.cat([geo[:, :4], white, black, geo[:, 4:6]], 1)  # data._P's order
    return (render(labels, params, size, edge_px)[:, 0] + 1) / 2


def _colours(images: torch.Tensor, alpha: torch.Tensor):
    """Least-squares colours of the data set's model for images (N, 3, S, S) in [0, 1] and
    coverage alpha (N, S, S): pixel = a fg + (1 - a) (bg + gdx (x - 1/2) + gdy (y - 1/2)), the
    ramp shared by the channels. Solved from the normal equations' sums (8 unknowns).
    Returns (the model's image, foreground (N, 3, 1, 1), background with its ramp
    (N, 3, S, S))."""
    N, S = images.shape[0], images.shape[-1]
    gx, gy = pixel_centres(S)
    a = alpha.reshape(N, -1)
    b = 1 - a
    X, Y = (gx - 0.5).reshape(1, -1), (gy - 0.5).reshape(1, -1)
    y = images.reshape(N, 3, -1)
    s = lambda t: t.sum(-1)  # noqa: E731
    ch = torch.arange(3)
    M = images.new_zeros(N, 8, 8)
    for i, j, v in (
        (ch, ch, s(a * a)),
        (ch + 3, ch + 3, s(b * b)),
        (ch, ch + 3, s(a * b)),
        (ch, 6, s(a * b * X)),
        (ch, 7, s(a * b * Y)),
        (ch + 3, 6, s(b * b * X)),
        (ch + 3, 7, s(b * b * Y)),
    ):
        M[:, i, j] = v[:, None]
        M[:, j, i] = v[:, None]
    M[:, 6, 6] = 3 * s(b * b * X * X)
    M[:, 7, 7] = 3 * s(b * b * Y * Y)
    M[:, 6, 7] = M[:, 7, 6] = 3 * s(b * b * X * Y)
    rhs = torch.cat(
        [
            (a[:, None] * y).sum(-1),
            (b[:, None] * y).sum(-1),
            (b * X)[:, None].mul(y).sum((1, 2))[:, None],
            (b * Y)[:, None].mul(y).sum((1, 2))[:, None],
        ],
        1,
    )
    u = torch.linalg.solve(M + 1e-5 * torch.eye(8, dtype=images.dtype), rhs)
    fg = u[:, 0:3, None]  # (N, 3, 1)
    background = u[:, 3:6, None] + (X * u[:, 6:7] + Y * u[:, 7:8])[:, None]  # (N, 3, P)
    model = a[:, None] * fg + b[:, None] * background
    return model.reshape(N, 3, S, S), fg[..., None], background.reshape(N, 3, S, S)


def _starts(labels: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """(N * STARTS, 6) starting geometries; the centre starts at the centroid of
    the pixels unlike the border's median colour."""
    N, S = images.shape[0], images.shape[-1]
    edge = torch.cat([images[..., 0, :], images[..., -1, :], images[..., 0], images[..., -1]], 2)
    unlike = (images - edge.median(2).values[..., None, None]).norm(dim=1)
    w = (unlike / unlike.flatten(1).amax(1).clamp(min=1e-6)[:, None, None]) ** 2
    gx, gy = pixel_centres(S)
    total = w.flatten(1).sum(1).clamp(min=1e-6)
    cx, cy = (w * gx).flatten(1).sum(1) / total, (w * gy).flatten(1).sum(1) / total
    names = [CLASSES[int(c)] for c in labels]
    period = torch.tensor([SYMMETRY[n] for n in names], dtype=images.dtype)
    stripes = torch.tensor([n in STRIPES for n in names])
    out = []
    for k in range(STARTS):
        i, j = k % ROTATIONS, k // ROTATIONS
        size = torch.full((N,), START_SIZES[j], dtype=images.dtype)
        g = torch.stack([cx, cy, size, period * i / ROTATIONS, size, torch.zeros_like(cx)], 1)
        g[stripes, 0:2] = 0.5
        g[stripes, 5] = i * 2 * math.pi / ROTATIONS  # phase
        out.append(g)
    return torch.stack(out, 1).reshape(-1, 6)


def outline_iou(
    images: torch.Tensor, labels: torch.Tensor, steps: int = 120, batch_size: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """images (N, 3, S, S) in [-1, 1] of the built-in classes, labels (N,) -> (IoU (N,) of each
    image's silhouette with the best-fitting clean shape of its class, that shape rendered
    (N, 3, S, S) in [-1, 1])."""
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < len(CLASSES):
        raise ValueError(f"labels must be class ids of the built-in set (0-{len(CLASSES) - 1})")
    ious, fits = [], []
    for start in range(0, len(images), batch_size):
        iou, fit = _fit(
            images[start : start + batch_size], labels[start : start + batch_size], steps
        )
        ious.append(iou)
        fits.append(fit)
    if not ious:
        return torch.zeros(0), images.new_zeros(images.shape)
    return torch.cat(ious), torch.cat(fits)


def _fit(images: torch.Tensor, labels: torch.Tensor, steps: int):
    x0 = ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)
    labels = labels.cpu()
    N, S = x0.shape[0], x0.shape[-1]
    K = STARTS
    lab, x = labels.repeat_interleave(K), x0.repeat_interleave(K, 0)
    geo = _starts(labels, x0).requires_grad_(True)
    opt = torch.optim.Adam([geo], lr=0.01)
    with torch.enable_grad():
        for step in range(steps):
            edge = 5.0 + (EDGE_PX - 5.0) * step / steps
            model = _colours(x, _coverage(lab, geo, S, edge))[0]
            loss = ((model - x) ** 2).flatten(1).mean(1).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # A box's distance has sqrt(0) at its corners; float32 can turn that into a NaN
            # gradient for one start at one step: skip it there.
            geo.grad.nan_to_num_(0.0, 0.0, 0.0)
            opt.step()
    with torch.no_grad():
        alpha = _coverage(lab, geo, S, EDGE_PX)
        model, fg, bg = _colours(x, alpha)
        err = ((model - x) ** 2).flatten(1).mean(1).reshape(N, K)
        best = err.argmin(1) + torch.arange(N) * K
        alpha, model, fg, bg = alpha[best], model[best], fg[best], bg[best]
        span = fg - bg
        along = ((x0 - bg) * span).sum(1) / (span * span).sum(1).clamp(min=1e-4)
        seen, fitted = along > 0.5, alpha > 0.5
        iou = (seen & fitted).flatten(1).sum(1) / (seen | fitted).flatten(1).sum(1).clamp(min=1)
    return iou.float(), model.clamp(0, 1) * 2 - 1

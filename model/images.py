"""Image <-> tensor conversion shared by the CLI, the service and training.

Any PIL-readable image is turned upright by its EXIF orientation (as browsers and photo viewers
show it), becomes RGB (grayscale, RGBA, palette and 16-bit modes converted), is resized so its
shorter side equals the model's size (bicubic) and centre-cropped to a square.
Pixels map to [-1, 1]. Output images are clamped to [-1, 1] before quantising to 8 bits.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps


def upright(img: Image.Image) -> Image.Image:
    """Turn an image by its EXIF orientation tag. Phones and cameras store a photo as the
    sensor read it and tag how to turn it; browsers and viewers obey the tag, so without this
    a portrait photo reaches the model lying on its side (and a portrait's centre crop is
    another part of the picture than the one the person sees)."""
    if img.getexif().get(ExifTags.Base.Orientation, 1) == 1:
        return img  # the usual case: no copy
    return ImageOps.exif_transpose(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, 16-bit, palette, CMYK, RGBA (composited on white) -> 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def square_rgb(img: Image.Image, size: int) -> Image.Image:
    """Any PIL image -> the upright, RGB, ``size`` x ``size`` image the models read."""
    return resize_center_crop(to_rgb(upright(img)), size)


def pil_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> (3, size, size) float32 in [-1, 1]."""
    arr = np.asarray(square_rgb(img, size), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def load_image(data: bytes | str, size: int) -> torch.Tensor:
    """Encoded image bytes or a file path -> (3, size, size) in [-1, 1]."""
    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    with Image.open(src) as img:
        img.load()
        return pil_to_tensor(img, size)


def tensor_to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, S, S) in [-1, 1] (clamped here) -> (B, S, S, 3) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray(a) for a in tensor_to_uint8(images)]


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_grid(images: list[Image.Image], columns: int | None = None, pad: int = 2) -> Image.Image:
    """Tile equal-sized images into one picture (a row of ``columns`` at a time)."""
    if not images:
        raise ValueError("no images to tile")
    n = len(images)
    cols = columns or min(n, 8)
    rows = (n + cols - 1) // cols
    w, h = images[0].size
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def psnr(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per-image PSNR in dB between two (B, 3, S, S) batches in [-1, 1], on 8-bit pixels."""
    x = torch.from_numpy(tensor_to_uint8(a)).double()
    y = torch.from_numpy(tensor_to_uint8(b)).double()
    mse = ((x - y) ** 2).flatten(1).mean(1)
    return [float("inf") if m == 0 else float(10 * torch.log10(255.0**2 / m)) for m in mse]

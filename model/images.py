"""Image <-> tensor conversion shared by the CLI, the service and training.

Any PIL-readable image (HEIC too) is turned upright by its EXIF orientation (as browsers and
photo viewers show it), becomes RGB (grayscale, RGBA, palette and 16-bit modes converted), is
resized so its shorter side equals the model's size (bicubic) and centre-cropped to a square; a
large JPEG is scaled down by its decoder first (``decode_for``).
Pixels map to [-1, 1]. Output images are clamped to [-1, 1] before quantising to 8 bits.
"""

from __future__ import annotations

import io

import numpy as np
import pillow_heif
import torch
from PIL import ExifTags, Image

# HEIC / HEIF (an iPhone's photos) opened by Pillow as any other format. libheif applies the
# file's own rotation while decoding and reports EXIF orientation 1 afterwards; AVIF (Pillow's
# own) reports its rotation as the EXIF orientation, which ``square_rgb`` obeys.
pillow_heif.register_heif_opener()

# EXIF orientation -> the transposition that shows the picture upright (browsers and viewers
# obey this tag; phones store a portrait photo sideways and set it to 6).
ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


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


Box = tuple[float, float, float, float]


def resize_center_crop(img: Image.Image, size: int, picture: Box | None = None) -> Image.Image:
    """The centre square of ``picture`` (a region of ``img``, the whole image by default),
    resampled (bicubic, antialiased) to ``size`` x ``size``. The square's edges may fall
    between pixels: the crop is where it belongs, not rounded to the image's grid."""
    x0, y0, x1, y1 = picture or (0, 0, *img.size)
    if (x0, y0, x1, y1) == (0, 0, size, size):
        return img
    side = min(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    square = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    return img.resize((size, size), Image.BICUBIC, box=square)


def square_rgb(img: Image.Image, size: int, picture: Box | None = None) -> Image.Image:
    """Any PIL image -> the upright, RGB, ``size`` x ``size`` image the models read.

    The centre square of a picture is the centre square whichever way it is turned, so the
    crop is taken as stored and only the small result is turned by the EXIF orientation."""
    orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    square = resize_center_crop(to_rgb(img), size, picture)
    return square.transpose(ORIENTATIONS[orientation]) if orientation in ORIENTATIONS else square


def pil_to_tensor(img: Image.Image, size: int, picture: Box | None = None) -> torch.Tensor:
    """PIL image -> (3, size, size) float32 in [-1, 1]."""
    arr = np.asarray(square_rgb(img, size, picture), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def decode_for(img: Image.Image, size: int) -> Box | None:
    """Decode an opened image's pixels for a model of ``size``; returns the region of them
    that is the picture when the decoder scaled it (else None), for ``square_rgb``.

    A JPEG is scaled down by its decoder (1/2, 1/4 or 1/8, in the DCT) as long as both sides
    keep twice ``size``; the antialiased resize does the rest. A 12-megapixel photo decodes
    2-6x faster for a 32 or 256 px model, 50+ dB from decoding it whole (BENCHMARKS.md)."""
    picture = None
    if img.format == "JPEG":
        drafted = img.draft(img.mode, (2 * size, 2 * size))
        if drafted and drafted[1][2:] != img.size:
            picture = drafted[1]  # the last row / column of scaled blocks is partly padding
    img.load()  # raises on truncated or corrupt data
    return picture


def load_image(data: bytes | str, size: int) -> torch.Tensor:
    """Encoded image bytes or a file path -> (3, size, size) in [-1, 1]."""
    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    with Image.open(src) as img:
        picture = decode_for(img, size)
        return pil_to_tensor(img, size, picture)


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

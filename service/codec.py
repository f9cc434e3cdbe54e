"""Bytes <-> arrays at the API boundary: images in, tokens in and out, PNGs out.

Images leave here as uint8 pixels (n, 3, S, S), not floats: they travel to the model (an
in-process queue, or a Redis stream) at a byte per value; service/tasks.py maps them to
[-1, 1] where the model runs.

Everything here refuses bad input with an ``ApiError`` (4xx) before any model work:

- images: base64 (standard or URL-safe, optional ``data:`` prefix) or raw upload bytes, at
  most ``max_image_bytes``; the pixel count is read from the header and checked against
  ``max_image_pixels`` BEFORE a single pixel is decoded (a decompression bomb never expands);
  truncated or non-image bytes are refused; only PNG, JPEG, WebP, AVIF and HEIC are opened.
- tokens: a nested (B, L, D) list, or ``tokens_b64`` = little-endian bytes with ``shape`` and
  ``dtype``; the shape must be exactly (B, L, D) of the model and every value finite.

Decoding images is CPU work: callers run ``decode_images`` in a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from model.images import decode_for, make_grid, png_bytes, square_rgb

from .errors import ApiError

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "AVIF", "HEIF")  # HEIF: HEIC photos (model.images)
TOKEN_DTYPES = {"float32": "<f4", "float16": "<f2", "float64": "<f8", "bfloat16": "<u2"}


# --- images in ---------------------------------------------------------------------------
def b64decode(text: str, what: str, max_bytes: int) -> bytes:
    """Base64 text (standard or URL-safe alphabet, padding optional) -> bytes."""
    if not isinstance(text, str):
        raise ApiError(422, "invalid_request", f"{what}: expected a base64 string")
    if text.startswith("data:"):  # data:image/png;base64,....
        _, _, text = text.partition(",")
    text = "".join(text.split())  # line-wrapped base64 is common
    # 4 characters carry 3 bytes: refuse before decoding anything too large.
    if len(text) * 3 // 4 > max_bytes + 3:
        raise ApiError(413, "image_too_large", f"{what}: more than {max_bytes} bytes")
    text = text.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_base64", f"{what}: not valid base64") from None
    if not data:
        raise ApiError(400, "invalid_image", f"{what}: empty")
    return data


def decode_image(data: bytes, size: int, max_bytes: int, max_pixels: int, what: str = "image"):
    """Encoded PNG / JPEG / WebP / AVIF / HEIC bytes -> (3, size, size) uint8 pixels (numpy):
    a JPEG scaled by its decoder, then upright, RGB, resized and centre-cropped as
    model.images.load_image does; the executor maps them to [-1, 1] (service/tasks.py), so a
    job carries a quarter of float32's bytes."""
    if len(data) > max_bytes:
        raise ApiError(413, "image_too_large", f"{what}: {len(data)} bytes, limit {max_bytes}")
    if not data:
        raise ApiError(400, "invalid_image", f"{what}: empty")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            # Image.open parsed only the header: refuse big images before decoding pixels.
            w, h = img.size
            if w * h > max_pixels:
                raise ApiError(
                    422, "image_too_many_pixels", f"{what}: {w}x{h} pixels, limit {max_pixels}"
                )
            if w < 1 or h < 1:
                raise ApiError(400, "invalid_image", f"{what}: {w}x{h} pixels")
            picture = decode_for(img, size)  # raises on truncated or corrupt data
            return pixels(img, size, picture)
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(
            422, "image_too_many_pixels", f"{what}: more than {max_pixels} pixels"
        ) from None
    except UnidentifiedImageError:
        raise ApiError(
            400, "invalid_image", f"{what}: not a PNG, JPEG, WebP, AVIF or HEIC image"
        ) from None
    except Exception as e:
        # Pillow's decoders report truncated / corrupt / hostile data through a zoo of
        # exception types (OSError, SyntaxError, ValueError, struct.error, ...): any failure
        # to decode the client's bytes is the client's image, answered 400.
        raise ApiError(
            400, "invalid_image", f"{what}: truncated or corrupt image ({e.__class__.__name__})"
        ) from None


def pixels(img: Image.Image, size: int, picture=None) -> np.ndarray:
    """PIL image -> (3, size, size) uint8, C-contiguous (``picture``: see decode_for)."""
    arr = np.asarray(square_rgb(img, size, picture), dtype=np.uint8)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def decode_images(
    blobs: Sequence[bytes | str], size: int, max_bytes: int, max_pixels: int
) -> np.ndarray:
    """Encoded images (raw bytes, or base64 text) -> (n, 3, size, size) uint8 pixels."""
    arrays = []
    for i, blob in enumerate(blobs):
        what = f"images[{i}]"
        data = b64decode(blob, what, max_bytes) if isinstance(blob, str) else blob
        arrays.append(decode_image(data, size, max_bytes, max_pixels, what=what))
    return np.stack(arrays)


# --- tokens in ------------------------------------------------------------------------------
def parse_tokens(
    tokens,
    tokens_b64: str | None,
    shape: Sequence[int] | None,
    dtype: str | None,
    num_tokens: int,
    token_dim: int,
    max_items: int,
    max_bytes: int,
) -> np.ndarray:
    """A nested list or base64 bytes + shape + dtype -> float32 (B, L, D), checked."""
    L, D = num_tokens, token_dim
    if (tokens is None) == (tokens_b64 is None):
        raise ApiError(422, "invalid_tokens", "send exactly one of 'tokens' or 'tokens_b64'")
    if tokens is not None:
        try:
            arr = np.asarray(tokens, dtype=np.float32)
        except (ValueError, TypeError, OverflowError):
            raise ApiError(
                422, "invalid_tokens", f"tokens must be a (B, {L}, {D}) array of numbers"
            ) from None
    else:
        arr = _tokens_from_b64(tokens_b64, shape, dtype or "float32", max_bytes)
    if arr.ndim != 3 or arr.shape[1:] != (L, D) or arr.shape[0] < 1:
        raise ApiError(
            422, "invalid_tokens", f"tokens must have shape (B, {L}, {D}), got {list(arr.shape)}"
        )
    if arr.shape[0] > max_items:
        raise ApiError(
            422, "too_many_images", f"{arr.shape[0]} token sets, at most {max_items} per request"
        )
    if not np.isfinite(arr).all():
        raise ApiError(422, "invalid_tokens", "tokens hold NaN or Inf")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _tokens_from_b64(text: str, shape, dtype: str, max_bytes: int) -> np.ndarray:
    if dtype not in TOKEN_DTYPES:
        raise ApiError(
            422, "invalid_tokens", f"dtype must be one of {sorted(TOKEN_DTYPES)}, got {dtype!r}"
        )
    if shape is None or len(shape) != 3 or any(int(s) < 1 for s in shape):
        raise ApiError(422, "invalid_tokens", "tokens_b64 needs 'shape': [B, L, D]")
    data = b64decode(text, "tokens_b64", max_bytes)
    raw = np.dtype(TOKEN_DTYPES[dtype])
    expected = math.prod(int(s) for s in shape) * raw.itemsize
    if len(data) != expected:
        raise ApiError(
            422,
            "invalid_tokens",
            f"tokens_b64 holds {len(data)} bytes; shape {list(shape)} of {dtype} needs {expected}",
        )
    arr = np.frombuffer(data, dtype=raw).reshape([int(s) for s in shape])
    if dtype == "bfloat16":  # bfloat16 is the top half of a float32
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


# --- out -------------------------------------------------------------------------------------
def tokens_b64(tokens: np.ndarray) -> str:
    """(B, L, D) -> base64 of its little-endian float32 bytes (C order)."""
    return base64.b64encode(np.ascontiguousarray(tokens, dtype="<f4").tobytes()).decode()


def png_list(images: np.ndarray) -> list[bytes]:
    """uint8 (n, S, S, 3) -> one PNG per image."""
    return [png_bytes(Image.fromarray(a)) for a in images]


def png_b64_list(images: np.ndarray) -> list[str]:
    return [base64.b64encode(p).decode() for p in png_list(images)]


def preview_png(images: np.ndarray, max_side: int) -> bytes:
    """uint8 (n, S, S, 3) -> one small PNG: each image downscaled to at most ``max_side``
    px, then the image itself or a grid of all of them (as ``png_single_or_grid``)."""
    side = min(images.shape[1], max_side)
    if side != images.shape[1]:
        images = np.stack(
            [np.asarray(Image.fromarray(a).resize((side, side), Image.BOX)) for a in images]
        )
    return png_single_or_grid(images)


def png_single_or_grid(images: np.ndarray) -> bytes:
    """uint8 (n, S, S, 3) -> one PNG: the image itself, or a grid of all of them."""
    pics = [Image.fromarray(a) for a in images]
    return png_bytes(pics[0] if len(pics) == 1 else make_grid(pics))

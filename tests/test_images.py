"""Image conversion: every common mode becomes RGB; other sizes are resized and centre-cropped."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, UnidentifiedImageError

from model.images import (
    decode_for,
    load_image,
    make_grid,
    pil_to_tensor,
    png_bytes,
    psnr,
    resize_center_crop,
    to_pil,
)


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    "img",
    [
        Image.new("L", (40, 40), 128),
        Image.new("RGBA", (40, 40), (255, 0, 0, 255)),
        Image.new("RGB", (40, 40), (10, 20, 30)).convert("P"),
        Image.new("CMYK", (40, 40), (0, 0, 0, 0)),
        Image.fromarray(np.full((40, 40), 65535, dtype=np.uint16)),
        Image.new("LA", (40, 40), (0, 0)),
    ],
    ids=["L", "RGBA", "P", "CMYK", "I16", "LA"],
)
def test_modes_become_rgb(img):
    fmt = "JPEG" if img.mode == "CMYK" else "PNG"
    x = load_image(encode(img, fmt), 32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("fmt", ["AVIF", "HEIF"])
def test_a_phones_avif_and_heic_photos_are_read(fmt):
    """HEIC is an iPhone camera's default; AVIF the web's. Lossy, so read within 30 dB."""
    smooth = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    picture = Image.fromarray(smooth).resize((64, 48), Image.BICUBIC)
    got = load_image(encode(picture, fmt), 32)
    assert psnr(got[None], load_image(encode(picture), 32)[None])[0] > 30


def test_values():
    x = load_image(encode(Image.new("RGB", (32, 32), (255, 0, 128))), 32)
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]), atol=1e-6)
    white = load_image(encode(Image.new("LA", (8, 8), (0, 0))), 8)  # transparent -> white
    assert torch.allclose(white, torch.ones_like(white))
    sixteen = load_image(encode(Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))), 8)
    assert torch.allclose(sixteen, torch.ones_like(sixteen))


# A photo as the sensor stored it, and what its EXIF orientation tag tells a viewer to show.
SHOWN = {
    1: lambda a: a,
    2: np.fliplr,  # mirrored
    3: lambda a: np.rot90(a, 2),
    6: lambda a: np.rot90(a, -1),  # turned a quarter clockwise: a phone held upright
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", sorted(SHOWN))
@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_exif_orientation_is_obeyed(orientation, fmt):
    stored = np.random.default_rng(orientation).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, fmt, exif=exif, lossless=True)
    shown = np.ascontiguousarray(SHOWN[orientation](stored))
    got = load_image(buf.getvalue(), 16)
    want = load_image(encode(Image.fromarray(shown)), 16)  # the same pixels, untagged
    assert torch.equal(got, want)
    if orientation != 1:  # the tag mattered: read as stored, the image is another one
        assert not torch.equal(got, load_image(encode(Image.fromarray(stored)), 16))


@pytest.mark.parametrize("size", [32, 64, 256])
def test_a_large_jpeg_is_scaled_by_its_decoder_and_reads_as_if_decoded_whole(size, monkeypatch):
    """A 3.8-megapixel phone photo (odd sides, stored sideways): the decoder scales it down
    in the DCT, and the model still reads the picture decoded whole, to within 40 dB."""
    # Pillow's process-wide limit: an app built by an earlier test may have lowered it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_000_000)
    smooth = np.random.default_rng(size).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(smooth).resize((2403, 1601), Image.BICUBIC).save(buf, "JPEG", exif=exif)
    with Image.open(io.BytesIO(buf.getvalue())) as img:
        picture = decode_for(img, size)
        assert picture is not None and img.size[0] < 2403  # the scaled path was taken
    with Image.open(io.BytesIO(buf.getvalue())) as img:
        img.load()  # decoded whole
        whole = pil_to_tensor(img, size)
    got = load_image(buf.getvalue(), size)
    assert psnr(got[None], whole[None])[0] > 40
    # Stored sideways, shown upright: the left of the stored picture is the top of the shown one.
    left = pil_to_tensor(Image.fromarray(smooth).resize((2403, 1601), Image.BICUBIC), size)
    assert psnr(got[None], left.transpose(1, 2).flip(2)[None])[0] > 30


def test_resize_shorter_side_then_centre_crop():
    arr = np.zeros((100, 300, 3), dtype=np.uint8)
    arr[:, 100:200] = 255  # a white band in the middle third
    out = resize_center_crop(Image.fromarray(arr), 50)
    assert out.size == (50, 50)
    # The middle third of a 150x50 resize is exactly the crop: all white, edges aside.
    assert np.asarray(out)[:, 3:-3].min() > 200


def test_round_trip_and_psnr():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    pics = to_pil(x)
    back = torch.stack([load_image(png_bytes(p), 16) for p in pics])
    assert (back - x).abs().max() <= 1 / 127.5 + 1e-6
    assert all(v > 45 for v in psnr(x, back))
    assert psnr(x, x) == [float("inf")] * 2
    grid = make_grid(pics, columns=2)
    assert grid.size == (2 * 18 + 2, 18 + 2)


def test_garbage_is_an_error():
    with pytest.raises(UnidentifiedImageError):
        load_image(b"definitely not an image", 32)
    truncated = encode(Image.new("RGB", (64, 64), (1, 2, 3)))[:60]
    with pytest.raises(OSError):
        load_image(truncated, 32)

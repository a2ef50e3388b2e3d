import io

import numpy as np
import pytest
import torch
from PIL import Image

from hndsr.images import ImageDecodeError, decode_rgb, encode_png, to_tensor, to_uint8

LIMIT = 10_000_000


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_rgb_is_unchanged():
    rgb = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    out = decode_rgb(_encode(Image.fromarray(rgb)), max_pixels=LIMIT)
    assert out.dtype == np.uint8 and out.shape == (17, 23, 3)
    assert np.array_equal(out, rgb)


def test_grayscale_is_copied_to_three_channels():
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = decode_rgb(_encode(Image.fromarray(gray)), max_pixels=LIMIT)
    assert np.array_equal(out, np.repeat(gray[..., None], 3, axis=2))


def test_sixteen_bit_grayscale_keeps_the_high_byte():
    values = np.array([[0, 255, 256, 65535], [1000, 32768, 40000, 65280]], dtype=np.uint16)
    out = decode_rgb(_encode(Image.fromarray(values)), max_pixels=LIMIT)
    assert np.array_equal(out[..., 0], (values >> 8).astype(np.uint8))
    assert np.array_equal(out[..., 0], out[..., 2])


def test_rgba_is_composited_over_black():
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128]]], dtype=np.uint8)
    out = decode_rgb(_encode(Image.fromarray(rgba, mode="RGBA")), max_pixels=LIMIT)
    assert out[0, 0].tolist() == [200, 100, 50]
    assert out[0, 1].tolist() == [0, 0, 0]
    assert out[0, 2].tolist() == [100, 50, 25]  # round(c * 128 / 255)


def test_palette_is_expanded():
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[:, :4] = [255, 0, 0]
    rgb[:, 4:] = [0, 0, 255]
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=2)
    assert palette.mode == "P"
    out = decode_rgb(_encode(palette), max_pixels=LIMIT)
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, 7].tolist() == [0, 0, 255]


def test_cmyk_jpeg_and_tiff_are_converted():
    rgb = np.full((16, 16, 3), [10, 200, 90], dtype=np.uint8)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    out = decode_rgb(_encode(cmyk, "JPEG", quality=95), max_pixels=LIMIT)
    assert out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - rgb).max() < 12
    tiff = decode_rgb(_encode(Image.fromarray(rgb), "TIFF"), max_pixels=LIMIT)
    assert np.array_equal(tiff, rgb)


def test_float_images_are_refused_with_a_reason():
    data = _encode(Image.fromarray(np.zeros((4, 4), dtype=np.float32), mode="F"), "TIFF")
    with pytest.raises(ImageDecodeError, match="unsupported pixel mode F"):
        decode_rgb(data, max_pixels=LIMIT)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (b"this is a text file, not an image", "not a recognised image"),
        (_encode(Image.new("RGB", (8, 8)), "GIF"), "unsupported format GIF"),
        (_encode(Image.new("RGB", (8, 8)), "BMP"), "unsupported format BMP"),
    ],
)
def test_bad_bytes_raise_a_one_line_reason(data, reason):
    with pytest.raises(ImageDecodeError, match=reason) as info:
        decode_rgb(data, max_pixels=LIMIT)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_images_are_refused(fmt):
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noise), fmt)
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        decode_rgb(data[: len(data) // 2], max_pixels=LIMIT)


def test_pixel_limit_is_checked_from_the_header():
    data = _encode(Image.new("RGB", (100, 100)))
    with pytest.raises(ImageDecodeError, match="too many pixels: 100x100"):
        decode_rgb(data, max_pixels=9_999)
    assert decode_rgb(data, max_pixels=10_000).shape == (100, 100, 3)


def test_png_round_trip_is_lossless_and_deterministic():
    rgb = np.random.default_rng(2).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    first, second = encode_png(rgb), encode_png(rgb.copy())
    assert first == second
    assert np.array_equal(decode_rgb(first, max_pixels=LIMIT), rgb)


def test_tensor_conversions_round_trip():
    rgb = np.random.default_rng(3).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    tensor = to_tensor(rgb)
    assert tensor.shape == (2, 3, 5, 7) and tensor.dtype == torch.float32
    assert np.array_equal(to_uint8(tensor), rgb)
    assert to_tensor(rgb[0]).shape == (1, 3, 5, 7)

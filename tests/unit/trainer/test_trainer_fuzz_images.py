"""Fuzzing image decoding (issue 17, "Fuzzing"): whatever bytes a user uploads as an instance image,
`imageio.decode_image` either returns an RGB image or raises InvalidInputError naming the file: never another
exception, never a hang, never gigabytes of pixels.

Generated inputs: arbitrary bytes; valid images in every mode Pillow writes for JPEG, PNG and WEBP (RGB, RGBA, L,
LA, P with and without transparency, 1-bit, CMYK JPEG, 16-bit PNG), then truncated or with bytes flipped; headers
that claim huge sizes (decompression bombs, refused before decoding); animated images; formats the trainer does not
accept under an accepted extension (GIF, BMP, TIFF, ICO named .png). Every example has a deadline.
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from dreambooth_api.exitcodes import InvalidInputError
from dreambooth_trainer.imageio import MAX_IMAGE_PIXELS, decode_image

NAME = "s3://bucket/subject/photo-7.png"
FUZZ = settings(
    max_examples=150, deadline=timedelta(seconds=5), suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


def _decodes_or_refuses(data: bytes, name: str = NAME, min_resolution: int = 1) -> Image.Image | None:
    """The property: an RGB image, or InvalidInputError naming the file (anything else fails the test)."""
    refused: str | None = None
    try:
        img = decode_image(data, name, min_resolution=min_resolution)
    except InvalidInputError as err:
        refused = str(err)
    if refused is not None:
        assert name in refused, refused
        return None
    assert img.mode == "RGB"
    assert img.size[0] * img.size[1] <= MAX_IMAGE_PIXELS
    np.asarray(img)  # the pixels are really there
    return img


def _encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


@st.composite
def images(draw: st.DrawFn) -> bytes:
    """A valid image file: a random picture in one of the modes each accepted format can store."""
    width, height = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    fmt, mode = draw(
        st.sampled_from(
            [
                ("PNG", "RGB"),
                ("PNG", "RGBA"),
                ("PNG", "L"),
                ("PNG", "LA"),
                ("PNG", "P"),
                ("PNG", "1"),
                ("PNG", "I;16"),
                ("PNG", "I"),
                ("JPEG", "RGB"),
                ("JPEG", "L"),
                ("JPEG", "CMYK"),
                ("WEBP", "RGB"),
                ("WEBP", "RGBA"),
            ]
        )
    )
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    if mode in ("I;16", "I"):
        arr = rng.integers(0, 65535, (height, width), dtype=np.uint16)
        img = Image.fromarray(arr, mode="I;16")
        if mode == "I":
            img = img.convert("I")
    else:
        img = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8), mode="RGB").convert(mode)
    params: dict[str, object] = {}
    if mode == "P" and draw(st.booleans()):
        params["transparency"] = 0
    return _encode(img, fmt, **params)


@FUZZ
@given(st.binary(max_size=4096))
@example(b"")
@example(b"\x89PNG\r\n\x1a\n")
@example(b"\xff\xd8\xff")
@example(b"RIFF\x00\x00\x00\x00WEBPVP8 ")
def test_arbitrary_bytes_decode_or_are_refused(data: bytes) -> None:
    _decodes_or_refuses(data)


@FUZZ
@given(images())
def test_valid_images_of_every_mode_decode_to_rgb(data: bytes) -> None:
    assert _decodes_or_refuses(data) is not None


@FUZZ
@given(images(), st.floats(0.0, 1.0))
def test_truncated_images_decode_or_are_refused(data: bytes, keep: float) -> None:
    _decodes_or_refuses(data[: int(len(data) * keep)])


@FUZZ
@given(images(), st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), min_size=1, max_size=8))
def test_corrupted_images_decode_or_are_refused(data: bytes, flips: list[tuple[float, int]]) -> None:
    buf = bytearray(data)
    for where, value in flips:
        buf[min(int(where * len(buf)), len(buf) - 1)] = value
    _decodes_or_refuses(bytes(buf))


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (RGB, 8 bits) with a tiny compressed stream."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A real small JPEG with its frame header (SOF0) patched to claim width x height."""
    data = bytearray(_encode(Image.new("RGB", (16, 16), (10, 20, 30)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize(
    "data",
    [
        _png_claiming(100_000, 100_000),
        _png_claiming(2**31 - 1, 2**31 - 1),
        _png_claiming(8193, 8192),
        _jpeg_claiming(65_535, 65_535),
    ],
    ids=["png-100k", "png-2^31", "png-just-over", "jpeg-64k"],
)
def test_decompression_bombs_are_refused_before_decoding(data: bytes) -> None:
    start = time.monotonic()
    with pytest.raises(InvalidInputError, match=r"photo-7\.png.*(too many pixels|decompression bomb)"):
        decode_image(data, NAME)
    assert time.monotonic() - start < 2.0
    assert len(data) < 4096  # a small file claiming billions of pixels


def test_a_real_bomb_of_highly_compressible_pixels_is_refused() -> None:
    """9000 x 9000 black pixels compress to about 100 KB and would decode to 243 MB."""
    data = _encode(Image.new("L", (9000, 9000)), "PNG", optimize=True)
    assert len(data) < 1_000_000
    with pytest.raises(InvalidInputError, match="too many pixels"):
        decode_image(data, NAME)


def test_sixteen_bit_and_cmyk_decode_with_their_colours() -> None:
    white16 = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16), mode="I;16")
    assert decode_image(_encode(white16, "PNG"), NAME).getpixel((0, 0)) == (255, 255, 255)
    cmyk_black = Image.new("CMYK", (8, 8), (0, 0, 0, 255))
    pixel = decode_image(_encode(cmyk_black, "JPEG", quality=100), NAME).getpixel((4, 4))
    assert isinstance(pixel, tuple)
    assert max(pixel) < 40


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animated_images_of_accepted_formats_give_their_first_frame(fmt: str) -> None:
    img = decode_image(_animated(fmt), NAME)
    pixel = img.getpixel((8, 8))
    assert img.size == (16, 16)
    assert isinstance(pixel, tuple)
    assert pixel[0] > 200  # the first frame is red


@pytest.mark.parametrize(
    "data",
    [
        _animated("GIF"),
        _encode(Image.new("RGB", (16, 16)), "BMP"),
        _encode(Image.new("RGB", (16, 16)), "TIFF"),
        _encode(Image.new("RGB", (16, 16)), "ICO"),
        b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>",
        b"%PDF-1.4\n",
    ],
    ids=["gif", "bmp", "tiff", "ico", "svg", "pdf"],
)
def test_other_formats_under_an_image_name_are_refused(data: bytes) -> None:
    with pytest.raises(InvalidInputError, match=r"photo-7\.png is not a decodable image"):
        decode_image(data, NAME)


def test_the_extension_does_not_decide_the_format() -> None:
    """A PNG named .jpg decodes (by its content); the name is only used in messages."""
    img = decode_image(_encode(Image.new("RGB", (12, 10), (1, 2, 3)), "PNG"), "s3://b/cat.jpg")
    assert (img.size, img.getpixel((0, 0))) == ((12, 10), (1, 2, 3))


def test_an_image_under_the_minimum_resolution_is_refused_by_name() -> None:
    with pytest.raises(InvalidInputError, match=r"photo-7\.png is too small: 8x30"):
        decode_image(_encode(Image.new("RGB", (8, 30)), "PNG"), NAME, min_resolution=16)

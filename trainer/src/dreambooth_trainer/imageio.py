"""Decoding untrusted images safely, and the few image operations the trainer shares (resize, crop, to tensor, PNG).

Every decoding error names the object, so that a bad upload fails the job with a message the user can act on.
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

from PIL import Image, ImageOps, UnidentifiedImageError

from dreambooth_api.exitcodes import InvalidInputError

if TYPE_CHECKING:
    import torch

# Refuse images with more pixels than this before decoding them (a decompression bomb is a small file that
# decodes to gigabytes). 8192 x 8192 is well above any useful training photo.
MAX_IMAGE_PIXELS = 8192 * 8192
# Refuse files larger than this before reading them into memory.
MAX_IMAGE_BYTES = 64 * 1024 * 1024
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# The formats Pillow may decode (docs/api.md promises jpg, jpeg, png, webp); others are refused unparsed.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
# Pillow's modes of more than 8 bits per sample (16-bit PNGs open as I;16 or I) and their full-scale value.
_WIDE_MODES = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def check_size(size: int, name: str) -> None:
    """Refuse an image file over MAX_IMAGE_BYTES (call it with the listed size before reading the object)."""
    if size > MAX_IMAGE_BYTES:
        raise InvalidInputError(f"instance image {name} is too large ({size} bytes > {MAX_IMAGE_BYTES})")


def decode_image(data: bytes, name: str, min_resolution: int = 1, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode JPEG, PNG or WEBP bytes to an RGB image with its EXIF orientation applied.

    Raises InvalidInputError naming `name`.
    """
    check_size(len(data), name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            width, height = opened.size
            if width * height > max_pixels:
                raise InvalidInputError(
                    f"instance image {name} has too many pixels ({width}x{height} > {max_pixels}); refusing to decode"
                )
            opened.load()
    except InvalidInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise InvalidInputError(f"instance image {name} is a decompression bomb: {err}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InvalidInputError(f"instance image {name} is not a decodable image: {err}") from err
    img = _to_rgb(ImageOps.exif_transpose(opened))
    if min(img.size) < min_resolution:
        raise InvalidInputError(
            f"instance image {name} is too small: {img.size[0]}x{img.size[1]}, the shorter side must be at least "
            f"{min_resolution} pixels"
        )
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in _WIDE_MODES:
        return _to_8bit(img, _WIDE_MODES[img.mode]).convert("RGB")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _to_8bit(img: Image.Image, full_scale: float) -> Image.Image:
    """A grayscale image of more than 8 bits per sample scaled to mode L (0..full_scale -> 0..255)."""
    import numpy as np

    arr = np.asarray(img, dtype=np.float64) * (255.0 / full_scale)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Resize so that the shorter side is `size` pixels, keeping the aspect ratio."""
    width, height = img.size
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new == img.size:
        return img
    return img.resize(new, Image.Resampling.BICUBIC)


def crop_box(
    img_size: tuple[int, int], size: int, left_frac: float = 0.5, top_frac: float = 0.5
) -> tuple[int, int, int, int]:
    """A size x size box; the fractions place it (0.5, 0.5 is the center crop)."""
    width, height = img_size
    left = round((width - size) * left_frac)
    top = round((height - size) * top_frac)
    return (left, top, left + size, top + size)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB image as a float CHW tensor in [-1, 1]."""
    import numpy as np
    import torch

    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()

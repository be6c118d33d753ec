"""A procedural demo subject: a coloured geometric toy drawn at a few poses, written as PNGs.

Pure Python (a tiny PNG encoder), so `make demo` needs no photos, no downloads and no imaging library.
The toy: a magenta round body, a yellow triangular hat, two eyes and a green base, on a pale blue background.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

Color = tuple[int, int, int]
BACKGROUND: Color = (190, 225, 250)
BODY: Color = (225, 30, 150)
HAT: Color = (255, 205, 0)
BASE: Color = (30, 160, 70)
EYE: Color = (255, 255, 255)
PUPIL: Color = (20, 20, 20)


@dataclass(frozen=True)
class Pose:
    cx: float
    """Centre, as a fraction of the width."""
    cy: float
    scale: float
    """Body radius as a fraction of the size."""
    angle: float
    """Rotation in degrees."""


POSES = (
    Pose(0.50, 0.55, 0.26, 0.0),
    Pose(0.42, 0.52, 0.24, -15.0),
    Pose(0.58, 0.55, 0.25, 12.0),
    Pose(0.50, 0.58, 0.22, 25.0),
    Pose(0.47, 0.50, 0.28, -25.0),
    Pose(0.53, 0.57, 0.23, 5.0),
)


def png_bytes(pixels: list[list[Color]]) -> bytes:
    """Encode RGB rows as a PNG (8-bit truecolour, no interlace)."""
    height, width = len(pixels), len(pixels[0])
    raw = b"".join(b"\x00" + bytes(c for px in row for c in px) for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _colour_at(u: float, v: float) -> Color | None:
    """The toy in its own frame (body radius 1, y down); None outside it."""
    for ex in (-0.38, 0.38):
        d = math.hypot(u - ex, v + 0.15)
        if d < 0.12:
            return PUPIL
        if d < 0.25:
            return EYE
    if u * u + v * v <= 1.0:
        return BODY
    # Hat: a triangle from (-0.7, -0.75) and (0.7, -0.75) up to (0, -1.9).
    if -1.9 <= v <= -0.75 and abs(u) <= 0.7 * (v + 1.9) / 1.15:
        return HAT
    # Base: a bar under the body.
    if 0.85 <= v <= 1.25 and abs(u) <= 0.9:
        return BASE
    return None


def render(pose: Pose, size: int) -> list[list[Color]]:
    cos_a, sin_a = math.cos(math.radians(pose.angle)), math.sin(math.radians(pose.angle))
    radius = pose.scale * size
    rows = []
    for y in range(size):
        row = []
        for x in range(size):
            dx, dy = (x + 0.5 - pose.cx * size) / radius, (y + 0.5 - pose.cy * size) / radius
            u, v = cos_a * dx + sin_a * dy, -sin_a * dx + cos_a * dy
            shade = 1.0 - 0.15 * y / size  # a soft vertical gradient, so the background is not flat
            bg = tuple(int(c * shade) for c in BACKGROUND)
            row.append(_colour_at(u, v) or (bg[0], bg[1], bg[2]))
        rows.append(row)
    return rows


def write_subject(folder: Path, *, size: int = 64, count: int = len(POSES)) -> list[Path]:
    """Write `count` poses as toy-00.png ... into folder (existing identical files are simply rewritten)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, pose in enumerate(POSES[:count]):
        path = folder / f"toy-{i:02d}.png"
        path.write_bytes(png_bytes(render(pose, size)))
        paths.append(path)
    return paths

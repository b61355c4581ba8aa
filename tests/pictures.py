"""Picture files for tests that need a particular header or size without paying for the pixels."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

BACKGROUND = (40, 40, 40)
WARM = (230, 200, 170)
COOL = (170, 200, 240)


def picture(size, faces, background=BACKGROUND) -> Image.Image:
    """RGB image with bright squares ("faces" to the smoke detector) given as (x1, y1, side, colour)."""
    array = np.full((size[1], size[0], 3), background, np.uint8)
    for x, y, side, colour in faces:
        array[y : y + side, x : x + side] = colour
    return Image.fromarray(array)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says `width` x `height` and that holds no pixels: Pillow reads the size from the
    header (and refuses a decompression bomb there) before it would decode anything."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path

"""PNG files for the upload tests, written by hand so that they can lie: a small file that
declares a huge image (a decompression bomb), a truncated one, one with a broken checksum."""

import random
import struct
import zlib


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def grey_png(width: int, height: int, noise: bool = False) -> bytes:
    """A valid 8-bit grey PNG, compressed row by row: of zeros, 20000 x 20000 pixels take about 390 KB;
    ``noise``: pseudo-random pixels, which do not compress."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    deflate = zlib.compressobj(9)
    rows = (b"\0" + (random.Random(y).randbytes(width) if noise else bytes(width)) for y in range(height))
    idat = b"".join(deflate.compress(row) for row in rows) + deflate.flush()
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def truncated_png(width: int, height: int) -> bytes:
    """A PNG cut off in the middle of its pixel data."""
    blob = grey_png(width, height, noise=True)
    idat = blob.index(b"IDAT")
    (length,) = struct.unpack(">I", blob[idat - 4 : idat])
    return blob[: idat + 4 + length // 2]


def bad_checksum_png(width: int, height: int) -> bytes:
    """A PNG whose image data fails its CRC."""
    blob = bytearray(grey_png(width, height, noise=True))
    idat = blob.index(b"IDAT")
    blob[idat + 6] ^= 0xFF
    return bytes(blob)

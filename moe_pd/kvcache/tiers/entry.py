"""The disk tier's file format: one page per file, self-describing and checksummed (no torch).

    magic 'MPDKVE01' | model digest 16 | key 16 | parent key 16 | num_tokens u32 | payload bytes u64 |
    payload crc32 u32 | tokens int64 x num_tokens | header crc32 u32 | payload

All integers little-endian. A reader accepts a file only when the magic, both checksums, the model digest,
the key, the parent key and the tokens match what it asked for and the file is exactly header + payload
bytes long, so a truncated, corrupted or foreign file is a miss.
"""

from __future__ import annotations

import struct
import zlib
from array import array
from collections.abc import Sequence

MAGIC = b"MPDKVE01"
_FIXED = struct.Struct("<8s16s16s16sIQI")
_CRC = struct.Struct("<I")


def header_size(num_tokens: int) -> int:
    return _FIXED.size + 8 * num_tokens + _CRC.size


def pack_header(digest: bytes, key: bytes, parent: bytes, tokens: Sequence[int], payload: memoryview) -> bytes:
    fixed = _FIXED.pack(MAGIC, digest, key, parent, len(tokens), payload.nbytes, zlib.crc32(payload))
    body = fixed + array("q", tokens).tobytes()
    return body + _CRC.pack(zlib.crc32(body))


def check_header(header: bytes, digest: bytes, key: bytes, parent: bytes, tokens: Sequence[int],
                 payload_bytes: int) -> tuple[int, str | None]:
    """(payload crc32, None) when the header is whole and describes exactly this page, else (0, why)."""
    if len(header) != header_size(len(tokens)):
        return 0, "truncated header"
    body, (crc,) = header[: -_CRC.size], _CRC.unpack(header[-_CRC.size :])
    if zlib.crc32(body) != crc:
        return 0, "header checksum"
    magic, d, k, p, n, size, payload_crc = _FIXED.unpack(body[: _FIXED.size])
    if magic != MAGIC:
        return 0, "magic"
    if d != digest or k != key or p != parent:
        return 0, "another model or page"
    if n != len(tokens) or body[_FIXED.size :] != array("q", tokens).tobytes():
        return 0, "tokens differ"
    if size != payload_bytes:
        return 0, "payload size"
    return payload_crc, None

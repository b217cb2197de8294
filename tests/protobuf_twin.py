"""The protobuf wire format, written by hand, for the tokenizer tests' tiny SentencePiece model twins (pure
stdlib, so the same builders ran unchanged beside the publishers' tokenizer code when the official ids were
recorded)."""

import struct


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 values are written as 10-byte two's complement varints
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value) -> bytes:
    """One protobuf field: bytes/str/message as length-delimited, float as fixed32, bool/int as varint."""
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, (bool, int)):
        return _varint(number << 3) + _varint(int(value))
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data

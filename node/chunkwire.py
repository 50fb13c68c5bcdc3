"""`TensorChunk` (layerlink.v1) encoded and decoded without protobuf's copies of the data.

Shipping moves every weight byte through one message type. The generated code copies a
4 MiB piece twice on each side (into the message, out of it); here the coordinator builds the
serialized message with one join and the node gets a zero-copy view of the data inside the
bytes gRPC delivered. The wire format is exactly protobuf's (proto3 field rules: default
values omitted; unknown fields skipped); tests/test_chunkwire.py checks both directions against
the generated code. Only PushTensors uses this; every other message goes through protobuf.

    field 1 sha256 (string, wire type 2), field 2 offset (uint64, wire type 0),
    field 3 data (bytes, wire type 2)
"""

from __future__ import annotations

from dataclasses import dataclass

METHOD = "/layerlink.v1.Node/PushTensors"
SERVICE = "layerlink.v1.Node"


class ChunkDecodeError(ValueError):
    pass


@dataclass(frozen=True)
class RawChunk:
    """A decoded TensorChunk; `data` is a view into the received message."""

    sha256: str
    offset: int
    data: memoryview


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ChunkDecodeError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def encode_chunk(sha256: str, offset: int, data: bytes) -> bytes:
    """The serialized TensorChunk (byte-identical to the generated SerializeToString)."""
    sha = sha256.encode()
    head = bytearray()
    if sha:
        head += b"\x0a" + _varint(len(sha)) + sha
    if offset:
        head += b"\x10" + _varint(offset)
    if not data:
        return bytes(head)
    head += b"\x1a" + _varint(len(data))
    return b"".join((head, data))


def decode_chunk(raw: bytes) -> RawChunk:
    """Parse a serialized TensorChunk; the data is not copied."""
    view = memoryview(raw)
    pos = offset = 0
    sha = ""
    data = view[0:0]
    while pos < len(raw):
        key, pos = _read_varint(raw, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(raw, pos)
            if field == 2:
                offset = value
        elif wire == 2:
            n, pos = _read_varint(raw, pos)
            if pos + n > len(raw):
                raise ChunkDecodeError("length-delimited field runs past the message")
            if field == 1:
                try:
                    sha = bytes(view[pos : pos + n]).decode()
                except UnicodeDecodeError:
                    raise ChunkDecodeError("sha256 is not UTF-8") from None
            elif field == 3:
                data = view[pos : pos + n]
            pos += n
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ChunkDecodeError(f"unsupported wire type {wire}")
    if pos != len(raw):
        raise ChunkDecodeError("message ends inside a field")
    return RawChunk(sha, offset, data)

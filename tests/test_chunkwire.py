"""node/chunkwire.py speaks exactly protobuf's TensorChunk, both ways."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node._proto.layerlink.v1 import node_pb2 as pb
from node.chunkwire import ChunkDecodeError, decode_chunk, encode_chunk

shas = st.text(alphabet="0123456789abcdef", max_size=64)
offsets = st.integers(min_value=0, max_value=(1 << 64) - 1)


@given(shas, offsets, st.binary(max_size=4096))
def test_encode_is_byte_identical_to_protobuf(sha: str, offset: int, data: bytes) -> None:
    want = pb.TensorChunk(sha256=sha, offset=offset, data=data).SerializeToString()
    assert encode_chunk(sha, offset, data) == want


@given(shas, offsets, st.binary(max_size=4096))
def test_decode_reads_what_protobuf_writes(sha: str, offset: int, data: bytes) -> None:
    raw = pb.TensorChunk(sha256=sha, offset=offset, data=data).SerializeToString()
    got = decode_chunk(raw)
    assert (got.sha256, got.offset, bytes(got.data)) == (sha, offset, data)


def test_decode_skips_unknown_fields_and_does_not_copy() -> None:
    data = os.urandom(1 << 20)
    raw = encode_chunk("ab" * 32, 7, data)
    # Unknown fields a newer peer might add: varint 9, fixed64 10, bytes 11, fixed32 12.
    raw += b"\x48\x05" + b"\x51" + bytes(8) + b"\x5a\x03xyz" + b"\x65" + bytes(4)
    got = decode_chunk(raw)
    assert (got.sha256, got.offset, bytes(got.data)) == ("ab" * 32, 7, data)
    assert got.data.obj is raw  # a view into the received message


@pytest.mark.parametrize(
    "raw",
    [b"\x1a\x05abc", b"\x0a", b"\x10\xff", b"\x0b", b"\x1a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"],
)
def test_malformed_messages_are_refused(raw: bytes) -> None:
    with pytest.raises(ChunkDecodeError):
        decode_chunk(raw)

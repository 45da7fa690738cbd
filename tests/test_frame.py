from __future__ import annotations

import contextlib
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncdb.transport.errors import DecodeError, MessageTooLarge
from asyncdb.transport.frame import (
    ALIGN,
    HEADER,
    MAGIC,
    VERSION,
    FrameDecoder,
    encode_frame,
    parse_frame,
)

DTYPES = ["?", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8", "c8", "c16"]


def sample_arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.standard_normal((3, 5)).astype(np.float32),
        np.arange(7, dtype=np.int64),
        np.zeros((0, 4), np.float64),
        np.array(3.5),
        rng.standard_normal((4, 6)).astype(">f8"),  # big-endian travels as little
        np.asfortranarray(rng.standard_normal((5, 3))),  # not C-contiguous
    ]


def test_round_trip_keeps_values_shapes_and_alignment():
    arrays = sample_arrays()
    data = encode_frame(7, b'{"x":1}', arrays, flags=3).to_bytes()
    frame = parse_frame(data)
    assert (frame.kind, frame.flags, frame.meta) == (7, 3, b'{"x":1}')
    assert len(frame.arrays) == len(arrays)
    for got, want in zip(frame.arrays, arrays, strict=True):
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype.newbyteorder("<")
        offset = got.__array_interface__["data"][0] - np.frombuffer(data, np.uint8).ctypes.data
        assert want.size == 0 or offset % ALIGN == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_numeric_dtype_travels(dtype):
    arr = (np.arange(12) % 2).astype(dtype).reshape(3, 4)
    (got,) = parse_frame(encode_frame(1, b"", [arr]).to_bytes()).arrays
    np.testing.assert_array_equal(got, arr)


@pytest.mark.parametrize("bad", [np.array(["a"]), np.array([object()]),
                                 np.zeros(2, dtype=[("a", "f4")])])
def test_non_numeric_arrays_are_refused(bad):
    with pytest.raises(TypeError):
        encode_frame(1, b"", [bad])


def test_pieces_and_copy_range_reassemble_the_frame():
    out = encode_frame(2, b"meta", sample_arrays())
    whole = out.to_bytes()
    assert b"".join(bytes(p) for p in out.pieces(100, small=8)) == whole
    part = bytearray(300)
    out.copy_range(50, 350, memoryview(part))
    assert bytes(part) == whole[50:350]


def test_decoder_fed_one_byte_at_a_time():
    frames = [encode_frame(k, b"m%d" % k, sample_arrays()[: k % 4]).to_bytes()
              for k in range(1, 6)]
    stream = b"".join(frames)
    decoder = FrameDecoder()
    got = []
    for i in range(len(stream)):
        got += decoder.feed(stream[i : i + 1])
    assert [f.kind for f in got] == [1, 2, 3, 4, 5]
    assert decoder.buffered == 0
    np.testing.assert_array_equal(got[2].arrays[1], sample_arrays()[1])


def header(kind=1, flags=0, n_arrays=0, meta_len=0, total=None, magic=MAGIC,
           version=VERSION) -> bytes:
    total = HEADER.size + meta_len if total is None else total
    return HEADER.pack(magic, version, kind, flags, n_arrays, meta_len, total)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"AD", "truncated header"),
        (header(magic=b"XX"), "bad magic"),
        (header(version=9), "unsupported frame version"),
        (header(kind=0), "kind 0"),
        (header(n_arrays=60000), "arrays"),
        (header(meta_len=10, total=25) + b"12345", "shorter than its header"),
        (header(meta_len=4, total=HEADER.size + 4) + b"ab", "were given"),
        (header(n_arrays=1, total=HEADER.size + 2) + struct.pack("<BB", 99, 0), "dtype code"),
        (header(n_arrays=1, total=HEADER.size + 2) + struct.pack("<BB", 11, 40), "dimensions"),
        (header(n_arrays=1, total=HEADER.size + 2) + struct.pack("<BB", 11, 1), "truncated"),
        (header(n_arrays=1, total=HEADER.size + 10) + struct.pack("<BBQ", 11, 1, 1 << 40),
         "runs past"),
        (header(meta_len=2, total=HEADER.size + 3) + b"abc", "does not match"),
    ],
)
def test_malformed_frames_raise_decode_error_with_a_reason(data, reason):
    with pytest.raises(DecodeError, match=reason):
        parse_frame(data)


def test_oversized_frame_is_refused_before_buffering():
    decoder = FrameDecoder(max_frame_bytes=1000)
    with pytest.raises(MessageTooLarge):
        decoder.feed(header(meta_len=0, total=1 << 30))
    with pytest.raises(DecodeError, match="already failed"):
        decoder.feed(b"more")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_random_bytes_only_ever_raise_decode_error(data):
    decoder = FrameDecoder(max_frame_bytes=1 << 16)
    with contextlib.suppress(DecodeError):
        decoder.feed(data)
    with contextlib.suppress(DecodeError):
        parse_frame(data)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 255), st.integers(1, 3))
def test_fuzz_mutated_valid_frames(position, value, cut):
    data = bytearray(encode_frame(4, b'{"a":[1,2]}', sample_arrays()[:3]).to_bytes())
    data[position % len(data)] = value
    for candidate in (bytes(data), bytes(data[: len(data) // cut])):
        try:
            frame = parse_frame(candidate)
        except DecodeError:
            continue
        for arr in frame.arrays:
            with np.errstate(all="ignore"):  # mutated bytes may well be NaN
                arr.sum()  # whatever parses must be readable without a crash

from __future__ import annotations

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


def _feed_in_chunks(data: bytes, cuts: list[int]) -> list:
    """Feed `data` to a fresh FrameDecoder split at `cuts`; frames out, or DecodeError."""
    decoder = FrameDecoder(max_frame_bytes=1 << 16)
    frames, last = [], 0
    for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
        frames += decoder.feed(data[last:cut])
        last = max(last, cut)
    return frames


def _same_frame(a, b) -> None:
    assert (a.kind, a.flags, a.meta) == (b.kind, b.flags, b.meta)
    assert len(a.arrays) == len(b.arrays)
    for x, y in zip(a.arrays, b.arrays, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def _parse_and_decoder_agree(data: bytes, cuts: list[int]) -> None:
    """The whole-frame parser and the incremental decoder, fed the same bytes in
    pieces, agree: both give the same frame, or both refuse it (the decoder may also
    still be waiting for the rest). Nothing but DecodeError ever escapes."""
    try:
        want = parse_frame(data, 1 << 16)
    except DecodeError:
        want = None
    try:
        got = _feed_in_chunks(data, cuts)
    except DecodeError:
        got = None
    if want is None:
        assert not got  # refused, or still waiting for bytes that never come
        return
    assert got is not None and len(got) == 1
    _same_frame(got[0], want)
    for arr in got[0].arrays:
        with np.errstate(all="ignore"):  # mutated bytes may well be NaN
            arr.sum()  # whatever parses must be readable without a crash


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=4))
def test_fuzz_random_bytes_only_ever_raise_decode_error(data, cuts):
    _parse_and_decoder_agree(data, cuts)


@settings(max_examples=400, deadline=None)
@given(st.integers(1, 255), st.integers(0, 3), st.integers(0, 4), st.integers(0, 400),
       st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=4))
def test_fuzz_random_bytes_behind_a_valid_header_prefix(kind, flags, n_arrays, meta_len,
                                                        rest, cuts):
    """Random bodies behind a header that passes the magic and version checks, so the
    fuzz reaches the table, metadata and buffer checks."""
    total = HEADER.size + len(rest)
    data = header(kind, flags, n_arrays, min(meta_len, len(rest)), total) + rest
    _parse_and_decoder_agree(data, cuts)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1,
                max_size=3),
       st.integers(1, 3), st.lists(st.integers(0, 10_000), max_size=4))
def test_fuzz_mutated_valid_frames(mutations, cut, cuts):
    data = bytearray(encode_frame(4, b'{"a":[1,2]}', sample_arrays()[:3]).to_bytes())
    for position, value in mutations:
        data[position % len(data)] = value
    for candidate in (bytes(data), bytes(data[: len(data) // cut])):
        _parse_and_decoder_agree(candidate, cuts)


def test_unmutated_frames_pass_the_agreement_check():
    data = encode_frame(4, b'{"a":[1,2]}', sample_arrays()[:3]).to_bytes()
    frames = _feed_in_chunks(data, [1, 7, 50, 200])
    assert len(frames) == 1
    _same_frame(frames[0], parse_frame(data))


def test_the_small_frame_fast_path_agrees_with_parse_frame():
    from asyncdb.transport.frame import parse_plain

    wire = b"\0" * 7 + encode_frame(3, b'["x",1,2]').to_bytes() + b"tail"
    fast = parse_plain(wire, 7, len(wire) - 11)
    full = parse_frame(wire[7:-4])
    assert fast is not None
    assert (fast.kind, fast.flags, fast.meta, fast.arrays) == (
        full.kind, full.flags, full.meta, full.arrays) == (3, 0, b'["x",1,2]', [])
    with_array = encode_frame(3, b"m", [np.zeros(3, np.float32)]).to_bytes()
    assert parse_plain(with_array, 0, len(with_array)) is None  # the general path's job
    good = encode_frame(3, b"meta").to_bytes()
    for bad in (b"XX" + good[2:], good[:-1], good[:10]):
        assert parse_plain(bad, 0, len(bad)) is None  # parse_frame says what is wrong
    assert parse_plain(good, 0, len(good), max_bytes=len(good) - 1) is None

"""One frame format for every transport, and an I/O-free decoder for it.

Layout (little-endian, every offset relative to the frame's first byte):

    header   20 bytes  magic b"AD", version u8, kind u8, flags u16, n_arrays u16,
                       meta_len u32, total_len u64
    table    per array: dtype code u8, ndim u8, then ndim dims as u64
    meta     meta_len bytes, opaque here (the layer above puts JSON in it)
    buffers  each array's raw C-order bytes, each starting on a 64-byte boundary

An array whose dtype code has the EXTERNAL bit set carries no bytes: its buffer is a
REF_BYTES reference, written and resolved by a transport that can reach the memory it
names (the shared-memory ring, for arrays in shared memory). A decoder given no
resolver rejects such frames.

`encode_frame` copies nothing: it returns an `OutFrame` that knows where each piece
goes, and a transport copies the pieces once, straight into its ring or socket buffer.
`parse_frame` reads a complete frame in place; `FrameDecoder` is fed bytes as they
arrive and returns whole frames. Neither does I/O, and every malformed input raises
`DecodeError` with the reason.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import DecodeError, MessageTooLarge
from .pool import BufferPool

HEADER = struct.Struct("<2sBBHHIQ")
MAGIC = b"AD"
VERSION = 1
ALIGN = 64
MAX_ARRAYS = 4096
MAX_NDIM = 32
DEFAULT_MAX_FRAME_BYTES = 1 << 32

EXTERNAL = 0x80  # dtype code bit: the array's buffer is a reference, not its bytes
REF_BYTES = 32

_DIM = struct.Struct("<Q")
_TABLE_ENTRY = struct.Struct("<BB")
_ZEROS = bytes(ALIGN)
_MAX_EXTENT = 1 << 62  # numpy refuses shapes whose extent reaches this, even if empty

# Only plain numeric dtypes travel; object arrays would be pickle by another name.
_DTYPES: tuple[np.dtype[np.generic], ...] = tuple(
    np.dtype(t).newbyteorder("<")
    for t in (
        "?", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8", "c8", "c16",
    )
)
_CODES: dict[np.dtype[np.generic], int] = {dt: i for i, dt in enumerate(_DTYPES)}


def align(n: int) -> int:
    """Round n up to the frame alignment (64 bytes, one cache line)."""
    return (n + ALIGN - 1) & ~(ALIGN - 1)


@dataclass(slots=True)
class Frame:
    """A decoded frame; `meta` is always a private copy. `borrowed` frames' arrays are
    views into the transport's own buffer (a shared-memory ring), which is reused once
    they are all gone: copy them to keep them for long."""

    kind: int
    flags: int
    meta: bytes
    arrays: list[np.ndarray]
    borrowed: bool = False
    external: tuple[int, ...] = ()  # indices of arrays resolved from references


Resolver = Callable[[memoryview, np.dtype[np.generic], tuple[int, ...]], np.ndarray]


class OutFrame:
    """An encoded frame whose pieces have not been copied yet.

    `segments` are (offset, bytes-like) pairs in increasing offset order; the gaps
    between them are alignment padding and read as zeros. `meta` and `arrays` (as laid
    out, contiguous and little-endian) let a transport lay the frame out again with
    some arrays sent as references (`encode_frame(..., refs=...)`).
    """

    __slots__ = ("arrays", "flags", "kind", "meta", "nbytes", "segments")

    def __init__(self, kind: int, flags: int, segments: list[tuple[int, memoryview]],
                 nbytes: int, meta: bytes = b"", arrays: Sequence[np.ndarray] = ()):
        self.kind = kind
        self.flags = flags
        self.segments = segments
        self.nbytes = nbytes
        self.meta = meta
        self.arrays = arrays

    def copy_range(self, start: int, stop: int, dest: memoryview) -> None:
        """Write bytes [start, stop) of the frame into dest[0 : stop - start]."""
        pos = start
        for seg_start, seg in self.segments:
            seg_end = seg_start + len(seg)
            if seg_end <= pos:
                continue
            if seg_start >= stop:
                break
            if seg_start > pos:
                dest[pos - start : seg_start - start] = _ZEROS[: seg_start - pos]
                pos = seg_start
            hi = min(stop, seg_end)
            dest[pos - start : hi - start] = seg[pos - seg_start : hi - seg_start]
            pos = hi
        if pos < stop:
            dest[pos - start : stop - start] = _ZEROS[: stop - pos]

    def write_into(self, dest: memoryview) -> None:
        """Copy the whole frame into dest, which must hold at least `nbytes`."""
        if len(self.segments) == 1 and len(self.segments[0][1]) == self.nbytes:
            dest[: self.nbytes] = self.segments[0][1]
        else:
            self.copy_range(0, self.nbytes, dest)

    def pieces(self, limit: int, small: int = 64 << 10) -> Iterator[bytes | memoryview]:
        """The frame as consecutive pieces of at most `limit` bytes, in order: large
        array buffers as zero-copy slices, everything else merged into small copies."""
        pending = bytearray()
        pos = 0
        for seg_start, seg in self.segments:
            if seg_start > pos:
                pending += _ZEROS[: seg_start - pos]
            pos = seg_start + len(seg)
            if len(seg) < small:
                pending += seg
                if len(pending) >= limit:
                    yield from (bytes(pending[i:i + limit]) for i in range(0, len(pending), limit))
                    pending = bytearray()
                continue
            if pending:
                yield bytes(pending)
                pending = bytearray()
            for i in range(0, len(seg), limit):
                yield seg[i:i + limit]
        if pos < self.nbytes:
            pending += _ZEROS[: self.nbytes - pos]
        if pending:
            yield bytes(pending)

    def to_bytes(self) -> bytes:
        if len(self.segments) == 1 and len(self.segments[0][1]) == self.nbytes:
            return bytes(self.segments[0][1])
        buf = bytearray(self.nbytes)
        self.write_into(memoryview(buf))
        return bytes(buf)


def _wire_array(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and not _little_endian()):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    return arr


def _little_endian() -> bool:
    return bool(np.little_endian)


def encode_frame(
    kind: int, meta: bytes, arrays: Sequence[np.ndarray] = (), flags: int = 0,
    refs: dict[int, bytes] | None = None,
) -> OutFrame:
    """Lay out a frame around `meta` and `arrays` without copying their contents.
    `refs` maps an array's index to the REF_BYTES reference sent in place of its bytes.

    Raises TypeError for an array whose dtype cannot travel (object, strings,
    structured) and ValueError for a kind outside 1..255 or too many arrays.
    """
    if not 0 < kind < 256:
        raise ValueError(f"frame kind must be in 1..255, got {kind}")
    if not arrays:
        total = HEADER.size + len(meta)
        head = HEADER.pack(MAGIC, VERSION, kind, flags, 0, len(meta), total)
        return OutFrame(kind, flags, [(0, memoryview(head + meta))], total, meta)
    if len(arrays) > MAX_ARRAYS:
        raise ValueError(f"a frame carries at most {MAX_ARRAYS} arrays, got {len(arrays)}")
    refs = refs or {}
    table = bytearray()
    wires: list[np.ndarray] = []
    for index, arr in enumerate(arrays):
        wire = _wire_array(arr)
        code = _CODES.get(wire.dtype.newbyteorder("<"))
        if code is None:
            raise TypeError(f"arrays of dtype {arr.dtype} cannot be sent; use a numeric dtype")
        if wire.ndim > MAX_NDIM:
            raise ValueError(f"arrays of more than {MAX_NDIM} dimensions cannot be sent")
        if index in refs:
            if len(refs[index]) != REF_BYTES:
                raise ValueError(f"an array reference is {REF_BYTES} bytes")
            code |= EXTERNAL
        table += _TABLE_ENTRY.pack(code, wire.ndim)
        for dim in wire.shape:
            table += _DIM.pack(dim)
        wires.append(wire)
    prefix_len = HEADER.size + len(table) + len(meta)
    offset = align(prefix_len)
    segments: list[tuple[int, memoryview]] = [(0, memoryview(b""))]
    for index, wire in enumerate(wires):
        ref = refs.get(index)
        if ref is not None:
            segments.append((offset, memoryview(ref)))
            offset = align(offset + REF_BYTES)
            continue
        if wire.nbytes:
            segments.append((offset, wire.reshape(-1).view(np.uint8).data))
        offset = align(offset + wire.nbytes)
    total = offset if wires else prefix_len
    header = HEADER.pack(MAGIC, VERSION, kind, flags, len(wires), len(meta), total)
    segments[0] = (0, memoryview(header + bytes(table) + meta))
    return OutFrame(kind, flags, segments, total, meta, wires)


def check_header(buf: bytes | bytearray | memoryview, max_bytes: int) -> int:
    """Validate a frame header; return the frame's total length."""
    if len(buf) < HEADER.size:
        raise DecodeError(f"truncated header: {len(buf)} of {HEADER.size} bytes")
    magic, version, kind, _flags, n_arrays, meta_len, total = HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise DecodeError(f"bad magic {bytes(magic)!r}: not an asyncdb frame")
    if version != VERSION:
        raise DecodeError(f"unsupported frame version {version} (this side speaks {VERSION})")
    if kind == 0:
        raise DecodeError("frame kind 0 is not used")
    if n_arrays > MAX_ARRAYS:
        raise DecodeError(f"frame declares {n_arrays} arrays, the limit is {MAX_ARRAYS}")
    if total > max_bytes:
        raise MessageTooLarge(f"frame of {total} bytes is over the {max_bytes}-byte limit")
    if total < HEADER.size + meta_len:
        raise DecodeError(f"frame length {total} is shorter than its header and metadata")
    return int(total)


def parse_plain(buf: bytes | bytearray | memoryview | mmap.mmap, offset: int, nbytes: int,
                max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Frame | None:
    """The small-frame fast path: the frame of `nbytes` at `offset` in `buf` if it is
    well-formed and carries no arrays (its metadata copied out), else None, and
    `parse_frame` (which says what is wrong) decides."""
    if nbytes < HEADER.size:
        return None
    magic, version, kind, flags, n_arrays, meta_len, total = HEADER.unpack_from(buf, offset)
    if (n_arrays or magic != MAGIC or version != VERSION or not kind or total != nbytes
            or total > max_bytes or HEADER.size + meta_len != total):
        return None
    start = offset + HEADER.size
    return Frame(kind, flags, bytes(buf[start : start + meta_len]), [])


def parse_frame(
    buf: bytes | bytearray | memoryview | np.ndarray,
    max_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    resolve: Resolver | None = None,
) -> Frame:
    """Decode one complete frame. Arrays are views into `buf` (no copy), so a caller
    that hands in a uint8 ndarray can track their lifetime through it.

    Arrays sent as references are handed to `resolve(reference, dtype, shape)`; every
    reference of the frame is offered to it even when one fails (so a transport can
    settle each), and the first DecodeError is raised after."""
    raw = buf.data if isinstance(buf, np.ndarray) else memoryview(buf)
    total = check_header(raw, max_bytes)
    if total != raw.nbytes:
        raise DecodeError(f"frame says {total} bytes but {raw.nbytes} were given")
    _magic, _version, kind, flags, n_arrays, meta_len, _total = HEADER.unpack_from(raw)
    pos = HEADER.size
    if not n_arrays:
        if HEADER.size + meta_len != total:
            raise DecodeError(f"frame length {total} does not match its contents "
                              f"({HEADER.size + meta_len})")
        return Frame(kind, flags, bytes(raw[pos : pos + meta_len]), [])
    specs: list[tuple[np.dtype[np.generic], tuple[int, ...], bool]] = []
    for index in range(n_arrays):
        if pos + _TABLE_ENTRY.size > total:
            raise DecodeError(f"array table truncated at entry {index}")
        code, ndim = _TABLE_ENTRY.unpack_from(raw, pos)
        pos += _TABLE_ENTRY.size
        external = bool(code & EXTERNAL)
        code &= ~EXTERNAL
        if external and resolve is None:
            raise DecodeError(f"array {index} is a reference to shared memory, which "
                              "this transport cannot reach")
        if code >= len(_DTYPES):
            raise DecodeError(f"array {index} has unknown dtype code {code}")
        if ndim > MAX_NDIM:
            raise DecodeError(f"array {index} has {ndim} dimensions, the limit is {MAX_NDIM}")
        if pos + ndim * _DIM.size > total:
            raise DecodeError(f"array table truncated in the shape of array {index}")
        shape = struct.unpack_from(f"<{ndim}Q", raw, pos)
        pos += ndim * _DIM.size
        specs.append((_DTYPES[code], shape, external))
    if pos + meta_len > total:
        raise DecodeError(f"metadata of {meta_len} bytes runs past the frame end")
    meta = bytes(raw[pos : pos + meta_len])
    pos += meta_len
    flat = buf if isinstance(buf, np.ndarray) else np.frombuffer(buf, np.uint8)
    arrays: list[np.ndarray] = []
    offset = align(pos)
    refs: list[tuple[int, memoryview, np.dtype[np.generic], tuple[int, ...]]] = []
    for index, (dtype, shape, external) in enumerate(specs):
        count, extent = 1, dtype.itemsize
        for dim in shape:
            count *= dim
            extent *= max(dim, 1)
        if extent >= _MAX_EXTENT:
            raise DecodeError(f"array {index} has an impossible shape {shape}")
        nbytes = REF_BYTES if external else count * dtype.itemsize
        if offset + nbytes > total:
            raise DecodeError(f"array {index} ({nbytes} bytes) runs past the frame end")
        if external:
            refs.append((index, raw[offset : offset + nbytes], dtype, shape))
            arrays.append(flat[:0])  # replaced below
        else:
            arrays.append(flat[offset : offset + nbytes].view(dtype).reshape(shape))
        offset = align(offset + nbytes)
    expected = offset if specs else pos
    if expected != total:
        raise DecodeError(f"frame length {total} does not match its contents ({expected})")
    if not refs:
        return Frame(kind, flags, meta, arrays)
    assert resolve is not None
    failure: DecodeError | None = None
    for index, ref, dtype, shape in refs:
        try:
            arrays[index] = resolve(ref, dtype, shape)
        except DecodeError as exc:
            failure = failure or exc
    if failure is not None:
        raise failure
    return Frame(kind, flags, meta, arrays, external=tuple(index for index, *_ in refs))


def array_spans(head: bytes | bytearray | memoryview | np.ndarray) -> list[tuple[int, int]] | None:
    """(offset, nbytes) of each array of the frame whose first bytes are `head`, or
    None while `head` does not yet hold the whole array table. No validation: the
    complete frame is still checked by `parse_frame`."""
    raw = head.data if isinstance(head, np.ndarray) else memoryview(head)
    if len(raw) < HEADER.size:
        return None
    _m, _v, _k, _f, n_arrays, meta_len, _t = HEADER.unpack_from(raw)
    pos, sizes = HEADER.size, []
    for _ in range(n_arrays):
        if pos + _TABLE_ENTRY.size > len(raw):
            return None
        code, ndim = _TABLE_ENTRY.unpack_from(raw, pos)
        pos += _TABLE_ENTRY.size
        if pos + ndim * _DIM.size > len(raw) or code & ~EXTERNAL >= len(_DTYPES):
            return None
        count = 1
        for dim in struct.unpack_from(f"<{ndim}Q", raw, pos):
            count *= dim
        pos += ndim * _DIM.size
        sizes.append(REF_BYTES if code & EXTERNAL
                     else count * _DTYPES[code & ~EXTERNAL].itemsize)
    spans, offset = [], align(pos + meta_len)
    for nbytes in sizes:
        spans.append((offset, nbytes))
        offset = align(offset + nbytes)
    return spans


class FrameDecoder:
    """Turns a byte stream into frames: `feed(bytes) -> list[Frame]`.

    A frame's bytes are copied once, into a buffer of the frame's own size; its arrays
    are views into that buffer. Where a fed `bytes` object (or a memoryview of one) is
    exactly one array's buffer (a sender that sends each array as a message of its
    own), that array is read from the object itself, read-only, with no copy. After a
    `DecodeError` the stream cannot be trusted to be in step, so every later `feed`
    raises again: close the connection.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 pool: BufferPool | None = None) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.pool = pool
        self._head = bytearray()
        self._body: np.ndarray | None = None
        self._filled = 0
        self._error: DecodeError | None = None
        self._spans: dict[int, int] | None = None  # array offset -> nbytes, once known
        self._adopted: dict[int, bytes | bytearray | memoryview] = {}
        self._data: bytes | bytearray | memoryview = b""

    @property
    def buffered(self) -> int:
        """Bytes held of a frame not yet complete."""
        return len(self._head) if self._body is None else self._filled

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        if self._error is not None:
            raise DecodeError(f"stream already failed: {self._error}")
        self._data = data
        try:
            return self._feed(memoryview(data).cast("B"))
        except DecodeError as exc:
            self._error = exc
            raise
        finally:
            self._data = b""  # adopted messages are referenced by their arrays alone

    def _feed(self, mv: memoryview) -> list[Frame]:
        frames: list[Frame] = []
        i, n = 0, len(mv)
        while i < n:
            if self._body is None:
                take = min(HEADER.size - len(self._head), n - i)
                self._head += mv[i : i + take]
                i += take
                if len(self._head) < HEADER.size:
                    break
                total = check_header(self._head, self.max_frame_bytes)
                self._body = (np.empty(total, np.uint8) if self.pool is None
                               else self.pool.take(total))
                self._body[: HEADER.size] = np.frombuffer(self._head, np.uint8)
                self._filled = HEADER.size
                self._head.clear()
                self._spans, self._adopted = None, {}
            body = self._body
            if self._spans is None:
                spans = array_spans(body[: self._filled])
                if spans is not None:
                    self._spans = dict(spans)
            if (i == 0 and _immutable(self._data) and self._spans
                    and self._spans.get(self._filled) == n):
                self._adopted[self._filled] = self._data  # the whole message is one array
                self._filled += n
                i = n
            else:
                take = min(len(body) - self._filled, n - i)
                body[self._filled : self._filled + take] = np.frombuffer(mv[i : i + take],
                                                                         np.uint8)
                self._filled += take
                i += take
            if self._filled == len(body):
                self._body = None
                frames.append(self._finish(body))
        return frames

    def _finish(self, body: np.ndarray) -> Frame:
        frame = parse_frame(body, self.max_frame_bytes)
        if self._adopted and self._spans is not None:
            for index, offset in enumerate(self._spans):
                data = self._adopted.get(offset)
                if data is not None:
                    old = frame.arrays[index]
                    frame.arrays[index] = np.frombuffer(data, old.dtype).reshape(old.shape)
        self._adopted = {}
        return frame


def _immutable(data: bytes | bytearray | memoryview) -> bool:
    """Whether `data` can never change under an array made on it."""
    return isinstance(data, bytes) or (isinstance(data, memoryview)
                                       and isinstance(data.obj, bytes))

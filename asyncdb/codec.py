"""Messages to frames and back.

A message is plain data: None, bool, int, float, str, lists, tuples (they arrive as
lists), dicts with str keys, numpy arrays, bytes and `ActorRef`s, nested freely.
The frame's metadata is JSON; arrays are replaced in it by {"__nd__": i} and travel as
the frame's raw buffers; refs become {"__ref__": [node, name]}. Nothing is pickled.

Those placeholder keys are reserved: a dict holding one of them, or a key that is not a
str (JSON would turn it into one silently), is refused with EncodeError, so whatever
encodes decodes to the same message.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from typing import Any

import numpy as np

from asyncdb.transport.frame import Frame, OutFrame, encode_frame

from .errors import DecodeError, EncodeError, MessageTooLarge

# Frame kinds between nodes.
TELL, ASK, REPLY, FAIL, HELLO, CREDIT = 1, 2, 3, 4, 5, 6
KINDS = {TELL: "tell", ASK: "ask", REPLY: "reply", FAIL: "fail", HELLO: "hello",
         CREDIT: "credit"}
# Metadata arity per kind: header fields plus the body.
_ARITY = {TELL: 2, ASK: 3, REPLY: 2, FAIL: 2, HELLO: 2, CREDIT: 2}
SPECIAL = 1  # frame flag: the metadata holds array, bytes or ref placeholders
RESERVED = frozenset({"__nd__", "__bytes__", "__ref__"})
_CONTAINERS = (dict, list, tuple)

class _Codec(threading.local):
    """Per-thread JSON encoder and decoder, built once: json.dumps and json.loads
    build a new one on every call that passes options."""

    def __init__(self) -> None:
        self.arrays: list[np.ndarray] = []
        self.special = False
        self.make_ref: Callable[[str, str], Any] | None = None
        self.plain = json.JSONEncoder(separators=(",", ":")).encode
        self.rich = json.JSONEncoder(separators=(",", ":"), default=self.default).encode
        self.decode_plain = json.JSONDecoder().decode
        self.scan_plain: Callable[[str, int], tuple[Any, int]] = (
            json.JSONDecoder().scan_once)  # type: ignore[attr-defined]
        self.decode_rich = json.JSONDecoder(object_hook=self.hook).decode

    def default(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            self.arrays.append(obj)
            return {"__nd__": len(self.arrays) - 1}
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, bytes | bytearray | memoryview):
            self.arrays.append(np.frombuffer(obj, np.uint8))
            return {"__bytes__": len(self.arrays) - 1}
        ref = getattr(obj, "__asyncdb_ref__", None)
        if ref is not None:
            return {"__ref__": ref()}
        raise EncodeError(
            f"cannot send a {type(obj).__name__}: messages hold plain data, numpy arrays, "
            "bytes and ActorRefs")

    def hook(self, obj: dict[str, Any]) -> Any:
        if len(obj) != 1:
            return obj
        if "__nd__" in obj:
            return _array(self.arrays, obj["__nd__"])
        if "__bytes__" in obj:
            return _array(self.arrays, obj["__bytes__"]).tobytes()
        if "__ref__" in obj:
            ref = obj["__ref__"]
            if (not isinstance(ref, list) or len(ref) != 2
                    or not all(isinstance(part, str) for part in ref)):
                raise DecodeError(f"malformed actor ref {ref!r}")
            assert self.make_ref is not None
            return self.make_ref(ref[0], ref[1])
        return obj


_codec = _Codec()


def _flat_json(doc: list[Any]) -> str | None:
    """`doc` as the plain encoder writes it, when it holds only str, int, finite float,
    bool and None (most headers and bodies), else None: no encoder call per message."""
    parts = []
    for item in doc:
        kind = type(item)
        if kind is str:
            parts.append(encode_basestring_ascii(item))
        elif kind is int:
            parts.append(int.__repr__(item))
        elif item is None:
            parts.append("null")
        elif kind is float and -math.inf < item < math.inf:
            parts.append(float.__repr__(item))
        elif kind is bool:
            parts.append("true" if item else "false")
        else:
            return None
    return "[" + ",".join(parts) + "]"


def _decode_plain(text: str) -> Any:
    """JSON without placeholders: the scanner straight away when the text is one
    value and nothing else (what encoders here write), else the full decoder."""
    try:
        value, end = _codec.scan_plain(text, 0)
    except StopIteration:
        return _codec.decode_plain(text)  # raises the decoder's own error
    return value if end == len(text) else _codec.decode_plain(text)


def encode_message(kind: int, header: list[Any], body: Any) -> OutFrame:
    """One frame carrying `header + [body]`; raises EncodeError for what cannot travel."""
    codec = _codec
    doc = [*header, body]
    if isinstance(body, _CONTAINERS):
        _check_keys(body)
        flat = None
    else:
        flat = _flat_json(doc)
    arrays: list[np.ndarray] = []
    try:
        meta = (codec.plain(doc) if flat is None else flat).encode()
        flags = 0
    except TypeError:  # holds arrays, bytes or refs: encode again, collecting them
        codec.arrays = arrays
        try:
            meta = codec.rich(doc).encode()
        except (TypeError, ValueError) as exc:
            if isinstance(exc, EncodeError):
                raise
            raise EncodeError(f"cannot encode message: {exc}") from exc
        finally:
            codec.arrays = []
        flags = SPECIAL
    except ValueError as exc:
        raise EncodeError(f"cannot encode message: {exc}") from exc
    try:
        return encode_frame(kind, meta, arrays, flags)
    except (TypeError, ValueError) as exc:
        raise EncodeError(str(exc)) from exc


def decode_message(frame: Frame, make_ref: Callable[[str, str], Any]) -> list[Any]:
    """The metadata list of `frame`, placeholders replaced; DecodeError if malformed."""
    arity = _ARITY.get(frame.kind)
    if arity is None:
        raise DecodeError(f"unknown message kind {frame.kind}")
    codec = _codec
    try:
        if frame.flags & SPECIAL:
            codec.arrays, codec.make_ref = frame.arrays, make_ref
            try:
                meta = codec.decode_rich(frame.meta.decode())
            finally:
                codec.arrays, codec.make_ref = [], None
        else:
            meta = _decode_plain(frame.meta.decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DecodeError(f"{KINDS[frame.kind]} metadata is not valid JSON: {exc}") from exc
    if not isinstance(meta, list) or len(meta) != arity:
        raise DecodeError(f"{KINDS[frame.kind]} metadata must be a list of {arity} items")
    return meta


def _check_keys(obj: dict[Any, Any] | list[Any] | tuple[Any, ...]) -> None:
    """Refuse dict keys that would not come back as sent: non-str keys and the
    reserved placeholder keys."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, str):
                raise EncodeError(f"dict keys must be str, got {type(key).__name__} {key!r}")
            if key in RESERVED:
                raise EncodeError(f"dict key {key!r} is reserved for the codec")
            if isinstance(value, _CONTAINERS):
                _check_keys(value)
    else:
        for value in obj:
            if isinstance(value, _CONTAINERS):
                _check_keys(value)


def local_copy(kind: int, header: list[Any], body: Any, max_bytes: int,
               make_ref: Callable[[str, str], Any]) -> Any:
    """`body` as a receiver in another process would get it: encoded (EncodeError or
    MessageTooLarge as a send would raise), its arrays copied, and decoded again."""
    out = encode_message(kind, header, body)
    if out.nbytes > max_bytes:
        raise MessageTooLarge(f"message of {out.nbytes} bytes is over the "
                              f"{max_bytes}-byte frame limit")
    frame = Frame(kind, out.flags, out.meta, [wire.copy() for wire in out.arrays])
    return decode_message(frame, make_ref)[-1]


def own_arrays(obj: Any) -> Any:
    """`obj` with every numpy array in it replaced by a private copy."""
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, list):
        return [own_arrays(item) for item in obj]
    if isinstance(obj, dict):
        return {key: own_arrays(value) for key, value in obj.items()}
    return obj


def _array(arrays: list[np.ndarray], index: Any) -> np.ndarray:
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(arrays):
        raise DecodeError(f"array placeholder {index!r} names no array of this frame")
    return arrays[index]

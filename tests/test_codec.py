from __future__ import annotations

import numpy as np
import pytest

from asyncdb import codec
from asyncdb.errors import DecodeError, EncodeError
from asyncdb.transport.frame import encode_frame, parse_frame


def round_trip(kind, header, body):
    frame = parse_frame(codec.encode_message(kind, header, body).to_bytes())
    return codec.decode_message(frame, lambda node, name: ("ref", node, name))


class FakeRef:
    def __asyncdb_ref__(self):
        return ["n1", "shard-0"]


def test_plain_data_round_trips_without_special_flag():
    body = {"op": "push", "n": 3, "x": 2.5, "ok": True, "none": None, "list": [1, "a"]}
    frame = codec.encode_message(codec.TELL, ["actor"], body)
    assert frame.flags == 0
    assert round_trip(codec.TELL, ["actor"], body) == ["actor", body]


def test_arrays_bytes_refs_and_numpy_scalars_nest_freely():
    grad = np.arange(6, dtype=np.float32).reshape(2, 3)
    body = {"grads": [grad, {"deep": grad * 2}], "raw": b"\x00\x01", "to": FakeRef(),
            "lr": np.float32(0.5), "tuple": (1, 2)}
    name, ask_id, got = round_trip(codec.ASK, ["a", 9], body)
    assert (name, ask_id) == ("a", 9)
    np.testing.assert_array_equal(got["grads"][0], grad)
    np.testing.assert_array_equal(got["grads"][1]["deep"], grad * 2)
    assert got["raw"] == b"\x00\x01"
    assert got["to"] == ("ref", "n1", "shard-0")
    assert got["lr"] == 0.5 and got["tuple"] == [1, 2]


@pytest.mark.parametrize("bad", [object(), {1, 2}, np.array([object()])])
def test_unsendable_objects_raise_encode_error(bad):
    with pytest.raises(EncodeError):
        codec.encode_message(codec.TELL, ["a"], {"x": bad})


@pytest.mark.parametrize(
    ("kind", "meta", "flags", "reason"),
    [
        (codec.TELL, b"not json", 0, "not valid JSON"),
        (codec.TELL, b"\xff\xfe", 0, "not valid JSON"),
        (codec.TELL, b'{"a":1}', 0, "must be a list"),
        (codec.ASK, b'["a",1]', 0, "list of 3"),
        (codec.TELL, b'["a",{"__nd__":5}]', codec.SPECIAL, "names no array"),
        (codec.TELL, b'["a",{"__ref__":[1]}]', codec.SPECIAL, "malformed actor ref"),
        (99, b"[]", 0, "unknown message kind"),
    ],
)
def test_malformed_metadata_raises_decode_error(kind, meta, flags, reason):
    frame = parse_frame(encode_frame(kind, meta, [], flags).to_bytes())
    with pytest.raises(DecodeError, match=reason):
        codec.decode_message(frame, lambda node, name: None)


def test_own_arrays_copies_every_array():
    arr = np.ones(3)
    got = codec.own_arrays({"a": [arr, {"b": arr}], "c": 1})
    assert got["a"][0] is not arr and not np.shares_memory(got["a"][1]["b"], arr)
    np.testing.assert_array_equal(got["a"][0], arr)

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

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


RESERVED_TRAPS = [
    {"__nd__": 0}, {"__bytes__": 0}, {"__ref__": ["n", "a"]}, {"x": [{"__nd__": 0}]},
]


@pytest.mark.parametrize("trap", RESERVED_TRAPS)
@pytest.mark.parametrize("with_array", [False, True])
def test_reserved_keys_are_refused_not_misread(trap, with_array):
    body = {"user": trap, "grad": np.ones(2, np.float32) if with_array else None}
    with pytest.raises(EncodeError, match="reserved"):
        codec.encode_message(codec.TELL, ["a"], body)


@pytest.mark.parametrize("key", [1, 2.5, None, True, ("a", 1)])
def test_non_string_keys_are_refused(key):
    with pytest.raises(EncodeError, match="keys must be str"):
        codec.encode_message(codec.TELL, ["a"], {"outer": [{key: 1}]})


# -- property-based round trips ---------------------------------------------------

_keys = st.text(max_size=12).filter(lambda k: k not in codec.RESERVED)
_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
            | st.floats(allow_nan=False) | st.text(max_size=20))
_arrays = hnp.arrays(st.sampled_from([np.float32, np.float64, np.int64, np.uint8, np.bool_]),
                     hnp.array_shapes(min_dims=0, max_dims=3, max_side=4))
_leaves = _scalars | _arrays | st.binary(max_size=16) | st.builds(FakeRef)


def _plain_data(leaves):
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                        | st.tuples(inner, inner)
                        | st.dictionaries(_keys, inner, max_size=4), max_leaves=20)


def _expected(obj):
    """What a message looks like after the trip: tuples arrive as lists, refs as
    whatever make_ref builds."""
    if isinstance(obj, list | tuple):
        return [_expected(item) for item in obj]
    if isinstance(obj, dict):
        return {key: _expected(value) for key, value in obj.items()}
    if isinstance(obj, FakeRef):
        return ("ref", "n1", "shard-0")
    return obj


def _assert_same(got, want):
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype
        assert got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            _assert_same(g, w)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys()
        for key in want:
            _assert_same(got[key], want[key])
    else:
        assert type(got) is type(want) and got == want


@settings(max_examples=300, deadline=None)
@given(_plain_data(_scalars))
def test_plain_data_round_trips_exactly(body):
    _assert_same(round_trip(codec.TELL, ["actor"], body)[1], _expected(body))


@settings(max_examples=300, deadline=None)
@given(_plain_data(_leaves), st.integers(0, 2**53))
def test_nested_arrays_bytes_and_refs_round_trip_exactly(body, ask_id):
    name, got_id, got = round_trip(codec.ASK, ["actor", ask_id], body)
    assert (name, got_id) == ("actor", ask_id)
    _assert_same(got, _expected(body))


# -- fuzzing the decoder ------------------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["__nd__", "__bytes__", "__ref__", "op", "a"]) | st.text(max_size=4),
        inner, max_size=3),
    max_leaves=12)


def _decode_only_raises_decode_error(kind, meta, flags, arrays):
    frame = parse_frame(encode_frame(kind, meta, arrays, flags).to_bytes())
    try:
        meta_list = codec.decode_message(frame, lambda node, name: ("ref", node, name))
    except DecodeError:
        return None
    assert isinstance(meta_list, list)
    return meta_list


@settings(max_examples=400, deadline=None)
@given(st.integers(1, 9), st.binary(max_size=64), st.sampled_from([0, codec.SPECIAL]))
def test_fuzz_decode_message_random_metadata(kind, meta, flags):
    _decode_only_raises_decode_error(kind, meta, flags, [np.arange(3, dtype=np.int32)])


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(codec.KINDS)), st.lists(_json_values, max_size=4),
       st.sampled_from([0, codec.SPECIAL]))
def test_fuzz_decode_message_structured_metadata(kind, items, flags):
    meta = json.dumps(items).encode()
    got = _decode_only_raises_decode_error(kind, meta, flags, [np.arange(3, dtype=np.int32)])
    if got is not None:
        assert len(got) == len(items)  # whatever decodes keeps the frame's shape


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), st.booleans(), st.integers(), st.text(),
                 st.floats(allow_nan=True, allow_infinity=True)), st.integers(0, 2**53))
def test_scalar_messages_encode_as_the_json_encoder_writes_them(body, ask_id):
    meta = codec.encode_message(codec.ASK, ["actor\u00e9\"", ask_id], body).meta
    assert meta == json.dumps(["actor\u00e9\"", ask_id, body], separators=(",", ":")).encode()


@pytest.mark.parametrize(("meta", "want"), [
    (b' ["a", 1] ', ["a", 1]),  # whitespace: not what we write, still JSON
    (b'["a",NaN]', ["a", float("nan")]),
])
def test_plain_metadata_decodes_as_json_does(meta, want):
    frame = parse_frame(encode_frame(codec.TELL, meta, []).to_bytes())
    got = codec.decode_message(frame, lambda node, name: None)
    assert json.dumps(got) == json.dumps(want)


def test_trailing_bytes_after_the_metadata_are_a_decode_error():
    frame = parse_frame(encode_frame(codec.TELL, b'["a",1] x', []).to_bytes())
    with pytest.raises(DecodeError, match="not valid JSON"):
        codec.decode_message(frame, lambda node, name: None)

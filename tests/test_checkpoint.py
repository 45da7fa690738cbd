import numpy as np
import pytest

from asyncdb import CheckpointError, CheckpointStore
from asyncdb.checkpoint import MAGIC, read_checkpoint


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"values": rng.standard_normal(1000).astype(np.float32),
            "accum": rng.random(1000).astype(np.float32)}


def test_round_trip_keeps_arrays_and_meta(tmp_path):
    store = CheckpointStore(tmp_path)
    arrays = _arrays(0)
    store.save("shard-0", arrays, {"version": 17, "optimizer": {"rule": "adagrad"}})
    loaded, meta = store.load("shard-0")
    assert meta == {"version": 17, "optimizer": {"rule": "adagrad"}}
    assert set(loaded) == {"values", "accum"}
    for name, array in arrays.items():
        np.testing.assert_array_equal(loaded[name], array)
        assert loaded[name].dtype == np.float32


def test_newest_wins_and_only_keep_files_remain(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for version in range(5):
        store.save("shard-1", _arrays(version), {"version": version})
    assert store.load("shard-1")[1]["version"] == 4
    assert len(list(tmp_path.glob("shard-1.*.ckpt"))) == 2
    assert not list(tmp_path.glob("*.tmp"))
    assert store.names() == ["shard-1"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "magic"])
def test_corrupt_newest_falls_back_to_previous(tmp_path, damage, caplog):
    store = CheckpointStore(tmp_path)
    store.save("shard-0", _arrays(1), {"version": 1})
    newest = store.save("shard-0", _arrays(2), {"version": 2})
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-100] ^= 0xFF
    else:
        data[:len(MAGIC)] = b"XXXXXXXX"
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        read_checkpoint(newest)
    arrays, meta = store.load("shard-0")
    assert meta["version"] == 1
    np.testing.assert_array_equal(arrays["values"], _arrays(1)["values"])
    assert "unusable" in caplog.text


def test_every_file_corrupt_or_none_is_a_clear_error(tmp_path):
    store = CheckpointStore(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        store.load("shard-0")
    path = store.save("shard-0", _arrays(0), {"version": 0})
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="unusable"):
        store.load("shard-0")


def test_names_cannot_escape_the_directory(tmp_path):
    store = CheckpointStore(tmp_path / "ck")
    with pytest.raises(CheckpointError):
        store.save("../evil", _arrays(0), {})

from __future__ import annotations

import json

import numpy as np
import pytest

import asyncdb
from asyncdb.models import MLP
from asyncdb.runs import unique_dir


def blobs(n=400, features=6, classes=3, seed=1):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.normal(size=(n, features)) + 4 * y[:, None] + 50  # far from standardized
    return x, y


@pytest.fixture(scope="module")
def trained():
    x, y = blobs()
    data = asyncdb.datasets.from_arrays(x, y, name="blobs")

    async def train():
        # evaluations every 5 ms: the run (about 50 ms here) makes several before the last
        async with asyncdb.Cluster.inproc(shards=2, replicas=2) as cluster:
            return await cluster.train(MLP([6, 16, 3]), data, epochs=15, eval_every=0.005)

    return x, y, data, asyncdb.run(train())


async def test_a_run_directory_gives_back_the_model(tmp_path, trained):
    x, y, data, run = trained
    directory = run.save(tmp_path / "run")
    assert {p.name for p in directory.iterdir()} == {
        "history.json", "params.npz", "model.json", "options.json"}
    saved = asyncdb.load(directory)
    model, params = saved
    assert model == MLP([6, 16, 3]) and set(params) == set(run.params)
    for name, value in run.params.items():
        np.testing.assert_array_equal(params[name], value)
    # predict takes raw rows: the saved standardization is applied first
    np.testing.assert_array_equal(saved.predict(x),
                                  model.predict(params, data.preprocessing.apply(x)))
    result = saved.evaluate(x, y)
    assert result["accuracy"] > 0.9 and result["loss"] < 0.5
    assert saved.version == asyncdb.__version__
    options = json.loads((directory / "options.json").read_text())
    assert options["epochs"] == 15 and options["replicas"] == 2
    assert options["algorithm"]["batch_size"] == 32
    assert options["optimizer"]["initial_accumulator"] == 0.1
    assert options["asyncdb_version"] == asyncdb.__version__


async def test_final_reports_test_accuracy_and_evaluations_use_validation(trained):
    _, _, data, run = trained
    assert len(run.history) >= 2
    for entry in run.history[:-1]:
        assert "test_accuracy" not in entry and 0 <= entry["val_accuracy"] <= 1
    model = MLP([6, 16, 3])
    assert run.final["test_accuracy"] == pytest.approx(
        model.accuracy(run.params, data.x_test, data.y_test))
    assert run.final["val_accuracy"] == pytest.approx(
        model.accuracy(run.params, data.x_val, data.y_val))


async def test_a_json_path_keeps_the_history_file(tmp_path, trained):
    run = trained[3]
    path = run.save(tmp_path / "h.json")
    saved = json.loads(path.read_text())
    assert saved["history"] == json.loads(json.dumps(run.history))
    assert saved["config"]["eval_every"] == 0.005


def test_saved_models_refuse_wrong_rows(tmp_path, trained):
    saved = asyncdb.load(trained[3].save(tmp_path / "r"))
    with pytest.raises(asyncdb.ConfigError, match="6 features"):
        saved.predict(np.zeros((2, 5)))
    with pytest.raises(asyncdb.ConfigError, match=r"labels must be integers 0\.\.2"):
        saved.evaluate(np.zeros((2, 6)), [0, 3])
    (tmp_path / "r" / "params.npz").unlink()
    with pytest.raises(asyncdb.ConfigError, match=r"params\.npz is missing"):
        asyncdb.load(tmp_path / "r")


def test_run_directories_never_collide(tmp_path):
    made = {unique_dir(tmp_path) for _ in range(20)}
    assert len(made) == 20 and all(p.is_dir() for p in made)


async def test_a_model_that_does_not_fit_the_data_is_refused_before_spawning():
    x, y = blobs()
    data = asyncdb.datasets.from_arrays(x, y)
    async with asyncdb.Cluster.inproc() as cluster:
        with pytest.raises(asyncdb.ConfigError, match="takes 64 features"):
            await cluster.train(MLP([64, 3]), data)
        with pytest.raises(asyncdb.ConfigError, match="2 outputs"):
            await cluster.train(MLP([6, 2]), data)
        assert cluster.node is not None and not cluster.node.actors()

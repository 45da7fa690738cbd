from __future__ import annotations

import numpy as np
import pytest
from numerics import worst_gradient_error

from asyncdb.models import MLP, Model, SoftmaxRegression


def finite_difference_check(model: Model, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    params = {k: v.astype(np.float64) for k, v in model.init_params(rng).items()}
    for v in params.values():
        v += rng.standard_normal(v.shape) * 0.1  # non-zero biases too
    n_in = model.param_shapes()["W0"][0]
    n_out = list(model.param_shapes().values())[-1][0]
    x = rng.standard_normal((7, n_in))
    y = rng.integers(0, n_out, 7)
    return worst_gradient_error(model, params, x, y)


@pytest.mark.parametrize("model", [MLP([6, 5, 4, 3]), MLP([4, 3]), SoftmaxRegression(5, 4)])
def test_gradients_match_finite_differences(model):
    assert finite_difference_check(model) < 1e-6


def test_loss_is_mean_cross_entropy_and_names_follow_the_layout():
    model = MLP([3, 2])
    assert list(model.param_shapes()) == ["W0", "b0"]
    assert model.param_shapes()["W0"] == (3, 2)
    params = {"W0": np.zeros((3, 2), np.float32), "b0": np.zeros(2, np.float32)}
    loss, _ = model.loss_and_grad(params, np.ones((4, 3)), np.array([0, 1, 0, 1]))
    assert loss == pytest.approx(np.log(2), rel=1e-6)


def test_gradients_written_into_given_buffers():
    model = MLP([8, 6, 3])
    rng = np.random.default_rng(1)
    params = model.init_params(rng)
    flat = np.zeros(model.num_params(), np.float32)
    views, start = {}, 0
    for name, shape in model.param_shapes().items():
        size = int(np.prod(shape))
        views[name] = flat[start:start + size].reshape(shape)
        start += size
    x, y = rng.standard_normal((5, 8)), rng.integers(0, 3, 5)
    _, grads = model.loss_and_grad(params, x, y, views)
    assert grads is views and np.abs(flat).sum() > 0
    _, fresh = model.loss_and_grad(params, x, y)
    for name in views:
        np.testing.assert_allclose(views[name], fresh[name], rtol=1e-6)


def test_config_round_trip_and_predict():
    model = MLP([4, 7, 3])
    assert Model.from_config(model.to_config()) == model
    assert Model.from_config(SoftmaxRegression(4, 2).to_config()).sizes == [4, 2]
    params = model.init_params(np.random.default_rng(2))
    x = np.random.default_rng(3).standard_normal((10, 4))
    assert model.predict(params, x).shape == (10,)
    assert 0.0 <= model.accuracy(params, x, np.zeros(10, int)) <= 1.0
    with pytest.raises(ValueError):
        Model.from_config({"type": "Nope"})
    with pytest.raises(ValueError):
        MLP([5])


def test_training_reduces_loss():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((256, 10)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int)
    model = MLP([10, 16, 2])
    params = model.init_params(rng)
    first, grads = model.loss_and_grad(params, x, y)
    for _ in range(200):
        loss, grads = model.loss_and_grad(params, x, y, grads)
        for name in params:
            params[name] -= 0.5 * grads[name]
    assert loss < first / 4
    assert model.accuracy(params, x, y) > 0.95


@pytest.mark.parametrize("model", [MLP([6, 5, 3], l2=0.3), SoftmaxRegression(5, 4, l2=0.1)])
def test_l2_penalty_gradients_match_finite_differences(model):
    assert finite_difference_check(model) < 1e-6


def test_l2_penalty_is_on_weights_only_and_can_be_left_out():
    model = SoftmaxRegression(3, 2, l2=0.5, dtype="float64")
    rng = np.random.default_rng(2)
    params = model.init_params(rng)
    assert params["W0"].dtype == np.float64
    params["b0"][:] = [1.0, -2.0]
    x, y = rng.standard_normal((5, 3)), np.array([0, 1, 1, 0, 1])
    loss, grads = model.loss_and_grad(params, x, y)
    data, data_grads = model.data_loss_and_grad(params, x, y)
    assert loss == pytest.approx(data + 0.25 * float((params["W0"] ** 2).sum()), rel=1e-12)
    np.testing.assert_allclose(grads["W0"], data_grads["W0"] + 0.5 * params["W0"])
    np.testing.assert_array_equal(grads["b0"], data_grads["b0"])
    assert model.data_loss(params, x, y) == data
    assert Model.from_config(model.to_config()) == model
    assert model != SoftmaxRegression(3, 2, dtype="float64")
    with pytest.raises(ValueError, match="l2"):
        MLP([3, 2], l2=-1.0)
    with pytest.raises(ValueError, match="dtype"):
        MLP([3, 2], dtype="int8")

"""Model parallelism, the math: a model split into partitions computes the same loss
and gradients as the whole model (models/partition.py, models/local.py)."""

from __future__ import annotations

import numpy as np
import pytest
from numerics import worst_gradient_error

from asyncdb.models import MLP, LocallyConnected1D, Model, split_loss_and_grad
from asyncdb.models.partition import split_span

MODELS = [
    MLP([13, 11, 7, 10]),               # uneven in every layer for 2 and 3 partitions
    MLP([8, 6]),                        # no hidden layer: only the output layer's rows split
    LocallyConnected1D(width=11, channels=[2, 3, 2], window=3, classes=4),
    LocallyConnected1D(width=7, channels=[1, 2, 3], window=5, classes=3),  # halo > a partition
]


def norm_relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def problem(model: Model, dtype: type, seed: int = 0, batch: int = 9):
    rng = np.random.default_rng(seed)
    params = {k: (v + rng.standard_normal(v.shape) * 0.1).astype(dtype)
              for k, v in model.init_params(rng).items()}
    n_in = model.partition(0, 1).owned[0][0][1]
    classes = model.partition(0, 1).head.classes
    return params, rng.standard_normal((batch, n_in)).astype(dtype), rng.integers(0, classes, batch)


@pytest.mark.parametrize("model", MODELS, ids=repr)
@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize(("dtype", "tolerance"), [(np.float64, 1e-10), (np.float32, 1e-5)])
def test_split_loss_and_gradients_equal_the_whole_model(model, parts, dtype, tolerance):
    params, x, y = problem(model, dtype)
    loss, grads = model.loss_and_grad(params, x, y)
    split_loss, split_grads = split_loss_and_grad(
        [model.partition(p, parts) for p in range(parts)], params, x, y)
    assert abs(split_loss - loss) <= tolerance * abs(loss)
    for name in grads:
        assert split_grads[name].shape == grads[name].shape
        assert norm_relative(split_grads[name], grads[name]) < tolerance, name


@pytest.mark.parametrize("model", MODELS[2:], ids=repr)
def test_locally_connected_gradients_match_finite_differences(model):
    params, x, y = problem(model, np.float64, batch=4)
    assert worst_gradient_error(model, params, x, y) < 1e-6


def test_locally_connected_units_see_only_their_window():
    model = LocallyConnected1D(width=9, channels=[1, 1], window=3, classes=2)
    params = {k: np.ones_like(v) if k.startswith("W") else np.zeros_like(v)
              for k, v in model.init_params(np.random.default_rng(0)).items()}
    x = np.zeros((1, 9))
    x[0, 4] = 1.0
    hidden = model._forward(params, x)[1].reshape(-1)
    assert list(np.flatnonzero(hidden)) == [3, 4, 5]


@pytest.mark.parametrize("model", MODELS, ids=repr)
def test_partitions_own_every_parameter_exactly_once(model):
    for parts in (1, 2, 3):
        seen = {name: np.zeros(shape, int) for name, shape in model.param_shapes().items()}
        total = 0
        for p in range(parts):
            part = model.partition(p, parts)
            for name, (whole, index) in part.param_index().items():
                seen[whole][index] += 1
                total += int(np.prod(part.param_shapes()[name]))
        assert all((count == 1).all() for count in seen.values())
        assert total == model.num_params()


def test_locally_connected_partitions_read_only_a_window_of_their_neighbours():
    model = LocallyConnected1D(width=100, channels=[1, 4, 4], window=5, classes=10)
    middle = model.partition(1, 3).stages[1]
    own_lo, own_hi = middle.out_span
    assert middle.in_span == (own_lo - 2 * 4, own_hi + 2 * 4)


def test_bad_splits_are_refused():
    with pytest.raises(ValueError, match="cannot split"):
        MLP([4, 2, 3]).partition(0, 3)
    with pytest.raises(ValueError, match="does not exist"):
        MLP([4, 4, 3]).partition(2, 2)
    with pytest.raises(ValueError, match="odd"):
        LocallyConnected1D(width=8, channels=[1, 2], window=4, classes=2)
    assert split_span(10, 3) == [(0, 3), (3, 6), (6, 10)]

from __future__ import annotations

import numpy as np
import pytest

from asyncdb import SGD, Adagrad, ConfigError, UpdateRule
from asyncdb.engine import BLOCK, Updater


def adagrad_reference(param, grads, lr, eps, initial):
    """Duchi et al. (2011), written as the textbook loop."""
    param = param.astype(np.float64).copy()
    accum = np.full_like(param, initial)
    for grad in grads:
        accum += grad.astype(np.float64) ** 2
        param -= lr * grad / (np.sqrt(accum) + eps)
    return param, accum


@pytest.mark.parametrize("engine", ["blocked", "numexpr"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("size", [1, 1000, BLOCK + 17, 3 * BLOCK])
def test_adagrad_matches_the_formula(engine, threads, size):
    rng = np.random.default_rng(size)
    param = rng.standard_normal(size).astype(np.float32)
    grads = [rng.standard_normal(size).astype(np.float32) for _ in range(4)]
    rule = Adagrad(lr=0.1, eps=1e-7, initial_accumulator=0.1)
    updater = Updater(rule, size, engine, threads)
    ours = param.copy()
    for grad in grads:
        updater.apply(ours, grad)
    updater.close()
    want, accum = adagrad_reference(param, grads, 0.1, 1e-7, 0.1)
    np.testing.assert_allclose(ours, want, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(updater.state["accum"], accum, rtol=2e-5)


@pytest.mark.parametrize("engine", ["blocked", "numexpr"])
def test_sgd_matches_the_formula(engine):
    rng = np.random.default_rng(0)
    param = rng.standard_normal(5000).astype(np.float32)
    grad = rng.standard_normal(5000).astype(np.float32)
    updater = Updater(SGD(lr=0.25), 5000, engine, 2)
    ours = param.copy()
    updater.apply(ours, grad)
    updater.close()
    np.testing.assert_allclose(ours, param - np.float32(0.25) * grad, rtol=1e-6)


def test_rules_round_trip_through_config():
    for rule in (SGD(lr=0.3), Adagrad(lr=0.2, eps=1e-6, initial_accumulator=0.5)):
        assert UpdateRule.from_config(rule.to_config()) == rule
    with pytest.raises(ConfigError):
        UpdateRule.from_config({"rule": "adam"})
    with pytest.raises(ConfigError):
        UpdateRule.from_config({"rule": "sgd", "momentum": 0.9})


def test_blocked_engine_compiles_general_expressions_and_refuses_others():
    class Custom(UpdateRule):
        state = ("velocity",)

        def statements(self):
            return [("velocity", "0.5 * velocity - grad"),
                    ("param", "param + square(velocity) - abs(-grad) / 2")]

        def scalars(self):
            return {}

    rng = np.random.default_rng(3)
    param, grad = rng.standard_normal(100).astype(np.float32), rng.standard_normal(100).astype(
        np.float32)
    updater = Updater(Custom(), 100, "blocked", 1)
    ours = param.copy()
    updater.apply(ours, grad)
    velocity = -grad
    np.testing.assert_allclose(ours, param + velocity**2 - np.abs(grad) / 2, rtol=1e-6)

    class Bad(Custom):
        def statements(self):
            return [("param", "param.sum()")]

    with pytest.raises(ConfigError):
        Updater(Bad(), 10, "blocked", 1)
    with pytest.raises(ConfigError):
        Updater(SGD(), 10, "gpu", 1)


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf"), -float("inf"), True])
@pytest.mark.parametrize("make", [lambda v: SGD(lr=v), lambda v: Adagrad(lr=v),
                                  lambda v: Adagrad(eps=v)])
def test_learning_rates_and_eps_must_be_finite_and_positive(make, bad):
    with pytest.raises(ConfigError, match="finite number above 0"):
        make(bad)


def test_bad_options_from_a_config_are_config_errors():
    with pytest.raises(ConfigError):
        UpdateRule.from_config({"rule": "sgd", "lr": float("nan")})
    with pytest.raises(ConfigError):
        UpdateRule.from_config({"rule": "adagrad", "initial_accumulator": -1.0})


@pytest.mark.parametrize("engine", ["blocked", "numexpr"])
def test_checked_step_matches_apply_and_refuses_overflow(engine):
    rng = np.random.default_rng(3)
    size = BLOCK + 5
    rule = Adagrad(lr=0.1, initial_accumulator=0.1)
    in_place, checked = Updater(rule, size, engine, 2), Updater(rule, size, engine, 2)
    param = rng.standard_normal(size).astype(np.float32)
    grad = rng.standard_normal(size).astype(np.float32)
    ours = param.copy()
    in_place.apply(ours, grad)
    stepped = checked.step(param.copy(), grad)
    np.testing.assert_array_equal(stepped, ours)
    np.testing.assert_array_equal(checked.state["accum"], in_place.state["accum"])
    accum = checked.state["accum"].copy()
    grad[-1] = 3e38  # only the last block overflows
    assert checked.step(stepped, grad) is None
    np.testing.assert_array_equal(checked.state["accum"], accum)
    np.testing.assert_array_equal(stepped, ours)

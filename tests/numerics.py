"""Numerical checks shared by the model tests."""

from __future__ import annotations

from typing import Any

import numpy as np


def worst_gradient_error(model: Any, params: dict[str, np.ndarray], x: np.ndarray,
                         y: np.ndarray, eps: float = 1e-6) -> float:
    """The largest gap between `model`'s gradient and central finite differences of its
    loss at `params` (float64) on (x, y)."""
    _, grads = model.loss_and_grad(params, x, y)
    worst = 0.0
    for name, value in params.items():
        for idx in np.ndindex(value.shape):
            old = value[idx]
            value[idx] = old + eps
            plus, _ = model.loss_and_grad(params, x, y)
            value[idx] = old - eps
            minus, _ = model.loss_and_grad(params, x, y)
            value[idx] = old
            worst = max(worst, abs((plus - minus) / (2 * eps) - grads[name][idx]))
    return worst

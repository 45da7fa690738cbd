"""numpy networks: parameter shapes, loss and gradient. Know nothing of actors."""

from __future__ import annotations

from .base import Model, Params
from .mlp import MLP, SoftmaxRegression

__all__ = ["MLP", "Model", "Params", "SoftmaxRegression"]

"""numpy networks: parameter shapes, loss and gradient. Know nothing of actors."""

from __future__ import annotations

from .base import Model, Params
from .local import LocallyConnected1D
from .mlp import MLP, SoftmaxRegression
from .partition import Partition, split_loss_and_grad

__all__ = ["MLP", "LocallyConnected1D", "Model", "Params", "Partition", "SoftmaxRegression",
           "split_loss_and_grad"]

"""The model protocol: parameter shapes, initialisation, loss and gradient, prediction.

Models are plain numpy and know nothing of actors. Parameters are a dict of float32
arrays in `param_shapes()` order; a caller may pass views into one flat vector, and
`loss_and_grad` may write gradients into caller-supplied views, so a replica keeps its
parameters and gradients as single flat buffers without copying.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .partition import Partition

Params = dict[str, np.ndarray]


class Model(ABC):
    """Base of every model. Subclasses are registered by name for `from_config`."""

    _types: dict[str, type[Model]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Model._types[cls.__name__] = cls

    @abstractmethod
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter names and shapes, in a fixed order."""

    @abstractmethod
    def init_params(self, rng: np.random.Generator) -> Params:
        """Fresh float32 parameters drawn from `rng`."""

    @abstractmethod
    def loss_and_grad(self, params: Params, x: np.ndarray, y: np.ndarray,
                      grads: Params | None = None) -> tuple[float, Params]:
        """Mean loss over the batch and its gradient; written into `grads` if given."""

    @abstractmethod
    def predict(self, params: Params, x: np.ndarray) -> np.ndarray:
        """Predicted class of each row of `x`."""

    @abstractmethod
    def to_config(self) -> dict[str, Any]:
        """Plain data that `Model.from_config` turns back into an equal model."""

    def accuracy(self, params: Params, x: np.ndarray, y: np.ndarray,
                 batch: int = 4096) -> float:
        """Fraction of rows whose predicted class is `y`."""
        if len(x) == 0:
            return float("nan")
        correct = 0
        for start in range(0, len(x), batch):
            correct += int((self.predict(params, x[start:start + batch])
                            == y[start:start + batch]).sum())
        return correct / len(x)

    def partition(self, part: int, parts: int) -> Partition:
        """Partition `part` of `parts` of this model (see `models.partition`)."""
        raise ValueError(f"{type(self).__name__} cannot be split into partitions")

    def num_params(self) -> int:
        return sum(int(np.prod(shape)) for shape in self.param_shapes().values())

    @staticmethod
    def from_config(config: dict[str, Any]) -> Model:
        kind = config.get("type")
        cls = Model._types.get(str(kind))
        if cls is None:
            raise ValueError(f"unknown model type {kind!r}; known: {sorted(Model._types)}")
        options = {k: v for k, v in config.items() if k != "type"}
        return cls(**options)

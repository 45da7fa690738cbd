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
    """Base of every model. Subclasses are registered by name for `from_config`.

    `l2` weighs an optional penalty `0.5 * l2 * sum of squares` of the tensors that
    `penalized()` names; `loss_and_grad` includes it, `data_loss_and_grad` leaves it
    out (for callers that add the penalty once over many batches)."""

    _types: dict[str, type[Model]] = {}
    l2: float = 0.0

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

    def data_loss_and_grad(self, params: Params, x: np.ndarray, y: np.ndarray,
                           grads: Params | None = None) -> tuple[float, Params]:
        """`loss_and_grad` without the L2 penalty."""
        if self.l2:
            raise NotImplementedError(f"{type(self).__name__} cannot leave its penalty out")
        return self.loss_and_grad(params, x, y, grads)

    def data_loss(self, params: Params, x: np.ndarray, y: np.ndarray) -> float:
        """The mean loss over the batch without the L2 penalty (no gradient)."""
        return self.data_loss_and_grad(params, x, y)[0]

    def penalized(self) -> list[str]:
        """Names of the tensors the L2 penalty applies to."""
        return []

    def penalty(self, params: Params, grads: Params | None = None) -> float:
        """`0.5 * l2 * sum of squares` of the penalized tensors; adds its gradient to
        `grads` if given."""
        total = 0.0
        for name in self.penalized():
            total += float(np.vdot(params[name], params[name]))
            if grads is not None:
                grads[name] += params[name] * grads[name].dtype.type(self.l2)
        return 0.5 * self.l2 * total

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

"""Multi-layer perceptrons: ReLU hidden layers, softmax cross-entropy on the last."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .base import Model, Params
from .partition import DenseStage, Head, Partition, split_span


class MLP(Model):
    """`MLP([784, 512, 512, 10])`: parameters W0, b0, W1, b1, ... with W{i} of shape
    (fan_in, fan_out); loss is the mean softmax cross-entropy over the batch.

    Activations and their gradients live in buffers kept per batch size, so a training
    step allocates nothing after the first.

    `l2`: weight of an L2 penalty on the weight matrices (not the biases);
    `dtype`: "float32" (default) or "float64", the dtype of `init_params`.
    """

    def __init__(self, sizes: Sequence[int], l2: float = 0.0, dtype: str = "float32") -> None:
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"an MLP needs at least two positive layer sizes, got {sizes}")
        if not l2 >= 0.0:
            raise ValueError(f"l2 must be a non-negative number, got {l2!r}")
        if dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
        self.sizes = sizes
        self.l2 = float(l2)
        self.dtype = dtype
        self._buffers: dict[int, list[np.ndarray]] = {}

    @property
    def layers(self) -> int:
        return len(self.sizes) - 1

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for i, (fan_in, fan_out) in enumerate(zip(self.sizes, self.sizes[1:], strict=False)):
            shapes[f"W{i}"] = (fan_in, fan_out)
            shapes[f"b{i}"] = (fan_out,)
        return shapes

    def init_params(self, rng: np.random.Generator) -> Params:
        params: Params = {}
        for i, (fan_in, fan_out) in enumerate(zip(self.sizes, self.sizes[1:], strict=False)):
            scale = np.sqrt(2.0 / fan_in)  # He et al. 2015, for ReLU
            params[f"W{i}"] = (rng.standard_normal((fan_in, fan_out)) * scale).astype(self.dtype)
            params[f"b{i}"] = np.zeros(fan_out, self.dtype)
        return params

    def penalized(self) -> list[str]:
        return [f"W{i}" for i in range(self.layers)]

    def _options(self) -> dict[str, Any]:
        return {**({"l2": self.l2} if self.l2 else {}),
                **({"dtype": self.dtype} if self.dtype != "float32" else {})}

    def to_config(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "sizes": list(self.sizes), **self._options()}

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, MLP) and type(other) is type(self)
                and other.sizes == self.sizes and other._options() == self._options())

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(self.sizes), self.l2, self.dtype))

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({self.sizes}{extra})"

    def _activations(self, batch: int, dtype: np.dtype[Any]) -> list[np.ndarray]:
        acts = self._buffers.get(batch)
        if acts is None or acts[0].dtype != dtype:
            acts = [np.empty((batch, n), dtype) for n in self.sizes[1:]]
            self._buffers = {batch: acts}  # keep one batch size: the training one
        return acts

    def _forward(self, params: Params, x: np.ndarray, acts: list[np.ndarray]) -> None:
        h = x
        last = self.layers - 1
        for i in range(self.layers):
            out = acts[i]
            np.matmul(h, params[f"W{i}"], out=out)
            out += params[f"b{i}"]
            if i < last:
                np.maximum(out, 0, out=out)
            h = out

    def loss_and_grad(self, params: Params, x: np.ndarray, y: np.ndarray,
                      grads: Params | None = None) -> tuple[float, Params]:
        loss, grads = self.data_loss_and_grad(params, x, y, grads)
        if self.l2:
            loss += self.penalty(params, grads)
        return loss, grads

    def data_loss(self, params: Params, x: np.ndarray, y: np.ndarray) -> float:
        acts = self._activations(len(x), params["W0"].dtype)
        self._forward(params, np.asarray(x, params["W0"].dtype), acts)
        logits = acts[-1]  # the same operations as the gradient's, so the same loss
        logits -= logits.max(axis=1, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(axis=1, keepdims=True)
        picked = logits[np.arange(len(x)), y]
        return float(-np.log(np.maximum(picked, 1e-30)).mean())

    def data_loss_and_grad(self, params: Params, x: np.ndarray, y: np.ndarray,
                           grads: Params | None = None) -> tuple[float, Params]:
        dtype = params["W0"].dtype
        x = np.asarray(x, dtype)
        batch = len(x)
        if grads is None:
            grads = {name: np.empty(shape, dtype) for name, shape in self.param_shapes().items()}
        acts = self._activations(batch, dtype)
        self._forward(params, x, acts)
        # Softmax cross-entropy, stable: shift by the row max.
        logits = acts[-1]
        logits -= logits.max(axis=1, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(axis=1, keepdims=True)
        rows = np.arange(batch)
        picked = logits[rows, y]
        loss = float(-np.log(np.maximum(picked, 1e-30)).mean())
        delta = logits  # becomes dL/dz of the last layer, in place
        delta[rows, y] -= 1.0
        delta *= dtype.type(1.0 / batch)
        for i in range(self.layers - 1, -1, -1):
            h_in = x if i == 0 else acts[i - 1]
            np.matmul(h_in.T, delta, out=grads[f"W{i}"])
            np.sum(delta, axis=0, out=grads[f"b{i}"])
            if i > 0:
                upstream = np.matmul(delta, params[f"W{i}"].T)
                upstream *= acts[i - 1] > 0  # ReLU gate
                delta = upstream
        return loss, grads

    def partition(self, part: int, parts: int) -> Partition:
        """Hidden layers split by columns, the output layer by rows (see
        `models.partition`); every layer's width must be at least `parts`."""
        if not 0 <= part < parts:
            raise ValueError(f"partition {part} of {parts} does not exist")
        last = self.layers - 1
        owned = [split_span(n, parts) for n in self.sizes[:-1]]
        stages: list[DenseStage] = [DenseStage(i, self.sizes[i], owned[i + 1][part])
                                    for i in range(last)]
        head = Head(last, owned[last][part], self.sizes[-1], with_bias=part == 0)
        return Partition(part, parts, list(stages), head, owned, self.param_shapes())

    def predict(self, params: Params, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, params["W0"].dtype)
        h = x
        for i in range(self.layers):
            h = h @ params[f"W{i}"] + params[f"b{i}"]
            if i < self.layers - 1:
                np.maximum(h, 0, out=h)
        return np.asarray(h.argmax(axis=1))


class SoftmaxRegression(MLP):
    """Multinomial logistic regression: an MLP with no hidden layer."""

    def __init__(self, n_in: int, n_out: int, l2: float = 0.0, dtype: str = "float32") -> None:
        super().__init__([n_in, n_out], l2=l2, dtype=dtype)

    def to_config(self) -> dict[str, Any]:
        return {"type": "SoftmaxRegression", "n_in": self.sizes[0], "n_out": self.sizes[1],
                **self._options()}

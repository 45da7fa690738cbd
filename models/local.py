"""Locally connected networks (the DistBelief paper's architecture): each output unit
sees a window of the previous layer, and no weights are shared between positions."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .base import Model, Params
from .partition import Head, Partition, Span, Stage, softmax_cross_entropy, split_span


class LocallyConnected1D(Model):
    """`LocallyConnected1D(width=64, channels=[1, 8, 8], window=5, classes=10)`.

    The input is `width` positions of `channels[0]` values each (row-major: position,
    then channel). Hidden layer i maps it to `width` positions of `channels[i + 1]`
    values: output position j sees input positions j - window//2 .. j + window//2
    (zeros past the edges) through its own weights `W{i}[j]` of shape
    (window * c_in, c_out) and bias `b{i}[j]`, then ReLU. A dense softmax layer
    `W{L}` ((width * c_last) x classes) reads the last hidden layer.

    Split into partitions along the width, a partition needs only window//2 positions
    of each neighbour's activations per layer, whatever the width.
    """

    def __init__(self, width: int, channels: Sequence[int], window: int, classes: int) -> None:
        channels = [int(c) for c in channels]
        if width < 1 or classes < 1 or len(channels) < 2 or min(channels) < 1:
            raise ValueError("LocallyConnected1D needs width, classes >= 1 and at least "
                             f"two positive channel counts, got {width}, {channels}, {classes}")
        if window < 1 or window % 2 == 0:
            raise ValueError(f"the window must be odd and positive, got {window}")
        self.width = int(width)
        self.channels = channels
        self.window = int(window)
        self.classes = int(classes)

    @property
    def layers(self) -> int:
        """Locally connected layers (the dense output layer is `W{layers}`)."""
        return len(self.channels) - 1

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for i, (c_in, c_out) in enumerate(itertools.pairwise(self.channels)):
            shapes[f"W{i}"] = (self.width, self.window * c_in, c_out)
            shapes[f"b{i}"] = (self.width, c_out)
        shapes[f"W{self.layers}"] = (self.width * self.channels[-1], self.classes)
        shapes[f"b{self.layers}"] = (self.classes,)
        return shapes

    def init_params(self, rng: np.random.Generator) -> Params:
        params: Params = {}
        for name, shape in self.param_shapes().items():
            if name.startswith("b"):
                params[name] = np.zeros(shape, np.float32)
            else:
                fan_in = shape[-2]
                params[name] = (rng.standard_normal(shape)
                                * np.sqrt(2.0 / fan_in)).astype(np.float32)
        return params

    def to_config(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "width": self.width,
                "channels": list(self.channels), "window": self.window,
                "classes": self.classes}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LocallyConnected1D) and other.to_config() == self.to_config()

    def __hash__(self) -> int:
        return hash(repr(self))

    def __repr__(self) -> str:
        return (f"LocallyConnected1D(width={self.width}, channels={self.channels}, "
                f"window={self.window}, classes={self.classes})")

    # -- the whole model, straight from the definition -------------------------

    def _forward(self, params: Params, x: np.ndarray) -> list[np.ndarray]:
        """Activations as (batch, width, channels), input first."""
        acts = [x.reshape(len(x), self.width, self.channels[0])]
        half = self.window // 2
        for i in range(self.layers):
            c_in, c_out = self.channels[i], self.channels[i + 1]
            w = params[f"W{i}"].reshape(self.width, self.window, c_in, c_out)
            padded = np.pad(acts[-1], ((0, 0), (half, half), (0, 0)))
            z = np.zeros((len(x), self.width, c_out), x.dtype)
            for t in range(self.window):
                z += np.einsum("bjc,jco->bjo", padded[:, t:t + self.width], w[:, t])
            z += params[f"b{i}"]
            acts.append(np.maximum(z, 0))
        return acts

    def loss_and_grad(self, params: Params, x: np.ndarray, y: np.ndarray,
                      grads: Params | None = None) -> tuple[float, Params]:
        dtype = params["W0"].dtype
        x = np.asarray(x, dtype)
        batch, half, top = len(x), self.window // 2, self.layers
        if grads is None:
            grads = {name: np.empty(shape, dtype) for name, shape in self.param_shapes().items()}
        acts = self._forward(params, x)
        h = acts[-1].reshape(batch, -1)
        loss, delta = softmax_cross_entropy(h @ params[f"W{top}"] + params[f"b{top}"], y)
        grads[f"W{top}"][...] = h.T @ delta
        grads[f"b{top}"][...] = delta.sum(axis=0)
        d = (delta @ params[f"W{top}"].T).reshape(acts[-1].shape)
        for i in range(top - 1, -1, -1):
            c_in, c_out = self.channels[i], self.channels[i + 1]
            w = params[f"W{i}"].reshape(self.width, self.window, c_in, c_out)
            dz = d * (acts[i + 1] > 0)
            padded = np.pad(acts[i], ((0, 0), (half, half), (0, 0)))
            d_padded = np.zeros_like(padded)
            g = grads[f"W{i}"].reshape(self.width, self.window, c_in, c_out)
            for t in range(self.window):
                g[:, t] = np.einsum("bjc,bjo->jco", padded[:, t:t + self.width], dz)
                d_padded[:, t:t + self.width] += np.einsum("bjo,jco->bjc", dz, w[:, t])
            grads[f"b{i}"][...] = dz.sum(axis=0)
            d = d_padded[:, half:half + self.width]
        return loss, grads

    def predict(self, params: Params, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, params["W0"].dtype)
        h = self._forward(params, x)[-1].reshape(len(x), -1)
        logits = h @ params[f"W{self.layers}"] + params[f"b{self.layers}"]
        return np.asarray(logits.argmax(axis=1))

    # -- partitions --------------------------------------------------------------

    def partition(self, part: int, parts: int) -> Partition:
        """Positions split evenly (sizes within one) across `parts` partitions, in
        every layer alike; the output layer by rows (see `models.partition`)."""
        if not 0 <= part < parts:
            raise ValueError(f"partition {part} of {parts} does not exist")
        positions = split_span(self.width, parts)
        owned = [[(lo * c, hi * c) for lo, hi in positions] for c in self.channels]
        stages: list[Stage] = [
            LocalStage(i, self.width, self.window, self.channels[i], self.channels[i + 1],
                       positions[part]) for i in range(self.layers)]
        head = Head(self.layers, owned[-1][part], self.classes, with_bias=part == 0)
        return Partition(part, parts, stages, head, owned, self.param_shapes())


class LocalStage(Stage):
    """Positions [lo, hi) of locally connected layer `layer`."""

    def __init__(self, layer: int, width: int, window: int, c_in: int, c_out: int,
                 positions: Span) -> None:
        self.layer, self.window, self.c_in, self.c_out = layer, window, c_in, c_out
        self.half = window // 2
        lo, hi = positions
        self.positions = positions
        self.in_positions = (max(0, lo - self.half), min(width, hi + self.half))
        self.in_span = (self.in_positions[0] * c_in, self.in_positions[1] * c_in)
        self.out_span = (lo * c_out, hi * c_out)
        self._patched: tuple[np.ndarray, np.ndarray] | None = None  # (input, its patches)

    def param_index(self) -> dict[str, tuple[str, tuple[slice, ...]]]:
        rows = slice(*self.positions)
        return {f"W{self.layer}": (f"W{self.layer}", (rows,)),
                f"b{self.layer}": (f"b{self.layer}", (rows,))}

    def _padded(self, batch: int, dtype: np.dtype[Any]) -> tuple[np.ndarray, int]:
        n = self.positions[1] - self.positions[0]
        start = self.in_positions[0] - (self.positions[0] - self.half)
        return np.zeros((batch, n + 2 * self.half, self.c_in), dtype), start

    def _patches(self, h_in: np.ndarray) -> np.ndarray:
        """(positions, batch, window * c_in): the input window of every own position."""
        batch = len(h_in)
        n = self.positions[1] - self.positions[0]
        padded, start = self._padded(batch, h_in.dtype)
        count = self.in_positions[1] - self.in_positions[0]
        padded[:, start:start + count] = h_in.reshape(batch, count, self.c_in)
        windows = sliding_window_view(padded, self.window, axis=1)  # (b, n, c, t)
        return windows.transpose(1, 0, 3, 2).reshape(n, batch, self.window * self.c_in)

    def forward(self, params: Params, h_in: np.ndarray, out: np.ndarray) -> None:
        patches = self._patches(h_in)
        self._patched = (h_in, patches)  # the backward pass that follows reuses them
        z = np.matmul(patches, params[f"W{self.layer}"])  # (n, batch, c_out)
        z += params[f"b{self.layer}"][:, None, :]
        np.maximum(z, 0, out=z)
        out.reshape(len(h_in), -1, self.c_out)[...] = z.transpose(1, 0, 2)

    def backward(self, params: Params, h_in: np.ndarray, out: np.ndarray,
                 d_out: np.ndarray, grads: Params, spans: Sequence[Span],
                 d_ins: Sequence[np.ndarray]) -> None:
        batch, w = len(h_in), params[f"W{self.layer}"]
        n = self.positions[1] - self.positions[0]
        d_out *= out > 0
        dz = np.ascontiguousarray(d_out.reshape(batch, n, self.c_out).transpose(1, 0, 2))
        cached = self._patched
        self._patched = None
        patches = cached[1] if cached is not None and cached[0] is h_in else self._patches(h_in)
        np.matmul(patches.transpose(0, 2, 1), dz, out=grads[f"W{self.layer}"])
        np.sum(dz, axis=1, out=grads[f"b{self.layer}"])
        if not spans:
            return
        n_padded = n + 2 * self.half
        start = self.in_positions[0] - (self.positions[0] - self.half)
        d_padded = np.zeros((n_padded, batch, self.c_in), h_in.dtype)  # position-major
        taps = w.reshape(n, self.window, self.c_in, self.c_out)
        for t in range(self.window):  # each window tap's share, added where it came from
            d_padded[t:t + n] += np.matmul(dz, taps[:, t].transpose(0, 2, 1))
        count = self.in_positions[1] - self.in_positions[0]
        d_in = d_padded[start:start + count].transpose(1, 0, 2).reshape(batch, -1)
        for (lo, hi), target in zip(spans, d_ins, strict=True):
            target[...] = d_in[:, lo - self.in_span[0]:hi - self.in_span[0]]

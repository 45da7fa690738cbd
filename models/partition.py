"""Model parallelism: one replica's layers split across `parts` partitions.

Every activation (the input x, then each hidden layer's output) is a (batch, width)
matrix whose columns are owned in contiguous spans, one span per partition. A hidden
layer on partition p computes its owned columns of the layer's output from the input
columns it reads (`in_span`): all of them for a dense layer, its own positions plus
a window's worth on each side for a locally connected one. Forward, a partition
receives the input columns it reads but does not own; backward, it computes the
gradient of the loss with respect to every input column it read, and the owner of
each column sums the contributions.

The output layer is split by its rows: partition p holds the rows of the last weight
matrix that belong to its own columns of the last activation (and partition 0 the
bias), so each partition computes partial logits from what it already has. The
partial logits (batch x classes) are summed on partition 0, which computes the
softmax and the loss and sends dL/dlogits (batch x classes) back. No activation
crosses a boundary for the output layer; only logits do.

This module is plain numpy. `split_loss_and_grad` runs all partitions one after the
other in this process, exchanging by slicing, as the reference the distributed
runner is checked against.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .base import Params

Span = tuple[int, int]
Index = tuple[slice, ...]


def split_span(n: int, parts: int) -> list[Span]:
    """`parts` contiguous spans covering range(n), sizes within one (larger last)."""
    if not 1 <= parts <= n:
        raise ValueError(f"cannot split {n} units into {parts} partitions")
    edges = [n * i // parts for i in range(parts + 1)]
    return list(itertools.pairwise(edges))


def overlap(a: Span, b: Span) -> Span | None:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


def softmax_cross_entropy(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy over the batch and dL/dlogits, computed in place in `logits`."""
    batch = len(logits)
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    rows = np.arange(batch)
    loss = float(-np.log(np.maximum(logits[rows, y], 1e-30)).mean())
    logits[rows, y] -= 1.0
    logits *= logits.dtype.type(1.0 / batch)
    return loss, logits


class Stage(ABC):
    """One hidden layer's share on one partition (output columns `out_span`)."""

    in_span: Span
    out_span: Span

    @abstractmethod
    def param_index(self) -> dict[str, tuple[str, Index]]:
        """Local parameter name -> (global name, the slice of it this stage owns)."""

    @abstractmethod
    def forward(self, params: Params, h_in: np.ndarray, out: np.ndarray) -> None:
        """`out` (batch, own width) from `h_in` (batch, in_span width)."""

    @abstractmethod
    def backward(self, params: Params, h_in: np.ndarray, out: np.ndarray,
                 d_out: np.ndarray, grads: Params, spans: Sequence[Span],
                 d_ins: Sequence[np.ndarray]) -> None:
        """Write parameter gradients into `grads` and, for each input span in `spans`
        (global columns, inside `in_span`), dL/d(input columns) into `d_ins`. `d_out`
        is dL/d(out) and may be overwritten."""


class DenseStage(Stage):
    """Columns [lo, hi) of a ReLU dense layer `W{layer}` (fan_in x fan_out)."""

    def __init__(self, layer: int, fan_in: int, span: Span) -> None:
        self.layer = layer
        self.in_span = (0, fan_in)
        self.out_span = span

    def param_index(self) -> dict[str, tuple[str, Index]]:
        cols = slice(*self.out_span)
        return {f"W{self.layer}": (f"W{self.layer}", (slice(None), cols)),
                f"b{self.layer}": (f"b{self.layer}", (cols,))}

    def forward(self, params: Params, h_in: np.ndarray, out: np.ndarray) -> None:
        np.matmul(h_in, params[f"W{self.layer}"], out=out)
        out += params[f"b{self.layer}"]
        np.maximum(out, 0, out=out)

    def backward(self, params: Params, h_in: np.ndarray, out: np.ndarray,
                 d_out: np.ndarray, grads: Params, spans: Sequence[Span],
                 d_ins: Sequence[np.ndarray]) -> None:
        d_out *= out > 0  # ReLU gate
        w = params[f"W{self.layer}"]
        for (lo, hi), d_in in zip(spans, d_ins, strict=True):
            np.matmul(d_out, w[lo:hi].T, out=d_in)
        np.matmul(h_in.T, d_out, out=grads[f"W{self.layer}"])
        np.sum(d_out, axis=0, out=grads[f"b{self.layer}"])


class Head:
    """The output layer's rows `rows` (columns of the last activation this partition
    owns); the bias lives on partition 0."""

    def __init__(self, layer: int, rows: Span, classes: int, with_bias: bool) -> None:
        self.layer = layer
        self.rows = rows
        self.classes = classes
        self.with_bias = with_bias

    def param_index(self) -> dict[str, tuple[str, Index]]:
        index: dict[str, tuple[str, Index]] = {
            f"W{self.layer}": (f"W{self.layer}", (slice(*self.rows), slice(None)))}
        if self.with_bias:
            index[f"b{self.layer}"] = (f"b{self.layer}", (slice(None),))
        return index

    def partial_logits(self, params: Params, h_own: np.ndarray, out: np.ndarray) -> None:
        np.matmul(h_own, params[f"W{self.layer}"], out=out)
        if self.with_bias:
            out += params[f"b{self.layer}"]

    def backward(self, params: Params, h_own: np.ndarray, delta: np.ndarray,
                 grads: Params, d_h: np.ndarray | None) -> None:
        """Gradients of the owned rows (and bias); dL/d(own columns) into `d_h`."""
        np.matmul(h_own.T, delta, out=grads[f"W{self.layer}"])
        if self.with_bias:
            np.sum(delta, axis=0, out=grads[f"b{self.layer}"])
        if d_h is not None:
            np.matmul(delta, params[f"W{self.layer}"].T, out=d_h)


@dataclass
class Partition:
    """Partition `part` of `parts`: its hidden-layer stages, its share of the output
    layer, and the owned spans of every activation (`owned[a][q]`: the columns of
    activation a that partition q owns; activation 0 is the input)."""

    part: int
    parts: int
    stages: list[Stage]
    head: Head
    owned: list[list[Span]]
    shapes: dict[str, tuple[int, ...]]

    def param_index(self) -> dict[str, tuple[str, Index]]:
        index: dict[str, tuple[str, Index]] = {}
        for stage in self.stages:
            index.update(stage.param_index())
        index.update(self.head.param_index())
        return index

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """This partition's parameter names and shapes, in a fixed order."""
        shapes = {}
        for name, (global_name, index) in self.param_index().items():
            probe = np.empty(self.shapes[global_name], np.bool_)[index]
            shapes[name] = probe.shape
        return shapes

    def take(self, params: Params) -> Params:
        """This partition's share of whole (user-shaped) parameters, as copies."""
        return {name: np.array(params[g][index])
                for name, (g, index) in self.param_index().items()}

    def put(self, local: Params, params: Params) -> None:
        """Write this partition's share `local` into whole tensors `params`."""
        for name, (g, index) in self.param_index().items():
            params[g][index] = local[name]

    def own(self, activation: int) -> Span:
        return self.owned[activation][self.part]


def split_loss_and_grad(partitions: Sequence[Partition], params: Params, x: np.ndarray,
                        y: np.ndarray) -> tuple[float, Params]:
    """Loss and whole-model gradients computed partition by partition, the exchanges
    done by slicing full activation matrices (the in-process reference)."""
    dtype = next(iter(params.values())).dtype
    x = np.asarray(x, dtype)
    batch = len(x)
    locals_ = [p.take(params) for p in partitions]
    widths = [spans[-1][1] for spans in partitions[0].owned]
    acts = [x] + [np.empty((batch, w), dtype) for w in widths[1:]]
    outs: list[list[np.ndarray]] = [[] for _ in partitions]
    for a, _ in enumerate(partitions[0].stages):
        for p, part in enumerate(partitions):
            stage = part.stages[a]
            out = np.empty((batch, stage.out_span[1] - stage.out_span[0]), dtype)
            stage.forward(locals_[p], acts[a][:, slice(*stage.in_span)], out)
            outs[p].append(out)
        for p, part in enumerate(partitions):
            acts[a + 1][:, slice(*part.stages[a].out_span)] = outs[p][a]
    last = len(acts) - 1
    logits = np.zeros((batch, partitions[0].head.classes), dtype)
    for p, part in enumerate(partitions):
        partial = np.empty_like(logits)
        part.head.partial_logits(locals_[p], acts[last][:, slice(*part.own(last))], partial)
        logits += partial
    loss, delta = softmax_cross_entropy(logits, y)
    local_grads = [{n: np.empty(s, dtype) for n, s in part.param_shapes().items()}
                   for part in partitions]
    d_act = np.zeros((batch, widths[last]), dtype)
    for p, part in enumerate(partitions):
        lo, hi = part.own(last)
        d_own = np.empty((batch, hi - lo), dtype) if last > 0 else None
        part.head.backward(locals_[p], acts[last][:, lo:hi], delta, local_grads[p], d_own)
        if d_own is not None:
            d_act[:, lo:hi] = d_own
    for a in range(last - 1, -1, -1):
        d_prev = np.zeros((batch, widths[a]), dtype)
        for p, part in enumerate(partitions):
            stage = part.stages[a]
            lo, hi = stage.out_span
            spans = [stage.in_span] if a > 0 else []
            d_ins = [np.empty((batch, s[1] - s[0]), dtype) for s in spans]
            stage.backward(locals_[p], acts[a][:, slice(*stage.in_span)], outs[p][a],
                           d_act[:, lo:hi].copy(), local_grads[p], spans, d_ins)
            for (s_lo, s_hi), d_in in zip(spans, d_ins, strict=True):
                d_prev[:, s_lo:s_hi] += d_in
        d_act = d_prev
    grads = {name: np.zeros(shape, dtype)
             for name, shape in partitions[0].shapes.items()}
    for p, part in enumerate(partitions):
        part.put(local_grads[p], grads)
    return loss, grads

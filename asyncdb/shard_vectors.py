"""A shard's Sandblaster state: named vectors over its slice and the L-BFGS history ring.

Beside the parameters ("x") a Sandblaster shard keeps, for its own slice only:

    g, gt   the gradient at x and at the trial point (accumulated from replicas' pushes)
    d       the search direction
    xt      the trial point x + alpha d
    s<k>, y<k>  history pair k of the ring of `memory` pairs (s = x' - x, y = g' - g)

The coordinator runs L-BFGS by sending small programs of vector operations over these
names and adding up the scalars every shard answers; no vector ever leaves the shard
except to replicas that fetch "x" or "xt". Operations (lists, in order):

    ["copy", dst, src]          dst = src
    ["axpy", a, x, y]           y += a x
    ["scale", a, x]             x *= a
    ["dot", a, b]               answers a . b
    ["paxpy", a, x, y]          y += a x on the penalized (L2) part of the slice only
    ["pdot", a, b]              a . b on the penalized part only
    ["history", k, a, b, c, e]  s<k> = a - b, y<k> = c - e; answers s.y and y.y
    ["version", n]              the shard's version is n (the iteration number)

Gradient passes accumulate with exactly-once accounting: `begin` opens pass p of N
portions into a target vector (zeroed), `accumulate` adds a pushed sum carrying the
ids of its portions unless the pass is not the open one or any id was counted already
(then the whole push is dropped and counted as a duplicate), and `missing` says which
of the N portions this shard has not counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import UpdateRejected

ACCUMULATORS = ("g", "gt")
WORK = ("g", "gt", "d", "xt")


class SliceVectors:
    """The named vectors of one shard's slice; `x` is the shard's own values array."""

    def __init__(self, index: int, values: np.ndarray, memory: int,
                 penalized: Sequence[Sequence[int]] = ()) -> None:
        if memory < 1:
            raise UpdateRejected(f"shard {index}: L-BFGS memory must be at least 1")
        self.index = index
        self.memory = memory
        n = len(values)
        self.vectors: dict[str, np.ndarray] = {"x": values}
        for name in WORK:
            self.vectors[name] = np.zeros(n, values.dtype)
        self.s = np.zeros((memory, n), values.dtype)
        self.y = np.zeros((memory, n), values.dtype)
        for k in range(memory):
            self.vectors[f"s{k}"] = self.s[k]
            self.vectors[f"y{k}"] = self.y[k]
        self.penalized = [(int(lo), int(hi)) for lo, hi in penalized]
        self.pass_id = -1
        self.portions = 0
        self.target = "g"
        self.counted: set[int] = set()
        self.accumulated = 0
        self.duplicates = 0
        self.stale = 0

    # -- passes --------------------------------------------------------------------

    def begin(self, pass_id: Any, portions: Any, target: Any) -> None:
        if not isinstance(pass_id, int) or not isinstance(portions, int) or portions < 1:
            raise UpdateRejected(f"shard {self.index}: bad pass {pass_id!r} of {portions!r}")
        if target not in ACCUMULATORS:
            raise UpdateRejected(f"shard {self.index}: cannot accumulate into {target!r}")
        self.pass_id, self.portions, self.target = pass_id, portions, str(target)
        self.counted = set()
        self.vectors[self.target][...] = 0.0

    def accumulate(self, pass_id: Any, portions: Any, grad: Any) -> bool:
        """Add `grad` (a sum over `portions` of pass `pass_id`); False if dropped."""
        target = self.vectors[self.target]
        if not isinstance(grad, np.ndarray) or grad.shape != target.shape \
                or grad.dtype != target.dtype or not np.isfinite(grad).all():
            raise UpdateRejected(f"shard {self.index}: an accumulated gradient must be a "
                                 f"finite {target.dtype} array of shape {target.shape}")
        ids = portions if isinstance(portions, list) else []
        if not ids or not all(isinstance(i, int) and 0 <= i < self.portions for i in ids) \
                or len(set(ids)) != len(ids):
            raise UpdateRejected(f"shard {self.index}: bad portion ids {portions!r}")
        if pass_id != self.pass_id:
            self.stale += 1  # a late push from a pass that is over
            return False
        if self.counted.intersection(ids):
            self.duplicates += 1
            return False
        target += grad
        self.counted.update(ids)
        self.accumulated += 1
        return True

    def missing(self, pass_id: Any) -> list[int]:
        if pass_id != self.pass_id:
            raise UpdateRejected(f"shard {self.index}: pass {pass_id!r} is not open")
        return [i for i in range(self.portions) if i not in self.counted]

    # -- vector programs -------------------------------------------------------------

    def run(self, program: Any) -> tuple[list[float], int | None]:
        """Run a program; returns the scalars it answers and a new version if set.
        Every operation is checked before any runs, so a bad program changes nothing."""
        if not isinstance(program, list) or not all(isinstance(op, list) and op
                                                    for op in program):
            raise UpdateRejected(f"shard {self.index}: a vector program is a list of lists")
        for op in program:
            self._check(op)
        out: list[float] = []
        version = None
        for op in program:
            kind, args = op[0], op[1:]
            if kind == "version":
                version = int(args[0])
            else:
                out.extend(getattr(self, f"_op_{kind}")(*args))
        return out, version

    _ARITY = {"copy": 2, "axpy": 3, "scale": 2, "dot": 2, "paxpy": 3, "pdot": 2,
              "history": 5, "version": 1}
    _NUMBER_AT = {"axpy": 0, "scale": 0, "paxpy": 0}

    def _check(self, op: list[Any]) -> None:
        kind, args = op[0], op[1:]
        if kind not in self._ARITY or len(args) != self._ARITY[kind]:
            raise UpdateRejected(f"shard {self.index}: bad vector operation {op!r}")
        names = list(args)
        if kind in self._NUMBER_AT or kind == "version":
            number = names.pop(0)
            if isinstance(number, bool) or not isinstance(number, int | float) \
                    or not np.isfinite(number):
                raise UpdateRejected(f"shard {self.index}: bad number in {op!r}")
        if kind == "history":
            slot = names.pop(0)
            if not isinstance(slot, int) or not 0 <= slot < self.memory:
                raise UpdateRejected(f"shard {self.index}: no history slot {slot!r}")
        for name in names:
            if name not in self.vectors:
                raise UpdateRejected(f"shard {self.index}: no vector named {name!r}")

    def _op_copy(self, dst: str, src: str) -> list[float]:
        self.vectors[dst][...] = self.vectors[src]
        return []

    def _op_axpy(self, a: float, x: str, y: str) -> list[float]:
        vy = self.vectors[y]
        vy += vy.dtype.type(a) * self.vectors[x]
        return []

    def _op_scale(self, a: float, x: str) -> list[float]:
        vx = self.vectors[x]
        vx *= vx.dtype.type(a)
        return []

    def _op_dot(self, a: str, b: str) -> list[float]:
        return [float(np.dot(self.vectors[a], self.vectors[b]))]

    def _op_paxpy(self, a: float, x: str, y: str) -> list[float]:
        vx, vy = self.vectors[x], self.vectors[y]
        for lo, hi in self.penalized:
            vy[lo:hi] += vy.dtype.type(a) * vx[lo:hi]
        return []

    def _op_pdot(self, a: str, b: str) -> list[float]:
        va, vb = self.vectors[a], self.vectors[b]
        return [sum(float(np.dot(va[lo:hi], vb[lo:hi])) for lo, hi in self.penalized)]

    def _op_history(self, k: int, a: str, b: str, c: str, e: str) -> list[float]:
        s, y = self.s[k], self.y[k]
        np.subtract(self.vectors[a], self.vectors[b], out=s)
        np.subtract(self.vectors[c], self.vectors[e], out=y)
        return [float(np.dot(s, y)), float(np.dot(y, y))]

    # -- state ---------------------------------------------------------------------

    def state(self) -> dict[str, np.ndarray]:
        return {f"lbfgs/{name}": self.vectors[name].copy() for name in ("g", "d")} | {
            "lbfgs/s": self.s.copy(), "lbfgs/y": self.y.copy()}

    def restore(self, state: dict[str, Any]) -> None:
        """Take back what `state` saved; checked whole before anything is written."""
        pairs = []
        for key, value in state.items():
            if not key.startswith("lbfgs/"):
                continue
            name = key.removeprefix("lbfgs/")
            target = {"s": self.s, "y": self.y}.get(name, self.vectors.get(name))
            if target is None or np.shape(value) != target.shape:
                raise UpdateRejected(f"shard {self.index}: checkpoint entry {key!r} does not "
                                     f"fit this shard's L-BFGS state")
            pairs.append((target, value))
        for target, value in pairs:
            target[...] = value

    def stats(self) -> dict[str, Any]:
        return {"memory": self.memory, "pass": self.pass_id, "accumulated": self.accumulated,
                "duplicate_pushes": self.duplicates, "stale_pushes": self.stale}

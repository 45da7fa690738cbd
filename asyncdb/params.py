"""Where each named tensor lives in one flat float32 vector, and how that vector is
split into contiguous shards of nearly equal size (the slicer)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ConfigError

if TYPE_CHECKING:
    from asyncdb.models import Model


@dataclass(frozen=True)
class ParameterLayout:
    """Named shapes laid end to end in one flat vector, in the order given."""

    shapes: dict[str, tuple[int, ...]]

    @property
    def offsets(self) -> dict[str, tuple[int, int]]:
        spans, start = {}, 0
        for name, shape in self.shapes.items():
            size = int(np.prod(shape, dtype=np.int64))
            spans[name] = (start, start + size)
            start += size
        return spans

    @property
    def size(self) -> int:
        return sum(int(np.prod(shape, dtype=np.int64)) for shape in self.shapes.values())

    def views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Each tensor as a view into `flat` (no copy)."""
        if flat.shape != (self.size,):
            raise ConfigError(f"flat vector has shape {flat.shape}, layout needs ({self.size},)")
        return {name: flat[lo:hi].reshape(self.shapes[name])
                for name, (lo, hi) in self.offsets.items()}

    def tensors(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """The user-facing tensors in `flat` (here views, no copy)."""
        return self.views(flat)

    def flatten(self, tensors: dict[str, np.ndarray], dtype: Any = np.float32) -> np.ndarray:
        flat = np.empty(self.size, dtype)
        for name, view in self.views(flat).items():
            view[...] = tensors[name]
        return flat

    def shard_bounds(self, shards: int) -> list[tuple[int, int]]:
        """`shards` contiguous [lo, hi) ranges covering the vector, sizes within one."""
        if not 1 <= shards <= max(1, self.size):
            raise ConfigError(f"cannot split {self.size} parameters into {shards} shards")
        edges = [self.size * i // shards for i in range(shards + 1)]
        return list(itertools.pairwise(edges))


class PartitionedLayout:
    """The parameters of a model split into `parts` partitions: partition 0's share
    (in its own `param_shapes()` order), then partition 1's, and so on, so each
    partition's parameters are one contiguous block of the flat vector. `tensors` and
    `flatten` convert to and from the user-facing shapes."""

    def __init__(self, model: Model, parts: int) -> None:
        try:
            partitions = [model.partition(p, parts) for p in range(parts)]
        except ValueError as exc:
            raise ConfigError(f"{model!r} in {parts} partitions: {exc}") from exc
        self.parts = parts
        self.shapes = model.param_shapes()
        self.blocks = [ParameterLayout(p.param_shapes()) for p in partitions]
        self.indexes = [p.param_index() for p in partitions]
        edges = list(itertools.accumulate((b.size for b in self.blocks), initial=0))
        self.block_bounds = list(itertools.pairwise(edges))
        self.size = edges[-1]

    def block(self, flat: np.ndarray, part: int) -> np.ndarray:
        lo, hi = self.block_bounds[part]
        return flat[lo:hi]

    def tensors(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Whole tensors in the user-facing shapes, assembled (copied) from `flat`."""
        if flat.shape != (self.size,):
            raise ConfigError(f"flat vector has shape {flat.shape}, layout needs ({self.size},)")
        whole = {name: np.empty(shape, flat.dtype) for name, shape in self.shapes.items()}
        for part, (layout, index) in enumerate(zip(self.blocks, self.indexes, strict=True)):
            for name, view in layout.views(self.block(flat, part)).items():
                target, where = index[name]
                whole[target][where] = view
        return whole

    def flatten(self, tensors: dict[str, np.ndarray], dtype: Any = np.float32) -> np.ndarray:
        flat = np.empty(self.size, dtype)
        for part, (layout, index) in enumerate(zip(self.blocks, self.indexes, strict=True)):
            for name, view in layout.views(self.block(flat, part)).items():
                source, where = index[name]
                view[...] = tensors[source][where]
        return flat

    def shard_bounds(self, shards: int) -> list[tuple[int, int]]:
        """Contiguous ranges, none straddling two partitions' blocks: partition p's block
        is cut into shards // parts shards (one more for the first shards % parts)."""
        if shards < self.parts:
            raise ConfigError(f"{shards} shards for {self.parts} partitions: each partition "
                              "needs shards of its own (at least one shard per partition)")
        bounds: list[tuple[int, int]] = []
        for part, (lo, hi) in enumerate(self.block_bounds):
            count = shards // self.parts + (1 if part < shards % self.parts else 0)
            if hi - lo < count:
                raise ConfigError(f"partition {part} has {hi - lo} parameters, too few "
                                  f"for {count} shards")
            edges = [lo + (hi - lo) * i // count for i in range(count + 1)]
            bounds += list(itertools.pairwise(edges))
        return bounds

    def shards_of(self, part: int, bounds: list[tuple[int, int]]) -> list[int]:
        """Indexes of the shards (from `shard_bounds`) holding partition `part`'s block."""
        lo, hi = self.block_bounds[part]
        return [i for i, (s_lo, s_hi) in enumerate(bounds) if lo <= s_lo and s_hi <= hi]


Layout = ParameterLayout | PartitionedLayout


def layout_of(model: Model, parts: int = 1) -> Layout:
    """The flat layout of `model`'s parameters for replicas in `parts` partitions."""
    if parts < 1:
        raise ConfigError(f"a replica needs at least one partition, got {parts}")
    if parts == 1:
        return ParameterLayout(model.param_shapes())
    return PartitionedLayout(model, parts)


def tensors_of(layout: Layout, flat: np.ndarray) -> dict[str, np.ndarray]:
    """The user-facing tensors of `flat` (views for a whole layout, copies when
    partitioned)."""
    if isinstance(layout, PartitionedLayout):
        return layout.tensors(flat)
    return dict(layout.views(flat))


def spans_of(layout: Layout, names: list[str]) -> list[tuple[int, int]]:
    """The flat ranges of the tensors `names` (user-facing names); several per tensor
    when partitioned (one per partition's share of it)."""
    if isinstance(layout, ParameterLayout):
        return [layout.offsets[name] for name in names]
    spans = []
    for (lo, _hi), block, index in zip(layout.block_bounds, layout.blocks, layout.indexes,
                                       strict=True):
        spans += [(lo + a, lo + b) for name, (a, b) in block.offsets.items()
                  if index[name][0] in names]
    return spans

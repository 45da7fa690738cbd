"""Where each named tensor lives in one flat float32 vector, and how that vector is
split into contiguous shards of nearly equal size (the slicer)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigError


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

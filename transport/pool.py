"""Reusable receive buffers, so large frames do not pay for fresh pages each time."""

from __future__ import annotations

import weakref
from collections import defaultdict

import numpy as np


class BufferPool:
    """Hands out uint8 arrays of an exact size, backed by recycled blocks.

    Each array handed out is a base array of its own: arrays parsed from it are views
    that keep it alive, and its block returns to the pool only when the last of them is
    gone. A receiver may keep what it got for as long as it likes; the pool just
    allocates another block meanwhile.
    """

    def __init__(self, max_blocks: int = 4) -> None:
        self.max_blocks = max_blocks
        self._free: defaultdict[int, list[np.ndarray]] = defaultdict(list)
        self._count = 0
        self.allocated = 0

    def take(self, nbytes: int) -> np.ndarray:
        free = self._free.get(nbytes)
        if free:
            block = free.pop()
            self._count -= 1
        else:
            block = np.empty(nbytes, np.uint8)
            self.allocated += 1
        view = np.frombuffer(block.data, np.uint8)
        weakref.finalize(view, self._give_back, block)
        return view

    def _give_back(self, block: np.ndarray) -> None:
        if self._count < self.max_blocks:
            self._free[len(block)].append(block)
            self._count += 1

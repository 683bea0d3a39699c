"""Reading image sets for the checks: random access at the audit geometry, with a bounded cache."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from synthgate.imageset import ImageSet


class SetLoader:
    """Random access to a set's images at the audit geometry, with a bounded LRU."""

    def __init__(self, imageset: ImageSet, geometry, max_bytes: int = 512 << 20):
        self.imageset = imageset
        self.geometry = geometry
        per = geometry.height * geometry.width * geometry.channels * 4
        self.capacity = max(8, max_bytes // per)
        self._lru: OrderedDict[int, np.ndarray] = OrderedDict()

    def one(self, i: int) -> np.ndarray:
        if i in self._lru:
            self._lru.move_to_end(i)
            return self._lru[i]
        x = np.ascontiguousarray(self.imageset.load(i, self.geometry).transpose(2, 0, 1))
        self._lru[i] = x
        if len(self._lru) > self.capacity:
            self._lru.popitem(last=False)
        return x

    def __call__(self, indices) -> np.ndarray:
        return np.stack([self.one(int(i)) for i in indices])

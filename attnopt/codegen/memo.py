"""Bounded, thread-safe memo tables for the module-level caches of the operators and the cost model.

attnopt runs inside serving processes that optimise, run and drop many models. A plain dict at
module level that gains an entry per model, per site or per shape grows for as long as the
process lives, so every module-level cache is a :class:`BoundedCache`: least recently used
entries go first once ``maxsize`` is reached, and a miss only costs recomputing the entry.
Entries tied to one model's lifetime (a rewritten site's mask kind, a calibration sample's
reference output) are also dropped when that model goes (see :func:`forget_when_freed`).

:func:`cache_sizes` lists every table with its size, so tests and ``benchmarks/memory.py`` can
check that nothing grows past its bound.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

__all__ = ["BoundedCache", "cache_sizes", "forget_when_freed"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: Every table by name, held weakly (a table made for a test goes with it).
_ALL: weakref.WeakValueDictionary[str, BoundedCache] = weakref.WeakValueDictionary()


class BoundedCache(Generic[K, V]):
    """A least-recently-used mapping of at most ``maxsize`` entries, safe to share between threads.

    Only the mapping is locked: a value is computed outside the lock, so two threads missing
    the same key at once both compute it (values are pure functions of their keys) and the
    second store wins.
    """

    __slots__ = ("name", "maxsize", "_data", "_lock", "__weakref__")

    def __init__(self, name: str, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"Expected maxsize >= 1 for cache {name!r}, but got {maxsize}.")
        self.name, self.maxsize = name, maxsize
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        _ALL[name] = self

    def get(self, key: K, default: Any = None) -> V | Any:
        """The value at ``key`` (marked most recently used), or ``default``."""
        with self._lock:
            try:
                self._data.move_to_end(key)
            except KeyError:
                return default
            return self._data[key]

    def __setitem__(self, key: K, value: V) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def __getitem__(self, key: K) -> V:
        missing = object()
        value = self.get(key, missing)
        if value is missing:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def items(self) -> list[tuple[K, V]]:
        """A snapshot of the entries, oldest first."""
        with self._lock:
            return list(self._data.items())

    def add(self, key: K) -> bool:
        """Use the table as a bounded set: store ``key``; True if it was not there yet."""
        with self._lock:
            new = key not in self._data
            self._data[key] = True  # type: ignore[assignment]
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)
            return new

    def pop(self, key: K, default: Any = None) -> V | Any:
        """Remove ``key``; its value, or ``default``."""
        with self._lock:
            return self._data.pop(key, default)

    def discard_where(self, predicate: Callable[[K], bool]) -> int:
        """Remove every entry whose key satisfies ``predicate``; how many went."""
        with self._lock:
            gone = [k for k in self._data if predicate(k)]
            for k in gone:
                del self._data[k]
            return len(gone)

    def clear(self) -> None:
        """Remove every entry."""
        with self._lock:
            self._data.clear()


def cache_sizes() -> dict[str, tuple[int, int]]:
    """``name -> (entries, maxsize)`` of every :class:`BoundedCache` created so far."""
    return {name: (len(c), c.maxsize) for name, c in sorted(_ALL.items())}


def forget_when_freed(owner: object, callback: Callable[..., Any], *args: Any) -> None:
    """Call ``callback(*args)`` once ``owner`` is garbage collected (never keeping it alive).

    For cache entries keyed by something that belongs to one model (a rewritten site's id, a
    calibration sample): the entry goes when the model does, instead of waiting to be evicted.
    """
    weakref.finalize(owner, callback, *args)

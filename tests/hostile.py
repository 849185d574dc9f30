"""User code that misbehaves in unusual ways (issue 10), importable by spawned processes."""

from __future__ import annotations

import os
import sqlite3

import numpy as np


class StrRaises(Exception):
    """A user exception whose ``__str__`` itself raises."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken too")


class UserInterrupt(BaseException):
    """A user exception that is a ``BaseException`` but not an ``Exception``."""


class RaiseOnce:
    """A ``transform`` of ``(x, index)`` samples raising ``kind()`` at sample ``index``; every call
    on that sample appends a byte to ``counter``, so a test can tell whether user code ran twice."""

    def __init__(self, index: int, kind: type[BaseException], counter: str):
        self.index = index
        self.kind = kind
        self.counter = counter

    def __call__(self, sample):
        x, y = sample
        if int(y) == self.index:
            with open(self.counter, "ab") as file:
                file.write(b"x")
            raise self.kind("bad sample")
        return x, y

    def calls(self) -> int:
        return os.path.getsize(self.counter) if os.path.exists(self.counter) else 0


class HoldsGenerator:
    """A ``transform`` that keeps a generator (which no pickler can handle)."""

    def __init__(self) -> None:
        self.numbers = (i for i in range(3))

    def __call__(self, sample):
        return sample


class Database:
    """A source holding an open ``sqlite3.Connection`` (cannot be pickled)."""

    def __init__(self, n: int) -> None:
        self.connection = sqlite3.connect(":memory:")
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        return np.full(2, i)

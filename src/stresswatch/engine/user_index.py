"""Engine-wide user numbers, so that per-user tables are arrays rather than dictionaries of strings.

Each user id is kept once (one dictionary, one list of names) and numbered in order of first
sight; numbers are never reused, so a table indexed by them stays valid whoever is forgotten.
At 100,000 users a per-user dictionary of strings cost 40-400 bytes a user per table; an
array column costs its item size (1-8 bytes).
"""

from __future__ import annotations

import numpy as np


class UserIndex:
    def __init__(self) -> None:
        self._number: dict[str, int] = {}
        self.names: list[str] = []

    def __len__(self) -> int:
        return len(self.names)

    def get(self, user: str) -> int | None:
        """The user's number, or None if never seen."""
        return self._number.get(user)

    def number(self, user: str) -> int:
        """The user's number, given one on first sight."""
        i = self._number.get(user)
        if i is None:
            i = self._number[user] = len(self.names)
            self.names.append(user)
        return i


class Column:
    """A growable array indexed by :class:`UserIndex` numbers (``fill`` where nothing is set)."""

    def __init__(self, dtype: type | np.dtype, fill: int = 0) -> None:
        self.fill = fill
        self.values = np.full(0, fill, dtype=dtype)

    def ensure(self, n: int) -> np.ndarray:
        """The array, grown (doubling) to hold at least ``n`` users."""
        if n > len(self.values):
            grown = np.full(max(n, 2 * len(self.values), 1024), self.fill, dtype=self.values.dtype)
            grown[: len(self.values)] = self.values
            self.values = grown
        return self.values


__all__ = ["Column", "UserIndex"]

"""Budget: one grace period shared by every step, so no single wait can overrun it.

Each step asks for ``budget.slice(cap)``: the smaller of its own cap and what is left. A step
that gets nothing left must not start. The clock is injectable so tests can drive it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Budget"]


class Budget:
    """A monotonic deadline with helpers that hand out what remains of it."""

    __slots__ = ("_clock", "_deadline", "_start", "total_s")

    def __init__(self, total_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.total_s = total_s
        self._clock = clock
        self._start = clock()
        self._deadline = self._start + total_s

    def remaining(self) -> float:
        """Seconds left, never negative."""
        return max(self._deadline - self._clock(), 0.0)

    @property
    def expired(self) -> bool:
        """True once nothing is left."""
        return self._clock() >= self._deadline

    def slice(self, cap: float | None = None) -> float:
        """What a step may spend: ``cap`` or whatever is left, whichever is smaller."""
        left = self.remaining()
        return left if cap is None else min(left, cap)

    def elapsed_ms(self) -> int:
        """Milliseconds since the budget started, for summaries."""
        return round((self._clock() - self._start) * 1000)

    def child(self, cap: float) -> Budget:
        """A sub-budget that ends at ``cap`` seconds from now or at this deadline, if sooner."""
        return Budget(self.slice(cap), clock=self._clock)

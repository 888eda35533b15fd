"""On a terminal, say what a stop is waiting for and how much of its budget is left.

A stop is usually over in tens of milliseconds, but a Coder server that does not answer can
hold its upload for most of the grace period, and a person running ``shutdown`` by hand saw
nothing for 8 seconds. After a second of silence, one line on stderr, rewritten in place every
second, names the steps still running and the seconds left; it is erased before the result is
printed. Nothing at all when stderr is not a terminal (the stop script's log, a pipe), so what
scripts read does not change.

A thread, not a task: a step that holds the event loop (a big parse) is exactly when the
line should keep counting.
"""

from __future__ import annotations

import sys
import threading
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from collections.abc import Set as AbstractSet
    from typing import TextIO

__all__ = ["WaitDisplay", "describe_steps"]

_FIRST_AFTER_S = 1.0
_EVERY_S = 1.0

_STEP_WORDS = {
    "fetch": "AgentAPI's messages",
    "state": "the durable write to disk",
    "agentapi_save": "AgentAPI to save its file",
    "snapshot": "the log snapshot upload to Coder",
    "stop": "AgentAPI to stop",
}


def describe_steps(names: AbstractSet[str]) -> str | None:
    """The running steps in words, in the sequence's order; ``None`` when none is running."""
    ordered = [words for name, words in _STEP_WORDS.items() if name in names]
    return ", ".join(ordered) or None


class WaitDisplay:
    """``waiting_for()`` says what is pending (``None``: nothing to say now); ``close()``
    erases the line and must come before the result is printed."""

    def __init__(
        self,
        waiting_for: Callable[[], str | None],
        *,
        ends_at: float,
        budget_s: float,
        stream: TextIO | None = None,
    ) -> None:
        self._waiting_for = waiting_for
        self._ends_at = ends_at
        self._budget_s = budget_s
        self._stream = stream if stream is not None else sys.stderr
        self._closed = threading.Event()
        self._shown = False
        self._thread: threading.Thread | None = None
        if _is_terminal(self._stream):
            self._thread = threading.Thread(target=self._run, name="persist.waiting", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        if self._closed.wait(_FIRST_AFTER_S):
            return
        while True:
            what = self._waiting_for()
            if what is not None:
                left = max(self._ends_at - time.monotonic(), 0.0)
                self._write(
                    f"\r\x1b[Kagentapi-persist: waiting for {what}; "
                    f"{left:.1f} s of the {self._budget_s:.1f} s budget left"
                )
                self._shown = True
            if self._closed.wait(_EVERY_S):
                return

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):  # a closed terminal must not break the stop
            self._closed.set()

    def close(self) -> None:
        """Stop and erase the line (idempotent)."""
        self._closed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)
        if self._shown:
            self._shown = False
            self._write("\r\x1b[K")


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False

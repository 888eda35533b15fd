"""Stopping: who asked, by when it must be done, and a watchdog that makes sure it is.

Signal handlers only record and coordinate (``StopController.request_stop``); the work happens
in the daemon's coroutine. A second stop request sets ``force``: the best-effort steps are
skipped, the durable write is not. The watchdog is a thread, not a loop callback, so a blocked
event loop (a hung fsync, say) cannot keep the process past its deadline: it calls
``os._exit`` just before the runtime's SIGKILL would land.

As PID 1 in a container, a signal with the default disposition is ignored by the kernel, so
handlers are always installed by ``serve`` unless an embedder passes its own trigger.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import structlog

from .errors import ExitCode

__all__ = [
    "STOP_SIGNALS",
    "StopController",
    "StopRequest",
    "arm_watchdog",
    "install_signal_handlers",
]

log = structlog.get_logger(__name__)

#: Signals that start the shutdown sequence. SIGHUP too: a closed terminal is a stop.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass(frozen=True, slots=True)
class StopRequest:
    """Why we are stopping and the monotonic time by which everything must be done."""

    reason: str
    deadline: float


class StopController:
    """The stop flag, the force flag, the deadline, and the hard-exit watchdog."""

    def __init__(self, *, hard_margin_s: float = 0.15, hard_exit: bool = True) -> None:
        self.hard_exit = hard_exit
        """Arm the ``os._exit`` watchdog on stop: only when we own the process."""
        self.stop = asyncio.Event()
        self.force = asyncio.Event()
        self.request: StopRequest | None = None
        self._hard_margin_s = hard_margin_s
        self._watchdog: threading.Timer | None = None

    def request_stop(self, reason: str, *, grace_s: float, started_at: float | None = None) -> None:
        """Ask for a stop that must finish ``grace_s`` after ``started_at`` (default: now).

        The first request sets the deadline and arms the watchdog; a later one escalates to
        ``force`` and may only bring the deadline closer.
        """
        start = time.monotonic() if started_at is None else started_at
        deadline = start + grace_s
        if self.request is None:
            self.request = StopRequest(reason, deadline)
            self.stop.set()
            self._arm(deadline)
            log.info("daemon.stop_requested", reason=reason, grace_s=round(grace_s, 3))
            return
        if deadline < self.request.deadline:
            self.request = StopRequest(self.request.reason, deadline)
            self._arm(deadline)
        if not self.force.is_set():
            self.force.set()
            log.warning("daemon.stop_forced", reason=reason)

    def remaining(self) -> float:
        """Seconds until the stop deadline (infinite before a stop was requested)."""
        if self.request is None:
            return float("inf")
        return max(self.request.deadline - time.monotonic(), 0.0)

    def _arm(self, deadline: float) -> None:
        if not self.hard_exit:
            return
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = arm_watchdog(deadline - self._hard_margin_s)

    def disarm(self) -> None:
        """Cancel the watchdog once the stop has completed in time."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None


def arm_watchdog(
    at: float, *, exit_code: Callable[[], int | None] | None = None
) -> threading.Timer:
    """Exit the process with code 5 at monotonic time ``at``, unless cancelled first.

    A thread timer, not a loop callback: a blocked event loop (a hung fsync, say) must not be
    able to keep us past the grace period. Whatever was durable before stays durable: every
    write is a rename of a complete file or a checksummed journal record. ``exit_code`` may
    name the code to exit with instead: once the outcome is known (and printed), cleaning up
    after it must not turn it into a 5.
    """

    def hard_exit() -> None:
        code = exit_code() if exit_code is not None else None
        if code is None:
            sys.stderr.write(
                "agentapi-persist: grace period about to end; exiting before SIGKILL "
                "(the last durable copy is intact)\n"
            )
            code = int(ExitCode.DEADLINE)
            sys.stderr.flush()
        else:
            # The result is out; what was cut is its clean-up (the records kept for `status`).
            log.warning("watchdog.exit_after_result", code=code)
        os._exit(code)

    timer = threading.Timer(max(at - time.monotonic(), 0.0), hard_exit)
    timer.daemon = True
    timer.start()
    return timer


@contextmanager
def install_signal_handlers(
    on_stop: Callable[[str], None], on_checkpoint: Callable[[], None]
) -> Iterator[bool]:
    """Route SIGTERM/SIGINT/SIGHUP to ``on_stop`` and SIGUSR1 to ``on_checkpoint``.

    Only possible on the main thread; yields ``False`` (and installs nothing) elsewhere.
    Handlers are removed on exit, which also gives SIGINT back to asyncio's own handler.
    """
    loop = asyncio.get_running_loop()
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    installed: list[signal.Signals] = []
    try:
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, on_stop, sig.name)
            installed.append(sig)
        loop.add_signal_handler(signal.SIGUSR1, on_checkpoint)
        installed.append(signal.SIGUSR1)
    except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix loops
        log.warning("daemon.signals_unavailable")
    try:
        yield bool(installed)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)

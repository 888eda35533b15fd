"""Stop signals that arrive before the sidecar's event loop exists.

``run`` spends its first few hundred milliseconds importing pydantic and aiohttp and loading
its settings. Until now a SIGTERM in that window met the default disposition: the process
died with nothing saved, and as PID 1 in a container (where the kernel drops a signal whose
disposition is the default) the signal was lost and the stop sequence never ran at all.
So the CLI calls ``catch`` first thing; the sidecar replays what was caught once its own
handlers are installed, with the grace period counted from the moment the signal came.

Standard library only, and tiny: it runs before anything heavy is imported.
"""

from __future__ import annotations

import signal
import time

__all__ = ["catch", "caught"]

_STOP = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_caught: list[tuple[str, float]] = []


def _record(signum: int, _frame: object) -> None:
    _caught.append((signal.Signals(signum).name, time.monotonic()))


def catch() -> None:
    """Record stop signals (and SIGUSR1, whose default would kill us) until the sidecar's
    own handlers replace these. Main thread only, as Python requires."""
    for sig in (*_STOP, signal.SIGUSR1):
        signal.signal(sig, _record)


def caught() -> list[tuple[str, float]]:
    """The stop signals caught so far, as (name, monotonic time); SIGUSR1 is not a stop."""
    return [(name, at) for name, at in _caught if name != "SIGUSR1"]

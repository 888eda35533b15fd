"""The sidecar's replica uploads: after each local durable write, coalesced, retried.

The local copy comes first, always: an upload starts only after a checkpoint made a change
durable on the volume (``wake``), waits ``coalesce_s`` so that a burst of checkpoints (a
running agent prints several a second) costs one upload, and never holds anything the
checkpointer waits for. A failure (the store down, slow, refusing the credentials) is logged
with a stable event name, recorded for ``status``, and retried after a backoff that doubles to
a minute; the local copy is unaffected throughout.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog

from .errors import ReplicaError
from .replica import Replica

__all__ = ["ReplicaUploader"]

log = structlog.get_logger(__name__)

#: Seconds a burst of checkpoints is given to settle into one upload.
COALESCE_S = 1.0
#: One push may take this long before it is abandoned and retried (a hung server).
_PUSH_CAP_S = 120.0
_RETRY_MIN_S = 1.0
_RETRY_MAX_S = 60.0


class ReplicaUploader:
    """``run`` until cancelled; ``wake`` after every local durable write; ``view`` for the
    sidecar's status."""

    def __init__(self, replica: Replica, *, coalesce_s: float = COALESCE_S) -> None:
        self.replica = replica
        self.coalesce_s = coalesce_s
        self.ok: bool | None = None
        """How the last push ended (``None``: none yet)."""
        self.error: str | None = None
        self.last_ok_at: float | None = None
        self.pushes = 0
        self.failures = 0
        self.pending_since: float | None = None
        """When the oldest change not yet uploaded became durable (``None``: none waits)."""
        self._wanted = asyncio.Event()
        self._retry_s = _RETRY_MIN_S

    def wake(self) -> None:
        """A change is durable locally: upload it soon."""
        if self.pending_since is None:
            self.pending_since = time.time()
        self._wanted.set()

    def view(self, now: float) -> dict[str, Any]:
        """The last push, and how long a change has waited for the next one."""
        return {
            "url": self.replica.url,
            "ok": self.ok,
            "error": self.error,
            "last_ok_age_s": None if self.last_ok_at is None else round(now - self.last_ok_at, 3),
            "waiting_s": None if self.pending_since is None else round(now - self.pending_since, 3),
            "pushes": self.pushes,
            "failures": self.failures,
        }

    async def run(self) -> None:
        """Push whenever woken (and once at start, to catch up), coalescing and retrying."""
        self.wake()
        while True:
            await self._wanted.wait()
            await asyncio.sleep(self.coalesce_s)
            self._wanted.clear()
            pending_since, self.pending_since = self.pending_since, None
            try:
                async with asyncio.timeout(_PUSH_CAP_S):
                    await self.replica.push()
            except (ReplicaError, TimeoutError) as exc:
                error = str(exc) or f"no answer within {_PUSH_CAP_S:.0f}s"
                if isinstance(exc, TimeoutError):
                    await self.replica.record_outcome(error=error)
                delay, self._retry_s = self._retry_s, min(self._retry_s * 2, _RETRY_MAX_S)
                self.ok, self.error, self.failures = False, error, self.failures + 1
                if self.pending_since is None:
                    self.pending_since = pending_since or time.time()
                log.warning("replica.push_failed", error=error, retry_in_s=delay)
                await asyncio.sleep(delay)
                self._wanted.set()
                continue
            self._retry_s = _RETRY_MIN_S
            self.ok, self.error, self.last_ok_at = True, None, time.time()
            self.pushes += 1

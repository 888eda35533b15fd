"""Checkpoints: the sidecar's changes made durable, at the cost of the change.

Changes are grouped for ``checkpoint_interval_s`` and appended to the journal with one fsync;
after a resync the mirror is compared with the stored copy once (``StateStore.sync``), because
AgentAPI may have restarted with less or with another conversation. The journal is folded into
a generation when it outgrows it. A checkpoint that fails (disk full, EIO) is tried again
after 0.5 s doubling to 30 s, so the change lands as soon as there is room.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import structlog

from .agent_process import find_agentapi, learn_version
from .config import Settings
from .errors import PersistError
from .mirror import Mirror
from .models import Conversation
from .store import StateStore

__all__ = ["COMPACT_MIN_BYTES", "Checkpointer"]

log = structlog.get_logger(__name__)

#: Compact the journal into a generation once it is this big and bigger than the generation.
COMPACT_MIN_BYTES = 8 * 1024 * 1024
#: A failed checkpoint (disk full, EIO) is tried again after this long, doubling up to the
#: max: the change must not wait in memory until AgentAPI happens to change something else.
_RETRY_MIN_S = 0.5
_RETRY_MAX_S = 30.0


class Checkpointer:
    """Keeps ``store`` up to date with ``mirror``; ``changed`` is set by whoever changes it.

    ``facts`` (shared with the sidecar's status view) gets ``last_checkpoint_at``,
    ``last_checkpoint_ms``, ``checkpoints`` and ``checkpoint_errors``.
    """

    def __init__(
        self,
        settings: Settings,
        store: StateStore,
        mirror: Mirror,
        facts: dict[str, Any],
        *,
        settle: Callable[[], None] = lambda: None,
        after_write: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.mirror = mirror
        self._settle = settle
        """Applies what the follower holds back undecoded (``Follower.settle``), before the
        mirror is read."""
        self._facts = facts
        self.after_write = after_write
        """Called after each checkpoint that succeeded: the change is durable locally (the
        replica uploads from there)."""
        self.changed = asyncio.Event()
        self._now = asyncio.Event()
        self.write_lock = asyncio.Lock()
        self._waiters: list[asyncio.Future[None]] = []
        self._retry_s = _RETRY_MIN_S
        self._retry: asyncio.TimerHandle | None = None
        self._learning: asyncio.Task[object] | None = None

    def wait_for_next(self) -> asyncio.Future[None]:
        """A future that completes when the next checkpoint has run (the control channel's
        ``checkpoint`` request), and ask for that checkpoint now."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self.request()
        return waiter

    def close(self) -> None:
        """Cancel a pending retry and a version lookup still running."""
        if self._retry is not None:
            self._retry.cancel()
        if self._learning is not None:
            self._learning.cancel()

    def request(self) -> None:
        """Checkpoint now instead of at the end of the grouping window (SIGUSR1)."""
        log.info("daemon.checkpoint_requested")
        self.changed.set()
        self._now.set()

    async def _learn_prompt_locked(self) -> None:
        """Record the initial prompt AgentAPI was started with, while it runs.

        The prompt fields exist only in AgentAPI's state file; when the copy never saw that
        file (AgentAPI killed before any save), ``restore`` must still write the exact prompt,
        or AgentAPI finds it "different" at load and sends it again. Its command line and
        environment say what it is; nothing is written when the copy already knows. Runs after
        each resync checkpoint (AgentAPI may have restarted), under the write lock.
        """
        stored = self.store.conversation
        if stored is None or stored.prompt_origin not in ("unknown", "environment"):
            return
        process, _ = find_agentapi(self.settings.agentapi_pid_file)
        if process is None or process.initial_prompt is None:
            return
        learned = stored.model_copy(
            update={
                "initial_prompt": process.initial_prompt,
                "initial_prompt_sent": None,
                "prompt_origin": "agentapi_process",
            }
        )
        try:
            await self.store.aappend((), prompt=learned)
        except PersistError as exc:
            log.warning("daemon.prompt_not_recorded", error=str(exc))
            return
        log.info(
            "daemon.prompt_learned",
            source="agentapi_process",
            chars=len(learned.initial_prompt or ""),
        )

    async def run(self) -> None:
        """Checkpoint whenever something changed, grouping the changes of one interval."""
        interval = self.settings.checkpoint_interval_s
        while True:
            await self.changed.wait()
            if not self._now.is_set():
                # Group the changes of the next `interval` into one fsync.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await self._now.wait()
            trigger = "request" if self._now.is_set() else "interval"
            self.changed.clear()
            self._now.clear()
            await self.checkpoint(trigger=trigger)

    async def checkpoint(self, *, trigger: str = "direct") -> None:
        """Make the mirror's changes durable now (journal append, or a full compare after a
        resync), and compact the journal when it has outgrown the generation. ``trigger``
        says why, in the log: the grouping ``interval`` ran out, a ``request`` (SIGUSR1, the
        control channel) came first, or a ``direct`` call (the stop's flush, an upload)."""
        async with self.write_lock:
            started = time.perf_counter()
            self._settle()
            try:
                if not self.mirror.synced:
                    await self._checkpoint_full()
                else:
                    updates = self.mirror.take_dirty()
                    if updates:
                        try:
                            await self.store.aappend(updates)
                        except PersistError:
                            self.mirror.requeue(updates)
                            raise
                await self._maybe_compact()
            except PersistError as exc:
                self._facts["checkpoint_errors"] += 1
                delay = self._retry_later()
                log.error("daemon.checkpoint_failed", error=str(exc), retry_in_s=delay)
                return
            finally:
                waiters, self._waiters = self._waiters, []
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)
            self._retry_s = _RETRY_MIN_S
            self.after_write()
            ms = round((time.perf_counter() - started) * 1000, 2)
            self._facts.update(
                last_checkpoint_at=time.time(),
                last_checkpoint_ms=ms,
                checkpoints=self._facts["checkpoints"] + 1,
            )
            log.debug(
                "daemon.checkpoint", ms=ms, journal_bytes=self.store.journal_bytes, trigger=trigger
            )

    def _retry_later(self) -> float:
        """Ask the checkpoint loop to try again after the current backoff; return it."""
        if self._retry is not None:
            self._retry.cancel()
        delay, self._retry_s = self._retry_s, min(self._retry_s * 2, _RETRY_MAX_S)
        self._retry = asyncio.get_running_loop().call_later(delay, self.changed.set)
        return delay

    async def _checkpoint_full(self) -> None:
        messages = tuple(self.mirror.messages)
        replacements = self.mirror.replacements
        self.mirror.dirty.clear()
        stored = self.store.conversation or Conversation()
        conversation = Conversation.model_construct(
            messages=messages,
            initial_prompt=stored.initial_prompt,
            initial_prompt_sent=stored.initial_prompt_sent,
            prompt_origin=stored.prompt_origin,
        )
        outcome, detail = await self.store.async_sync(conversation)
        current = self.store.conversation
        # Synced once the store holds exactly the mirror; while the stored copy is ahead
        # (AgentAPI came back with less), every checkpoint compares again. A replay that
        # replaced the mirror during the write is not what was compared: it stays unsynced,
        # for the checkpoint its change asked for (over ACP every turn ends with a resync;
        # with the real AgentAPI 0.12.2 this lost the turn's messages until the next change).
        if self.mirror.replacements == replacements:
            self.mirror.synced = current is not None and current.messages == messages
        log.info(
            "daemon.resync_checkpoint", outcome=outcome, detail=detail, synced=self.mirror.synced
        )
        await self._learn_prompt_locked()
        if self._learning is None or self._learning.done():
            # AgentAPI (re)connected: learn its version now, outside the write lock, so the
            # stop finds it known and runs no `agentapi --version` in its grace period.
            self._learning = asyncio.create_task(
                learn_version(
                    self.settings.agentapi_pid_file, fallback_bin=self.settings.agentapi_bin
                ),
                name="persist.learn_version",
            )

    async def _maybe_compact(self) -> None:
        journal = self.store.journal_bytes
        if journal > COMPACT_MIN_BYTES and journal > self.store.generation_bytes:
            report = await self.store.acompact()
            log.info("store.compacted", seq=report.seq, bytes=report.bytes_written)

    async def compact_on_exit(self, *, durable: bool, forced: bool, remaining_s: float) -> None:
        """Fold the journal into a generation, when it is durable and there is time for it.

        The next start then loads one file instead of replaying records. It is optional: a
        generation plus its journal loads just as correctly, so it is skipped when forced or
        when the estimated write (at a pessimistic 50 MB/s) would not fit what is left.
        """
        if not durable or forced or self.store.journal_bytes == 0:
            return
        estimate_s = (self.store.generation_bytes + self.store.journal_bytes) / 50e6 + 0.05
        if remaining_s < 2 * estimate_s:
            log.info(
                "store.compaction_skipped", reason="not enough time left", estimate_s=estimate_s
            )
            return
        with contextlib.suppress(PersistError):
            compacted = await self.store.acompact()
            log.info("store.compacted", seq=compacted.seq, bytes=compacted.bytes_written, on="exit")

"""The sidecar: keep the conversation durable all the time, then stop within the grace period.

It composes the rest of the package (the layering is a contract in pyproject.toml, checked
by ``lint-imports`` in scripts/check): ``peers`` opens the store and the clients, ``restoring``
runs at start, ``mirror`` holds what AgentAPI shows, ``shutdown.run_shutdown`` is the stop,
``signals`` and ``control`` bring the stop requests.

Lifecycle of ``serve``:

1. **Start**: ``restore`` (skipped with a log line if AgentAPI is already up: its file is its
   own then), load the store, open the control socket, log ``daemon.ready``.
2. **Run** (named tasks, all ours, supervised until a stop or a crash): *follow* AgentAPI's
   event stream (reconnecting with backoff, resynchronising from ``GET /messages`` when the
   stream drops);
   *checkpoint* changes within ``checkpoint_interval_s`` (one journal append, one fsync;
   compaction when the journal outgrows the generation); *upload* a snapshot when the agent
   turns stable after a change, at most once per ``snapshot_interval_s``.
3. **Stop** on SIGTERM/SIGINT/SIGHUP, a control-channel ``shutdown``, or the embedder's
   trigger: cancel only our tasks, flush the last changes, run the shutdown sequence with the
   in-memory copy, answer waiting control clients, return the report. A second stop request
   forces: best-effort steps are skipped, the durable write is not. SIGUSR1 forces a
   checkpoint now.

Idle means idle: with AgentAPI connected and silent, every task is blocked on a read or an
event; nothing polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import aiohttp
import structlog

from . import early_signals
from .agentapi import AgentAPIClient
from .budget import Budget
from .checkpointer import Checkpointer
from .coder import CoderClient, UploadOutcome
from .config import Settings
from .control import ControlServer
from .errors import (
    AgentRunningError,
    ControlUnavailable,
    ExitCode,
    PersistError,
    SidecarAlreadyRunning,
    StateDirBusy,
)
from .follower import Follower
from .identity import Instance
from .migration import adopt_legacy_copy
from .mirror import Mirror
from .peers import SIDECAR_AGENTAPI_TIMEOUT_S, Peers, open_peers
from .records import record_upload
from .replica import reader_for_restore
from .replica_uploader import ReplicaUploader
from .restoring import restore
from .shutdown import ShutdownReport, run_shutdown
from .signals import StopController, install_signal_handlers
from .snapshot import build_snapshot
from .store import StateStore

__all__ = ["Daemon", "DaemonState", "run", "serve"]

log = structlog.get_logger(__name__)

_UPLOAD_CAP_S = 10.0

Trigger = Callable[[], Awaitable[object]]


class DaemonState(enum.Enum):
    """Where the daemon is in its life; a daemon is used once."""

    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    CLOSED = "closed"


class Daemon:
    """The sidecar, as an async context manager: ``async with Daemon(s) as d: await d.serve()``.

    Sessions and the store may be passed in (tests, embedders); otherwise the daemon makes
    and closes its own.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        store: StateStore | None = None,
        agent_session: aiohttp.ClientSession | None = None,
        coder_session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.settings = settings
        self.store = store or StateStore(
            settings.state_dir,
            max_bytes=settings.max_body_bytes,
            instance=settings.instance.as_dict(),
        )
        self.state = DaemonState.NEW
        self.mirror = Mirror()
        self.stopper = StopController(hard_margin_s=settings.watchdog_margin_s)
        self._exit_stack = contextlib.AsyncExitStack()
        self._peers: Peers | None = None
        self._agent_session = agent_session
        self._coder_session = coder_session
        self._agent: AgentAPIClient | None = None
        self._coder: CoderClient | None = None
        self._done: asyncio.Future[ShutdownReport] | None = None
        self._control: ControlServer | None = None
        self._facts: dict[str, Any] = {
            "connected": False,
            "agent_status": None,
            "last_event_at": None,
            "last_checkpoint_at": None,
            "last_checkpoint_ms": None,
            "checkpoints": 0,
            "checkpoint_errors": 0,
            "reconnects": 0,
            "uploads": 0,
        }
        self.checkpointer = Checkpointer(
            settings,
            self.store,
            self.mirror,
            self._facts,
            settle=self._settle,
            after_write=self._wake_replica,
        )
        self.uploader: ReplicaUploader | None = None
        self._stop_agentapi: bool | None = None
        self._stop_grace_s: float | None = None
        self.follower: Follower | None = None
        self._uploaded_revision = -1
        self._route_missing = False
        self._last_upload_at = 0.0

    # -- context management -------------------------------------------------------------------

    async def __aenter__(self) -> Daemon:
        if self.state is not DaemonState.NEW:
            raise RuntimeError(f"a Daemon is used once; this one is {self.state.value}")
        try:
            # The state directory's lock first, held for the sidecar's whole life: before the
            # start's repair, before any write, before the control socket is bound.
            self._peers = await self._exit_stack.enter_async_context(
                open_peers(
                    self.settings,
                    store=self.store,
                    agent_session=self._agent_session,
                    coder_session=self._coder_session,
                    agent_timeout_s=SIDECAR_AGENTAPI_TIMEOUT_S,
                    lock="sidecar",
                    record_owner=True,
                )
            )
        except StateDirBusy as exc:
            raise SidecarAlreadyRunning(str(exc)) from None
        self._agent, self._coder = self._peers.agent, self._peers.coder
        if self._peers.replica is not None:
            self.uploader = ReplicaUploader(self._peers.replica)
        self.follower = Follower(
            self._agent,
            self.mirror,
            self._facts,
            on_change=self.checkpointer.changed.set,
            kept_messages=self._kept_messages,
        )
        if self._peers.coder_problem is not None:
            # Not fatal: the state is still kept durable; the stop's summary reports the
            # misconfigured snapshot (exit 4) so the template author sees it.
            log.error("daemon.snapshot_misconfigured", error=self._peers.coder_problem)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.state = DaemonState.CLOSED
        self.stopper.disarm()
        self.checkpointer.close()
        await self._exit_stack.aclose()

    # -- the whole life -----------------------------------------------------------------------

    async def serve(self, *, shutdown_trigger: Trigger | None = None) -> ShutdownReport:
        """Run until stopped, then run the shutdown sequence and return its report.

        Without ``shutdown_trigger`` the daemon owns the process: it installs signal
        handlers and arms a hard-exit watchdog on stop. With one (embedders, tests), it
        installs neither and stops when the trigger returns.
        """
        if self.state is not DaemonState.NEW or self._agent is None:
            raise RuntimeError("serve() runs once, inside `async with Daemon(...)`")
        self.state = DaemonState.RUNNING
        self._done = asyncio.get_running_loop().create_future()
        owns_process = shutdown_trigger is None
        self.stopper.hard_exit = owns_process
        signals = (
            install_signal_handlers(self._on_signal, self.request_checkpoint)
            if owns_process
            else contextlib.nullcontext(False)
        )
        with signals:
            if owns_process:
                # Stop signals that came while we were importing and loading (cli): honoured
                # now, the grace period counted from when each came.
                for name, at in early_signals.caught():
                    self.stopper.request_stop(name, grace_s=self.settings.grace_s, started_at=at)
            await self._start()
            crashed = await self._run_until_stopped(shutdown_trigger)
            report = await self._stop()
        if crashed:
            report.internal_error = True
            report.notes.append(f"internal error in {', '.join(crashed)}; state saved anyway")
        return report

    async def _run_until_stopped(self, trigger: Trigger | None) -> list[str]:
        """Run our tasks until a stop is requested or one of them crashes; cancel only ours.

        Not a ``TaskGroup`` ended by an exception: on Python 3.11 that leaves a stray
        cancellation request on this task, which would then cut the shutdown sequence.
        A crashed worker is logged and turns into a stop, so the state is still saved.
        """
        workers = {
            asyncio.create_task(self._followed().run(), name="daemon.follow"),
            asyncio.create_task(self.checkpointer.run(), name="daemon.checkpoint"),
        }
        if self._coder is not None and self.settings.snapshot_interval_s > 0:
            workers.add(asyncio.create_task(self._upload_loop(), name="daemon.upload"))
        if self.uploader is not None:
            workers.add(asyncio.create_task(self.uploader.run(), name="daemon.replica"))
        stop = asyncio.create_task(self._wait_for_stop(trigger), name="daemon.stop")
        everything = {*workers, stop}
        try:
            done, _ = await asyncio.wait(everything, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in everything:
                task.cancel(msg="daemon stopping")
            await asyncio.wait(everything)
        crashed = []
        for task in done - {stop}:
            error = None if task.cancelled() else task.exception()
            crashed.append(task.get_name())
            log.error("daemon.task_crashed", task=task.get_name(), error=repr(error))
        if crashed and self.stopper.request is None:
            self.stopper.request_stop("internal error", grace_s=self.settings.grace_s)
        return crashed

    async def _start(self) -> None:
        # Before the repair and the first load: a copy an earlier release kept for this
        # instance joins its directory (whether or not AgentAPI is up yet).
        moved = await asyncio.to_thread(adopt_legacy_copy, self.settings)
        if moved is not None:
            log.warning("daemon.legacy_copy", note=moved)
        try:
            # The replica is read (when AgentAPI is not up yet) in restore's worker thread.
            replica = reader_for_restore(self.settings, self.store)
            outcome = await asyncio.to_thread(
                restore, self.settings, store=self.store, locked=True, replica=replica
            )
            log.info("daemon.restored", outcome=outcome.outcome, messages=outcome.messages)
        except AgentRunningError as exc:
            # Say what showed it up: its pid file may well be missing (logged just before as
            # agentapi.not_found) while something answers at its address.
            log.info(
                "daemon.restore_skipped",
                reason=f"AgentAPI is already up ({exc.evidence}): it holds its own conversation",
            )
        except PersistError as exc:
            log.error("daemon.restore_failed", error=str(exc))
        if self.store.conversation is None:
            report = await self.store.aload()
            for problem in report.problems:
                log.warning("daemon.store_problem", problem=problem)
        control = ControlServer(self.settings.state_dir, self._handle_control)
        try:
            await control.start()
            self._control = control
        except ControlUnavailable as exc:
            # The conversation is still followed and checkpointed (retried while the store
            # fails); only the `shutdown` command cannot reach us. SIGTERM still stops us.
            log.error(
                "daemon.control_unavailable",
                error=str(exc),
                hint="`agentapi-persist shutdown` cannot reach this sidecar; SIGTERM stops it",
            )
        stored = self.store.conversation
        log.info(
            "daemon.ready",
            pid=os.getpid(),
            agentapi_url=self.settings.agentapi_url,
            stored_messages=len(stored.messages) if stored else 0,
            snapshot=self._coder is not None,
        )

    def _wake_replica(self) -> None:
        if self.uploader is not None:
            self.uploader.wake()

    async def _wait_for_stop(self, trigger: Trigger | None) -> None:
        if trigger is None:
            await self.stopper.stop.wait()
        else:
            waiter = asyncio.create_task(self.stopper.stop.wait(), name="daemon.stop_flag")
            external = asyncio.ensure_future(trigger())
            try:
                await asyncio.wait({waiter, external}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (waiter, external):
                    task.cancel()
            if self.stopper.request is None:
                self.stopper.request_stop("trigger", grace_s=self.settings.grace_s)

    def _on_signal(self, name: str) -> None:
        self.stopper.request_stop(name, grace_s=self.settings.grace_s)

    def _followed(self) -> Follower:
        assert self.follower is not None, "use the Daemon as an async context manager"
        return self.follower

    def _kept_messages(self) -> int:
        stored = self.store.conversation
        return len(stored.messages) if stored is not None else 0

    def request_checkpoint(self) -> None:
        """Checkpoint now instead of at the end of the grouping window (SIGUSR1)."""
        self.checkpointer.request()

    def _settle(self) -> None:
        """Apply the update the follower holds back undecoded, before the mirror is read."""
        if self.follower is not None:
            self.follower.settle()

    async def checkpoint(self) -> None:
        """Make the mirror's changes durable now."""
        await self.checkpointer.checkpoint()

    # -- periodic snapshots ---------------------------------------------------------------------

    async def _upload_loop(self) -> None:
        """Upload when the agent is stable after a change, at most once per interval."""
        interval = self.settings.snapshot_interval_s
        while True:
            if self._route_missing:
                # Idle until the stop cancels us (a worker that returns counts as crashed).
                await asyncio.Event().wait()
            stable = self._followed().stable
            await stable.wait()
            self._settle()
            if self.mirror.revision == self._uploaded_revision:
                # Nothing new since the last upload: wait for the next change to come and go.
                stable.clear()
                continue
            wait = self._last_upload_at + interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            await self.upload_snapshot()

    async def upload_snapshot(self) -> None:
        """Upload the durable copy's snapshot now (after flushing pending changes)."""
        if self._coder is None:
            return
        self._settle()
        revision = self.mirror.revision
        await self.checkpoint()
        conversation = self.store.conversation
        self._last_upload_at = time.monotonic()
        if conversation is None or not conversation.messages:
            self._uploaded_revision = revision
            return
        snapshot = build_snapshot(
            conversation.messages,
            max_messages=self.settings.snapshot_messages,
            max_bytes=self.settings.snapshot_max_bytes,
        )
        result = await self._coder.upload_snapshot(snapshot.payload, budget=Budget(_UPLOAD_CAP_S))
        self._facts["uploads"] += 1
        if result.delivered:
            self._uploaded_revision = revision
        if result.outcome is UploadOutcome.ROUTE_MISSING:
            # No upload to this server can ever succeed: stop asking until the next start.
            self._route_missing = True
            log.warning("daemon.snapshot_route_missing", detail=result.detail)
        await record_upload(
            self.settings.state_dir,
            result,
            messages=len(snapshot.messages),
            size=snapshot.size,
            periodic=True,
        )

    # -- stopping -------------------------------------------------------------------------------

    async def _stop(self) -> ShutdownReport:
        self.state = DaemonState.STOPPING
        request = self.stopper.request
        reason = request.reason if request else "unknown"
        settings = self.settings
        updates: dict[str, Any] = {}
        if self._stop_agentapi is not None:
            updates["stop_agentapi"] = self._stop_agentapi
        if self._stop_grace_s is not None:
            # `shutdown --grace N` over the control channel: this stop's margin follows N, not
            # the sidecar's own grace (a 2 s margin would leave 0.9 s of a 3 s grace).
            updates["grace_s"] = self._stop_grace_s
        if updates:
            settings = settings.model_copy(update=updates)
        assert self._peers is not None
        assert self._done is not None
        done = self._done

        def publish(report: ShutdownReport) -> None:
            log.info(
                "daemon.stopped", reason=reason, exit_code=int(report.exit_code), ms=report.total_ms
            )
            done.set_result(report)  # a waiting `shutdown` command gets its answer now

        report = await run_shutdown(
            settings,
            peers=self._peers,
            ends_at=time.monotonic() + self.stopper.remaining() - settings.margin_s,
            flush=self.checkpoint,
            force=self.stopper.force,
            reason=reason,
            publish=publish,
            stream_view=self.follower.current_messages if self.follower is not None else None,
        )
        await self.checkpointer.compact_on_exit(
            durable=report.durable,
            forced=self.stopper.force.is_set(),
            remaining_s=self.stopper.remaining() - self.settings.margin_s,
        )
        if self._control is not None:
            await self._control.close()
        self.stopper.disarm()
        return report

    # -- control channel ------------------------------------------------------------------------

    async def _handle_control(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "ping":
            return {"ok": True, "pid": os.getpid()}
        if op == "status":
            return {"ok": True, "status": self.view()}
        if op == "checkpoint":
            await self.checkpointer.wait_for_next()
            return {"ok": True, "status": self.view()}
        if op == "shutdown":
            refusal = self._foreign(request)
            if refusal is not None:
                return {"ok": False, "error": refusal, "exit_code": int(ExitCode.USAGE)}
            grace = float(request.get("grace_s") or self.settings.grace_s)
            elapsed = float(request.get("elapsed_s") or 0.0)
            if request.get("stop_agentapi") is not None:
                self._stop_agentapi = bool(request["stop_agentapi"])
            if self.stopper.request is None and 0 < grace <= 3600:
                self._stop_grace_s = grace
            self.stopper.request_stop(
                "control", grace_s=max(grace - elapsed, 0.1), started_at=time.monotonic()
            )
            assert self._done is not None
            report = await asyncio.shield(self._done)
            return {
                "ok": report.exit_code == 0,
                "exit_code": int(report.exit_code),
                "summary": report.summary(),
                "report": report.as_dict(),
            }
        return {"ok": False, "error": f"unknown op {op!r}", "exit_code": 2}

    def _foreign(self, request: dict[str, Any]) -> str | None:
        """Why a request names another AgentAPI instance than this sidecar's (``None``: it
        is ours, or names none, as an embedder's request may). A stop for module B must
        never be answered "ok" by module A's sidecar, which would save and stop A instead."""
        if "instance" not in request:
            return None
        theirs = Instance.from_dict(request["instance"])
        ours = self.settings.instance
        if theirs is None:
            return "bad request: 'instance' does not describe an AgentAPI instance"
        differences = ours.differences(theirs)
        if not differences:
            return None
        log.warning("control.foreign_request", op=request.get("op"), differences=differences)
        return (
            f"this sidecar keeps {ours.describe()}, and the request is for another instance "
            f"({'; '.join(differences)}): nothing was done. Give each instance its own "
            "--state-dir, or leave it unset (the default is one per module directory)"
        )

    def view(self) -> dict[str, Any]:
        """The live sidecar's facts for ``status``."""
        self._settle()
        stored = self.store.conversation
        now = time.time()
        last = self._facts["last_checkpoint_at"]
        return {
            "pid": os.getpid(),
            "state": self.state.value,
            "connected": self._facts["connected"],
            "agent_status": self._facts["agent_status"],
            "live_messages": len(self.mirror.messages),
            "stored_messages": len(stored.messages) if stored else 0,
            "pending_changes": len(self.mirror.dirty) + (0 if self.mirror.synced else 1),
            "last_checkpoint_age_s": None if last is None else round(now - last, 3),
            "last_checkpoint_ms": self._facts["last_checkpoint_ms"],
            "checkpoints": self._facts["checkpoints"],
            "checkpoint_errors": self._facts["checkpoint_errors"],
            "journal_bytes": self.store.journal_bytes,
            "generation": self.store.seq,
            "reconnects": self._facts["reconnects"],
            "uploads": self._facts["uploads"],
            **({"replica": self.uploader.view(now)} if self.uploader is not None else {}),
        }


async def serve(settings: Settings, *, shutdown_trigger: Trigger | None = None) -> ShutdownReport:
    """Run the sidecar until stopped; see ``Daemon.serve``."""
    async with Daemon(settings) as daemon:
        return await daemon.serve(shutdown_trigger=shutdown_trigger)


def run(settings: Settings) -> int:
    """The ``run`` command: serve until a stop signal, return the exit code."""
    report = asyncio.run(serve(settings))
    return int(report.exit_code)

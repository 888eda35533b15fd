"""The stop, top to bottom: everything a workspace stop must do, inside one grace budget.

``run_shutdown`` is the one stop, used by the ``shutdown`` command and by the sidecar:

    budget -> (the sidecar's last flush) -> the sequence -> the result published
           -> the records kept for later (last-shutdown, replica outcome, file mark)

The sequence (``run_sequence``, SPEC §2), all under ``asyncio.timeout`` at the budget's end:

0. **early save**: when ``GET /status`` says ``stable`` (AgentAPI has loaded its file then;
   asked again while the fetch runs), SIGUSR1 goes out at once, while the copies are read
   (``_EarlySave``); step 2 confirms it.
1. **fetch**: read the sidecar's copy and ``GET /messages`` at once (AgentAPI's state file when
   it can add something), and keep the freshest (``copies.choose``).
2. **agentapi_save**: SIGUSR1 to AgentAPI, only when its version is known >= 0.12.0, its pid
   really is AgentAPI and persistence is on; then confirm the save landed instead of sleeping.
3. **state**: the durable write of our own copy. Shielded: a deadline or a second signal never
   cuts it half way; the task is kept referenced and awaited again before we return.
4. **snapshot**: build and upload the log snapshot, retrying while the budget lasts.
5. **stop** (``--stop-agentapi``): SIGTERM AgentAPI and wait, bounded by what is left.

Steps 2, 3 and 4 start together once step 1 is done: none needs another's result, and the
Coder token is only honoured while the stop build runs, so the upload must not queue behind
AgentAPI's own save. The durable write is started first. Step 5 waits for step 2 (AgentAPI
stops serving once it saves on SIGTERM).

The result is a ``ShutdownReport``: one outcome and a duration per step, whether the state is
durable, and the exit code. Nothing here raises for a peer's failure; it is reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import structlog

from . import records
from .agent_process import AgentProcess, find_agentapi
from .agent_process import stop as agent_stop
from .agentapi import AgentAPIClient
from .agentapi_save import ask_agentapi_to_save
from .agentapi_state import read_agentapi_state
from .budget import Budget
from .coder import CoderClient
from .config import Settings
from .copies import Gathered, StreamView, gather, with_prompt_fields
from .errors import (
    ConfigError,
    DurabilityError,
    ExitCode,
    PersistError,
    ReplicaError,
    StateFileError,
)
from .file_mark import remember
from .models import AgentAPIState, Conversation, Message
from .peers import Peers
from .records import record_upload
from .snapshot import build_snapshot
from .store import StateStore

if TYPE_CHECKING:
    from .replica import Replica

__all__ = ["ShutdownReport", "StepResult", "run_sequence", "run_shutdown"]

log = structlog.get_logger(__name__)

StepName = Literal["fetch", "agentapi_save", "state", "snapshot", "replica", "stop"]

#: Outcomes that are fine for the exit code but whose reason still belongs on the summary
#: line: a fetch that did not use AgentAPI's live answer (the sidecar's copy was kept instead),
#: and a Coder server without the log-snapshot route (a valid skip that a person should know).
_SAID_EVEN_WHEN_OK = {
    "fetch": ("sidecar", "agentapi_state", "none"),
    "snapshot": ("route_missing",),
}

#: The upload's budget ends this long before the sequence's, so its result is collected.
_REPORT_SLACK_S = 0.05

#: The most the last steps leave to the records written after the result (``_records_reserve``).
_RECORDS_RESERVE_MAX_S = 0.5


@dataclass(slots=True)
class StepResult:
    """One step's outcome, as the summary line and ``--json`` show it."""

    name: StepName
    outcome: str
    ok: bool
    ms: int
    detail: str = ""


@dataclass(slots=True)
class ShutdownReport:
    """What the sequence did, what was kept, and the exit code that follows."""

    steps: list[StepResult] = field(default_factory=list)
    saved_state: AgentAPIState | None = field(default=None, repr=False)
    """AgentAPI's file as parsed to confirm its save (not reported): read once, used twice."""
    durable: bool = False
    snapshot_ok: bool = False
    replica_ok: bool = True
    """False when a configured replica was not brought up to date (exit 9)."""
    deadline_hit: bool = False
    messages: int = 0
    kept: str = ""
    notes: list[str] = field(default_factory=list)
    total_ms: int = 0
    internal_error: bool = False
    """The sidecar stopped because one of its tasks crashed (the state was still saved)."""
    agreed_file: Path | None = None
    """AgentAPI's state file, when its confirmed save and our durable copy hold the same
    conversation (``file_mark`` records it after the result is published)."""
    agreed_messages: tuple[Message, ...] | None = field(default=None, repr=False)
    """That conversation's messages, digested into the record."""
    in_progress: set[StepName] = field(default_factory=set, repr=False)
    """The steps running now (not reported): what a terminal is told the stop waits for."""

    @property
    def exit_code(self) -> ExitCode:
        """0 only when the state is durable and the snapshot was delivered or validly skipped."""
        if not self.durable:
            return ExitCode.DEADLINE if self.deadline_hit else ExitCode.NOT_DURABLE
        if not self.snapshot_ok:
            return ExitCode.SNAPSHOT_FAILED
        if not self.replica_ok:
            return ExitCode.REPLICA_BEHIND
        return ExitCode.ERROR if self.internal_error else ExitCode.OK

    def cut_short(self) -> ShutdownReport:
        """What is known when the process must end before the sequence did: the steps that
        ended, the deadline hit, the copy as it was (a watchdog prints this)."""
        partial = ShutdownReport(
            steps=list(self.steps),
            durable=self.durable,
            snapshot_ok=self.snapshot_ok,
            replica_ok=self.replica_ok,
            deadline_hit=True,
            messages=self.messages,
        )
        if not partial.durable:
            partial.kept = "the previous copy is intact; the newest changes were not saved"
        partial.notes = ["the grace period ran out before the stop finished"]
        return partial

    @contextlib.contextmanager
    def running(self, name: StepName) -> Iterator[None]:
        """Mark step ``name`` as running (``in_progress``) for the duration."""
        self.in_progress.add(name)
        try:
            yield
        finally:
            self.in_progress.discard(name)

    def step(self, name: StepName) -> StepResult | None:
        """The result of step ``name``, if it ran."""
        return next((s for s in self.steps if s.name == name), None)

    def summary(self) -> str:
        """One line: verdict, each step's outcome and milliseconds, then what was kept."""
        verdict = "ok" if self.exit_code is ExitCode.OK else f"FAILED (exit {int(self.exit_code)})"
        parts = [f"{s.name}={s.outcome} {s.ms}ms" for s in self.steps]
        line = f"shutdown {verdict}: " + "; ".join(parts) + f"; total {self.total_ms}ms"
        # A fetch that found a copy is ok, but when AgentAPI's answer could not be used the
        # reason still belongs on the line: the sidecar's copy was kept instead of the live one.
        problems = [
            f"{s.name}: {s.detail}"
            for s in self.steps
            if s.detail and (not s.ok or s.outcome in _SAID_EVEN_WHEN_OK.get(s.name, ()))
        ]
        if problems:
            line += " | " + " | ".join(problems)
        if self.kept:
            line += f" | kept: {self.kept}"
        return line

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view (``--json`` and ``last-shutdown.json``)."""
        return {
            "ok": self.exit_code is ExitCode.OK,
            "exit_code": int(self.exit_code),
            "durable": self.durable,
            "snapshot_ok": self.snapshot_ok,
            "replica_ok": self.replica_ok,
            "deadline_hit": self.deadline_hit,
            "messages": self.messages,
            "kept": self.kept,
            "total_ms": self.total_ms,
            "notes": list(self.notes),
            "steps": [asdict(s) for s in self.steps],
            "finished_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }


async def _timed(coro: Awaitable[StepResult], name: StepName, report: ShutdownReport) -> StepResult:
    started = time.perf_counter()
    with report.running(name):
        result = await coro
    result.ms = round((time.perf_counter() - started) * 1000)
    log.info(f"shutdown.{name}", outcome=result.outcome, ok=result.ok, ms=result.ms)
    return result


async def run_shutdown(
    settings: Settings,
    *,
    peers: Peers,
    ends_at: float,
    flush: Callable[[], Awaitable[None]] | None = None,
    force: asyncio.Event | None = None,
    reason: str | None = None,
    publish: Callable[[ShutdownReport], None] | None = None,
    report: ShutdownReport | None = None,
    stream_view: StreamView | None = None,
) -> ShutdownReport:
    """The whole stop: returns its report once the records kept for later are written.

    ``ends_at`` is when the budget ends (``time.monotonic()``). ``flush`` is the running
    sidecar's last checkpoint: it gets at most half of the budget, and the sidecar's durable
    copy is then the live copy the sequence starts from. ``publish`` is called with the report
    as soon as it is known (the summary goes out before the clean-up, so a watchdog exit at
    the deadline still reports the real outcome).
    """
    live_copy: Conversation | None = None
    if flush is not None:
        # The last changes seen on the stream go to disk first; the sequence then compares
        # with a fresh GET /messages and writes only what is still missing.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(ends_at - time.monotonic(), 0.05) / 2):
                await flush()
        live_copy = peers.store.conversation
    budget = Budget(max(ends_at - time.monotonic(), 0.05))
    report = await run_sequence(
        settings,
        store=peers.store,
        agent=peers.agent,
        coder=peers.coder,
        budget=budget,
        live_copy=live_copy,
        force=force,
        report=report,
        stream_view=stream_view,
        replica=peers.replica,
    )
    if reason is not None:
        report.notes.insert(0, f"stopped by {reason}")
    if publish is not None:
        publish(report)
    await _keep_records(settings, report, peers.replica)
    return report


async def _keep_records(
    settings: Settings, report: ShutdownReport, replica: Replica | None
) -> None:
    """Write what the stop keeps for later, once its result is out: ``last-shutdown.json``,
    the replica's outcome (``replica.json``, for ``status``) and the file mark.

    Side by side, each durable on its own: between the result and the watchdog's exit there
    may be only the grace period's margin (0.15 s at a 3 s grace), and one after the other
    they cost three durable writes where a slow disk allows about one (measured with 100 ms
    per fsync: ``replica.json``, written second, was never written).
    """
    writes: list[Awaitable[None]] = [asyncio.to_thread(_write_last_shutdown, settings, report)]
    replicated = report.step("replica")
    if replica is not None and replicated is not None:
        error = None if replicated.ok else replicated.detail or replicated.outcome
        writes.append(replica.record_outcome(error=error))
    if report.agreed_file is not None:
        # So that a later divergence between the two is settled by what changed, not clocks.
        writes.append(
            asyncio.to_thread(
                remember, settings.state_dir, report.agreed_file, report.agreed_messages
            )
        )
    await asyncio.gather(*writes)


def _write_last_shutdown(settings: Settings, report: ShutdownReport) -> None:
    with contextlib.suppress(PersistError):  # informational only; the summary says it all
        records.write_record(settings.state_dir, records.LAST_SHUTDOWN, report.as_dict())


async def run_sequence(
    settings: Settings,
    *,
    store: StateStore,
    agent: AgentAPIClient | None,
    coder: CoderClient | None,
    budget: Budget,
    live_copy: Conversation | None = None,
    force: asyncio.Event | None = None,
    on_durable: Callable[[Conversation], None] | None = None,
    report: ShutdownReport | None = None,
    stream_view: StreamView | None = None,
    replica: Replica | None = None,
) -> ShutdownReport:
    """Run the whole sequence within ``budget`` and report; never raises for peer failures.

    ``coder`` is ``None`` when no snapshot is wanted. ``force`` (a second stop signal) skips
    the best-effort steps that have not started; the durable write always completes.
    ``report`` is filled in as the steps end (a watchdog can say how far the stop got).
    """
    report = report if report is not None else ShutdownReport()
    # A configured replica is behind until its step says otherwise: a stop cut anywhere
    # before that (a watchdog's line included) must not say it is up to date.
    report.replica_ok = replica is None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget.remaining()
    write_task: asyncio.Task[StepResult] | None = None
    best_effort: list[asyncio.Task[StepResult]] = []
    early: _EarlySave | None = None
    started = time.perf_counter()
    try:
        async with asyncio.timeout_at(deadline):
            process, process_reason = find_agentapi(settings.agentapi_pid_file)
            prompt = process.initial_prompt if process is not None else None
            # The stop script is not told a custom state file (the registry module passes
            # ARG_MODULE_DIR_NAME and ARG_PID_FILE_PATH only); the running AgentAPI knows it.
            agentapi_file = (
                process.state_file
                if process is not None and process.state_file is not None
                else settings.agentapi_state_file
            )
            # AgentAPI's own save goes out first, while our copies are read and parsed (a
            # 100,000-message stop spent its whole budget parsing before it asked), whenever
            # AgentAPI says it is stable: it has loaded its file then, and a save cannot lose it.
            early = _EarlySave(report)
            early.task = asyncio.create_task(
                early.run(settings, agent, process, process_reason, budget),
                name="persist.early_save",
            )
            with report.running("fetch"):
                gathered = await _fetch_step(
                    settings, store, agent, budget, live_copy, prompt, agentapi_file, report,
                    stream_view,
                )  # fmt: skip
            conversation = gathered.conversation
            early.expected = conversation.messages if conversation is not None else None
            if conversation is None:
                if _unknown(agent, gathered, process):
                    _nothing_known(report, gathered)
                    # AgentAPI's own save is then the only copy there can be: ask for it.
                    save = early.step() or _agentapi_save_step(
                        settings, process, process_reason, None, None, budget, report
                    )
                    report.steps.append(await _timed(save, "agentapi_save", report))
                else:
                    early.give_up()
                return report
            write_task = asyncio.create_task(
                _timed(_write_step(store, conversation, on_durable), "state", report),
                name="persist.write",
            )
            save = early.step() or _agentapi_save_step(
                settings, process, process_reason, conversation, gathered.agentapi_view, budget,
                report,
            )  # fmt: skip
            # The upload ends a moment before the sequence's deadline, so that its own outcome
            # (timed out, server error, ...) is reported rather than a bare "cut".
            upload_budget = budget.child(max(budget.remaining() - _REPORT_SLACK_S, 0.0))
            upload = _snapshot_step(settings, coder, conversation, upload_budget, force)
            best_effort = [
                asyncio.create_task(
                    _timed(save, "agentapi_save", report), name="persist.agentapi_save"
                ),
                asyncio.create_task(_timed(upload, "snapshot", report), name="persist.snapshot"),
            ]
            state_result = await asyncio.shield(write_task)
            report.steps.append(state_result)
            report.durable = state_result.ok
            names: tuple[StepName, ...] = ("agentapi_save", "snapshot")
            for task, name in zip(best_effort, names, strict=True):
                report.steps.append(await _best_effort(task, name, force))
            saved = report.step("agentapi_save")
            confirmed = ("confirmed_changed", "confirmed_unchanged")
            if report.durable and saved is not None and saved.outcome in confirmed:
                # AgentAPI's file and our durable copy now hold the same conversation; the
                # clean-up records it (file_mark) once the result is out.
                report.agreed_file = agentapi_file
                report.agreed_messages = conversation.messages
                if saved.outcome == "confirmed_changed":
                    await _adopt_saved_prompt(settings, store, agentapi_file, report.saved_state)
            snapshot = report.step("snapshot")
            report.snapshot_ok = snapshot is not None and snapshot.ok
            # The steps that spend whatever is left leave the records written after the
            # result (``_keep_records``) what this stop's own durable write took.
            tail = budget.child(max(budget.remaining() - _records_reserve(state_result, budget), 0))
            if replica is not None and report.durable:
                # Last, with what is left: the local copy and the snapshot never wait for it.
                pushed = await _timed(_replica_step(replica, tail, force), "replica", report)
                report.steps.append(pushed)
                report.replica_ok = pushed.ok
            if settings.stop_agentapi:
                if force is not None and force.is_set():
                    report.steps.append(StepResult("stop", "skipped", True, 0, "forced stop"))
                else:
                    stop = _stop_step(process, process_reason, tail)
                    report.steps.append(await _timed(stop, "stop", report))
    except TimeoutError:
        report.deadline_hit = True
        finished: list[StepResult] = []
        if early is not None:
            # The early save, if it was asked for, is the save there is: its own result, or
            # that it was asked and not confirmed (never a bare "cut", which says it was not).
            done = early.finished() or early.unconfirmed()
            if done is not None:
                finished.append(done)
            early.give_up(force=True)
        await _after_deadline(
            report, write_task, best_effort, settings, budget, coder, finished=finished
        )
        if replica is not None and report.durable and report.step("replica") is None:
            report.steps.append(
                StepResult("replica", "cut", False, 0, "the budget ran out before the replica")
            )
    except asyncio.CancelledError:
        # Cancelled from outside (e.g. a second Ctrl-C): the durable write still completes.
        if early is not None:
            early.give_up(force=True)
        for task in best_effort:
            task.cancel(msg="shutdown sequence cancelled")
        if write_task is not None:
            await asyncio.wait({write_task}, timeout=settings.margin_s)
        raise
    finally:
        report.total_ms = round((time.perf_counter() - started) * 1000)
    report.kept = _kept_sentence(report, store)
    return report


async def _fetch_step(
    settings: Settings,
    store: StateStore,
    agent: AgentAPIClient | None,
    budget: Budget,
    live_copy: Conversation | None,
    process_prompt: str | None,
    state_file: Path,
    report: ShutdownReport,
    stream_view: StreamView | None,
) -> Gathered:
    started = time.perf_counter()
    gathered = await gather(
        settings,
        store=store,
        agent=agent,
        budget=budget,
        live_copy=live_copy,
        process_prompt=process_prompt,
        state_file=state_file,
        stream_view=stream_view,
    )
    ms = round((time.perf_counter() - started) * 1000)
    report.notes.extend(gathered.notes)
    found = gathered.conversation is not None
    detail = "" if found else "; ".join(gathered.notes) or "no copy anywhere"
    if found and gathered.live_error is not None and agent is not None:
        detail = f"live messages unavailable: {gathered.live_error}"
    report.steps.append(StepResult("fetch", gathered.source, found, ms, detail))
    log.info("shutdown.fetch", source=gathered.source, ms=ms, notes=len(gathered.notes))
    if gathered.conversation is None:
        # Nothing exists anywhere, so nothing can be lost: durable and validly skipped.
        report.durable = True
        report.snapshot_ok = True
        report.kept = "no conversation found anywhere (nothing to save)"
        report.steps.append(StepResult("snapshot", "skipped", True, 0, "no messages"))
        return gathered
    report.messages = len(gathered.conversation.messages)
    return gathered


#: How long the stop waits for one ``GET /status`` answer before asking again.
_EARLY_STATUS_CAP_S = 0.3
#: The pause between two such questions while the fetch runs.
_EARLY_STATUS_PAUSE_S = 0.05


class _EarlySave:
    """AgentAPI's save asked for at the very start of the stop, when that is safe without
    our copy: ``GET /status`` says ``stable``, which AgentAPI reports only once its agent is
    ready, the moment it also loads its state file (coder/agentapi
    lib/screentracker/pty_conversation.go: ``statusLocked`` is "changing" until
    ``initialPromptReady``; the snapshot loop loads the state in the tick readiness is seen).
    A late or unstable answer is asked again until the fetch is done (``give_up``): with one
    answer only, an answer held past its 0.3 s (a busy AgentAPI, or our own process held by
    the parse of a 38 MB body) left a 100,000-message stop, whose fetch then took its whole
    budget, without AgentAPI's save. Otherwise the save is decided after the fetch, with
    the start-up-screen guard."""

    def __init__(self, report: ShutdownReport) -> None:
        self.report = report
        """Where the save's parse of AgentAPI's file goes (``ShutdownReport.saved_state``)."""
        self.task: asyncio.Task[StepResult | None] | None = None
        self.asked = False
        self.expected: tuple[Message, ...] | None = None
        """The conversation once the fetch has read it: AgentAPI skips a save when nothing
        changed since its last one, and then only the file's content can confirm it."""

    async def run(
        self,
        settings: Settings,
        agent: AgentAPIClient | None,
        process: AgentProcess | None,
        reason: str,
        budget: Budget,
    ) -> StepResult | None:
        if process is None or agent is None:
            return None
        attempt = 1
        while not await self._stable(agent, budget, attempt):
            await asyncio.sleep(_EARLY_STATUS_PAUSE_S)
            attempt += 1
        self.asked = True  # set before the next await: give_up() cannot race past it
        log.debug("shutdown.early_save", attempt=attempt)
        saved = await ask_agentapi_to_save(
            settings,
            process,
            reason=reason,
            conversation=None,
            agentapi_view=None,
            budget=budget,
            expected=lambda: self.expected,
        )
        self.report.saved_state = saved.state
        return StepResult("agentapi_save", str(saved.outcome), saved.ok, 0, saved.detail)

    @staticmethod
    async def _stable(agent: AgentAPIClient, budget: Budget, attempt: int) -> bool:
        """One question: does AgentAPI say ``stable`` within the cap? (debug event if not)"""
        try:
            status = await agent.status(budget=budget, cap_s=_EARLY_STATUS_CAP_S)
        except PersistError as exc:
            log.debug("shutdown.early_status", attempt=attempt, error=str(exc))
            return False
        if status.status != "stable":
            log.debug("shutdown.early_status", attempt=attempt, status=status.status)
        return status.status == "stable"

    def step(self) -> Awaitable[StepResult] | None:
        """The save step when the early save was asked for; otherwise stop looking (the
        caller decides the save itself) and ``None``."""
        if not self.asked:
            self.give_up()
            return None
        return self.wait()

    async def wait(self) -> StepResult:
        """The early save's result, once it was asked for."""
        assert self.task is not None
        found = await self.task
        return found or StepResult("agentapi_save", "cut", False, 0, "the budget ran out")

    def finished(self) -> StepResult | None:
        """Its result if it already finished, else ``None``."""
        task = self.task
        if task is None or not task.done() or task.cancelled() or task.exception() is not None:
            return None
        return task.result()

    def unconfirmed(self) -> StepResult | None:
        """The save step when it was asked for and has no result yet (the deadline came
        first): a 100,000-message stop asked at the start and, cut while its copy was still
        being written, said "cut, the budget ran out" as if AgentAPI had never been asked."""
        if not self.asked:
            return None
        detail = (
            "asked at the start (AgentAPI was stable); the budget ran out before it was confirmed"
        )
        return StepResult("agentapi_save", "not_confirmed", False, 0, detail)

    def give_up(self, *, force: bool = False) -> None:
        """Not needed any more: stop before it asks, if it has not yet (``force``: even a
        save already asked for is no longer waited on)."""
        if self.task is not None and (force or not self.asked):
            self.task.cancel(msg="the save is decided after the fetch")


def _unknown(
    agent: AgentAPIClient | None, gathered: Gathered, process: AgentProcess | None
) -> bool:
    """No copy anywhere, but AgentAPI could not be read: it may hold a conversation, so this
    is not "nothing to save". Provably nothing only when nobody listens at its address and
    no AgentAPI process is found (it is not running)."""
    if agent is None or gathered.live_error is None:
        return False
    return process is not None or not gathered.live_refused


def _nothing_known(report: ShutdownReport, gathered: Gathered) -> None:
    """Rewrite the fetch's "nothing anywhere" verdict: unknown is not empty."""
    report.durable = False
    report.snapshot_ok = False
    report.kept = (
        f"nothing saved: AgentAPI could not be read ({gathered.live_error}) and no earlier copy "
        "exists, so what it holds is unknown"
    )
    for step in report.steps:
        if step.name == "fetch":
            step.outcome, step.ok = "unknown", False
            step.detail = f"AgentAPI could not be read: {gathered.live_error}"
        elif step.name == "snapshot":
            step.ok, step.detail = False, "nothing known to upload"


async def _after_deadline(
    report: ShutdownReport,
    write_task: asyncio.Task[StepResult] | None,
    best_effort: list[asyncio.Task[StepResult]],
    settings: Settings,
    budget: Budget,
    coder: CoderClient | None,
    *,
    finished: list[StepResult] | None = None,
) -> None:
    """Say what the deadline cut, cancel the best-effort steps, and finish the durable write.
    ``finished``: steps that completed outside ``best_effort`` (the early save)."""
    done = {step.name for step in report.steps}
    # A best-effort step may have finished while the sequence waited on a slow write: its
    # outcome (the snapshot delivered, say) is reported as it was, not as cut.
    finished_early = {
        task.result().name: task.result()
        for task in best_effort
        if task.done() and not task.cancelled() and task.exception() is None
    }
    finished_early.update((step.name, step) for step in finished or ())
    all_steps: tuple[StepName, ...] = ("fetch", "state", "agentapi_save", "snapshot")
    cut = [name for name in all_steps if name not in done and name not in finished_early]
    for task in best_effort:
        task.cancel(msg="grace budget exhausted")
    if best_effort:
        # A moment for the cancelled steps to unwind: an upload cut mid-retry records why.
        await asyncio.wait(best_effort, timeout=_REPORT_SLACK_S)
    log.warning("shutdown.deadline", cut=cut, budget_s=round(budget.total_s, 3))
    report.notes.append(f"the {budget.total_s:.1f}s budget ran out during: {', '.join(cut)}")
    if write_task is not None and "state" not in done:
        # Never abandoned: the write gets part of the grace margin kept back for this, but not
        # the watchdog's last moments (``watchdog_margin_s`` before the grace ends): on a
        # hung disk it would exit before this summary is printed.
        margin = settings.margin_s
        wait_s = max(min(margin * 0.8, margin - settings.watchdog_margin_s - _REPORT_SLACK_S), 0.0)
        written, _ = await asyncio.wait({write_task}, timeout=wait_s)
        if written:
            result = write_task.result()
            report.steps.append(result)
            report.durable = result.ok
        else:
            report.steps.append(
                StepResult("state", "unfinished", False, 0, "the write did not finish in time")
            )
    for name in ("agentapi_save", "snapshot"):
        if name in finished_early and name not in done:
            report.steps.append(finished_early[name])
        elif name in cut:
            report.steps.append(_cut_step(name, coder))
    snapshot = report.step("snapshot")
    report.snapshot_ok = snapshot is not None and snapshot.ok


def _cut_step(name: StepName, coder: CoderClient | None) -> StepResult:
    """A step the deadline cut. An upload cut while it was retrying failed for a reason
    already known (a reset, a 5xx): that reason is the outcome, not a bare "cut"."""
    interrupted = coder.interrupted if name == "snapshot" and coder is not None else None
    if interrupted is None:
        return StepResult(name, "cut", False, 0, "the budget ran out")
    detail = f"{interrupted.detail} (the budget ran out during the retries)"
    return StepResult(name, str(interrupted.outcome), False, 0, detail)


async def _best_effort(
    task: asyncio.Task[StepResult], name: StepName, force: asyncio.Event | None
) -> StepResult:
    """Await a best-effort step, unless a second stop signal says to cut it short."""
    if force is None:
        return await task
    forced = asyncio.create_task(force.wait(), name="persist.force_watch")
    try:
        await asyncio.wait({task, forced}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        forced.cancel()
    if task.done():
        return task.result()
    task.cancel(msg="second stop signal")
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # we are being cancelled ourselves: never swallow that
    log.warning("shutdown.forced", step=name)
    return StepResult(name, "forced", False, 0, "cut short by a second stop signal")


def _kept_sentence(report: ShutdownReport, store: StateStore) -> str:
    """What is safe after the stop, said only as far as it is known: a copy that could not be
    read is not "0 messages", and a copy that never existed is not "intact"."""
    if report.durable:
        return f"{report.messages} messages durable in {store.directory}"
    lost = f" ({report.messages} messages)" if report.messages else ""
    newest = f"the newest changes{lost} were not saved"
    if not store.loaded:
        return f"the copy in {store.directory} could not be read and was left as it was; {newest}"
    stored = store.conversation
    if stored is None:
        return f"no earlier copy exists in {store.directory}; {newest}"
    return f"previous copy intact in {store.directory} ({len(stored.messages)} messages); {newest}"


async def _write_step(
    store: StateStore, conversation: Conversation, on_durable: Callable[[Conversation], None] | None
) -> StepResult:
    try:
        outcome, detail = await store.async_sync(conversation)
    except (DurabilityError, StateFileError) as exc:
        return StepResult("state", "failed", False, 0, str(exc))
    if on_durable is not None:
        on_durable(conversation)
    return StepResult("state", outcome, True, 0, detail)


async def _agentapi_save_step(
    settings: Settings,
    process: AgentProcess | None,
    reason: str,
    conversation: Conversation | None,
    agentapi_view: tuple[Message, ...] | None,
    budget: Budget,
    report: ShutdownReport,
) -> StepResult:
    saved = await ask_agentapi_to_save(
        settings,
        process,
        reason=reason,
        conversation=conversation,
        agentapi_view=agentapi_view,
        budget=budget,
    )
    report.saved_state = saved.state
    return StepResult("agentapi_save", str(saved.outcome), saved.ok, 0, saved.detail)


async def _adopt_saved_prompt(
    settings: Settings, store: StateStore, state_file: Path, parsed: AgentAPIState | None
) -> None:
    """Take the prompt fields from the file AgentAPI just saved: it is their only source.
    Not read when the copy already holds them as AgentAPI saved them, prompt sent: they
    cannot change after that, and the file is as big as the conversation. ``parsed`` is the
    file as the save's confirmation already read it, if it did."""
    current = store.conversation
    if current is not None and current.prompt_settled:
        return
    try:
        state = parsed
        if state is None:
            state = await asyncio.to_thread(
                read_agentapi_state, state_file, max_bytes=settings.max_body_bytes
            )
        current = store.conversation
        if current is None:
            return
        fields = (state.initial_prompt, state.initial_prompt_sent, "agentapi_state")
        if fields != (current.initial_prompt, current.initial_prompt_sent, current.prompt_origin):
            updated, _ = with_prompt_fields(current, from_file=state, environment_prompt=None)
            await store.aappend((), prompt=updated)
    except (FileNotFoundError, PersistError) as exc:
        log.info("shutdown.prompt_fields_kept", reason=str(exc))


async def _snapshot_step(
    settings: Settings,
    coder: CoderClient | None,
    conversation: Conversation,
    budget: Budget,
    force: asyncio.Event | None,
) -> StepResult:
    try:
        target = settings.coder_target()
    except ConfigError as exc:
        return StepResult("snapshot", "misconfigured", False, 0, str(exc))
    if target is None or coder is None:
        why = "no task id" if not settings.task_id else "snapshots switched off"
        return StepResult("snapshot", "skipped", True, 0, why)
    if not conversation.messages:
        return StepResult("snapshot", "skipped", True, 0, "no messages")
    if force is not None and force.is_set():
        return StepResult("snapshot", "skipped", False, 0, "forced stop before the upload")
    snapshot = build_snapshot(
        conversation.messages,
        max_messages=settings.snapshot_messages,
        max_bytes=settings.snapshot_max_bytes,
    )
    result = await coder.upload_snapshot(snapshot.payload, budget=budget)
    record = asyncio.ensure_future(
        record_upload(
            settings.state_dir, result, messages=len(snapshot.messages), size=snapshot.size
        )
    )
    # The record is informational: on a hung disk it must not hold back (and so lose to the
    # deadline) the outcome of an upload that went through.
    await asyncio.wait({record}, timeout=budget.remaining())
    detail = "" if result.delivered else result.detail
    if result.delivered:
        detail = f"{len(snapshot.messages)} messages, {snapshot.size} bytes"
    return StepResult("snapshot", str(result.outcome), result.acceptable, 0, detail)


def _records_reserve(state: StepResult, budget: Budget) -> float:
    """What the last steps (replica, stop) leave to the records written once the result is out.

    They are written side by side, so they take about one durable write, and this stop's own
    durable write says what one costs on this disk now: without this they had only the
    grace period's margin (0.15 s at a 3 s grace), which a disk at 100 ms per fsync overruns.
    Twice that cost, as three writes at once on one disk wait on each other and the process
    must still exit after them (with exactly that cost, a run ended 0.13-0.15 s before its
    watchdog, and one in a full test run ended by it). At most a quarter of what is left, and
    ``_RECORDS_RESERVE_MAX_S``.
    """
    return min(2 * state.ms / 1000, budget.remaining() / 4, _RECORDS_RESERVE_MAX_S)


async def _replica_step(
    replica: Replica, budget: Budget, force: asyncio.Event | None
) -> StepResult:
    """Bring the replica up to date with the durable copy in what is left of the budget."""
    if force is not None and force.is_set():
        return StepResult(
            "replica", "skipped", False, 0, "forced stop: the replica was not updated"
        )
    left = budget.remaining() - _REPORT_SLACK_S
    if left <= 0.05:
        return StepResult("replica", "cut", False, 0, "no time left to update the replica")
    try:
        async with asyncio.timeout(left):
            pushed = await replica.push(record=False)  # recorded once the result is out
    except TimeoutError:
        error = f"not brought up to date in the {left:.1f}s left"
        return StepResult("replica", "timed_out", False, 0, error + "; the local copy is durable")
    except ReplicaError as exc:
        return StepResult("replica", "failed", False, 0, f"{exc}; the local copy is durable")
    outcome = "uploaded" if pushed.objects else "current"
    return StepResult("replica", outcome, True, 0, pushed.describe())


async def _stop_step(process: AgentProcess | None, reason: str, budget: Budget) -> StepResult:
    if process is None:
        return StepResult("stop", "skipped", True, 0, reason)
    result = await agent_stop(process, budget=budget)
    return StepResult("stop", str(result.outcome), result.stopped, 0, result.detail)

"""Following AgentAPI: its event stream into the mirror, reconnecting and resynchronising.

AgentAPI's ``GET /events`` replays every message, then one ``status_change``, then its stored
errors, then deltas; an idle stream is silent (no keep-alive), so following costs nothing
while nothing happens. A dropped stream is followed again with a backoff (0.05 s doubling to
5 s, started over after a healthy second), and ``GET /messages`` is taken as the truth in
between. In ACP mode the end of every turn is a resync too: a failed turn's message is removed
without an event (coder/agentapi x/acpio/acp_conversation.go).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog

from .agentapi import AgentAPIClient, AgentErrorEvent, HeldUpdate, MessageUpdate, StatusChange
from .budget import Budget
from .errors import AgentAPIError, EventGap, EventTooLarge
from .mirror import Mirror, build_replay
from .models import AgentStatus, Message

__all__ = ["Follower"]

log = structlog.get_logger(__name__)

_RECONNECT_MIN_S = 0.05
_RECONNECT_MAX_S = 5.0
#: A stream followed this long was healthy: its failure starts the reconnect backoff over.
_HEALTHY_S = 1.0
#: AgentAPI reports ``stable`` only once the agent's screen has not changed for 2 s
#: (coder/agentapi lib/httpapi/server.go: ``ScreenStabilityLength: 2 * time.Second``), and a
#: message changes only with the screen. A stream followed longer than that, uninterrupted,
#: has seen every change before a ``stable`` that ``GET /status`` reports now.
_STREAM_CURRENT_AFTER_S = 2.5
_RESYNC_CAP_S = 2.0
#: After an event over the body cap, the pause before the stream is tried again: each try
#: replays the same oversized message, so a short backoff would be a hot loop.
_OVERSIZE_RETRY_S = 30.0
#: While AgentAPI replays a stream's history, the longest wait for its next event.
_REPLAY_GAP_S = 3.0
#: How AgentAPI's ``agent_error`` starts when it could not load its state file
#: (coder/agentapi lib/screentracker/pty_conversation.go, the snapshot loop).
_LOAD_FAILED = "Failed to restore previous session"


class Follower:
    """Keeps ``mirror`` equal to what AgentAPI holds; calls ``on_change`` on every change.

    ``facts`` (shared with the sidecar's status view) gets ``connected``, ``agent_status``,
    ``last_event_at`` and ``reconnects``; ``stable`` is set while the agent is idle.
    ``kept_messages`` says how much the durable copy holds, for the failed-load warning.
    """

    def __init__(
        self,
        agent: AgentAPIClient,
        mirror: Mirror,
        facts: dict[str, Any],
        *,
        on_change: Callable[[], None],
        kept_messages: Callable[[], int],
    ) -> None:
        self._agent = agent
        self.mirror = mirror
        self._facts = facts
        self._on_change = on_change
        self._kept_messages = kept_messages
        self.stable = asyncio.Event()
        self._synced_at: float | None = None
        self._acp: bool | None = None
        """AgentAPI runs its agent over ACP: resync at the end of every turn. ``None``: not
        known yet (``GET /status`` did not answer); asked again at the next turn's end."""
        self._oversize_reported = False
        self._errors_seen: set[tuple[str, str, str]] = set()
        """AgentAPI replays its stored errors (up to 100) on every connect: log each once."""
        self._held: HeldUpdate | None = None
        """A large update not decoded yet (``settle`` applies it): replaced, undecoded, when
        the same message changes again before anyone reads the mirror."""
        self._bad_event: AgentAPIError | None = None
        """An update that ``settle`` could not apply: the stream is resynchronised at its next
        event, and until then the mirror is in doubt."""

    async def run(self) -> None:
        """Follow until cancelled: one stream after another, with backoff in between."""
        backoff = _RECONNECT_MIN_S
        while True:
            self._synced_at = None
            try:
                await self._stream_once()
                log.info("agentapi.stream_ended")
                backoff = _RECONNECT_MIN_S
            except EventTooLarge as exc:
                # Every reconnect would replay the same oversized message: say it once, take
                # what GET /messages gives, and try the stream again only rarely.
                if not self._oversize_reported:
                    log.warning("agentapi.event_too_large", error=str(exc))
                    self._oversize_reported = True
                backoff = _OVERSIZE_RETRY_S
            except AgentAPIError as exc:
                if self._followed_for() >= _HEALTHY_S:
                    # It had been following fine: a new failure starts the backoff over, or an
                    # old run of failures would keep changes off the disk for seconds.
                    backoff = _RECONNECT_MIN_S
                if isinstance(exc, EventGap):
                    log.warning("agentapi.events_missed", detail=str(exc))
                else:
                    log.info("agentapi.unavailable", error=str(exc), retry_in_s=round(backoff, 2))
            self._facts["connected"] = False
            await self.resync()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, max(_RECONNECT_MAX_S, backoff))
            self._facts["reconnects"] += 1

    def current_messages(self, status: AgentStatus) -> tuple[Message, ...] | None:
        """The conversation as AgentAPI holds it now, from the stream alone, or ``None`` when
        in doubt (then the stop fetches it whole). ``status`` is a fresh ``GET /status``.

        Certain only for a terminal (PTY) agent that AgentAPI says is stable, on a stream
        followed without a break for longer than AgentAPI's stability window, whose own last
        status event said stable too, with the replay taken: every message change comes with
        a screen change, so the last one happened at least 2 s ago, and the stream delivered
        it. ACP agents change messages without a screen and are always fetched."""
        self.settle()
        if self._bad_event is not None:
            return None  # an update could not be applied: the mirror is in doubt
        if status.status != "stable" or status.transport not in (None, "pty") or self._acp:
            return None
        if not self._facts.get("connected") or self._facts.get("agent_status") != "stable":
            return None
        if self._followed_for() < _STREAM_CURRENT_AFTER_S:
            return None
        return tuple(self.mirror.messages)

    def settle(self) -> None:
        """Apply the update held back, if any: whoever reads the mirror calls this first (the
        checkpointer, the stop, the status view). Only the latest version of a message that
        changed within a checkpoint interval is ever decoded. An update that cannot be applied
        is logged and kept for ``_follow`` to raise at the stream's next event (AgentAPI sends
        one when the agent turns stable), which resynchronises from ``GET /messages``."""
        held, self._held = self._held, None
        if held is None:
            return
        try:
            # No on_change here: holding the update asked for the checkpoint that reads it.
            self.mirror.apply(held.decode().as_message())
        except AgentAPIError as exc:
            log.warning("agentapi.bad_event", error=str(exc))
            self._bad_event = exc

    def _settle_or_raise(self) -> None:
        self.settle()
        if self._bad_event is not None:
            failure, self._bad_event = self._bad_event, None
            raise failure

    def _followed_for(self) -> float:
        """Seconds the current stream has been synced (0 if it never synced)."""
        return 0.0 if self._synced_at is None else time.monotonic() - self._synced_at

    async def _stream_once(self) -> None:
        """Follow one event stream: collect the replay, take it as the truth, apply deltas.

        AgentAPI writes its replay the moment a stream opens, so while replaying every event
        must follow the last within ``_REPLAY_GAP_S``; a stream that sends headers and then
        nothing is dropped (logged, and ``GET /messages`` taken as the truth by ``run``).
        Once the replay is done the stream may stay silent for ever: an idle agent.
        """
        replay: list[Message] = []
        loop = asyncio.get_running_loop()
        try:
            async with (
                asyncio.timeout_at(loop.time() + _REPLAY_GAP_S) as bound,
                contextlib.aclosing(self._agent.events(connect_timeout_s=2.0)) as events,
            ):
                try:
                    await self._follow(events, replay, bound)
                finally:
                    self.settle()  # what the stream delivered is applied however it ends
        except TimeoutError:
            log.warning("agentapi.replay_stalled", after_messages=len(replay))
            raise AgentAPIError(
                f"AgentAPI's event stream sent no replay event for {_REPLAY_GAP_S:.0f} s "
                f"({len(replay)} messages so far): dropped, resynchronising from GET /messages"
            ) from None

    async def _follow(
        self, events: AsyncIterator[Any], replay: list[Message], bound: asyncio.Timeout
    ) -> None:
        """Apply one stream's events; ``bound`` limits each gap while the replay lasts."""
        replaying = True
        loop = asyncio.get_running_loop()
        async for event in events:
            if replaying:
                bound.reschedule(loop.time() + _REPLAY_GAP_S)
            self._facts["last_event_at"] = time.time()
            if not replaying:
                if isinstance(event, HeldUpdate):
                    if self._held is not None and self._held.id != event.id:
                        self._settle_or_raise()  # another message: the held one first
                    elif self._held is not None:
                        log.debug("agentapi.update_superseded", id=event.id)
                    self._held = event
                    self._on_change()  # the checkpoint that will settle it
                    self.stable.clear()
                    continue
                self._settle_or_raise()  # events apply in the order they came
            elif isinstance(event, HeldUpdate):
                event = event.decode()  # a replay is taken whole
            if isinstance(event, MessageUpdate):
                if replaying:
                    replay.append(event.as_message())
                elif self.mirror.apply(event.as_message()):
                    self._on_change()
                    self.stable.clear()
            elif isinstance(event, StatusChange):
                if replaying:
                    replaying = False
                    bound.reschedule(None)  # an idle stream is silent: no bound now
                    self._facts["connected"] = True
                    self._synced_at = time.monotonic()
                    self._oversize_reported = False
                    self.mirror.replace(*build_replay(replay))
                    self._on_change()
                    log.info("agentapi.synced", messages=len(self.mirror.messages))
                    self._acp = await self._is_acp()
                elif self._acp is None and event.status == "stable":
                    self._acp = await self._is_acp()  # it did not answer at connect
                self._facts["agent_status"] = event.status
                if event.status == "stable":
                    if self._acp and not replaying:
                        # ACP removes a failed turn's message without an event: the end
                        # of each turn is when GET /messages shows what really remains.
                        await self.resync()
                    self.stable.set()
                else:
                    self.stable.clear()
            elif isinstance(event, AgentErrorEvent):
                self._on_agent_error(event)

    def _on_agent_error(self, event: AgentErrorEvent) -> None:
        """Log an ``agent_error`` the first time it is seen (AgentAPI replays its stored
        errors after every connect: coder/agentapi lib/httpapi/events.go, ``errors``)."""
        key = (event.time, event.level, event.message)
        if key in self._errors_seen:
            return
        self._errors_seen.add(key)
        log.warning("agentapi.agent_error", message=event.message, level=event.level)
        if event.message.startswith(_LOAD_FAILED):
            # AgentAPI started without its conversation and will save less over its file on
            # its next save. The copy keeps the conversation: a start-up screen never replaces
            # it, and a new conversation that diverges from it moves it to the archive whole.
            log.warning("agentapi.load_failed", kept_messages=self._kept_messages())

    async def resync(self) -> None:
        """After a dropped stream: take ``GET /messages`` as the truth, if AgentAPI answers."""
        try:
            messages, ids = await self._agent.messages_with_ids(budget=Budget(_RESYNC_CAP_S))
        except AgentAPIError:
            return
        self._held, self._bad_event = None, None  # GET /messages is the truth now
        if list(messages) == self.mirror.messages and list(ids) == self.mirror.ids:
            return
        self.mirror.replace(messages, ids)
        self._on_change()
        log.info("agentapi.resynced", messages=len(messages))

    async def _is_acp(self) -> bool | None:
        """Whether AgentAPI drives its agent over ACP (``transport`` in ``GET /status``, from
        0.12.0); ``False`` when it does not say, ``None`` when it does not answer."""
        try:
            status = await self._agent.status(budget=Budget(_RESYNC_CAP_S))
        except AgentAPIError:
            return None
        return status.transport == "acp"

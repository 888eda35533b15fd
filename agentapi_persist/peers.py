"""Opening the peers: the state store, the AgentAPI client and the Coder client, in one place.

Every path that talks to the outside world (the ``shutdown`` command, the sidecar, ``status``,
``doctor``, ``snapshot``, the examples, the tests and the benchmark) opens them here, so each
gets one session per site with an explicit timeout and no proxy from the environment, clients
with the configured body caps, and a Coder client only when a snapshot is wanted and
configured. Nobody opens a bare ``aiohttp.ClientSession()`` (a 300 s default timeout, no cap).

    async with open_peers(settings) as peers:
        report = await run_shutdown(settings, peers=peers, ends_at=...)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import structlog

from ._http import make_session
from .agentapi import AgentAPIClient
from .coder import CoderClient
from .config import Settings
from .errors import ConfigError
from .ownership import claim, take_lock

if TYPE_CHECKING:
    from .replica import Replica
from .store import StateStore

__all__ = ["Peers", "open_peers"]

log = structlog.get_logger(__name__)

#: The sidecar's AgentAPI session lives for days around one event stream; every request it
#: makes still carries its own budgeted timeout.
SIDECAR_AGENTAPI_TIMEOUT_S = 3600.0


@dataclass(frozen=True, slots=True)
class Peers:
    """What one command or the sidecar talks to."""

    store: StateStore
    agent: AgentAPIClient
    coder: CoderClient | None
    """``None`` when no snapshot is wanted or it is misconfigured (see ``coder_problem``)."""
    coder_problem: str | None
    """Why a wanted snapshot cannot be uploaded (a bad URL, a missing token, ...), else
    ``None``; the stop reports it as the snapshot's outcome (exit 4)."""
    replica: Replica | None = None
    """The off-volume replica, when one is configured (opened on first use)."""


@asynccontextmanager
async def open_peers(
    settings: Settings,
    *,
    store: StateStore | None = None,
    read_only: bool = False,
    agent_session: aiohttp.ClientSession | None = None,
    coder_session: aiohttp.ClientSession | None = None,
    agent_timeout_s: float = 30.0,
    lock: str | None = None,
    lock_wait_s: float = 0.0,
    record_owner: bool = False,
) -> AsyncIterator[Peers]:
    """Open the store and one session per site; close what was opened here on exit.

    ``store`` and the sessions may be passed in (tests, embedders); those stay open.
    ``read_only`` opens the store for reading only (``status``, ``snapshot``). ``lock`` names
    the writer (``"sidecar"``, ``"shutdown"``): the state directory's lock is taken first,
    before anything is read or written, waiting up to ``lock_wait_s`` for another holder, and
    held until the peers are closed (``ownership``; ``StateDirBusy`` names the holder).
    A state directory that belongs to another AgentAPI instance is refused with
    ``ForeignStateDir``. ``record_owner`` (the sidecar, holding the lock) records the
    instance in a directory that records none; the stop never writes the record (one more
    synchronous write before the sequence, outside its budget), it only checks it.
    """
    async with AsyncExitStack() as stack:
        # Whose conversation the directory holds, before anything is read or written there
        # (module B's command never loads, uploads or writes module A's copy), and before
        # waiting for its lock: the answer is the same however long one waits.
        await asyncio.to_thread(claim, settings.state_dir, settings.instance, write=False)
        if lock is not None:
            held = await asyncio.to_thread(
                take_lock, settings.state_dir, purpose=lock, wait_s=lock_wait_s
            )
            stack.callback(held.release)
        if record_owner:
            # Under the lock: record whose conversation the directory holds (the check above
            # already refused another instance's; this only writes what is missing).
            adopted = await asyncio.to_thread(
                claim, settings.state_dir, settings.instance, write=True
            )
            if adopted is not None:
                log.warning("peers.adopted_state_dir", note=adopted)
        if agent_session is None:
            agent_session = make_session(total_timeout_s=agent_timeout_s)
            stack.push_async_callback(agent_session.close)
        if coder_session is None:
            coder_session = make_session()
            stack.push_async_callback(coder_session.close)
        if store is None:
            store = StateStore(
                settings.state_dir,
                max_bytes=settings.max_body_bytes,
                read_only=read_only,
                instance=settings.instance.as_dict(),
            )
        agent = AgentAPIClient(
            settings.agentapi_url, session=agent_session, max_body_bytes=settings.max_body_bytes
        )
        coder: CoderClient | None = None
        problem: str | None = None
        try:
            target = settings.coder_target()
            if target is not None:
                coder = CoderClient(target, session=coder_session)
        except ConfigError as exc:
            problem = str(exc)
        replica: Replica | None = None
        if settings.replica is not None:  # its modules load only where one is configured
            from .replica import replica_for

            replica = replica_for(settings, store)
        if replica is not None:
            stack.push_async_callback(replica.close)
        yield Peers(store=store, agent=agent, coder=coder, coder_problem=problem, replica=replica)

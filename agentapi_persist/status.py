"""``status``: one look at everything that decides whether a stop will lose anything.

Read-only: it never writes, never signals, and bounds every probe (a hung AgentAPI costs at
most ``probe_s``). The token is reported only as present or absent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import records
from .agent_process import MIN_SIGUSR1_VERSION, detect_version, find_agentapi
from .agentapi_save import persistence_enabled
from .agentapi_state import read_agentapi_state
from .budget import Budget
from .config import Settings
from .control_client import ask_sidecar
from .errors import ConfigError, ExitCode, PersistError, SidecarUnavailable, StateFileError
from .models import Relation, compare
from .ownership import claim, read_owner
from .peers import open_peers
from .replica import describe_replica
from .store import StateStore, holds_a_copy, list_archives

__all__ = ["StatusReport", "collect_status", "sidecar_view"]


@dataclass(slots=True)
class StatusReport:
    """Facts for ``status``; ``problems`` lists what needs attention."""

    facts: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> ExitCode:
        """8 when something needs attention, else 0."""
        return ExitCode.DEGRADED if self.problems else ExitCode.OK

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {**self.facts, "problems": self.problems, "ok": not self.problems}

    def render(self) -> str:
        """A person's view: one aligned line per fact, then the problems."""
        lines = []
        for key, value in self.facts.items():
            for i, item in enumerate(value if isinstance(value, list) else [value]):
                lines.append(f"{key if i == 0 else '':<14} {_row(item)}")
        lines.extend(f"PROBLEM        {p}" for p in self.problems)
        if not self.problems:
            lines.append("verdict        ok")
        return "\n".join(lines)


def _row(value: Any) -> str:
    """One fact as text: a dict as ``k=v`` pairs (unset ones left out), an archive by its
    name first (what ``export --archive`` takes)."""
    if isinstance(value, dict):
        name = value.get("name")
        pairs = ", ".join(f"{k}={v}" for k, v in value.items() if v is not None and k != "name")
        return f"{name} ({pairs})" if name else pairs
    return str(value)


def sidecar_view(settings: Settings) -> dict[str, Any]:
    """The running sidecar's own facts, or ``{"running": False}``."""
    try:
        result = ask_sidecar(settings.state_dir, {"op": "status"}, timeout_s=1.0)
    except (SidecarUnavailable, TimeoutError, ValueError):
        return {"running": False}
    view = result.get("status")
    return {"running": True, **view} if isinstance(view, dict) else {"running": True}


async def collect_status(settings: Settings, *, probe_s: float = 1.0) -> StatusReport:
    """Gather every fact, each bounded; never raises for what it finds."""
    report = StatusReport()
    facts = report.facts
    # Another instance's directory: refused before anything is read from it (exit 2).
    await asyncio.to_thread(claim, settings.state_dir, settings.instance, write=False)
    facts["sidecar"] = await asyncio.to_thread(sidecar_view, settings)

    store = StateStore(settings.state_dir, max_bytes=settings.max_body_bytes, read_only=True)
    loaded = await store.aload()
    report.problems.extend(loaded.problems)
    stored = loaded.conversation
    facts["checkpoint"] = {
        "messages": len(stored.messages) if stored else 0,
        "generation": loaded.seq,
        "journal_records": loaded.journal_records,
        "age_s": _age_s(loaded.saved_at),
        "bytes": _dir_bytes(settings),
        "dir": str(settings.state_dir),
        "owner": _owner(settings),
    }
    try:
        archives = await asyncio.to_thread(list_archives, settings.state_dir)
    except StateFileError as exc:
        archives = []
        report.problems.append(f"The archived conversations cannot be listed: {exc}")
    # Conversations kept aside when a newer one replaced them: `export --archive NAME`.
    facts["archived"] = [asdict(a) for a in archives] or "none"
    unwritable = await asyncio.to_thread(_cannot_write, settings.state_dir)
    if unwritable is not None:
        report.problems.append(
            f"Nothing can be written in {settings.state_dir}: {unwritable}. The conversation "
            "cannot be kept there; give --state-dir a directory on the persistent volume."
        )
    mode = _mode(settings.state_dir)
    if mode is not None and mode & 0o077:
        # Never changed by us (it may be $HOME, or shared on purpose): said, for a person.
        report.problems.append(
            f"{settings.state_dir} is open to other users (mode {mode:04o}); the files in it "
            "are 0600, but `chmod 700` it unless that is meant."
        )
    if not settings.state_dir_explicit and holds_a_copy(settings.state_dir.parent):
        report.problems.append(
            f"A copy written by an earlier release is in {settings.state_dir.parent}: it "
            "moves into its module's directory at that module's next sidecar start or "
            "`restore`, when AgentAPI's file shows whose it is (nothing is deleted)."
        )

    path = settings.agentapi_state_file
    try:
        state = await asyncio.to_thread(
            read_agentapi_state, path, max_bytes=settings.max_body_bytes
        )
    except FileNotFoundError:
        facts["state_file"] = {"path": str(path), "health": "missing"}
    except StateFileError as exc:
        facts["state_file"] = {"path": str(path), "health": "unusable", "error": str(exc)}
        report.problems.append(
            f"AgentAPI's state file is unusable: {exc}. Run `restore` before AgentAPI starts."
        )
    else:
        behind = (
            stored is not None
            and compare(stored.messages, state.conversation_messages()) is Relation.A_AHEAD
        )
        facts["state_file"] = {
            "path": str(path),
            "health": "behind the sidecar copy" if behind else "valid",
            "messages": len(state.messages),
            "initial_prompt_sent": state.initial_prompt_sent,
        }

    last = records.read_record(settings.state_dir, records.LAST_UPLOAD) or {}
    # "never", not an empty row, when nothing was ever uploaded from this directory.
    facts["last_upload"] = last or "never"
    if last.get("at") and not last.get("delivered") and last.get("outcome") != "route_missing":
        # A server without the route is not a failure to fix here: the row says it as it is.
        report.problems.append(f"The last snapshot upload failed: {last.get('detail')}")

    budget = Budget(probe_s)
    process, reason = find_agentapi(settings.agentapi_pid_file)
    agent: dict[str, Any] = {
        "pid": process.pid if process else None,
        "process": "found" if process else reason,
    }
    async with open_peers(settings, store=store, agent_timeout_s=probe_s) as peers:
        try:
            status = await peers.agent.status(budget=budget)
            agent.update(
                url=settings.agentapi_url,
                reachable=True,
                status=status.status,
                agent_type=status.agent_type,
            )
        except PersistError as exc:
            agent.update(url=settings.agentapi_url, reachable=False, error=str(exc))
            report.problems.append(
                f"AgentAPI is not answering at {settings.agentapi_url} ({exc}): nothing can "
                "follow it, and a stop now keeps only the last copy."
            )
    version = await detect_version(process, fallback_bin=settings.agentapi_bin, budget=budget)
    agent["version"] = str(version) if version else None
    agent["saves_on_sigusr1"] = version is not None and version >= MIN_SIGUSR1_VERSION
    if process is not None:
        agent["persistence"] = persistence_enabled(
            process,
            setting=settings.state_persistence,
            state_file_explicit=settings.agentapi_state_file_explicit,
        )
    facts["agentapi"] = agent

    snapshot: dict[str, Any] = {
        "task_id": settings.task_id or None,
        "coder_url": settings.coder_url,
        "token": "present" if settings.coder_token else "absent",
        # The setting (how many of the latest messages an upload keeps), not a count.
        "keeps_last": settings.snapshot_messages,
    }
    try:
        settings.coder_target()
    except ConfigError as exc:
        report.problems.append(str(exc))
    facts["snapshot"] = snapshot
    replica, replica_problems = await describe_replica(
        settings, store, local_saved_at=loaded.saved_at
    )
    facts["replica"] = replica if replica.get("configured", True) else "not configured"
    report.problems.extend(replica_problems)
    facts["grace"] = {"grace_s": settings.grace_s, "budget_s": round(settings.budget_s, 3)}
    return report


def _age_s(when: datetime | None) -> float | None:
    return None if when is None else round((datetime.now(UTC) - when).total_seconds(), 1)


def _cannot_write(directory: Path) -> str | None:
    """Why a file cannot be created in ``directory`` (or, while it does not exist yet, in
    the nearest directory above it), ``None`` when it can. A real probe, created and removed
    at once: permission bits say nothing to root, and nothing at all about /proc or a
    read-only mount."""
    target = directory
    while not target.exists() and target.parent != target:
        target = target.parent
    probe = target / f".agentapi-persist-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        return f"{exc.strerror or exc} (creating a file in {target})"
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return None


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return None


def _owner(settings: Settings) -> str:
    owner = read_owner(settings.state_dir)
    return owner.describe() if owner is not None else "not recorded yet"


def _dir_bytes(settings: Settings) -> int:
    try:
        return sum(p.stat().st_size for p in settings.state_dir.iterdir() if p.is_file())
    except OSError:
        return 0

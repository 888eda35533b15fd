"""Every error agentapi-persist raises on purpose, and the exit code each one maps to.

The tree::

    PersistError                     root; everything we raise on purpose       exit 1
    ├── ConfigError                  bad flags or environment                   exit 2
    ├── UpstreamError                a peer failed us (.url, .status)           exit 1
    │   ├── BodyTooLarge             a peer's body passed the cap we read
    │   ├── AgentAPIError            AgentAPI down, slow, or sent bad data
    │   │   ├── AgentAPIBodyError    body too big, not JSON, wrong shape
    │   │   └── EventGap             the event stream and the mirror disagree (resync)
    │   └── CoderAPIError            the log-snapshot endpoint refused
    ├── ReplicaError                 the off-volume replica failed or is unusable
    ├── StateFileError               a state file on disk is unusable
    │   ├── StateFileCorrupt         torn, bad checksum, bad JSON, bad schema
    │   └── StateFileVersionError    a format version we do not know
    ├── DurabilityError              a write or fsync failed; previous copy kept exit 3
    ├── AgentRunningError            refused to write AgentAPI's file under it   exit 6
    ├── StateDirBusy                 another writer holds the state directory    exit 1
    │   └── SidecarAlreadyRunning    ... and it is a sidecar, for a second sidecar
    └── SidecarUnavailable           no sidecar answered: do the work here (never shown)

A stop whose budget runs out before the durable write is not an exception: the shutdown
report says which step was cut, and its exit code is 5 (``ExitCode.DEADLINE``).

Why exit codes live here: ``cli.main`` is the only place that turns exceptions into exit
codes, and it reads them from the class, so the table below is the single source of truth
(the README copies it).
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "AgentAPIBodyError",
    "AgentAPIError",
    "AgentAPIUnreachable",
    "AgentRunningError",
    "BodyTooLarge",
    "CoderAPIError",
    "ConfigError",
    "ControlUnavailable",
    "DurabilityError",
    "EventGap",
    "EventTooLarge",
    "ExitCode",
    "ForeignStateDir",
    "PersistError",
    "ReplicaError",
    "SidecarAlreadyRunning",
    "SidecarUnavailable",
    "StateDirBusy",
    "StateFileCorrupt",
    "StateFileError",
    "StateFileVersionError",
    "UpstreamError",
    "cap_text",
]

#: Longest peer body copied into an error message; bodies can be megabytes.
TEXT_ERROR_MAX_CHARS = 256


class ExitCode(IntEnum):
    """Process exit codes, documented in the README."""

    OK = 0
    """Everything done: state durable, snapshot delivered or validly skipped."""
    ERROR = 1
    """Unexpected failure; the message says what was kept."""
    USAGE = 2
    """Bad flags or environment (nothing was touched)."""
    NOT_DURABLE = 3
    """The state could not be made durable; the previous good copy is intact."""
    SNAPSHOT_FAILED = 4
    """The state is durable but the log snapshot was not delivered."""
    DEADLINE = 5
    """The grace budget ran out before the durable write finished."""
    AGENT_RUNNING = 6
    """`restore` refused: AgentAPI is running and owns its state file."""
    NO_GOOD_COPY = 7
    """`restore` found no valid copy of the conversation anywhere (bad bytes quarantined)."""
    DEGRADED = 8
    """`status` found something that needs attention, or `doctor` a failing check."""
    REPLICA_BEHIND = 9
    """The state is durable locally, but the off-volume replica was not brought up to date."""


def cap_text(text: str, limit: int = TEXT_ERROR_MAX_CHARS) -> str:
    """Shorten peer-supplied text for a message, marking the cut."""
    text = text.replace("\r", " ").replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more chars)"


class PersistError(Exception):
    """Root of every error agentapi-persist raises on purpose."""

    exit_code: ExitCode = ExitCode.ERROR


class ConfigError(PersistError):
    """A flag or environment variable is missing or invalid."""

    exit_code = ExitCode.USAGE


class UpstreamError(PersistError):
    """A peer (AgentAPI or the Coder server) failed, refused, or sent something unusable."""

    def __init__(self, message: str, *, url: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class AgentAPIError(UpstreamError):
    """AgentAPI is unreachable, too slow, or answered with an error status."""


class BodyTooLarge(UpstreamError):
    """A peer's body exceeded the cap we read."""


class AgentAPIUnreachable(AgentAPIError):
    """Nothing listens at AgentAPI's address (the connection was refused): unlike a slow or
    garbled answer, this says AgentAPI holds nothing there right now."""


class AgentAPIBodyError(AgentAPIError):
    """AgentAPI answered, but the body is too big, not JSON, or not the documented shape."""


class EventTooLarge(AgentAPIBodyError):
    """One server-sent event is over the body cap: the stream cannot be followed while that
    message is in the conversation (its replay carries it on every connect)."""


class EventGap(AgentAPIError):
    """An event named a message the mirror cannot place: events were missed, so the mirror
    must be resynchronised from ``GET /messages``."""


class CoderAPIError(UpstreamError):
    """The Coder log-snapshot endpoint refused the upload."""


class ReplicaError(PersistError):
    """The off-volume replica (S3-compatible object storage) failed, refused, or holds
    something unusable. Never about the local copy: that one is untouched."""


class StateFileError(PersistError):
    """A state file on disk cannot be used."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class StateFileCorrupt(StateFileError):
    """Torn, truncated, failed its checksum, or does not match the schema."""


class StateFileVersionError(StateFileError):
    """Declares a format version this release does not understand."""


class StateDirNotADirectory(StateFileError, ConfigError):
    """The configured state directory is a file (or lies under one): a setting to fix, so
    exit 2 like any bad setting; a ``StateFileError`` still, so a stop that meets it goes on
    to upload the snapshot."""

    exit_code = ExitCode.USAGE


class DurabilityError(PersistError):
    """A write, fsync or rename failed. The previous good copy is intact; nothing is retried."""

    exit_code = ExitCode.NOT_DURABLE


class AgentRunningError(PersistError):
    """AgentAPI is running, so its state file is its own: we must not write it."""

    exit_code = ExitCode.AGENT_RUNNING

    def __init__(self, message: str, *, evidence: str = "") -> None:
        super().__init__(message)
        self.evidence = evidence
        """What showed it running (its pid, or an answer at its address), for a log line."""


class StateDirBusy(PersistError):
    """Another writer (a sidecar, a ``shutdown``, a ``restore``) holds the state directory's
    lock; nothing was written. The message names it."""


class ForeignStateDir(ConfigError):
    """The state directory holds another AgentAPI instance's conversation (its
    ``instance.json`` says so); nothing was read for, or written by, this one. The fix is
    configuration: one state directory per instance."""


class SidecarAlreadyRunning(StateDirBusy):
    """Another sidecar owns this state directory."""


class ControlUnavailable(PersistError):
    """The sidecar cannot listen on its control socket (a read-only or full filesystem, a
    state directory under ``/proc``); it goes on without one, stopped by its signals."""


class SidecarUnavailable(PersistError):
    """No sidecar answered; the caller should do the work itself."""

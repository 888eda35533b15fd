"""agentapi-persist: keeps AgentAPI conversations durable across workspace stops.

The public API is re-exported here. Names are resolved lazily (PEP 562): the command line
imports this package on every run, and the shutdown path must not pay for aiohttp or pydantic
when it does not use them. ``from agentapi_persist import X`` works as usual, and type
checkers see the real imports below.
"""

from __future__ import annotations

from ._version import __version__

# Not `from typing import ...`: every command imports this package first, and the `shutdown`
# client path counts milliseconds. mypy treats a name TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .agent_process import AgentProcess, Version, find_agentapi
    from .agentapi import AgentAPIClient
    from .agentapi_state import read_agentapi_state, render_agentapi_state, write_agentapi_state
    from .budget import Budget
    from .coder import CoderClient, UploadOutcome, UploadResult
    from .config import CoderTarget, Settings
    from .copies import gather
    from .daemon import Daemon, DaemonState, run, serve
    from .errors import (
        AgentAPIError,
        AgentRunningError,
        CoderAPIError,
        ConfigError,
        DurabilityError,
        ExitCode,
        PersistError,
        StateFileCorrupt,
        StateFileError,
        StateFileVersionError,
        UpstreamError,
    )
    from .log import configure_logging
    from .models import AgentAPIState, AgentStatus, Conversation, Message
    from .peers import Peers, open_peers
    from .restoring import RestoreReport, restore
    from .shutdown import ShutdownReport, run_sequence, run_shutdown
    from .snapshot import Snapshot, build_snapshot
    from .status import StatusReport, collect_status
    from .store import LoadReport, SaveReport, StateStore

__all__ = [
    "AgentAPIClient",
    "AgentAPIError",
    "AgentAPIState",
    "AgentProcess",
    "AgentRunningError",
    "AgentStatus",
    "Budget",
    "CoderAPIError",
    "CoderClient",
    "CoderTarget",
    "ConfigError",
    "Conversation",
    "Daemon",
    "DaemonState",
    "DurabilityError",
    "ExitCode",
    "LoadReport",
    "Message",
    "Peers",
    "PersistError",
    "RestoreReport",
    "SaveReport",
    "Settings",
    "ShutdownReport",
    "Snapshot",
    "StateFileCorrupt",
    "StateFileError",
    "StateFileVersionError",
    "StateStore",
    "StatusReport",
    "UploadOutcome",
    "UploadResult",
    "UpstreamError",
    "Version",
    "__version__",
    "build_snapshot",
    "collect_status",
    "configure_logging",
    "find_agentapi",
    "gather",
    "open_peers",
    "read_agentapi_state",
    "render_agentapi_state",
    "restore",
    "run",
    "run_sequence",
    "run_shutdown",
    "serve",
    "write_agentapi_state",
]

_HOME: dict[str, str] = {
    "AgentProcess": "agent_process",
    "Version": "agent_process",
    "find_agentapi": "agent_process",
    "AgentAPIClient": "agentapi",
    "read_agentapi_state": "agentapi_state",
    "render_agentapi_state": "agentapi_state",
    "write_agentapi_state": "agentapi_state",
    "Budget": "budget",
    "CoderClient": "coder",
    "UploadOutcome": "coder",
    "UploadResult": "coder",
    "CoderTarget": "config",
    "Settings": "config",
    "Daemon": "daemon",
    "DaemonState": "daemon",
    "run": "daemon",
    "serve": "daemon",
    "AgentAPIError": "errors",
    "AgentRunningError": "errors",
    "CoderAPIError": "errors",
    "ConfigError": "errors",
    "DurabilityError": "errors",
    "ExitCode": "errors",
    "PersistError": "errors",
    "StateFileCorrupt": "errors",
    "StateFileError": "errors",
    "StateFileVersionError": "errors",
    "UpstreamError": "errors",
    "AgentAPIState": "models",
    "AgentStatus": "models",
    "Conversation": "models",
    "Message": "models",
    "RestoreReport": "restoring",
    "restore": "restoring",
    "ShutdownReport": "shutdown",
    "gather": "copies",
    "run_sequence": "shutdown",
    "run_shutdown": "shutdown",
    "Peers": "peers",
    "open_peers": "peers",
    "Snapshot": "snapshot",
    "build_snapshot": "snapshot",
    "StatusReport": "status",
    "collect_status": "status",
    "configure_logging": "log",
    "LoadReport": "store",
    "SaveReport": "store",
    "StateStore": "store",
}


def __getattr__(name: str) -> Any:
    import importlib

    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'agentapi_persist' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""agentapi-persist: keeps AgentAPI conversations durable across workspace stops.

The public API is re-exported here. Names are resolved lazily (PEP 562): the command line
imports this package on every run, and the shutdown path must not pay for aiohttp or pydantic
when it does not use them. ``from agentapi_persist import X`` works as usual, and type
checkers see the real imports below.
"""

from __future__ import annotations

from ._version import __version__ as __version__

# Not `from typing import ...`: every command imports this package first, and the `shutdown`
# client path counts milliseconds. mypy treats a name TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .agent_process import (
        AgentProcess as AgentProcess,
    )
    from .agent_process import (
        Version as Version,
    )
    from .agent_process import (
        find_agentapi as find_agentapi,
    )
    from .agentapi import (
        AgentAPIClient as AgentAPIClient,
    )
    from .agentapi_state import (
        read_agentapi_state as read_agentapi_state,
    )
    from .agentapi_state import (
        render_agentapi_state as render_agentapi_state,
    )
    from .agentapi_state import (
        write_agentapi_state as write_agentapi_state,
    )
    from .budget import (
        Budget as Budget,
    )
    from .coder import (
        CoderClient as CoderClient,
    )
    from .coder import (
        UploadOutcome as UploadOutcome,
    )
    from .coder import (
        UploadResult as UploadResult,
    )
    from .config import (
        CoderTarget as CoderTarget,
    )
    from .config import (
        Settings as Settings,
    )
    from .copies import (
        gather as gather,
    )
    from .daemon import (
        Daemon as Daemon,
    )
    from .daemon import (
        DaemonState as DaemonState,
    )
    from .daemon import (
        run as run,
    )
    from .daemon import (
        serve as serve,
    )
    from .errors import (
        AgentAPIError as AgentAPIError,
    )
    from .errors import (
        AgentRunningError as AgentRunningError,
    )
    from .errors import (
        CoderAPIError as CoderAPIError,
    )
    from .errors import (
        ConfigError as ConfigError,
    )
    from .errors import (
        DurabilityError as DurabilityError,
    )
    from .errors import (
        ExitCode as ExitCode,
    )
    from .errors import (
        PersistError as PersistError,
    )
    from .errors import (
        StateFileCorrupt as StateFileCorrupt,
    )
    from .errors import (
        StateFileError as StateFileError,
    )
    from .errors import (
        StateFileVersionError as StateFileVersionError,
    )
    from .errors import (
        UpstreamError as UpstreamError,
    )
    from .log import (
        configure_logging as configure_logging,
    )
    from .models import (
        AgentAPIState as AgentAPIState,
    )
    from .models import (
        AgentStatus as AgentStatus,
    )
    from .models import (
        Conversation as Conversation,
    )
    from .models import (
        Message as Message,
    )
    from .peers import (
        Peers as Peers,
    )
    from .peers import (
        open_peers as open_peers,
    )
    from .restoring import (
        RestoreReport as RestoreReport,
    )
    from .restoring import (
        restore as restore,
    )
    from .shutdown import (
        ShutdownReport as ShutdownReport,
    )
    from .shutdown import (
        run_sequence as run_sequence,
    )
    from .shutdown import (
        run_shutdown as run_shutdown,
    )
    from .snapshot import (
        Snapshot as Snapshot,
    )
    from .snapshot import (
        build_snapshot as build_snapshot,
    )
    from .status import (
        StatusReport as StatusReport,
    )
    from .status import (
        collect_status as collect_status,
    )
    from .store import (
        LoadReport as LoadReport,
    )
    from .store import (
        SaveReport as SaveReport,
    )
    from .store import (
        StateStore as StateStore,
    )


#: Where each public name lives: the one list of the public API (the imports above say the
#: same for type checkers, and a test keeps the two equal). Names load on first use (PEP 562).
_HOME: dict[str, str] = {
    "AgentAPIClient": "agentapi",
    "AgentAPIError": "errors",
    "AgentAPIState": "models",
    "AgentProcess": "agent_process",
    "AgentRunningError": "errors",
    "AgentStatus": "models",
    "Budget": "budget",
    "CoderAPIError": "errors",
    "CoderClient": "coder",
    "CoderTarget": "config",
    "ConfigError": "errors",
    "Conversation": "models",
    "Daemon": "daemon",
    "DaemonState": "daemon",
    "DurabilityError": "errors",
    "ExitCode": "errors",
    "LoadReport": "store",
    "Message": "models",
    "Peers": "peers",
    "PersistError": "errors",
    "RestoreReport": "restoring",
    "SaveReport": "store",
    "Settings": "config",
    "ShutdownReport": "shutdown",
    "Snapshot": "snapshot",
    "StateFileCorrupt": "errors",
    "StateFileError": "errors",
    "StateFileVersionError": "errors",
    "StateStore": "store",
    "StatusReport": "status",
    "UploadOutcome": "coder",
    "UploadResult": "coder",
    "UpstreamError": "errors",
    "Version": "agent_process",
    "build_snapshot": "snapshot",
    "collect_status": "status",
    "configure_logging": "log",
    "find_agentapi": "agent_process",
    "gather": "copies",
    "open_peers": "peers",
    "read_agentapi_state": "agentapi_state",
    "render_agentapi_state": "agentapi_state",
    "restore": "restoring",
    "run": "daemon",
    "run_sequence": "shutdown",
    "run_shutdown": "shutdown",
    "serve": "daemon",
    "write_agentapi_state": "agentapi_state",
}

__all__ = sorted([*_HOME, "__version__"])


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

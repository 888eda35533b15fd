"""agentapi-persist: keeps AgentAPI conversations durable across workspace stops."""

from ._version import __version__

__all__ = ["__version__"]

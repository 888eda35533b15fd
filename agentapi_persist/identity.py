"""Which AgentAPI instance a conversation belongs to, and where its copy lives by default.

A workspace may run several AgentAPI-based agent modules at once, each with its own module
directory (``$HOME/$ARG_MODULE_DIR_NAME``), port, state file and task. A conversation has one
owner: the copy of module A must never be loaded, uploaded or written for module B. So every
store records the ``Instance`` it belongs to, the default state directory is one subdirectory
per module directory, and the sidecar's control channel answers only its own instance.

What makes two descriptions the same instance (``differences``): the module directory always
(the registry module hands ``ARG_MODULE_DIR_NAME`` to the start script and to the stop script
alike, and two modules never share one), the AgentAPI port between running processes (no two
AgentAPI servers share a port; a stored copy follows its module to a new port), the state
file when both sides name one (the registry's stop script is not told the state file, so a
defaulted path proves nothing), and the task id when both sides have one.

Standard library only: the ``shutdown`` client path resolves the instance before it asks a
running sidecar, and must not pay for pydantic.
"""

from __future__ import annotations

import hashlib
import os
import re

TYPE_CHECKING = False  # not `typing`: the client path counts every import
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

__all__ = [
    "STATE_ROOT_NAME",
    "Instance",
    "default_state_dir",
    "instance_dir_name",
    "port_of",
    "xdg_state_home",
]

#: The directory under ``$XDG_STATE_HOME`` that holds one subdirectory per instance (and,
#: from releases before instance directories, a copy of its own: see ``migration``).
STATE_ROOT_NAME = "agentapi-persist"

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class Instance:
    """One AgentAPI instance as the settings describe it (plain values, JSON-ready)."""

    __slots__ = ("module_dir", "port", "state_file", "state_file_explicit", "task_id")

    def __init__(
        self,
        *,
        module_dir: str,
        port: int | None,
        state_file: str,
        state_file_explicit: bool,
        task_id: str = "",
    ) -> None:
        self.module_dir = os.path.abspath(module_dir)
        self.port = port
        self.state_file = os.path.abspath(state_file)
        self.state_file_explicit = state_file_explicit
        self.task_id = task_id

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (``instance.json``, generation headers, control requests)."""
        return {
            "module_dir": self.module_dir,
            "port": self.port,
            "state_file": self.state_file,
            "state_file_explicit": self.state_file_explicit,
            "task_id": self.task_id,
        }

    @classmethod
    def from_dict(cls, data: object) -> Instance | None:
        """The instance a JSON document describes, ``None`` if it does not describe one."""
        if not isinstance(data, dict):
            return None
        module_dir, port, state_file = (
            data.get("module_dir"),
            data.get("port"),
            data.get("state_file"),
        )
        task_id = data.get("task_id", "")
        if not isinstance(module_dir, str) or not isinstance(state_file, str):
            return None
        if port is not None and type(port) is not int:
            return None
        return cls(
            module_dir=module_dir,
            port=port,
            state_file=state_file,
            state_file_explicit=data.get("state_file_explicit") is True,
            task_id=task_id if isinstance(task_id, str) else "",
        )

    def differences(self, other: Instance, *, by_port: bool = True) -> list[str]:
        """What tells ``other`` apart from this instance (empty: the same instance).

        ``by_port=False`` for a stored copy: a template may move its AgentAPI to another port
        between builds, and the module's conversation stays its own. Two running processes
        on different ports (a stop request and a sidecar) are two AgentAPI servers.
        """
        found = []
        if self.module_dir != other.module_dir:
            found.append(f"module directory {other.module_dir} (this one: {self.module_dir})")
        if by_port and self.port != other.port:
            found.append(f"AgentAPI port {other.port} (this one: {self.port})")
        if (
            self.state_file_explicit
            and other.state_file_explicit
            and self.state_file != other.state_file
        ):
            found.append(f"state file {other.state_file} (this one: {self.state_file})")
        if self.task_id and other.task_id and self.task_id != other.task_id:
            found.append(f"task {other.task_id} (this one: {self.task_id})")
        return found

    def merged(self, other: Instance) -> Instance:
        """This instance completed with what ``other`` (the same instance) knows and this one
        does not: a configured state file, a task id."""
        explicit = self.state_file_explicit or other.state_file_explicit
        return Instance(
            module_dir=self.module_dir,
            port=self.port,
            state_file=self.state_file if self.state_file_explicit else other.state_file,
            state_file_explicit=explicit,
            task_id=self.task_id or other.task_id,
        )

    def describe(self) -> str:
        """A short phrase for messages: the module directory and the port."""
        return f"the AgentAPI of {self.module_dir} on port {self.port}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Instance) and self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.as_dict().values()))

    def __repr__(self) -> str:
        return f"Instance({self.as_dict()!r})"


def port_of(url: str) -> int | None:
    """The TCP port of an http(s) URL (the scheme's default when none is given), ``None``
    when it cannot be read (the full validation in ``config`` reports why)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        return parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None


def xdg_state_home(env: Mapping[str, str]) -> str | None:
    """``$XDG_STATE_HOME`` when it is an absolute path, else ``None``. The XDG spec says a
    relative value is invalid and must be ignored: taken as it is, the sidecar and the stop
    script (started in different working directories) would resolve different directories."""
    value = env.get("XDG_STATE_HOME") or ""
    return value if os.path.isabs(value) else None


def instance_dir_name(module_dir: str | os.PathLike[str]) -> str:
    """The state subdirectory of a module directory: readable, and distinct for distinct
    directories (``.agentapi-module`` and ``agentapi-module`` differ only by the hash)."""
    absolute = os.path.abspath(module_dir)
    label = _UNSAFE.sub("_", os.path.basename(absolute)).lstrip(".")[:48] or "module"
    digest = hashlib.sha256(absolute.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{label}-{digest}"


def default_state_dir(
    state_home: str | os.PathLike[str], module_dir: str | os.PathLike[str]
) -> str:
    """``<state_home>/agentapi-persist/<instance_dir_name(module_dir)>``."""
    return os.path.join(os.fspath(state_home), STATE_ROOT_NAME, instance_dir_name(module_dir))

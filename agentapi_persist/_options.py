"""The table of settings (flag, variables, default, help), importable without pydantic.

``cli`` builds its parser from ``OPTIONS`` so help, variables and defaults cannot drift apart,
and the sidecar client path reads the two settings it needs (``state_dir_from``) without
loading pydantic: ``agentapi-persist shutdown`` must start in a few tens of milliseconds when a
sidecar is running. Together with ``config`` this is the only code that reads the environment.
"""

from __future__ import annotations

import os
import re

from .errors import ConfigError
from .identity import Instance, default_state_dir, port_of, xdg_state_home

# Not `from typing import ...`: this module is on the `shutdown` client path, where every
# import counts; mypy treats a name TYPE_CHECKING as true whatever its origin.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any, Literal

    Kind = Literal["str", "int", "float", "bool", "path"]

__all__ = [
    "COMMANDS",
    "DEFAULT_AGENTAPI_PORT",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MODULE_DIR_NAME",
    "GROUPS",
    "OPTIONS",
    "Option",
    "env_source",
    "parse_bool",
    "quick_settings",
]

DEFAULT_AGENTAPI_PORT = 3284
DEFAULT_MODULE_DIR_NAME = ".agentapi-module"
#: The largest AgentAPI response or state file read, in bytes: one value for every reader
#: (the clients, the store, AgentAPI's file), overridable with --max-body-bytes.
DEFAULT_MAX_BODY_BYTES = 256 * 1024 * 1024

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", ""}


def parse_bool(value: str, *, name: str) -> bool:
    """Parse a boolean the way shell users write them; refuse anything else by name."""
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean (use true/false, 1/0, yes/no)")


class Option:
    """One setting: its flag, the variables that feed it, and the help the CLI prints.

    A plain slotted class rather than a dataclass: ``dataclasses`` imports ``inspect``, a
    measurable cost on the client path. ``kind`` names the type: ``config`` converts.
    """

    __slots__ = (
        "commands",
        "default_text",
        "env",
        "field",
        "flag",
        "group",
        "help",
        "kind",
        "metavar",
    )

    def __init__(
        self,
        field: str,
        flag: str,
        env: tuple[str, ...],
        help: str,
        default_text: str,
        kind: Kind = "str",
        metavar: str | None = None,
        *,
        group: str,
        commands: frozenset[str],
    ) -> None:
        self.field = field
        self.group = group
        """The heading ``--help`` lists it under (``GROUPS``)."""
        self.commands = commands
        """The commands that read it: only those offer its flag (the variable is read by
        every command, as it always was)."""
        self.flag = flag
        self.env = env
        self.help = help
        self.default_text = default_text
        self.kind: Kind = kind
        self.metavar = metavar

    def __repr__(self) -> str:
        return f"Option({self.field!r}, {self.flag!r})"


#: Every command, and the groups of settings ``--help`` shows, in order.
COMMANDS = frozenset({"run", "shutdown", "restore", "snapshot", "status", "doctor", "export"})
GROUPS = ("AgentAPI", "Coder", "storage", "replica", "timing", "output")
# Commands that stop (a budget), that upload the snapshot, that may signal AgentAPI.
_STOPPING = frozenset({"run", "shutdown", "snapshot", "doctor"})
_UPLOADING = frozenset({"run", "shutdown", "snapshot", "doctor"})
_SIGNALLING = frozenset({"run", "shutdown", "status", "doctor"})
# Commands that upload to, or read from, the off-volume replica.
_REPLICATING = frozenset({"run", "shutdown", "restore", "status", "doctor"})

#: Every configurable setting, in the order ``--help`` lists them within their group. The CLI
#: builds its flags from this table so that help, environment names and defaults cannot drift
#: apart.
OPTIONS: tuple[Option, ...] = (
    Option(
        "grace_s",
        "--grace",
        ("AGENTAPI_PERSIST_GRACE",),
        "Seconds the container runtime allows before SIGKILL; every wait fits inside it.",
        "10",
        "float",
        "SECONDS",
        group="timing",
        commands=_STOPPING | {"status"},
    ),
    Option(
        "state_dir",
        "--state-dir",
        ("AGENTAPI_PERSIST_STATE_DIR",),
        "Directory of the sidecar's own durable copy (put it on the persistent volume); one "
        "per AgentAPI instance: a directory used by another instance is refused.",
        "${XDG_STATE_HOME:-$HOME/.local/state}/agentapi-persist/<module dir name>-<hash>",
        "path",
        "DIR",
        group="storage",
        commands=COMMANDS,
    ),
    Option(
        "agentapi_url",
        "--agentapi-url",
        ("AGENTAPI_PERSIST_AGENTAPI_URL",),
        "Base URL of AgentAPI.",
        "http://localhost:$ARG_AGENTAPI_PORT (or $AGENTAPI_PORT, or 3284)",
        "str",
        "URL",
        group="AgentAPI",
        commands=COMMANDS - {"export"},
    ),
    Option(
        "snapshot_messages",
        "--snapshot-messages",
        ("AGENTAPI_PERSIST_SNAPSHOT_MESSAGES",),
        "How many of the latest messages the log snapshot keeps.",
        "30",
        "int",
        "N",
        group="Coder",
        commands=_UPLOADING | {"status"},
    ),
    Option(
        "task_id",
        "--task-id",
        ("AGENTAPI_PERSIST_TASK_ID", "ARG_TASK_ID"),
        "Coder task UUID for the log snapshot; empty means no snapshot.",
        "empty",
        "str",
        "UUID",
        group="Coder",
        commands=COMMANDS - {"export"},
    ),
    Option(
        "task_log_snapshot",
        "--task-log-snapshot",
        ("AGENTAPI_PERSIST_TASK_LOG_SNAPSHOT", "ARG_TASK_LOG_SNAPSHOT"),
        "Upload the log snapshot at all (true/false).",
        "true",
        "bool",
        "BOOL",
        group="Coder",
        commands=_UPLOADING,
    ),
    Option(
        "coder_url",
        "--coder-url",
        ("AGENTAPI_PERSIST_CODER_URL", "CODER_AGENT_URL"),
        "Coder server URL for the snapshot upload (the token comes from CODER_AGENT_TOKEN only).",
        "unset",
        "str",
        "URL",
        group="Coder",
        commands=_UPLOADING | {"status"},
    ),
    Option(
        "agentapi_state_file",
        "--agentapi-state-file",
        ("AGENTAPI_PERSIST_AGENTAPI_STATE_FILE", "AGENTAPI_STATE_FILE", "ARG_STATE_FILE_PATH"),
        "AgentAPI's own state file.",
        "$HOME/$ARG_MODULE_DIR_NAME/agentapi-state.json",
        "path",
        "FILE",
        group="AgentAPI",
        commands=COMMANDS - {"export"},
    ),
    Option(
        "agentapi_pid_file",
        "--agentapi-pid-file",
        ("AGENTAPI_PERSIST_AGENTAPI_PID_FILE", "AGENTAPI_PID_FILE", "ARG_PID_FILE_PATH"),
        "AgentAPI's pid file.",
        "$HOME/$ARG_MODULE_DIR_NAME/agentapi.pid",
        "path",
        "FILE",
        group="AgentAPI",
        commands=COMMANDS - {"export", "snapshot"},
    ),
    Option(
        "state_persistence",
        "--state-persistence",
        ("AGENTAPI_PERSIST_STATE_PERSISTENCE", "ARG_ENABLE_STATE_PERSISTENCE"),
        "Whether AgentAPI saves its own state (enables the SIGUSR1 save on stop). "
        "Unset: true when AgentAPI's process has AGENTAPI_STATE_FILE set.",
        "auto",
        "bool",
        "BOOL",
        group="AgentAPI",
        commands=_SIGNALLING,
    ),
    Option(
        "agentapi_bin",
        "--agentapi-bin",
        ("AGENTAPI_PERSIST_AGENTAPI_BIN",),
        "AgentAPI binary used for `--version` when the running process's own is unreadable.",
        "agentapi",
        "str",
        "PATH",
        group="AgentAPI",
        commands=_SIGNALLING,
    ),
    Option(
        "stop_agentapi",
        "--stop-agentapi",
        ("AGENTAPI_PERSIST_STOP_AGENTAPI",),
        "After saving, SIGTERM AgentAPI and wait for it (bounded by the budget).",
        "false",
        "bool",
        "BOOL",
        group="AgentAPI",
        commands=frozenset({"run", "shutdown"}),
    ),
    Option(
        "checkpoint_interval_s",
        "--checkpoint-interval",
        ("AGENTAPI_PERSIST_CHECKPOINT_INTERVAL",),
        "run: changes are grouped for this long, then made durable with one fsync.",
        "0.25",
        "float",
        "SECONDS",
        group="timing",
        commands=frozenset({"run"}),
    ),
    Option(
        "snapshot_interval_s",
        "--snapshot-interval",
        ("AGENTAPI_PERSIST_SNAPSHOT_INTERVAL",),
        "run: upload the log snapshot when the agent turns stable after a change, at most "
        "this often, so the paused page has history even after a SIGKILL; 0 turns it off.",
        "60",
        "float",
        "SECONDS",
        group="timing",
        commands=frozenset({"run"}),
    ),
    Option(
        "max_body_bytes",
        "--max-body-bytes",
        ("AGENTAPI_PERSIST_MAX_BODY_BYTES",),
        "Largest AgentAPI response or state file we accept, in bytes.",
        str(DEFAULT_MAX_BODY_BYTES),
        "int",
        "BYTES",
        group="storage",
        commands=COMMANDS,
    ),
    Option(
        "replica",
        "--replica",
        ("AGENTAPI_PERSIST_REPLICA",),
        "Off-volume replica of the copy in S3-compatible storage, s3://BUCKET/PREFIX (one "
        "place per instance under it); credentials come from the AWS chain (AWS_ACCESS_KEY_ID"
        "/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, web identity). Needs the s3 extra.",
        "unset (no replica)",
        "str",
        "URL",
        group="replica",
        commands=_REPLICATING,
    ),
    Option(
        "replica_endpoint",
        "--replica-endpoint",
        ("AGENTAPI_PERSIST_REPLICA_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
        "Endpoint of an S3-compatible server (MinIO, Ceph, R2, ...); unset means AWS S3.",
        "unset",
        "str",
        "URL",
        group="replica",
        commands=_REPLICATING,
    ),
    Option(
        "log_level",
        "--log-level",
        ("AGENTAPI_PERSIST_LOG_LEVEL",),
        "debug, info, warning or error.",
        "error for one-shot commands (their result states every problem), info for run",
        "str",
        "LEVEL",
        group="output",
        commands=COMMANDS,
    ),
)


def _lookup(field: str, flags: Mapping[str, Any], env: Mapping[str, str]) -> Any:
    """The raw value of ``field`` the way ``Settings.load`` picks it: the flag, then the first
    variable of its list that is set (an empty one counts only for text settings)."""
    if flags.get(field) is not None:
        return flags[field]
    found = env_source(next(o for o in OPTIONS if o.field == field), env)
    return found[1] if found is not None else None


#: Text settings whose empty variable is no value at all: a template's empty
#: ``AGENTAPI_PERSIST_REPLICA_ENDPOINT`` must not hide ``AWS_ENDPOINT_URL`` (AWS's own tools
#: ignore an empty variable too).
_EMPTY_IS_UNSET = frozenset({"replica", "replica_endpoint"})


def env_source(option: Option, env: Mapping[str, str]) -> tuple[str, str] | None:
    """(variable, raw value) of the first of ``option``'s variables that is set; an empty
    one counts only for text settings (``ARG_TASK_ID=""`` means "no task", not "unset")."""
    counts_empty = option.kind == "str" and option.field not in _EMPTY_IS_UNSET
    for name in option.env:
        raw = env.get(name)
        if raw is not None and (raw != "" or counts_empty):
            return name, raw
    return None


_UUID = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")


def quick_settings(
    flags: Mapping[str, Any], env: Mapping[str, str] | None = None
) -> tuple[str, float, Instance]:
    """``(state_dir, grace_s, instance)`` as ``Settings.load`` would resolve them, without
    pydantic.

    Only for reaching a running sidecar fast; anything invalid here is left for the full
    validation in ``Settings.load`` to report, and never raises.
    """
    env = os.environ if env is None else env
    home = env.get("HOME") or os.path.expanduser("~")
    module_dir = os.path.join(home, env.get("ARG_MODULE_DIR_NAME") or DEFAULT_MODULE_DIR_NAME)
    state_dir = _lookup("state_dir", flags, env)
    if not state_dir:
        state_home = xdg_state_home(env) or os.path.join(home, ".local", "state")
        state_dir = default_state_dir(state_home, module_dir)
    grace: Any = _lookup("grace_s", flags, env) or 10.0
    try:
        grace_s = float(grace)
    except ValueError:
        grace_s = 10.0
    url = _lookup("agentapi_url", flags, env)
    if url is not None:
        port = port_of(str(url))
    else:
        raw_port = (env.get("ARG_AGENTAPI_PORT") or env.get("AGENTAPI_PORT") or "").strip()
        raw_port = raw_port or str(DEFAULT_AGENTAPI_PORT)
        digits = raw_port.isascii() and raw_port.isdigit() and len(raw_port) <= 5
        port = int(raw_port) if digits else None
    state_file = _lookup("agentapi_state_file", flags, env)
    explicit = state_file is not None
    task_id = str(_lookup("task_id", flags, env) or "").strip()
    if _UUID.fullmatch(task_id):
        task_id = task_id.lower()
    try:
        expanded = os.path.expanduser(str(state_file)) if explicit else ""
    except (RuntimeError, ValueError):
        expanded = str(state_file)
    instance = Instance(
        module_dir=module_dir,
        port=port,
        state_file=expanded or os.path.join(module_dir, "agentapi-state.json"),
        state_file_explicit=explicit,
        task_id=task_id,
    )
    try:
        state_dir = os.path.expanduser(str(state_dir))
    except (RuntimeError, ValueError):
        state_dir = str(state_dir)
    return state_dir, grace_s, instance

"""Settings: one frozen, validated object built once from flags and the environment.

Names follow the registry's agentapi module (``ARG_*``, ``CODER_AGENT_*``) and AgentAPI's own
(``AGENTAPI_*``) so that a template can swap the bash script for this tool without renaming
anything; the project's own knobs use ``AGENTAPI_PERSIST_*``. Precedence: a flag the user
passed, then the first variable set in each option's list, then the default.

This is the only module that reads ``os.environ``. The Coder token is read from the
environment only (a flag would show up in the process table) and is kept as a ``SecretStr``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from ._options import (
    DEFAULT_AGENTAPI_PORT,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MODULE_DIR_NAME,
    OPTIONS,
    Option,
    env_source,
    parse_bool,
)
from .errors import ConfigError
from .identity import Instance, default_state_dir, port_of, xdg_state_home

if TYPE_CHECKING:
    from .replica_layout import ReplicaTarget

__all__ = ["OPTIONS", "CoderTarget", "Option", "Settings", "parse_bool"]

#: The Coder server rejects snapshot bodies over 64 KiB (400, not 413).
SNAPSHOT_MAX_BYTES = 65_536

_OPTION_BY_FIELD = {option.field: option for option in OPTIONS}
_ENV_NAMES = {name for option in OPTIONS for name in option.env}
#: Settings that only shape the log snapshot. A bad value of one in the environment (a typo in
#: a template) must not stop the conversation from being saved: it is reported as a
#: misconfigured snapshot (exit 4) and persistence goes on with its default.
_SNAPSHOT_ONLY = frozenset({"coder_url", "task_log_snapshot", "snapshot_messages"})


@dataclass(frozen=True, slots=True)
class CoderTarget:
    """Where and how to upload the log snapshot; exists only when an upload is wanted."""

    base_url: str
    token: SecretStr
    task_id: str

    def __repr__(self) -> str:  # the token must never reach a log line
        return f"CoderTarget(base_url={self.base_url!r}, task_id={self.task_id!r})"


class Settings(BaseModel):
    """Everything agentapi-persist needs to know, validated once at the edge."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    grace_s: float = Field(default=10.0, gt=0, le=3600, allow_inf_nan=False)
    """Seconds before the runtime SIGKILLs us (Docker 10, Kubernetes 30 shared with others)."""

    state_dir: Path
    """The sidecar's durable copy. Must be on the persistent volume to survive a stop."""

    state_dir_explicit: bool = False
    """True when the state directory was configured, not the per-instance default (only a
    default directory adopts a copy left by a release before instance directories)."""

    module_dir: Path = Path(DEFAULT_MODULE_DIR_NAME)
    """The registry module's directory (``$HOME/$ARG_MODULE_DIR_NAME``): part of the identity."""

    agentapi_url: str = f"http://localhost:{DEFAULT_AGENTAPI_PORT}"
    """AgentAPI's base URL; its Host check accepts localhost, 127.0.0.1 and [::1]."""

    snapshot_messages: int = Field(default=30, ge=1, le=100_000)
    """How many of the latest messages go into the log snapshot."""

    task_id: str = ""
    """Coder task UUID; empty means "no snapshot", which is not an error."""

    task_id_from: str = "ARG_TASK_ID"
    """Where the task id came from (a flag or a variable), named when it is refused."""

    task_log_snapshot: bool = True
    """The registry module's switch for the snapshot upload."""

    coder_url: str | None = None
    """Coder server base URL (``CODER_AGENT_URL``)."""

    coder_token: SecretStr | None = None
    """``CODER_AGENT_TOKEN``: honoured only while the stop build runs. Never printed."""

    agentapi_state_file: Path
    """AgentAPI's own state file (``AGENTAPI_STATE_FILE``)."""

    agentapi_state_file_explicit: bool = False
    """True when the state file path was configured, not defaulted (enables persistence)."""

    agentapi_pid_file: Path
    """AgentAPI's pid file; pid files outlive processes and pids get reused."""

    state_persistence: bool | None = None
    """``ARG_ENABLE_STATE_PERSISTENCE``; ``None`` means decide from AgentAPI's environment."""

    agentapi_bin: str = "agentapi"
    """Fallback binary for ``--version`` when ``/proc/<pid>/exe`` cannot be read."""

    stop_agentapi: bool = False
    """Whether the shutdown sequence ends by stopping AgentAPI."""

    initial_prompt: str | None = None
    """``AGENTAPI_INITIAL_PROMPT``: used only when no saved state ever told us the prompt."""

    checkpoint_interval_s: float = Field(default=0.25, ge=0.01, le=1.0, allow_inf_nan=False)
    """The sidecar groups changes this long before one durable append (the 1 s promise)."""

    snapshot_interval_s: float = Field(default=60.0, ge=0.0, le=86_400.0, allow_inf_nan=False)
    """Minimum seconds between periodic snapshot uploads while running; 0 disables them."""

    max_body_bytes: int = Field(default=DEFAULT_MAX_BODY_BYTES, ge=1024)
    """Cap on any AgentAPI body or state file we read: input from AgentAPI is untrusted."""

    replica: str | None = None
    """``s3://bucket/prefix`` of the off-volume replica; ``None``: no replica."""

    replica_endpoint: str | None = None
    """An S3-compatible server's URL; ``None``: AWS S3 (botocore's own resolution)."""

    log_level: str = "info"
    """Minimum level of log events."""

    snapshot_problem: str | None = None
    """Why a snapshot-only variable was refused (its default applies); ``coder_target``
    reports it when a snapshot is wanted, and persistence is not affected."""

    snapshot_max_bytes: int = Field(default=SNAPSHOT_MAX_BYTES, ge=256, le=SNAPSHOT_MAX_BYTES)
    """Upper bound of the snapshot body in bytes; the server's limit is 65,536."""

    @field_validator("agentapi_url", "coder_url", "replica_endpoint")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError(f"{value!r} is not an http(s) URL")
        if parts.query or parts.fragment:
            raise ValueError(f"{value!r} must not carry a query or fragment")
        try:
            parts.port  # noqa: B018  # raises for a port out of range or not a number
        except ValueError:
            raise ValueError(f"{value!r} does not have a valid TCP port number") from None
        return value.rstrip("/")

    @field_validator("replica", "replica_endpoint", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # AWS_ENDPOINT_URL="" or AGENTAPI_PERSIST_REPLICA="" in a template means "none".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("replica")
    @classmethod
    def _replica_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from .replica_layout import parse_replica_url  # only where a replica is configured

        return parse_replica_url(value).url

    @field_validator("replica_endpoint")
    @classmethod
    def _endpoint_without_credentials(cls, value: str | None) -> str | None:
        parts = urlsplit(value) if value is not None else None
        if parts is not None and (parts.username or parts.password):
            raise ValueError(
                "must not carry credentials: they come from the AWS chain "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, web identity)"
            )
        return value

    @field_validator("task_id")
    @classmethod
    def _task_uuid(cls, value: str) -> str:
        # Only normalised here. A malformed task id must not stop the state from being saved
        # (a typo in ARG_TASK_ID would otherwise turn persistence off entirely): it is
        # refused in coder_target(), before it can go into a URL, and reported as a
        # misconfigured snapshot.
        value = value.strip()
        return value.lower() if _canonical_uuid(value) else value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.lower()
        if value not in {"debug", "info", "warning", "error"}:
            raise ValueError(f"log level {value!r} is not debug, info, warning or error")
        return value

    @property
    def margin_s(self) -> float:
        """Time kept back from the grace period for process exit and scheduling jitter."""
        return min(max(0.25, self.grace_s * 0.1), 2.0)

    @property
    def watchdog_margin_s(self) -> float:
        """How long before the grace period ends the hard-exit watchdog fires: inside the
        margin (so the runtime's SIGKILL never comes first), at most 0.15 s before its end."""
        return min(0.15, self.margin_s / 2)

    @property
    def budget_s(self) -> float:
        """The shutdown sequence's whole budget: grace minus the safety margin."""
        return max(self.grace_s - self.margin_s, 0.1)

    @property
    def instance(self) -> Instance:
        """The AgentAPI instance these settings describe (the owner of the conversation)."""
        return Instance(
            module_dir=str(self.module_dir),
            port=port_of(self.agentapi_url),
            state_file=str(self.agentapi_state_file),
            state_file_explicit=self.agentapi_state_file_explicit,
            task_id=self.task_id,
        )

    @property
    def replica_target(self) -> ReplicaTarget | None:
        """Where the replica lives, ``None`` when none is configured."""
        if self.replica is None:
            return None
        from .replica_layout import parse_replica_url

        return parse_replica_url(self.replica)

    @property
    def snapshot_wanted(self) -> bool:
        """True when a task id is configured and snapshots are not switched off."""
        return self.task_log_snapshot and self.task_id != ""

    def coder_target(self) -> CoderTarget | None:
        """Where to upload, ``None`` when no snapshot is wanted, ``ConfigError`` if half-set."""
        if not self.snapshot_wanted:
            return None
        if self.snapshot_problem is not None:
            raise ConfigError(
                f"{self.snapshot_problem}: cannot upload the log snapshot (the conversation is "
                "still saved)"
            )
        missing = [
            name
            for name, value in (
                ("CODER_AGENT_URL", self.coder_url),
                ("CODER_AGENT_TOKEN", self.coder_token),
            )
            if not value
        ]
        if not _canonical_uuid(self.task_id):
            raise ConfigError(
                f"task id {self.task_id[:64]!r} ({self.task_id_from}) is not a canonical UUID: "
                "cannot upload the log snapshot"
            )
        if missing:
            raise ConfigError(
                f"task id {self.task_id} is set but {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} missing: cannot upload the log snapshot"
            )
        assert self.coder_url is not None
        assert self.coder_token is not None
        return CoderTarget(base_url=self.coder_url, token=self.coder_token, task_id=self.task_id)

    @classmethod
    def load(
        cls,
        flags: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        *,
        default_log_level: str | None = None,
    ) -> Settings:
        """Build settings from flags the user passed (field name -> value) over ``env``.

        ``env`` defaults to ``os.environ``; pass a dict in tests and embedders. Raises
        ``ConfigError`` naming the flag or variable at fault. ``default_log_level`` is the
        level when neither a flag nor ``AGENTAPI_PERSIST_LOG_LEVEL`` sets one (the CLI's
        one-shot commands log errors only, the sidecar info).
        """
        env = os.environ if env is None else env
        # A flag whose value is None was not passed (argparse and embedders both do this).
        flags = {name: value for name, value in (flags or {}).items() if value is not None}
        if default_log_level is not None and "log_level" not in flags:
            flags["log_level"] = env.get("AGENTAPI_PERSIST_LOG_LEVEL") or default_log_level
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        snapshot_problems: list[str] = []
        for option in OPTIONS:
            if option.field in flags:
                values[option.field] = flags.pop(option.field)
                sources[option.field] = option.flag
                continue
            found = env_source(option, env)
            if found is None:
                continue
            name, raw = found
            try:
                values[option.field] = _convert(raw, option, name)
            except ConfigError as exc:
                if option.field not in _SNAPSHOT_ONLY:
                    raise
                snapshot_problems.append(str(exc))
                continue
            sources[option.field] = name
        if flags:
            raise ConfigError(f"unknown settings: {', '.join(sorted(flags))}")

        home = _home(env, values)
        module_dir = home / (env.get("ARG_MODULE_DIR_NAME") or DEFAULT_MODULE_DIR_NAME)
        values["module_dir"] = module_dir
        values["state_dir_explicit"] = "state_dir" in values
        if "state_dir" not in values:
            state_home = xdg_state_home(env) or str(home / ".local" / "state")
            values["state_dir"] = Path(default_state_dir(state_home, module_dir))
        if "agentapi_url" not in values:
            port = env.get("ARG_AGENTAPI_PORT") or env.get("AGENTAPI_PORT") or ""
            port = port.strip() or str(DEFAULT_AGENTAPI_PORT)
            # isdigit() alone would pass "²" or "٣" (int() refuses or misreads them) and
            # 5,000 digits (int() refuses those too).
            digits = port.isascii() and port.isdigit() and len(port) <= 5
            if not digits or not 0 < int(port) < 65536:
                raise ConfigError(f"AgentAPI port {port!r} is not a TCP port number")
            values["agentapi_url"] = f"http://localhost:{port}"
        if "task_id" in sources:
            values["task_id_from"] = sources["task_id"]
        values["agentapi_state_file_explicit"] = "agentapi_state_file" in values
        values.setdefault("agentapi_state_file", module_dir / "agentapi-state.json")
        values.setdefault("agentapi_pid_file", module_dir / "agentapi.pid")
        token = env.get("CODER_AGENT_TOKEN", "")
        if token.strip():
            values["coder_token"] = SecretStr(token.strip())
        if env.get("AGENTAPI_INITIAL_PROMPT"):
            values["initial_prompt"] = env["AGENTAPI_INITIAL_PROMPT"]
        while True:
            try:
                settings = cls(**values)
            except ValidationError as exc:
                err = exc.errors(include_url=False, include_input=False)[0]
                field = str(err["loc"][0]) if err["loc"] else ""
                known = _OPTION_BY_FIELD.get(field)
                where = sources.get(field) or (known.flag if known is not None else field)
                message = f"{where}: {err['msg'].removeprefix('Value error, ')}"
                if field not in _SNAPSHOT_ONLY or where not in _ENV_NAMES:
                    raise ConfigError(message) from None
                # A bad snapshot-only variable must not stop persistence: it is dropped
                # (its default applies) and reported as a misconfigured snapshot.
                snapshot_problems.append(message)
                del values[field]
                continue
            if snapshot_problems:
                problem = "; ".join(snapshot_problems)
                return settings.model_copy(update={"snapshot_problem": problem})
            return settings


def _home(env: Mapping[str, str], values: Mapping[str, Any]) -> Path:
    """``$HOME``, else the passwd entry's. A uid with neither (a container started with
    ``--user 12345`` and no ``HOME``) still works when every path is given; otherwise the
    paths that need a home are named."""
    if env.get("HOME"):
        return Path(env["HOME"])
    try:
        return Path.home()
    except (RuntimeError, KeyError):
        pass
    needed = {"state_dir", "agentapi_state_file", "agentapi_pid_file"} - set(values)
    if needed:
        flags = ", ".join(_OPTION_BY_FIELD[name].flag for name in sorted(needed))
        raise ConfigError(
            f"HOME is not set and uid {os.getuid()} has no passwd entry: set HOME, or give {flags}"
        )
    return Path("/nonexistent-home")  # never used: every path that needs it was given


def _canonical_uuid(value: str) -> bool:
    """True for the canonical 8-4-4-4-12 form only: ``uuid.UUID`` also accepts braces,
    ``urn:`` prefixes and missing hyphens, and the URL wants nothing that could smuggle a path."""
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


def _convert(raw: str, option: Option, name: str) -> Any:
    if option.kind == "bool":
        return parse_bool(raw, name=name)
    if option.kind in ("int", "float"):
        convert = int if option.kind == "int" else float
        try:
            return convert(raw.strip())
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a number") from None
    if option.kind == "path":
        try:
            return Path(raw).expanduser()
        except RuntimeError:  # "~someone" for a user that does not exist
            raise ConfigError(f"{name}={raw!r}: cannot expand '~': no such user") from None
    return raw

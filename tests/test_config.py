"""Settings: flags over environment over defaults, registry-module names, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentapi_persist.config import Settings
from agentapi_persist.errors import ConfigError
from agentapi_persist.identity import instance_dir_name

TASK = "5f1c7a0e-3b2d-4c1e-9f00-1234567890ab"


def load(flags: dict[str, object] | None = None, /, **env: str) -> Settings:
    base = {"HOME": "/home/coder"}
    base.update(env)
    return Settings.load(flags, env=base)


def test_defaults_follow_the_registry_module() -> None:
    """Without configuration, paths and port match the agentapi module's defaults."""
    s = load()
    assert s.grace_s == 10
    assert s.snapshot_messages == 30
    assert s.agentapi_url == "http://localhost:3284"
    assert s.state_dir == Path("/home/coder/.local/state/agentapi-persist") / instance_dir_name(
        "/home/coder/.agentapi-module"
    )
    assert not s.state_dir_explicit
    assert s.agentapi_state_file == Path("/home/coder/.agentapi-module/agentapi-state.json")
    assert s.agentapi_pid_file == Path("/home/coder/.agentapi-module/agentapi.pid")
    assert not s.agentapi_state_file_explicit
    assert s.coder_target() is None


@pytest.mark.parametrize(
    ("env", "field", "expected"),
    [
        ({"ARG_AGENTAPI_PORT": "4000"}, "agentapi_url", "http://localhost:4000"),
        ({"AGENTAPI_PORT": "4001"}, "agentapi_url", "http://localhost:4001"),
        (
            {"ARG_MODULE_DIR_NAME": ".claude-module"},
            "agentapi_pid_file",
            Path("/home/coder/.claude-module/agentapi.pid"),
        ),
        ({"ARG_PID_FILE_PATH": "/tmp/a.pid"}, "agentapi_pid_file", Path("/tmp/a.pid")),
        (
            {"AGENTAPI_PID_FILE": "/tmp/b.pid", "ARG_PID_FILE_PATH": "/tmp/a.pid"},
            "agentapi_pid_file",
            Path("/tmp/b.pid"),
        ),
        ({"ARG_STATE_FILE_PATH": "/tmp/s.json"}, "agentapi_state_file", Path("/tmp/s.json")),
        (
            {"XDG_STATE_HOME": "/var/state"},
            "state_dir",
            Path("/var/state/agentapi-persist", instance_dir_name("/home/coder/.agentapi-module")),
        ),
        (
            {"XDG_STATE_HOME": "state"},  # relative: invalid by the XDG spec, ignored
            "state_dir",
            Path("/home/coder/.local/state/agentapi-persist")
            / instance_dir_name("/home/coder/.agentapi-module"),
        ),
        ({"AGENTAPI_PERSIST_GRACE": "30"}, "grace_s", 30.0),
        ({"ARG_ENABLE_STATE_PERSISTENCE": "true"}, "state_persistence", True),
        ({"ARG_ENABLE_STATE_PERSISTENCE": "false"}, "state_persistence", False),
        ({"ARG_TASK_LOG_SNAPSHOT": "false"}, "task_log_snapshot", False),
        ({"ARG_TASK_ID": TASK.upper()}, "task_id", TASK),
        ({"ARG_TASK_ID": ""}, "task_id", ""),
        ({"AGENTAPI_PERSIST_SNAPSHOT_MESSAGES": "10"}, "snapshot_messages", 10),
    ],
)
def test_environment_names(env: dict[str, str], field: str, expected: object) -> None:
    """Each registry-module and project variable lands in its setting."""
    assert getattr(load(**env), field) == expected


def test_flags_win_over_environment() -> None:
    """A flag the user passed beats every variable."""
    s = load({"grace_s": 3.0, "snapshot_messages": 5}, AGENTAPI_PERSIST_GRACE="30")
    assert s.grace_s == 3.0
    assert s.snapshot_messages == 5


def test_explicit_state_file_is_recorded() -> None:
    """A configured state file means persistence was asked for."""
    assert load(AGENTAPI_STATE_FILE="/x/state.json").agentapi_state_file_explicit


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"AGENTAPI_PERSIST_GRACE": "soon"}, "AGENTAPI_PERSIST_GRACE"),
        ({"AGENTAPI_PERSIST_GRACE": "-1"}, "AGENTAPI_PERSIST_GRACE"),
        ({"ARG_ENABLE_STATE_PERSISTENCE": "maybe"}, "ARG_ENABLE_STATE_PERSISTENCE"),
        ({"ARG_AGENTAPI_PORT": "99999"}, "port"),
        ({"AGENTAPI_PERSIST_LOG_LEVEL": "loud"}, "AGENTAPI_PERSIST_LOG_LEVEL"),
    ],
)
def test_bad_values_name_their_source(env: dict[str, str], needle: str) -> None:
    """A bad value raises ConfigError naming the variable or the problem."""
    with pytest.raises(ConfigError, match=needle):
        load(**env)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"CODER_AGENT_URL": "ftp://coder"}, "CODER_AGENT_URL"),
        ({"ARG_TASK_LOG_SNAPSHOT": "maybe"}, "ARG_TASK_LOG_SNAPSHOT"),
        ({"AGENTAPI_PERSIST_SNAPSHOT_MESSAGES": "many"}, "AGENTAPI_PERSIST_SNAPSHOT_MESSAGES"),
    ],
)
def test_a_bad_snapshot_only_variable_is_a_snapshot_problem(
    env: dict[str, str], needle: str
) -> None:
    """Settings load (persistence goes on); the snapshot, when wanted, names the variable."""
    settings = load(
        **{"ARG_TASK_ID": TASK, "CODER_AGENT_TOKEN": "t", "CODER_AGENT_URL": "http://c", **env}
    )
    with pytest.raises(ConfigError, match=needle):
        settings.coder_target()
    assert load(**env).coder_target() is None  # no task: nothing to upload, nothing wrong


def test_task_without_url_or_token_is_a_clear_error() -> None:
    """A task id with no Coder URL or token cannot upload, and says which is missing."""
    s = load(ARG_TASK_ID=TASK)
    with pytest.raises(ConfigError, match="CODER_AGENT_URL and CODER_AGENT_TOKEN are missing"):
        s.coder_target()
    s = load(ARG_TASK_ID=TASK, CODER_AGENT_URL="https://coder.example.com")
    with pytest.raises(ConfigError, match="CODER_AGENT_TOKEN is missing"):
        s.coder_target()


def test_token_never_shows_in_reprs() -> None:
    """The token is a secret in the settings and in the upload target."""
    canary = "tok-CANARY-8c1f"
    s = load(
        ARG_TASK_ID=TASK, CODER_AGENT_URL="https://coder.example.com", CODER_AGENT_TOKEN=canary
    )
    target = s.coder_target()
    assert target is not None
    assert target.token.get_secret_value() == canary
    for text in (repr(s), str(s), repr(target), s.model_dump_json()):
        assert canary not in text


def test_budget_keeps_a_margin() -> None:
    """The sequence budget is below the grace period by a margin that scales with it."""
    assert load(AGENTAPI_PERSIST_GRACE="10").budget_s == pytest.approx(9.0)
    assert load(AGENTAPI_PERSIST_GRACE="3").budget_s == pytest.approx(2.7)
    assert load(AGENTAPI_PERSIST_GRACE="30").budget_s == pytest.approx(28.0)


@pytest.mark.parametrize(
    "task_id",
    [
        "../../etc/passwd",
        "{5f1c7a0e-3b2d-4c1e-9f00-1234567890ab}",
        "5f1c7a0e3b2d4c1e9f001234567890ab",
    ],
)
def test_malformed_task_id_blocks_only_the_upload(task_id: str) -> None:
    """A bad task id never reaches a URL, but it does not stop settings (and saving) either."""
    s = load(
        ARG_TASK_ID=task_id, CODER_AGENT_URL="https://coder.example.com", CODER_AGENT_TOKEN="t"
    )
    with pytest.raises(ConfigError, match="not a canonical UUID"):
        s.coder_target()

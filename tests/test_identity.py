"""Instance identity: who owns a state directory, and the per-module default directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentapi_persist._options import quick_settings
from agentapi_persist.config import Settings
from agentapi_persist.errors import ForeignStateDir
from agentapi_persist.identity import Instance, instance_dir_name
from agentapi_persist.ownership import INSTANCE_NAME, claim, read_owner

TASK_A = "5f1c7a0e-3b2d-4c1e-9f00-1234567890ab"
TASK_B = "6f1c7a0e-3b2d-4c1e-9f00-1234567890ab"


def instance(**changes: object) -> Instance:
    fields: dict[str, object] = {
        "module_dir": "/home/coder/.claude-module",
        "port": 3284,
        "state_file": "/home/coder/.claude-module/agentapi-state.json",
        "state_file_explicit": False,
        "task_id": "",
    }
    fields.update(changes)
    return Instance(**fields)  # type: ignore[arg-type]


def module_env(name: str, port: int) -> dict[str, str]:
    return {"HOME": "/home/coder", "ARG_MODULE_DIR_NAME": name, "ARG_AGENTAPI_PORT": str(port)}


def test_two_modules_in_one_home_get_two_state_directories() -> None:
    """The registry's defaults for two modules: distinct directories, both readable names,
    and the fast client path resolves exactly what the full settings do."""
    a = Settings.load({}, env=module_env(".claude-module", 3284))
    b = Settings.load({}, env=module_env(".codex-module", 3285))
    assert a.state_dir != b.state_dir
    assert (
        a.state_dir.parent
        == b.state_dir.parent
        == Path("/home/coder/.local/state/agentapi-persist")
    )
    assert a.state_dir.name.startswith("claude-module-")
    assert b.state_dir.name.startswith("codex-module-")
    for env, settings in (
        (module_env(".claude-module", 3284), a),
        (module_env(".codex-module", 3285), b),
    ):
        state_dir, _, quick = quick_settings({}, env)
        assert state_dir == str(settings.state_dir)
        assert quick == settings.instance
    # Names that differ only in what the label drops still get their own directory.
    assert instance_dir_name("/h/.agentapi-module") != instance_dir_name("/h/agentapi-module")
    assert instance_dir_name("/h/a b/../c") == instance_dir_name("/h/c")


@pytest.mark.parametrize(
    ("other", "differs"),
    [
        (instance(), []),
        (instance(module_dir="/home/coder/.codex-module"), ["module directory"]),
        (instance(port=3285), ["AgentAPI port"]),
        # The registry's stop script is not told the state file: a defaulted one proves nothing.
        (instance(state_file="/elsewhere.json", state_file_explicit=True), []),
        (instance(task_id=TASK_A), []),
    ],
)
def test_what_makes_another_instance(other: Instance, differs: list[str]) -> None:
    found = instance().differences(other)
    assert [d.split(" /")[0].split(" 3")[0] for d in found] == differs, found


def test_a_stored_copy_follows_its_module_to_another_port(tmp_path: Path) -> None:
    """A template that moves AgentAPI to a new port keeps the module's conversation; two live
    processes on two ports are two servers."""
    moved = instance(port=3290)
    assert not instance().differences(moved, by_port=False)
    assert instance().differences(moved)
    claim(tmp_path, instance(), write=True)
    claim(tmp_path, moved, write=True)
    assert read_owner(tmp_path) == moved


def test_explicit_state_files_and_task_ids_must_agree_when_both_are_known() -> None:
    a = instance(state_file="/a.json", state_file_explicit=True, task_id=TASK_A)
    assert a.differences(instance(state_file="/b.json", state_file_explicit=True))
    assert a.differences(instance(task_id=TASK_B))
    assert not a.differences(instance(task_id=TASK_A))
    assert a.merged(instance()) == a
    assert instance().merged(a) == instance(
        state_file="/a.json", state_file_explicit=True, task_id=TASK_A
    )


def test_claim_records_the_owner_and_refuses_another(tmp_path: Path) -> None:
    """The first writer records its instance; another instance is refused, naming both,
    before anything is read or written; a reader records nothing."""
    directory = tmp_path / "state"
    directory.mkdir()
    assert claim(directory, instance(), write=False) is None
    assert not (directory / INSTANCE_NAME).exists()
    assert claim(directory, instance(), write=True) is None
    assert read_owner(directory) == instance()
    other = instance(module_dir="/home/coder/.codex-module", port=3285)
    for write in (False, True):
        with pytest.raises(ForeignStateDir) as refused:
            claim(directory, other, write=write)
        message = str(refused.value)
        assert "/home/coder/.claude-module" in message
        assert "/home/coder/.codex-module" in message
        assert "nothing was read or written" in message
    assert read_owner(directory) == instance()
    # The same instance, knowing more (its task), completes the record.
    claim(directory, instance(task_id=TASK_A), write=True)
    assert read_owner(directory) == instance(task_id=TASK_A)
    with pytest.raises(ForeignStateDir):
        claim(directory, instance(task_id=TASK_B), write=True)


def test_a_directory_with_a_copy_and_no_owner_is_adopted_and_said(tmp_path: Path) -> None:
    """A directory given with --state-dir to a release before instance records."""
    directory = tmp_path / "state"
    directory.mkdir()
    (directory / "conversation-000000000001.json").write_bytes(b"{}")
    note = claim(directory, instance(), write=True)
    assert note is not None
    assert "adopted" in note
    assert read_owner(directory) == instance()


def test_an_unreadable_record_is_kept_aside_and_replaced(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    directory.mkdir()
    (directory / INSTANCE_NAME).write_text("{not json")
    claim(directory, instance(), write=True)
    assert read_owner(directory) == instance()
    aside = [p for p in directory.iterdir() if p.name.startswith(INSTANCE_NAME + ".corrupt-")]
    assert len(aside) == 1
    assert aside[0].read_text() == "{not json"
    record = json.loads((directory / INSTANCE_NAME).read_text())
    assert record["format"] == "agentapi-persist-instance"

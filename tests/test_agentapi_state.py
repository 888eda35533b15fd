"""AgentAPI's v1 state file: byte-exact round trips and a clear error for each kind of bad file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agentapi_persist.agentapi_state import (
    conversation_from_state,
    read_agentapi_state,
    render_agentapi_state,
    write_agentapi_state,
)
from agentapi_persist.errors import StateFileCorrupt, StateFileError, StateFileVersionError
from agentapi_persist.models import AgentAPIState, Conversation, Message

REALISTIC = (
    b'{"version":1,"messages":[{"id":0,"message":"hi","role":"user",'
    b'"time":"2025-01-02T03:04:05.123456789Z"}],"initial_prompt":"p","initial_prompt_sent":true}\n'
)
RICH = (
    '{"version":1,"messages":['
    '{"id":0,"message":"Fix the build \\u003e now","role":"user","time":"2025-01-02T03:04:05Z"},'
    '{"id":1,"message":"╭─ Done ─╮\\n│ ✓ tests │\\n\\"quoted\\" & <tags>","role":"agent",'
    '"time":"2025-01-02T03:04:06.1+02:00"}],'
    '"initial_prompt":"Fix the build","initial_prompt_sent":false,'
    '"future_field":{"a":[1,2.5,null]}}\n'
).encode()
MAX = 1 << 20


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "agentapi-state.json"
    path.write_bytes(data)
    return path


def reread(tmp_path: Path, data: bytes) -> bytes:
    state = read_agentapi_state(write(tmp_path, data), max_bytes=MAX)
    return render_agentapi_state(conversation_from_state(state), extra=state)


class TestRoundTrip:
    def test_realistic_file_is_byte_exact(self, tmp_path):
        """AgentAPI's compact file reads and re-renders identically (9-digit time kept)."""
        assert reread(tmp_path, REALISTIC) == REALISTIC

    def test_unicode_and_unknown_fields_survive(self, tmp_path):
        """Box drawing, quotes and an unknown top-level field come back; ``\\u003e`` (Go's HTML
        escape) comes back as the character it means."""
        out = reread(tmp_path, RICH)
        assert out == RICH.replace(b"\\u003e", b">")
        again = read_agentapi_state(write(tmp_path, out), max_bytes=MAX)
        assert again.model_extra == {"future_field": {"a": [1, 2.5, None]}}
        assert again.messages[1].message == '╭─ Done ─╮\n│ ✓ tests │\n"quoted" & <tags>'

    def test_conversation_from_state_marks_origin(self, tmp_path):
        """The prompt fields come from the file and say so."""
        state = read_agentapi_state(write(tmp_path, REALISTIC), max_bytes=MAX)
        conversation = conversation_from_state(state)
        assert conversation.prompt_origin == "agentapi_state"
        assert conversation.initial_prompt == "p"
        assert conversation.initial_prompt_sent is True
        assert conversation.messages == (
            Message(id=0, role="user", content="hi", time="2025-01-02T03:04:05.123456789Z"),
        )

    def test_unknown_prompt_renders_empty_and_unsent(self):
        """A conversation that never saw the prompt fields renders "" and false."""
        conversation = Conversation(
            messages=(Message(id=0, role="agent", content="ready", time="2025-01-02T03:04:05Z"),)
        )
        assert render_agentapi_state(conversation) == (
            b'{"version":1,"messages":[{"id":0,"message":"ready","role":"agent",'
            b'"time":"2025-01-02T03:04:05Z"}],"initial_prompt":"","initial_prompt_sent":false}\n'
        )

    def test_empty_conversation(self):
        """No messages is still a valid file."""
        rendered = render_agentapi_state(Conversation())
        assert rendered == (
            b'{"version":1,"messages":[],"initial_prompt":"","initial_prompt_sent":false}\n'
        )

    def test_write_is_atomic_and_private(self, tmp_path):
        """The file is replaced whole, 0600, and the byte count is returned."""
        path = write(tmp_path, b"old")
        path.chmod(0o644)
        state = AgentAPIState.model_validate_json(REALISTIC)
        written = write_agentapi_state(path, conversation_from_state(state), extra=state)
        assert written == len(REALISTIC)
        assert path.read_bytes() == REALISTIC
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert [name for name in os.listdir(tmp_path) if name.endswith(".tmp")] == []


class TestGoTolerance:
    """What AgentAPI's Go decoder accepts (with U+FFFD), we accept the same way."""

    def test_invalid_utf8_inside_a_string_becomes_replacement(self, tmp_path):
        """A stray 0xFF inside a message is read as U+FFFD, and re-rendered as valid UTF-8."""
        data = REALISTIC.replace(b'"hi"', b'"h\xffi"')
        state = read_agentapi_state(write(tmp_path, data), max_bytes=MAX)
        assert state.messages[0].message == "h\ufffdi"
        assert reread(tmp_path, data) == REALISTIC.replace(b'"hi"', '"h\ufffdi"'.encode())

    def test_lone_surrogate_escape_becomes_replacement(self, tmp_path):
        """``\\ud800`` with no partner is read as U+FFFD, never kept as an unencodable char."""
        data = REALISTIC.replace(b'"hi"', b'"h\\ud800i"')
        state = read_agentapi_state(write(tmp_path, data), max_bytes=MAX)
        assert state.messages[0].message == "h\ufffdi"
        reread(tmp_path, data).decode("utf-8")  # strict: raises if anything unencodable is left


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (b"", StateFileCorrupt, r"is empty \(0 bytes\)"),
        (b" \n", StateFileCorrupt, r"is empty \(2 bytes\)"),
        (REALISTIC[:60], StateFileCorrupt, r"line 1 column \d+.*ends mid-document"),
        (b"garbage", StateFileCorrupt, r"not valid JSON: Expecting value: line 1 column 1"),
        (b"\xff\xfe\x00{}", StateFileCorrupt, "not valid JSON"),
        (b"[1, 2]", StateFileCorrupt, "Input should be an object"),
        (REALISTIC.replace(b'"version":1', b'"version":2'), StateFileVersionError, "version 2"),
        (b'{"version":"2.0","messages":{}}', StateFileVersionError, "version '2.0'"),
        (
            REALISTIC.replace(b'"id":0', b'"id":1'),
            StateFileCorrupt,
            r"ids must be 0\.\.n-1; found id 1 at 0",
        ),
        (REALISTIC.replace(b'"user"', b'"system"'), StateFileCorrupt, r"messages\.0\.role"),
        (REALISTIC.replace(b'"version":1,', b""), StateFileCorrupt, "version: Field required"),
        (
            REALISTIC.replace(b"03:04:05.123456789Z", b"03:04:05"),
            StateFileCorrupt,
            r"messages\.0\.time",
        ),
        (b'{"version":1,"messages":"none"}', StateFileCorrupt, "messages"),
        (b"[" * 100_000, StateFileCorrupt, "corrupt"),
    ],
    ids=[
        "empty",
        "whitespace",
        "truncated",
        "garbage",
        "non-utf8-binary",
        "not-an-object",
        "wrong-version",
        "string-version",
        "ids-with-gap",
        "unknown-role",
        "missing-version",
        "time-without-offset",
        "messages-wrong-type",
        "deeply-nested",
    ],
)
def test_bad_files(tmp_path, data, error, message):
    """Each kind of bad file raises its documented error, naming the file and the fault."""
    path = write(tmp_path, data)
    with pytest.raises(error, match=message) as caught:
        read_agentapi_state(path, max_bytes=MAX)
    assert str(path) in str(caught.value)
    assert caught.value.path == str(path)


def test_missing_file(tmp_path):
    """A missing file is FileNotFoundError: the caller treats "none yet" differently."""
    with pytest.raises(FileNotFoundError):
        read_agentapi_state(tmp_path / "absent.json", max_bytes=MAX)


def test_too_big(tmp_path):
    """A file over the cap is refused before it is read."""
    path = write(tmp_path, REALISTIC)
    with pytest.raises(StateFileError, match="over the 100-byte cap") as caught:
        read_agentapi_state(path, max_bytes=100)
    assert not isinstance(caught.value, StateFileCorrupt)


def test_symlink_refused(tmp_path):
    """A symlink at the state file path is not followed."""
    real = tmp_path / "real.json"
    real.write_bytes(REALISTIC)
    link = tmp_path / "link.json"
    link.symlink_to(real)
    with pytest.raises(StateFileError, match="symlink"):
        read_agentapi_state(link, max_bytes=MAX)


def test_extra_with_lone_surrogate_still_renders_valid_json(tmp_path):
    """An unknown field holding a lone surrogate cannot break the file: it is escaped."""
    data = REALISTIC[:-2] + b',"note":"x\\udc80y"}\n'
    state = read_agentapi_state(write(tmp_path, data), max_bytes=MAX)
    rendered = render_agentapi_state(conversation_from_state(state), extra=state)
    rendered.decode("ascii")
    again = read_agentapi_state(write(tmp_path, rendered), max_bytes=MAX)
    assert again.messages == state.messages

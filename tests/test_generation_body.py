"""A generation's body is parsed as its file is read (``generation_body.BodyReader``): what
loads never depends on where the reads fall, a body that fails is named and never misread, and
a big copy is never held whole as bytes next to its messages."""

from __future__ import annotations

import gc
import hashlib
import json
import tracemalloc
from pathlib import Path

import pytest

from agentapi_persist.generation_body import BodyReader, conversation_body
from agentapi_persist.models import Conversation, Message
from agentapi_persist.store import StateStore

TIME = "2025-01-02T03:04:05.123456789Z"
TRICKY = '},{"id":7,"role":"user"}],"initial_prompt":"x" ─ '


def conversation(count: int, size: int = 100) -> Conversation:
    return Conversation(
        messages=tuple(
            Message(
                id=i, role=("user", "agent")[i % 2], content=f"{i} {TRICKY}" + "y" * size, time=TIME
            )
            for i in range(count)
        ),
        initial_prompt=TRICKY,
        initial_prompt_sent=True,
    )


def read_in(body: bytes, step: int) -> Conversation:
    reader = BodyReader()
    for at in range(0, len(body), step):
        reader.feed(body[at : at + step])
    return reader.finish()


@pytest.mark.parametrize("step", [1, 7, len('},{"id":'), 4096, 1 << 20])
def test_where_the_reads_fall_changes_nothing(step: int) -> None:
    """Every split, down to one byte at a time (inside the boundary sequence itself), reads
    the same conversation as one parse of the whole body."""
    expected = conversation(40)
    assert read_in(conversation_body(expected), step) == expected


@pytest.mark.parametrize("count", [0, 1])
def test_small_and_empty_conversations(count: int) -> None:
    expected = conversation(count)
    assert read_in(conversation_body(expected), 3) == expected


@pytest.mark.parametrize("step", [5, 1 << 20])
def test_a_body_laid_out_otherwise_is_read_whole(step: int) -> None:
    """Valid JSON we did not write (spaced, keys reordered) still loads, by the general parser."""
    expected = conversation(30, size=50_000)  # over 1 MiB: the batched general parser
    document = json.loads(conversation_body(expected))
    body = json.dumps({"initial_prompt": document["initial_prompt"], **document}, indent=1).encode()
    assert read_in(body, step) == expected


def test_a_message_that_does_not_validate_is_named_by_its_index() -> None:
    body = conversation_body(conversation(3000)).replace(
        b'"id":2500,"role":"user"', b'"id":2500,"role":"robot"'
    )
    with pytest.raises(ValueError, match=r"messages\.2500\.role"):
        read_in(body, 4096)


def test_a_list_that_does_not_end_as_written_is_refused() -> None:
    body = conversation_body(conversation(5))
    with pytest.raises(ValueError, match="does not end where it should"):
        read_in(body.replace(b'}],"initial_prompt":', b'}] ,"initial_prompt":'), 4096)


def _store_with_body(directory: Path, body: bytes) -> None:
    """A generation whose header vouches for ``body`` (length and checksum agree)."""
    header = {
        "format": "agentapi-persist",
        "format_version": 1,
        "seq": 1,
        "saved_at": "2025-01-02T03:04:05.000000Z",
        "length": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
    }
    directory.mkdir(mode=0o700, exist_ok=True)
    path = directory / "conversation-000000000001.json"
    path.write_bytes(json.dumps(header, separators=(",", ":")).encode() + b"\n" + body)


def test_a_vouched_body_that_does_not_validate_is_quarantined_with_its_reason(
    tmp_path: Path,
) -> None:
    body = conversation_body(conversation(3000)).replace(
        b'"id":2500,"role":"user"', b'"id":2500,"role":"robot"'
    )
    _store_with_body(tmp_path, body)
    report = StateStore(tmp_path).load()
    assert report.conversation is None
    assert any("does not validate: messages.2500.role" in p for p in report.problems), (
        report.problems
    )


def test_a_body_that_fails_to_parse_and_its_checksum_is_reported_as_the_checksum(
    tmp_path: Path,
) -> None:
    """The parse fails long before the end of the file; the checksum, read to the end, is
    what says the bytes are not what was written."""
    body = conversation_body(conversation(3000))
    _store_with_body(tmp_path, body)
    path = tmp_path / "conversation-000000000001.json"
    data = bytearray(path.read_bytes())
    data[data.index(b'"id":10,') + 1] = ord("#")  # breaks the JSON of message 10
    path.write_bytes(bytes(data))
    report = StateStore(tmp_path).load()
    assert report.conversation is None
    assert any("checksum mismatch" in p for p in report.problems), report.problems


def test_a_big_copy_is_never_held_whole_as_bytes_beside_its_messages(tmp_path: Path) -> None:
    """Loading 8 MB allocates at its peak little more than the messages it keeps: the file's
    bytes are parsed as they are read (reading it whole first held all 8 MB on top)."""
    saved = conversation(8000, size=1000)
    StateStore(tmp_path).save(saved)
    size = (tmp_path / "conversation-000000000001.json").stat().st_size
    assert size > 8_000_000
    del saved
    gc.collect()
    tracemalloc.start()
    try:
        report = StateStore(tmp_path).load()
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.conversation is not None
    assert len(report.conversation.messages) == 8000
    # A 256 KiB read, the bytes not parsed yet, one batch's copy for the parser (the whole
    # file read first put 9 MB here).
    assert peak - kept < 2 * (1 << 20), f"peak {peak:,} B, kept {kept:,} B, file {size:,} B"

"""StateStore: the sidecar's own durable copy of the conversation, in one private directory.

Why two kinds of file: rewriting a 50 MB conversation for every new message would cost the whole
conversation per checkpoint (SPEC section 5), so changes go to an append-only journal and only
``save``/``compact`` write a whole *generation*.

On-disk layout (directory 0700, files 0600, re-asserted on every write)::

    conversation-000000000007.json   generation 7
    journal-000000000007.log         changes on top of generation 7
    conversation-000000000006.json   the previous generation, kept as a fallback
    journal-000000000006.log
    *.corrupt-<UTC time>-<random>    unusable bytes moved aside (never deleted)

A generation file is one compact JSON header line, ``\\n``, then exactly ``length`` body bytes::

    {"format":"agentapi-persist","format_version":1,"seq":7,"saved_at":"2025-01-02T03:04:05.123456Z","length":1234,"sha256":"<hex>","instance":{...}}
    {"messages":[...],"initial_prompt":...,"initial_prompt_sent":...,"prompt_origin":...}

``instance`` names the AgentAPI instance the conversation belongs to (``identity``; the
directory's ``instance.json`` says the same for the directory as a whole).

The body is ``Conversation`` as compact JSON. A short body, extra bytes, a bad header or a
checksum mismatch marks the file torn or corrupt; an unknown ``format_version`` is refused.
Generations are written with ``write_atomic`` (temp file, fsync, rename, directory fsync).

A journal is one record per line, ``<crc32 as 8 hex digits> <compact JSON>\\n``. The first
record binds the journal to its generation (``{"op":"base","seq":7,"sha256":"<body hex>"}``) so
a journal can never be replayed on top of the wrong generation. Each later record is one
``append()`` call, applied all or nothing::

    {"op":"update","at":"<RFC 3339 UTC>",
     "put":[{"id":12,"role":"agent","content":"...","time":"..."}],
     "prompt":{"initial_prompt":"...","initial_prompt_sent":true,"prompt_origin":"agentapi_state"}}

(shown wrapped here; on disk a record is always one line).

``put`` upserts by id: an id equal to the current length appends, a smaller one replaces (the
last agent message keeps changing while AgentAPI runs). ``prompt`` is present only when it
changed. A message that only grew at its end (a running agent printing) is recorded as the
part it gained, so a checkpoint costs the change, not the message::

    {"op":"delta","at":"...","put":[...],
     "grow":[{"id":12,"from":1048576,"add":"<the appended text>","time":"..."}]}

``from`` is the length (in code points) the message must have for ``add`` to apply to it;
replay refuses a record whose message is another length, like any record that cannot apply.
The op differs from ``update`` so that a release that does not know ``grow`` stops at such a
record and reports it, instead of replaying the record without its growth.

Replay stops at the first record whose crc, JSON or content is bad, and at a last line
with no newline (a torn write): everything after is ignored and reported, never trusted. The
next ``append`` cuts the file back to the last good record (bytes after a bad *complete* record
are first copied aside, since they are more than a torn tail).

Rules (SPEC section 4): loading takes the newest generation that verifies and never an older one
while a newer one is valid; an unusable generation (and its journal) is quarantined and the
previous one is used with its journal. ``save`` writes the new generation durably *before*
deleting anything, and keeps the previous one. A save with fewer messages than the stored copy
is refused unless asked for. One writer per directory; readers may load at any time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import threading
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from ._fsutil import (
    append_durable,
    fsync_dir,
    quarantine,
    read_capped_chunks,
    read_capped_file,
    write_atomic,
)
from ._options import DEFAULT_MAX_BODY_BYTES
from .errors import (
    DurabilityError,
    StateDirNotADirectory,
    StateFileCorrupt,
    StateFileError,
    StateFileVersionError,
)
from .generation_body import BodyReader, conversation_body
from .models import (
    MESSAGES_ADAPTER,
    Conversation,
    Message,
    MessageId,
    PromptOrigin,
    Relation,
    Text,
    Time,
    compare,
    dump_compact,
    holds_user_message,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ArchivedCopy",
    "LoadReport",
    "SaveReport",
    "StateStore",
    "bytes_on_disk",
    "generation_file_name",
    "holds_a_copy",
    "journal_file_name",
    "list_archives",
    "read_archive",
    "stored_sequences",
]

log = structlog.get_logger(__name__)

FORMAT = "agentapi-persist"
FORMAT_VERSION = 1

_GENERATION = re.compile(r"conversation-(\d{12})\.json")
_JOURNAL = re.compile(r"journal-(\d{12})\.log")
# Temp files write_atomic leaves behind when the process is killed mid-write.
_STALE_TEMP = re.compile(r"\.conversation-\d{12}\.json\.[0-9a-f]+\.tmp")
_STALE_TEMP_AGE_S = 300.0
_HEADER_MAX = 4096


_ARCHIVED = re.compile(r"conversation-\d{8}T\d{6}(?:\.\d+)?Z-(\d{12})\.json")


@dataclass(frozen=True, slots=True)
class ArchivedCopy:
    """A conversation kept aside in ``archive/`` (``StateStore.archive``), from its header."""

    name: str
    saved_at: str | None
    reason: str | None
    bytes: int


def list_archives(directory: Path) -> list[ArchivedCopy]:
    """The archived conversations in ``directory``, oldest first; reads only their header
    lines. A file whose header does not read is listed without its facts."""
    try:
        names = sorted(p.name for p in (directory / "archive").iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise StateFileError(
            f"cannot list {directory / 'archive'}: {exc.strerror or exc}",
            path=str(directory / "archive"),
        ) from exc
    copies = []
    for name in names:
        if not _ARCHIVED.fullmatch(name):
            continue
        path = directory / "archive" / name
        header: Any = None
        size = 0
        with contextlib.suppress(OSError, ValueError), open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            header = json.loads(file.readline(_HEADER_MAX))
        fields = header if isinstance(header, dict) else {}
        saved_at, reason = fields.get("saved_at"), fields.get("archived_because")
        copies.append(
            ArchivedCopy(
                name=name,
                saved_at=saved_at if isinstance(saved_at, str) else None,
                reason=reason if isinstance(reason, str) else None,
                bytes=size,
            )
        )
    return copies


def read_archive(directory: Path, name: str, *, max_bytes: int) -> Conversation:
    """The archived conversation ``name`` (as ``list_archives`` names it), verified like a
    generation. Raises ``StateFileError``; never moves or changes anything."""
    match = _ARCHIVED.fullmatch(name)
    if match is None:
        raise StateFileError(f"{name!r} is not the name of an archived conversation")
    path = directory / "archive" / name
    try:
        return _read_generation(path, seq=int(match.group(1)), limit=max_bytes).conversation
    except FileNotFoundError:
        raise StateFileError(f"{path} does not exist (any more)", path=str(path)) from None


def _not_a_directory(directory: Path) -> str:
    """Which file stands where the state directory should be, and what that means."""
    blocker = directory
    while not blocker.exists() and blocker != blocker.parent:
        blocker = blocker.parent
    where = "is a file" if blocker == directory else f"lies under {blocker}, which is a file"
    return (
        f"the state directory {directory} {where}, not a directory: nothing was read or "
        "written there (the file is left as it is). Give --state-dir (or "
        "AGENTAPI_PERSIST_STATE_DIR) a directory on the persistent volume"
    )


def bytes_on_disk(directory: Path) -> int:
    """The size of the newest generation plus its journal in ``directory`` (0 if none):
    what a load reads. Never raises."""
    try:
        names = [p.name for p in directory.iterdir()]
    except OSError:
        return 0
    seqs = [int(m[1]) for name in names if (m := _GENERATION.fullmatch(name))]
    if not seqs:
        return 0
    total = 0
    for name in (_generation_name(max(seqs)), _journal_name(max(seqs))):
        with contextlib.suppress(OSError):
            total += (directory / name).stat().st_size
    return total


def holds_a_copy(directory: Path) -> bool:
    """True when ``directory`` holds at least one generation file (usable or not). Never
    raises: a directory that cannot be listed holds nothing this process can use."""
    try:
        return any(_GENERATION.fullmatch(name) for name in os.listdir(directory))
    except OSError:
        return False


def _generation_name(seq: int) -> str:
    return f"conversation-{seq:012d}.json"


def _journal_name(seq: int) -> str:
    return f"journal-{seq:012d}.log"


#: The file names of generation ``seq`` and of its journal (the replica copies them as they are).
generation_file_name = _generation_name
journal_file_name = _journal_name


def stored_sequences(directory: Path) -> tuple[set[int], set[int]]:
    """The generation and journal numbers present in ``directory`` (nothing if it is
    missing); ``StateStore`` lists its directory with it, the replica's uploader too."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return set(), set()
    except NotADirectoryError:
        raise StateDirNotADirectory(_not_a_directory(directory), path=str(directory)) from None
    except OSError as exc:
        raise StateFileError(
            f"cannot list {directory}: {exc.strerror or exc}", path=str(directory)
        ) from exc
    generations: set[int] = set()
    journals: set[int] = set()
    for name in names:
        if match := _GENERATION.fullmatch(name):
            generations.add(int(match[1]))
        elif match := _JOURNAL.fullmatch(name):
            journals.add(int(match[1]))
    return generations, journals


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _ms_since(start: float) -> int:
    return round((time.perf_counter() - start) * 1000)


def _parse_time(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What ``load()`` found: the conversation, where it came from, and what was wrong."""

    conversation: Conversation | None
    """``None`` when nothing is stored yet (or nothing stored was usable: see ``problems``)."""
    seq: int | None
    """The generation loaded."""
    journal_records: int
    """Journal records replayed on top of that generation."""
    saved_at: datetime | None
    """When the newest durable change was made."""
    problems: tuple[str, ...]
    """Sentences for a person: a corrupt generation moved aside, a torn journal tail dropped."""
    quarantined: tuple[Path, ...]
    """Where unusable bytes were moved (they are never deleted)."""


@dataclass(frozen=True, slots=True)
class SaveReport:
    """What one ``save``/``append``/``compact`` wrote."""

    seq: int
    bytes_written: int
    duration_ms: int
    path: Path
    kind: Literal["generation", "journal"]


class _Grow(BaseModel):
    """One ``grow`` entry of a ``delta`` record: text appended to a stored message."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    id: MessageId
    length: int = Field(alias="from", ge=0, strict=True)
    add: Text
    time: Time


_GROWS: TypeAdapter[tuple[_Grow, ...]] = TypeAdapter(tuple[_Grow, ...])


class _Prompt(BaseModel):
    """The prompt fields a journal record carries; same types as on ``Conversation``."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    initial_prompt: str | None
    initial_prompt_sent: bool | None
    prompt_origin: PromptOrigin


class _Generation:
    """A generation file that verified: its header facts and its conversation."""

    __slots__ = ("conversation", "saved_at", "seq", "sha256", "size")

    def __init__(
        self, *, seq: int, sha256: str, saved_at: str, size: int, conversation: Conversation
    ) -> None:
        self.seq = seq
        self.sha256 = sha256
        self.saved_at = saved_at
        self.size = size
        self.conversation = conversation


_READ_CHUNK = 256 << 10  # small: the reader keeps about three of them at once


def _read_generation(path: Path, *, seq: int, limit: int) -> _Generation:
    """Read, verify and parse the generation at ``path``. Raises StateFileError
    (``FileNotFoundError`` passes through).

    The body is parsed as it is read (``BodyReader``) and hashed on the way, so a 50 MB copy
    is never held as bytes and messages at once; what it says counts only once the length and
    checksum agree, and a body that both fails to parse and fails its checksum is reported as
    the checksum failure (the bytes are not what was written, which says more)."""
    with contextlib.closing(read_capped_chunks(path, limit, _READ_CHUNK)) as chunks:
        first = b""
        for chunk in chunks:
            first += chunk
            if len(first) >= _HEADER_MAX:
                break
        end = first.find(b"\n", 0, _HEADER_MAX)
        if end < 0:
            raise _corrupt(
                path, f"no header line in the first {_HEADER_MAX} bytes ({len(first)} bytes)"
            )
        length, digest, saved_at = _decode_header(first[:end], seq=seq, path=path)
        hasher = hashlib.sha256()
        reader: BodyReader | None = BodyReader()
        failure: str | None = None
        received = 0
        for piece in _body_pieces(first, end + 1, chunks):
            hasher.update(piece)
            received += len(piece)
            if reader is not None and received <= length:
                try:
                    reader.feed(piece)
                except ValueError as exc:
                    failure, reader = str(exc), None  # keep hashing: a mismatch says more
        if received != length:
            raise _corrupt(
                path, f"torn: the header promises {length} body bytes, the file has {received}"
            )
        if hasher.hexdigest() != digest:
            raise _corrupt(path, "checksum mismatch: the body is not what was written")
        try:
            if reader is None:
                raise ValueError(failure)
            conversation = reader.finish()
        except ValidationError as exc:
            error = exc.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(part) for part in error["loc"]) or "body"
            raise _corrupt(path, f"the body does not validate: {where}: {error['msg']}") from None
        except ValueError as exc:
            raise _corrupt(path, f"the body does not validate: {exc}") from None
    return _Generation(
        seq=seq,
        sha256=digest,
        saved_at=saved_at,
        size=end + 1 + received,
        conversation=conversation,
    )


def _body_pieces(first: bytes, start: int, rest: Iterator[bytes]) -> Iterator[bytes | memoryview]:
    """The body's bytes: the first read's from ``start`` (not copied, and let go once used),
    then every later read."""
    yield memoryview(first)[start:]
    del first
    yield from rest


def _corrupt(path: Path, reason: str) -> StateFileCorrupt:
    return StateFileCorrupt(f"{path.name}: {reason}", path=str(path))


def _decode_header(line: bytes, *, seq: int, path: Path) -> tuple[int, str, str]:
    """The header line's body length, checksum and save time. Raises StateFileError."""
    try:
        header = json.loads(line)
    except (ValueError, RecursionError):
        raise _corrupt(path, "the header line is not JSON") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise _corrupt(path, f"the header does not say format {FORMAT!r}")
    version = header.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise StateFileVersionError(
            f"{path.name}: format_version {version!r} is not one this release reads "
            f"({FORMAT_VERSION})",
            path=str(path),
        )
    length, digest, saved_at = header.get("length"), header.get("sha256"), header.get("saved_at")
    if header.get("seq") != seq:
        raise _corrupt(path, f"the header says seq {header.get('seq')!r}, the name says {seq}")
    if type(length) is not int or not isinstance(digest, str) or not isinstance(saved_at, str):
        raise _corrupt(path, "the header lacks length, sha256 or saved_at")
    return length, digest, saved_at


def _encode_record(record: dict[str, Any]) -> bytes:
    payload = dump_compact(record)
    return b"%08x " % zlib.crc32(payload) + payload + b"\n"


def _decode_record(line: bytes) -> dict[str, Any]:
    """One journal line without its newline -> the record. ValueError says what is wrong."""
    if len(line) < 10 or line[8:9] != b" ":
        raise ValueError("not a '<crc> <json>' record")
    try:
        crc = int(line[:8], 16)
    except ValueError:
        raise ValueError("the crc is not hexadecimal") from None
    payload = line[9:]
    if zlib.crc32(payload) != crc:
        raise ValueError("crc mismatch")
    try:
        record = json.loads(payload)
    except (ValueError, RecursionError):
        raise ValueError("the record is not JSON") from None
    if not isinstance(record, dict):
        raise ValueError("the record is not a JSON object")
    return record


@dataclass(slots=True)
class _Replay:
    """The outcome of replaying one journal."""

    records: int = 0
    good_end: int = 0
    last_at: str | None = None
    problem: str | None = None
    bad_complete_records: bool = False
    foreign: bool = False


class StateStore:
    """The conversation's durable copy in ``directory``: generations plus a journal.

    Sync methods take a lock, so the async wrappers (one ``asyncio.to_thread`` hop each) are
    safe to call concurrently. A thread cannot be cancelled: a cancelled ``asave`` still finishes
    its write, and the file is then the complete new generation.
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BODY_BYTES,
        read_only: bool = False,
        instance: Mapping[str, Any] | None = None,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.read_only = read_only
        """A read-only store never moves, cuts or writes anything (``status`` looks with one)."""
        self.instance = dict(instance) if instance is not None else None
        """The AgentAPI instance the conversation belongs to (``identity.Instance.as_dict``):
        every generation written records it in its header, beside ``instance.json``."""
        self._lock = threading.RLock()
        self._loaded = False
        self._seq: int | None = None
        self._sha256: str | None = None
        self._messages: list[Message] = []
        self._prompt = _Prompt(
            initial_prompt=None, initial_prompt_sent=None, prompt_origin="unknown"
        )
        self._cached: Conversation | None = None
        self._generation_bytes = 0
        self._journal_end = 0
        self._journal_size: int | None = 0
        self._preserve_tail = False
        self._needs_generation = False

    # -- reading -------------------------------------------------------------------------------

    @property
    def conversation(self) -> Conversation | None:
        """The in-memory copy as last loaded, saved or appended (``None``: nothing stored)."""
        cached = self._cached
        if cached is not None:
            # An immutable snapshot of the last completed change, read without the lock: a
            # look at the copy (the shutdown summary, say) never waits behind a write that is
            # stuck in fsync on a hung disk.
            return cached
        with self._lock:
            if self._seq is None:
                return None
            if self._cached is None:
                # Every message was validated on the way in; rebuilding costs pointers only.
                self._cached = Conversation.model_construct(
                    messages=tuple(self._messages),
                    initial_prompt=self._prompt.initial_prompt,
                    initial_prompt_sent=self._prompt.initial_prompt_sent,
                    prompt_origin=self._prompt.prompt_origin,
                )
            return self._cached

    @property
    def loaded(self) -> bool:
        """True once the directory was read (or written): ``conversation`` is then what it
        holds, ``None`` meaning nothing stored rather than unreadable."""
        return self._loaded

    @property
    def journal_bytes(self) -> int:
        """Bytes of good records in the current journal: a hint for when to ``compact``."""
        return self._journal_end

    @property
    def generation_bytes(self) -> int:
        """Size of the current generation file; with ``journal_bytes``, when to ``compact``."""
        return self._generation_bytes

    @property
    def seq(self) -> int | None:
        """The generation the in-memory copy is based on."""
        return self._seq

    def load(self) -> LoadReport:
        """Read the newest generation that verifies, then replay its journal.

        Unusable generations newer than that one are quarantined (moved aside with their
        journals, bytes kept) and reported. A directory that does not exist means nothing is
        stored yet. Raises ``StateFileError`` only if the directory itself cannot be listed.
        """
        with self._lock:
            return self._load()

    def _load(self) -> LoadReport:
        start = time.perf_counter()
        problems: list[str] = []
        moved: list[Path] = []
        generations, _ = self._scan()
        chosen: _Generation | None = None
        for seq in sorted(generations, reverse=True):
            path = self.directory / _generation_name(seq)
            try:
                chosen = _read_generation(path, seq=seq, limit=self.max_bytes)
                break
            except FileNotFoundError:
                continue  # pruned by a writer since the listing: not a problem
            except StateFileError as exc:
                self._quarantine_generation(seq, str(exc), problems, moved)

        self._reset()
        replay = _Replay()
        if chosen is not None:
            self._seq, self._sha256 = chosen.seq, chosen.sha256
            self._generation_bytes = chosen.size
            self._messages = list(chosen.conversation.messages)
            self._prompt = _Prompt(
                initial_prompt=chosen.conversation.initial_prompt,
                initial_prompt_sent=chosen.conversation.initial_prompt_sent,
                prompt_origin=chosen.conversation.prompt_origin,
            )
            replay = self._replay_journal(chosen, problems, moved)
        self._loaded = True
        report = LoadReport(
            conversation=self.conversation,
            seq=self._seq,
            journal_records=replay.records,
            saved_at=_parse_time(replay.last_at or (chosen.saved_at if chosen else None)),
            problems=tuple(problems),
            quarantined=tuple(moved),
        )
        # Routine loads (status, polling) stay quiet; a load that found problems is news.
        emit = log.warning if problems else log.debug
        emit(
            "store.loaded",
            seq=self._seq,
            messages=len(self._messages),
            journal_records=replay.records,
            problems=len(problems),
            ms=_ms_since(start),
        )
        return report

    def _scan(self) -> tuple[set[int], set[int]]:
        """Generation and journal sequence numbers present in the directory."""
        return stored_sequences(self.directory)

    def _reset(self) -> None:
        self._seq = self._sha256 = None
        self._messages = []
        self._prompt = _Prompt(
            initial_prompt=None, initial_prompt_sent=None, prompt_origin="unknown"
        )
        self._cached = None
        self._generation_bytes = 0
        self._journal_end = 0
        self._journal_size = 0
        self._preserve_tail = False
        self._needs_generation = False

    def _check_writable(self) -> None:
        if self.read_only:
            raise RuntimeError(f"this StateStore for {self.directory} is read-only")

    def _move_aside(self, path: Path, reason: str, problems: list[str], moved: list[Path]) -> None:
        if self.read_only:
            problems.append(f"{reason} (left in place: read-only look)")
            return
        try:
            dest = quarantine(path, reason=reason)
        except FileNotFoundError:
            return
        except DurabilityError as exc:
            problems.append(f"{path.name} could not be moved aside: {exc}")
            return
        moved.append(dest)
        problems.append(f"{reason}; moved aside to {dest.name}")
        log.warning("store.quarantined", path=str(path), moved_to=str(dest), reason=reason)

    def _quarantine_generation(
        self, seq: int, reason: str, problems: list[str], moved: list[Path]
    ) -> None:
        self._move_aside(
            self.directory / _generation_name(seq),
            f"generation {seq} is unusable ({reason})",
            problems,
            moved,
        )
        journal = self.directory / _journal_name(seq)
        if journal.exists():
            self._move_aside(
                journal, f"journal {seq} belongs to unusable generation {seq}", problems, moved
            )

    def _replay_journal(
        self, generation: _Generation, problems: list[str], moved: list[Path]
    ) -> _Replay:
        path = self.directory / _journal_name(generation.seq)
        try:
            data = read_capped_file(path, self.max_bytes)
        except FileNotFoundError:
            return _Replay()
        except StateFileError as exc:
            self._move_aside(path, f"journal {generation.seq} is unusable ({exc})", problems, moved)
            return _Replay()
        replay = self._apply_journal(data, generation)
        if replay.foreign:
            self._move_aside(
                path,
                f"journal {generation.seq} does not belong to generation {generation.seq}",
                problems,
                moved,
            )
            return _Replay()
        self._journal_end = replay.good_end
        self._journal_size = len(data)
        self._preserve_tail = replay.bad_complete_records
        if replay.problem is not None:
            dropped = len(data) - replay.good_end
            sentence = (
                f"journal {generation.seq}: {replay.problem} after {replay.records} good "
                f"records; the last {dropped} bytes were ignored"
            )
            problems.append(sentence)
            log.warning(
                "store.journal_torn",
                seq=generation.seq,
                records=replay.records,
                dropped_bytes=dropped,
                reason=replay.problem,
            )
        return replay

    def _apply_journal(self, data: bytes, generation: _Generation) -> _Replay:
        """Replay records in order onto the in-memory copy; stop at the first bad one."""
        replay = _Replay()
        pos = 0
        while pos < len(data):
            end = data.find(b"\n", pos)
            if end < 0:
                replay.problem = "a torn last line (no newline)"
                break
            try:
                record = _decode_record(data[pos:end])
                if pos == 0:
                    if record.get("op") != "base":
                        raise ValueError("the first record is not the base record")
                    if record.get("seq") != generation.seq or (
                        record.get("sha256") != generation.sha256
                    ):
                        replay.foreign = True
                        return replay
                else:
                    self._apply_update(record)
                    replay.records += 1
                    at = record.get("at")
                    replay.last_at = at if isinstance(at, str) else replay.last_at
            except ValueError as exc:
                replay.problem = f"a bad record ({exc})"
                replay.bad_complete_records = True
                break
            pos = end + 1
            replay.good_end = pos
        return replay

    def _apply_update(self, record: dict[str, Any]) -> None:
        """Apply one journal record, all or nothing. ValueError if it cannot apply."""
        op = record.get("op")
        if op not in ("update", "delta"):
            raise ValueError(f"unknown op {str(op)[:40]!r}")
        try:
            puts = MESSAGES_ADAPTER.validate_python(record.get("put", ()))
            grows = _GROWS.validate_python(record.get("grow", ())) if op == "delta" else ()
            prompt = _Prompt.model_validate(record["prompt"]) if "prompt" in record else None
        except ValidationError as exc:
            first = exc.errors(include_url=False, include_input=False)[0]
            raise ValueError(f"invalid content: {first['msg']}") from None
        length = len(self._messages)
        for message in puts:
            if message.id > length:
                raise ValueError(f"message id {message.id} leaves a gap after {length} messages")
            length = max(length, message.id + 1)
        grown = [self._grown(grow, puts) for grow in grows]
        self._upsert(puts)
        self._upsert(grown)
        if prompt is not None:
            self._prompt = prompt

    def _grown(self, grow: _Grow, puts: Sequence[Message]) -> Message:
        """The stored message ``grow`` extends, extended; ValueError if it cannot apply."""
        if grow.id >= len(self._messages) or any(put.id == grow.id for put in puts):
            raise ValueError(f"grows message {grow.id}, which is not a stored message")
        base = self._messages[grow.id]
        if len(base.content) != grow.length:
            raise ValueError(
                f"grows message {grow.id} from {grow.length} characters; it has {len(base.content)}"
            )
        return Message.model_construct(
            id=base.id, role=base.role, content=base.content + grow.add, time=grow.time
        )

    def _upsert(self, puts: Sequence[Message]) -> None:
        messages = self._messages
        for message in puts:
            if message.id < len(messages):
                messages[message.id] = message
            else:
                messages.append(message)
        self._cached = None

    # -- writing -------------------------------------------------------------------------------

    def save(
        self,
        conversation: Conversation,
        *,
        allow_shrink: bool = False,
        seq_at_least: int = 0,
    ) -> SaveReport:
        """Write ``conversation`` as a new generation (the journal starts empty).

        ``seq_at_least`` numbers the generation at least that high: a copy taken from the
        replica continues the replica's numbering, so that the next generation uploaded is
        the newest there too (``replica``).

        Refuses, with ``StateFileError``, a conversation with fewer messages than the stored one
        unless ``allow_shrink``: a partial copy must never replace a good one by accident.
        Loads first if this process has not. On ``DurabilityError`` the in-memory copy and the
        previous generation are unchanged.
        """
        self._check_writable()
        with self._lock:
            if not self._loaded:
                self._load()
            stored = len(self._messages)
            if len(conversation.messages) < stored and not allow_shrink:
                raise StateFileError(
                    f"refused to save {len(conversation.messages)} messages over the "
                    f"{stored} stored in {self.directory}: that would lose messages "
                    "(pass allow_shrink=True to mean it); the stored copy is kept",
                    path=str(self.directory),
                )
            return self._write_generation(conversation, seq_at_least=seq_at_least)

    def archive(self, *, reason: str, conversation: Conversation | None = None) -> Path | None:
        """Keep the current stored conversation aside, in ``archive/``, before it is replaced.

        Used when a newer conversation diverges from the stored one (AgentAPI restarted
        without its history, say): the newer one becomes current, and this one is kept whole
        rather than left to age out with the generations. Same file format as a generation;
        ``load`` never reads the archive. Returns the file, or ``None`` if nothing is stored.
        ``conversation`` archives that copy instead of the stored one (a replica's copy that
        lost to the stored one).
        """
        self._check_writable()
        with self._lock:
            conversation = conversation or self.conversation
            if conversation is None:
                return None
            body = conversation_body(conversation)
            saved_at = _now()
            header = dump_compact(
                {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "seq": self._seq,
                    "saved_at": saved_at,
                    "length": len(body),
                    "sha256": hashlib.sha256(body).hexdigest(),
                    "archived_because": reason,
                }
            )
            stamp = saved_at.replace(":", "").replace("-", "")
            path = self.directory / "archive" / f"conversation-{stamp}-{self._seq:012d}.json"
            write_atomic(path, (header, b"\n", body))
            log.info("store.archived", path=str(path), messages=len(conversation.messages))
            return path

    def compact(self, *, seq_at_least: int = 0) -> SaveReport:
        """Fold the journal into a new generation (``save`` of the in-memory copy)."""
        self._check_writable()
        with self._lock:
            conversation = self.conversation
            if not self._loaded or conversation is None:
                raise RuntimeError("compact() needs a stored conversation: load() or save() first")
            return self._write_generation(conversation, seq_at_least=seq_at_least)

    def append(
        self, updates: Sequence[Message], *, prompt: Conversation | None = None
    ) -> SaveReport:
        """Record these message upserts (and the prompt fields of ``prompt``, if they changed).

        Costs about the size of the change: one journal record, one fsync. Updates equal to
        what is stored are skipped (AgentAPI replays every message on reconnect). Each id must
        be at most the current length (append or replace). Needs a prior ``load()`` or
        ``save()`` in this process. After a failed write, or when the journal would pass
        ``max_bytes``, the change is written as a whole new generation instead.
        """
        self._check_writable()
        start = time.perf_counter()
        with self._lock:
            if not self._loaded:
                raise RuntimeError(
                    "append() needs the stored state first: call load() or save() in this process"
                )
            puts = self._changed(updates)
            new_prompt = self._prompt_change(prompt)
            if self._seq is None:
                return self._write_generation(self._preview(puts, new_prompt))
            assert self._sha256 is not None
            path = self.directory / _journal_name(self._seq)
            if not puts and new_prompt is None:
                return SaveReport(self._seq, 0, _ms_since(start), path, "journal")
            record = self._update_record(puts)
            if new_prompt is not None:
                record["prompt"] = new_prompt.model_dump()
            line = _encode_record(record)
            base = b""
            if self._journal_end == 0:
                base = _encode_record({"op": "base", "seq": self._seq, "sha256": self._sha256})
            data = base + line
            if self._needs_generation or self._journal_end + len(data) > self.max_bytes:
                return self._write_generation(self._preview(puts, new_prompt))
            if self._preserve_tail:
                self._preserve_journal_tail(path)
            try:
                # The size this store last saw: a journal that grew beside it holds another
                # writer's records, and is never cut back (a new generation is written instead).
                append_durable(path, data, offset=self._journal_end, expect_size=self._journal_size)
            except DurabilityError:
                self._needs_generation = True
                self._journal_size = None
                raise
            self._upsert(puts)
            if new_prompt is not None:
                self._prompt = new_prompt
            self._journal_end += len(data)
            self._journal_size = self._journal_end
            report = SaveReport(self._seq, len(data), _ms_since(start), path, "journal")
            log.debug(
                "store.appended",
                seq=self._seq,
                messages=len(puts),
                bytes=len(data),
                journal_bytes=self._journal_end,
                ms=report.duration_ms,
            )
            return report

    def _update_record(self, puts: Sequence[Message]) -> dict[str, Any]:
        """The journal record for ``puts``: whole messages, except those that only grew at
        their end, recorded as what they gained (``delta``; the module docstring)."""
        whole: list[dict[str, Any]] = []
        grow: list[dict[str, Any]] = []
        for m in puts:
            old = self._messages[m.id] if m.id < len(self._messages) else None
            if (
                old is not None
                and old.role == m.role
                and len(m.content) > len(old.content)
                and m.content.startswith(old.content)
            ):
                added = m.content[len(old.content) :]
                grow.append({"id": m.id, "from": len(old.content), "add": added, "time": m.time})
            else:
                whole.append({"id": m.id, "role": m.role, "content": m.content, "time": m.time})
        record: dict[str, Any] = {"op": "delta" if grow else "update", "at": _now(), "put": whole}
        if grow:
            record["grow"] = grow
        return record

    def _changed(self, updates: Sequence[Message]) -> list[Message]:
        """The updates that change something, in id order; ValueError on a gap."""
        pending: dict[int, Message] = {}
        length = len(self._messages)
        for message in updates:
            if message.id > length:
                raise ValueError(
                    f"message id {message.id} would leave a gap: the store holds {length} "
                    "messages (ids must be at most the current length)"
                )
            current = pending.get(message.id)
            if current is None and message.id < len(self._messages):
                current = self._messages[message.id]
            if current != message:
                pending[message.id] = message
            length = max(length, message.id + 1)
        return [pending[key] for key in sorted(pending)]

    def _prompt_change(self, prompt: Conversation | None) -> _Prompt | None:
        if prompt is None:
            return None
        fields = _Prompt(
            initial_prompt=prompt.initial_prompt,
            initial_prompt_sent=prompt.initial_prompt_sent,
            prompt_origin=prompt.prompt_origin,
        )
        return None if fields == self._prompt else fields

    def _preview(self, puts: Sequence[Message], prompt: _Prompt | None) -> Conversation:
        """The conversation these changes would produce, without touching the in-memory copy."""
        messages = list(self._messages)
        for message in puts:
            if message.id < len(messages):
                messages[message.id] = message
            else:
                messages.append(message)
        fields = prompt or self._prompt
        return Conversation.model_construct(
            messages=tuple(messages),
            initial_prompt=fields.initial_prompt,
            initial_prompt_sent=fields.initial_prompt_sent,
            prompt_origin=fields.prompt_origin,
        )

    def _preserve_journal_tail(self, path: Path) -> None:
        """Copy bytes after the last good record aside before ``append`` cuts them off: a bad
        record followed by more lines is damage worth keeping for a person to look at."""
        try:
            tail = read_capped_file(path, self.max_bytes)[self._journal_end :]
        except FileNotFoundError:
            tail = b""
        except StateFileError as exc:
            raise DurabilityError(
                f"could not copy the damaged end of {path} aside ({exc}); nothing was appended"
            ) from exc
        if tail:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            aside = path.with_name(f"{path.name}.corrupt-{stamp}-tail-at-{self._journal_end}")
            write_atomic(aside, tail)
            log.warning(
                "store.quarantined", path=str(path), moved_to=str(aside), reason="journal tail"
            )
        self._preserve_tail = False

    def _next_seq(self) -> int:
        generations, journals = self._scan()
        return max(generations | journals | {self._seq or 0}) + 1

    def _write_generation(self, conversation: Conversation, *, seq_at_least: int = 0) -> SaveReport:
        start = time.perf_counter()
        for index, message in enumerate(conversation.messages):
            # A model_construct()ed conversation skips validation; a generation that could
            # not be read back would silently send the next load to the previous one.
            if message.id != index:
                raise ValueError(
                    f"message ids must be 0..n-1; found id {message.id} at {index}: not saved"
                )
        seq = max(self._next_seq(), seq_at_least)
        body = conversation_body(conversation)
        digest = hashlib.sha256(body).hexdigest()
        saved_at = _now()
        fields: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "seq": seq,
            "saved_at": saved_at,
            "length": len(body),
            "sha256": digest,
        }
        if self.instance is not None:
            fields["instance"] = self.instance
        header = dump_compact(fields)
        if len(header) >= _HEADER_MAX:
            # Paths thousands of bytes long: a header a reader would refuse costs the copy;
            # instance.json still records the owner.
            del fields["instance"]
            header = dump_compact(fields)
        size = len(header) + 1 + len(body)
        if size > self.max_bytes:
            raise StateFileError(
                f"refused to save a {size}-byte generation: it is over the {self.max_bytes}-byte "
                "cap, so it could not be read back; the stored copy is kept",
                path=str(self.directory),
            )
        path = self.directory / _generation_name(seq)
        try:
            write_atomic(path, (header, b"\n", body))
        except DurabilityError:
            # If the rename happened but its directory fsync failed, the new generation may
            # shadow the current one: journaling onto the current one would then be lost.
            self._needs_generation = True
            raise
        previous = self._seq
        self._seq, self._sha256 = seq, digest
        self._messages = list(conversation.messages)
        self._prompt = _Prompt(
            initial_prompt=conversation.initial_prompt,
            initial_prompt_sent=conversation.initial_prompt_sent,
            prompt_origin=conversation.prompt_origin,
        )
        self._cached = conversation
        self._generation_bytes = size
        self._journal_end = 0
        self._journal_size = 0
        self._preserve_tail = False
        self._needs_generation = False
        self._loaded = True
        self._prune(keep_from=previous, new=seq)
        report = SaveReport(seq, size, _ms_since(start), path, "generation")
        log.info(
            "store.saved",
            seq=seq,
            messages=len(self._messages),
            bytes=size,
            ms=report.duration_ms,
        )
        return report

    def _prune(self, *, keep_from: int | None, new: int) -> None:
        """Delete generations and journals older than the previous one, after the new one is
        durable. Files between the previous and the new one were unusable at load and are left
        for a person (quarantine failed); nothing newer than the previous is ever deleted."""
        removed = 0
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        now = time.time()
        for name in names:
            path = self.directory / name
            match = _GENERATION.fullmatch(name) or _JOURNAL.fullmatch(name)
            try:
                if match is not None:
                    if keep_from is not None and int(match[1]) < keep_from:
                        path.unlink()
                        removed += 1
                elif _STALE_TEMP.fullmatch(name) and now - path.stat().st_mtime > _STALE_TEMP_AGE_S:
                    path.unlink()
                    removed += 1
            except OSError as exc:
                log.warning("store.prune_failed", path=str(path), error=str(exc))
        if removed:
            try:
                fsync_dir(self.directory)
            except DurabilityError as exc:
                # The new generation is durable; a delete that does not stick is harmless.
                log.warning("store.prune_failed", path=str(self.directory), error=str(exc))

    def sync(self, conversation: Conversation) -> tuple[str, str]:
        """Make ``conversation`` durable at the smallest cost, deciding by content how it
        relates to the stored copy. Returns (outcome, detail).

        If the stored copy is a prefix of it, only the changed tail is journalled; if it is
        already stored, nothing is written; a copy that diverged from the stored one gets a new
        full generation (the previous generation stays on disk).
        """
        stored = self.conversation
        if stored is None:
            report = self.save(conversation)
            return "durable", f"generation {report.seq}, {report.bytes_written} bytes"
        relation = compare(conversation.messages, stored.messages)
        prompt_changed = (
            conversation.initial_prompt,
            conversation.initial_prompt_sent,
            conversation.prompt_origin,
        ) != (stored.initial_prompt, stored.initial_prompt_sent, stored.prompt_origin)
        if relation is Relation.SAME and not prompt_changed:
            return "durable", "already on disk"
        if relation in (Relation.SAME, Relation.A_AHEAD, Relation.LAST_DIFFERS):
            first = _first_difference(conversation.messages, stored.messages)
            report = self.append(
                conversation.messages[first:], prompt=conversation if prompt_changed else None
            )
            added = len(conversation.messages) - first
            return "durable", f"journal +{added} messages, {report.bytes_written} bytes"
        if relation is Relation.B_AHEAD:
            return "durable", "the stored copy is already ahead"
        if holds_user_message(stored.messages) and not holds_user_message(conversation.messages):
            # AgentAPI restarted and shows only the agent's start-up screen until it has loaded
            # its file: that is not a new conversation, and must not replace this one.
            return "durable", (
                f"kept the stored {len(stored.messages)}-message conversation: AgentAPI shows only "
                "the agent's start-up screen (it has not loaded its file yet)"
            )
        kept = self.archive(reason="replaced by a diverging newer conversation")
        report = self.save(conversation, allow_shrink=True)
        return (
            "durable",
            f"diverged: new generation {report.seq}; the previous {len(stored.messages)}-message "
            f"conversation is kept at {kept}",
        )

    # -- async wrappers: one executor hop each ---------------------------------------------------

    async def aload(self) -> LoadReport:
        """``load`` in a worker thread."""
        return await asyncio.to_thread(self.load)

    async def asave(
        self, conversation: Conversation, *, allow_shrink: bool = False, seq_at_least: int = 0
    ) -> SaveReport:
        """``save`` in a worker thread (it completes even if the awaiting task is cancelled)."""
        return await asyncio.to_thread(
            self.save, conversation, allow_shrink=allow_shrink, seq_at_least=seq_at_least
        )

    async def aappend(
        self, updates: Sequence[Message], *, prompt: Conversation | None = None
    ) -> SaveReport:
        """``append`` in a worker thread."""
        return await asyncio.to_thread(self.append, updates, prompt=prompt)

    async def async_sync(self, conversation: Conversation) -> tuple[str, str]:
        """``sync`` in a worker thread."""
        return await asyncio.to_thread(self.sync, conversation)

    async def acompact(self, *, seq_at_least: int = 0) -> SaveReport:
        """``compact`` in a worker thread."""
        return await asyncio.to_thread(self.compact, seq_at_least=seq_at_least)


def _first_difference(new: tuple[Message, ...], old: tuple[Message, ...]) -> int:
    common = min(len(new), len(old))
    index = common
    # The tail is where changes are; walk back from the end of the common part.
    while index > 0 and new[index - 1] != old[index - 1]:
        index -= 1
    return index

"""Replica: the state directory's files copied to S3-compatible object storage, and read back.

The persistent volume is a single point of loss (a workspace without one, a volume deleted
with its workspace, a node that cannot mount it). The replica keeps the same generations and
journal bytes off the volume (``replica_layout`` names them), so ``restore`` on a new volume
can bring the whole conversation back.

It only ever copies files that are already durable on the volume, and never writes there
itself except to renumber: ``push`` reads the state directory, uploads what the bucket lacks
(a new generation whole, the journal's new complete records as one segment), then deletes the
bucket's generations older than the oldest local one. A failure raises ``ReplicaError`` and
changes nothing locally; the next push starts from what the bucket is known to hold.

``read_newest`` is the reader: the newest generation whose bytes match their checksum and
whose header names this instance, plus the verified chain of its journal segments, replayed by
the store's own loader in a private temporary directory (every record checked as on disk).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from ._fsutil import read_capped_file, read_json_record, write_atomic
from .config import Settings
from .errors import PersistError, ReplicaError, StateFileError
from .identity import Instance, instance_dir_name
from .models import Conversation, Relation, compare
from .replica_client import ObjectStore
from .replica_layout import (
    INSTANCE_OBJECT,
    ObjectName,
    ReplicaTarget,
    chain,
    generation_object,
    parse_object,
    plans_newest_first,
    segment_object,
)
from .store import (
    StateStore,
    generation_file_name,
    journal_file_name,
    stored_sequences,
)

__all__ = [
    "PushReport",
    "Replica",
    "ReplicaCopy",
    "ReplicaRead",
    "read_for_restore",
    "read_replica_record",
    "reader_for_restore",
    "replica_for",
]

log = structlog.get_logger(__name__)

#: ``replica.json`` in the state directory: the last push's outcome, for ``status``.
RECORD = "replica.json"
_RECORD_MAX = 64 * 1024
#: How long ``restore`` (and the sidecar's start) may spend reading the replica.
READ_TIMEOUT_S = 60.0
#: A journal segment larger than this is uploaded in pieces (each one an S3 object).
_SEGMENT_MAX = 8 * 1024 * 1024


@dataclass(slots=True)
class PushReport:
    """What one ``push`` uploaded, and what the bucket holds after it."""

    generation: int | None = None
    """The newest generation the bucket holds (``None``: nothing stored locally yet)."""
    journal_bytes: int = 0
    """How much of that generation's journal the bucket holds."""
    messages: int | None = None
    """Messages of the local copy this push caught up with (a lower bound of the bucket's)."""
    objects: int = 0
    bytes: int = 0
    deleted: int = 0
    ms: int = 0
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if self.generation is None:
            return "nothing stored locally yet"
        sent = f"{self.objects} objects, {self.bytes} bytes" if self.objects else "nothing new"
        held = f"generation {self.generation} + {self.journal_bytes} journal bytes"
        return f"{sent}; the replica holds {held}"


@dataclass(frozen=True, slots=True)
class ReplicaCopy:
    """What the replica holds for this instance, as ``read_newest`` verified it."""

    conversation: Conversation | None
    """``None``: nothing usable (see ``problems``) or nothing there."""
    seq: int | None = None
    journal_bytes: int = 0
    journal_records: int = 0
    saved_at: datetime | None = None
    problems: tuple[str, ...] = ()
    foreign: str | None = None
    """Set when the replica belongs to another instance: it was not read, and never used."""

    def describe(self) -> str:
        if self.foreign is not None:
            return f"belongs to another instance ({self.foreign}): not used"
        if self.conversation is None:
            return "holds no usable copy"
        return (
            f"{len(self.conversation.messages)} messages (generation {self.seq}, "
            f"{self.journal_records} journal records)"
        )


class Replica:
    """One instance's replica: ``push`` from the state directory, ``read_newest`` back.

    ``push`` calls are serialised. The object store client opens on first use (the library
    import and the model loading happen then, in a thread), so a configured replica costs a
    stop nothing before its durable write.
    """

    def __init__(
        self,
        target: ReplicaTarget,
        *,
        endpoint: str | None,
        instance: Instance,
        store: StateStore,
        objects: ObjectStore | None = None,
    ) -> None:
        self.target = target
        self.endpoint = endpoint
        self.instance = instance
        self.store = store
        self.objects = objects or ObjectStore(target.bucket, endpoint=endpoint)
        self.prefix = target.instance_prefix(instance_dir_name(instance.module_dir))
        self._lock = asyncio.Lock()
        self._remote: set[str] | None = None
        """Object names under ``prefix`` the bucket is known to hold (``None``: not listed)."""
        self._chains: dict[int, list[ObjectName]] = {}
        """Per local generation: the bucket's segments of its journal from byte 0, verified
        against the local journal (their last end is how much of it the bucket holds)."""
        self._ours: set[str] = set()
        """Names in the bucket that are this directory's files (or journal bytes), verified."""
        self.last_push: PushReport | None = None
        """The last push that succeeded."""
        self._generation_names: dict[tuple[int, int, int], str] = {}
        """(seq, size, mtime_ns) of a local generation file -> its object name (hash once)."""

    @property
    def url(self) -> str:
        """Where this instance's objects are (no credentials: there are none in it)."""
        return f"s3://{self.target.bucket}/{self.prefix}"

    async def close(self) -> None:
        await self.objects.close()

    # -- writing ----------------------------------------------------------------------------

    async def push(self, *, record: bool = True) -> PushReport:
        """Upload what the bucket lacks of the state directory, then prune the bucket.

        ``record=False`` leaves ``replica.json`` to ``record_outcome`` (the stop writes it once
        its result is out: a file write must not be what a short budget runs out in)."""
        async with self._lock:
            started = time.perf_counter()
            report = PushReport()
            try:
                await self._push(report)
            except BaseException as exc:  # failed or cut short: learn the bucket again
                self._remote = None
                if record and isinstance(exc, ReplicaError):
                    await self.record_outcome(error=str(exc))
                raise
            report.ms = round((time.perf_counter() - started) * 1000)
            self.last_push = report
            if record:
                await self.record_outcome(error=None)
            log.info(
                "replica.pushed",
                generation=report.generation,
                journal_bytes=report.journal_bytes,
                objects=report.objects,
                bytes=report.bytes,
                deleted=report.deleted,
                ms=report.ms,
            )
            return report

    async def _push(self, report: PushReport) -> None:
        conversation = self.store.conversation
        report.messages = len(conversation.messages) if conversation is not None else None
        generations, _ = await asyncio.to_thread(stored_sequences, self.store.directory)
        if not generations:
            return
        if self._remote is None:
            await self._learn(generations)
        oldest, newest = min(generations), max(generations)
        theirs = [
            p
            for p in self._listed()
            if p.kind == "generation" and p.seq >= oldest and p.name not in self._ours
        ]
        if theirs:
            # Generations this directory never had (a restore that kept the local copy over
            # them, or one that could not reach the bucket): kept under archive/, never
            # deleted, and when one is numbered at or past ours, the local copy is renumbered
            # past it so that a reader takes ours as the newest.
            await self._archive(theirs, report)
            floor = max(g.seq for g in theirs) + 1
            if floor > newest:
                saved = await self.store.acompact(seq_at_least=floor)
                report.notes.append(f"this copy was renumbered to generation {saved.seq}")
                generations, _ = await asyncio.to_thread(stored_sequences, self.store.directory)
                oldest, newest = min(generations), max(generations)
        for seq in sorted(generations):
            await self._push_generation(seq, report)
        report.generation = newest
        report.journal_bytes = _end(self._chains.get(newest, []))
        await self._prune(oldest, report)

    @property
    def _known(self) -> set[str]:
        """What the bucket holds, as listed at the start of the push and kept up since."""
        assert self._remote is not None, "listed by _learn at the start of every push"
        return self._remote

    def _listed(self) -> list[ObjectName]:
        return [p for name in list(self._known) if (p := parse_object(name)) is not None]

    async def _learn(self, generations: set[int]) -> None:
        """List the bucket, check whose it is, and find which of its objects are this
        directory's files byte for byte (``_ours``); the rest is pruned or archived."""
        remote = {key[len(self.prefix) :] for key in await self.objects.list(self.prefix)}
        if INSTANCE_OBJECT in remote:
            foreign = await self._foreign_owner()
            if foreign is not None:
                raise ReplicaError(
                    f"the replica at {self.url} belongs to another instance ({foreign}): "
                    "nothing was uploaded there; give this instance its own prefix"
                )
        else:
            record = json.dumps(self.instance.as_dict(), sort_keys=True).encode()
            await self.objects.put(self.prefix + INSTANCE_OBJECT, record)
            remote.add(INSTANCE_OBJECT)
        self._remote = remote
        self._chains = {}
        self._ours = set()
        for seq in generations:
            if not any(p.kind == "generation" and p.seq == seq for p in self._listed()):
                continue  # nothing of it there: no need to hash it here
            named = await self._generation_name(seq)
            if named is None or named[0] not in remote:
                continue
            name = named[0]
            self._ours.add(name)
            segments = [p for p in self._listed() if p.kind == "segment" and p.seq == seq]
            verified = await asyncio.to_thread(self._verified_chain, seq, chain(segments))
            self._ours.update(s.name for s in verified)
            self._chains[seq] = verified

    def _verified_chain(self, seq: int, segments: tuple[ObjectName, ...]) -> list[ObjectName]:
        """The bucket's segments that match the local journal byte for byte, from its start."""
        path = self.store.directory / journal_file_name(seq)
        verified: list[ObjectName] = []
        try:
            with open(path, "rb") as journal:
                for segment in segments:
                    journal.seek(segment.start)
                    data = journal.read(segment.end - segment.start)
                    if _sha(data) != segment.sha256:
                        break
                    verified.append(segment)
        except FileNotFoundError:
            return []
        return verified

    async def _foreign_owner(self) -> str | None:
        try:
            data = await self.objects.get(self.prefix + INSTANCE_OBJECT, max_bytes=_RECORD_MAX)
            owner = Instance.from_dict(json.loads(data))
        except ValueError:
            return "its instance.json is unreadable"
        if owner is None:
            return "its instance.json is unreadable"
        differences = self.instance.differences(owner, by_port=False)
        return "; ".join(differences) if differences else None

    async def _generation_name(self, seq: int) -> tuple[str, bytes | None] | None:
        """The object name of local generation ``seq``, hashed once per file, with the bytes
        when they were read just now to hash them (``None``: named from what was hashed
        before). ``None`` when the file is gone."""
        path = self.store.directory / generation_file_name(seq)
        try:
            info = path.stat()
        except FileNotFoundError:
            return None
        key = (seq, info.st_size, info.st_mtime_ns)
        if key in self._generation_names:
            return self._generation_names[key], None
        data = await asyncio.to_thread(_read, path, self.store.max_bytes)
        if data is None:
            return None
        name = generation_object(seq, await asyncio.to_thread(_sha, data))
        self._generation_names[key] = name
        return name, data

    async def _push_generation(self, seq: int, report: PushReport) -> None:
        named = await self._generation_name(seq)
        if named is None:
            return  # pruned locally since the listing: a newer one covers it
        name, data = named
        if name not in self._known:
            if data is None:  # hashed by an earlier push that did not send it
                path = self.store.directory / generation_file_name(seq)
                data = await asyncio.to_thread(_read, path, self.store.max_bytes)
                if data is None or generation_object(seq, _sha(data)) != name:
                    return  # replaced since it was hashed: the next push sends it
            await self.objects.put(self.prefix + name, data)
            self._known.add(name)
            self._chains[seq] = []
            report.objects += 1
            report.bytes += len(data)
        self._ours.add(name)
        await self._push_journal(seq, report)

    async def _push_journal(self, seq: int, report: PushReport) -> None:
        chain = self._chains.setdefault(seq, [])
        start = _end(chain)
        path = self.store.directory / journal_file_name(seq)
        data, size = await asyncio.to_thread(_complete_records, path, start)
        if size is not None and size < start:
            # The journal was cut back (a torn tail dropped at load): the bucket's segments
            # past the cut are not this journal any more; it is uploaded again from its start
            # and the old segments pruned.
            self._ours.difference_update(
                p.name for p in self._listed() if p.kind == "segment" and p.seq == seq
            )
            chain.clear()
            start = 0
            data, size = await asyncio.to_thread(_complete_records, path, start)
        for piece in _pieces(data, _SEGMENT_MAX):
            name = segment_object(seq, start, start + len(piece), _sha(piece))
            await self.objects.put(self.prefix + name, piece)
            self._known.add(name)
            self._ours.add(name)
            chain.append(ObjectName("segment", seq, _sha(piece), name, start, start + len(piece)))
            start += len(piece)
            report.objects += 1
            report.bytes += len(piece)
            await self._merge_tail(seq, chain, report)

    async def _merge_tail(self, seq: int, chain: list[ObjectName], report: PushReport) -> None:
        """Keep a journal's segments few: the last two become one while the newer is at least
        as long as the older (a binary counter: about log2(n) segments after n uploads, each
        byte sent again about as many times), up to ``_SEGMENT_MAX``. A reader then needs a
        handful of requests per generation, not one per upload; the merged ones are pruned."""
        path = self.store.directory / journal_file_name(seq)
        while len(chain) >= 2:
            older, newer = chain[-2], chain[-1]
            if newer.end - newer.start < older.end - older.start:
                return
            if newer.end - older.start > _SEGMENT_MAX:
                return
            data = await asyncio.to_thread(_read_range, path, older.start, newer.end)
            if data is None:
                return  # the journal went away (a new generation): nothing to merge
            digest = _sha(data)
            name = segment_object(seq, older.start, newer.end, digest)
            await self.objects.put(self.prefix + name, data)
            self._known.add(name)
            chain[-2:] = [ObjectName("segment", seq, digest, name, older.start, newer.end)]
            self._ours.difference_update((older.name, newer.name))
            self._ours.add(name)
            report.objects += 1
            report.bytes += len(data)

    async def _prune(self, oldest_local: int, report: PushReport) -> None:
        """Delete the bucket's generations and journals older than the oldest local one (the
        store prunes its own the same way), and stale segments of the local ones."""
        doomed = [
            p.name for p in self._listed() if p.seq < oldest_local or p.name not in self._ours
        ]
        if doomed:
            await self.objects.delete([self.prefix + name for name in doomed])
            self._known.difference_update(doomed)
            report.deleted += len(doomed)

    async def _archive(self, generations: list[ObjectName], report: PushReport) -> None:
        """Copy states that are not this directory's (with their journals) under
        ``archive/`` in the instance's prefix, then drop them from the live names."""
        seqs = {g.seq for g in generations}
        moved = [p for p in self._listed() if p.seq in seqs and p.name not in self._ours]
        for parsed in moved:
            data = await self.objects.get(self.prefix + parsed.name, max_bytes=self.store.max_bytes)
            await self.objects.put(f"{self.prefix}archive/{parsed.name}", data)
        await self.objects.delete([self.prefix + p.name for p in moved])
        self._known.difference_update(p.name for p in moved)
        report.notes.append(
            f"{len(moved)} objects of generations {sorted(seqs)}, which this copy never had, "
            f"were kept under {self.prefix}archive/"
        )
        log.warning(
            "replica.archived_foreign_lineage", generations=sorted(seqs), objects=len(moved)
        )

    async def record_outcome(self, *, error: str | None) -> None:
        """Keep the last push's outcome in ``replica.json``: ``error`` when it failed or was
        cut short (the bucket is then listed again before the next one), else ``last_push``."""
        if error is not None:
            self._remote = None
            await self._record(ok=False, error=error, report=PushReport())
        else:
            await self._record(ok=True, error=None, report=self.last_push or PushReport())

    async def _record(self, *, ok: bool, error: str | None, report: PushReport) -> None:
        """Keep the outcome in ``replica.json`` for ``status`` (informational only)."""
        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        previous = read_replica_record(self.store.directory) or {}
        record: dict[str, Any] = {
            "url": self.url,
            "endpoint": self.endpoint,
            "last_attempt_at": now,
            "ok": ok,
            "error": error,
            "last_ok_at": now if ok else previous.get("last_ok_at"),
            "generation": report.generation if ok else previous.get("generation"),
            "journal_bytes": report.journal_bytes if ok else previous.get("journal_bytes"),
            "messages": report.messages if ok else previous.get("messages"),
        }
        try:
            await asyncio.to_thread(
                write_atomic,
                self.store.directory / RECORD,
                json.dumps(record, separators=(",", ":")).encode() + b"\n",
            )
        except PersistError as exc:
            log.warning("replica.record_failed", error=str(exc))

    # -- reading ----------------------------------------------------------------------------

    async def read_newest(self) -> ReplicaCopy:
        """The newest state the bucket holds for this instance that verifies whole.

        Raises ``ReplicaError`` when the bucket cannot be read at all (unreachable, refused);
        a damaged or foreign object is a problem in the answer, never used.
        """
        names = [key[len(self.prefix) :] for key in await self.objects.list(self.prefix)]
        if INSTANCE_OBJECT in names:
            foreign = await self._foreign_owner()
            if foreign is not None:
                log.warning("replica.foreign", url=self.url, differences=foreign)
                return ReplicaCopy(conversation=None, foreign=foreign)
        problems: list[str] = []
        for plan in plans_newest_first(names):
            generation = await self._verified(plan.generation, problems)
            if generation is None:
                continue
            owner = _header_instance(generation)
            if owner is not None and (
                differences := self.instance.differences(owner, by_port=False)
            ):
                foreign = "; ".join(differences)
                return ReplicaCopy(conversation=None, foreign=foreign)
            journal: list[bytes] = []
            for segment in plan.segments:
                data = await self._verified(segment, problems)
                if data is None:
                    break  # the records before the damage are a state; nothing after a gap
                journal.append(data)
            copy = await asyncio.to_thread(
                self._replay, plan.generation.seq, generation, b"".join(journal), problems
            )
            if copy is not None:
                return copy
        return ReplicaCopy(conversation=None, problems=tuple(problems))

    async def _verified(self, parsed: ObjectName, problems: list[str]) -> bytes | None:
        try:
            data = await self.objects.get(self.prefix + parsed.name, max_bytes=self.store.max_bytes)
        except ReplicaError as exc:
            problems.append(f"{parsed.name}: {exc}")
            return None
        if _sha(data) != parsed.sha256:
            problems.append(
                f"{parsed.name} failed its checksum ({len(data)} bytes): damaged, not used"
            )
            log.warning("replica.object_corrupt", object=parsed.name, bytes=len(data))
            return None
        return data

    def _replay(
        self, seq: int, generation: bytes, journal: bytes, problems: list[str]
    ) -> ReplicaCopy | None:
        with tempfile.TemporaryDirectory(prefix="agentapi-persist-replica-") as scratch:
            directory = Path(scratch)
            (directory / generation_file_name(seq)).write_bytes(generation)
            if journal:
                (directory / journal_file_name(seq)).write_bytes(journal)
            store = StateStore(directory, max_bytes=self.store.max_bytes, read_only=True)
            try:
                loaded = store.load()
            except StateFileError as exc:
                problems.append(f"generation {seq}: {exc}")
                return None
        if loaded.conversation is None or loaded.seq != seq:
            problems.extend(f"generation {seq}: {p}" for p in loaded.problems)
            return None
        problems.extend(f"generation {seq}: {p}" for p in loaded.problems)
        return ReplicaCopy(
            conversation=loaded.conversation,
            seq=seq,
            journal_bytes=len(journal),
            journal_records=loaded.journal_records,
            saved_at=loaded.saved_at,
            problems=tuple(problems),
        )


@dataclass(frozen=True, slots=True)
class ReplicaRead:
    """What ``restore`` learned from the replica: its copy, or why it could not be read."""

    url: str
    copy: ReplicaCopy | None
    error: str | None = None


async def read_for_restore(
    settings: Settings, store: StateStore, *, timeout_s: float
) -> ReplicaRead | None:
    """Read the replica's newest valid copy within ``timeout_s`` (``None``: no replica is
    configured). Never raises for the replica's failures: they are the answer's ``error``."""
    replica = replica_for(settings, store)
    if replica is None:
        return None
    try:
        async with asyncio.timeout(timeout_s):
            copy = await replica.read_newest()
    except ReplicaError as exc:
        return ReplicaRead(url=replica.url, copy=None, error=str(exc))
    except TimeoutError:
        return ReplicaRead(url=replica.url, copy=None, error=f"no answer within {timeout_s:.0f}s")
    finally:
        await replica.close()
    return ReplicaRead(url=replica.url, copy=copy)


def replica_is_newer(
    theirs: Conversation, their_seq: int, local: Conversation | None, local_seq: int | None
) -> tuple[bool, Relation | None]:
    """Whether ``restore`` takes the replica's copy over the local one, and how the two
    relate (``None``: there is no local copy). By content first: a copy that extends the
    other is the newer one. Only between copies that diverge does the higher generation
    number win (one lineage: a copy taken from the replica continues its numbering). Never
    by clock. ``status`` says what a restore would do with the same rule."""
    if local is None:
        return True, None
    relation = compare(theirs.messages, local.messages)
    if relation in (Relation.SAME, Relation.B_AHEAD):
        return False, relation
    if relation is Relation.A_AHEAD:
        return True, relation
    return their_seq > (local_seq or 0), relation


def reader_for_restore(
    settings: Settings, store: StateStore
) -> Callable[[], ReplicaRead | None] | None:
    """What ``restore`` calls to read the replica (``None``: none configured): a blocking
    call with an event loop of its own, so that ``restore`` calls it only once it has
    checked that AgentAPI is not running, from the CLI or from the sidecar's worker thread."""
    if settings.replica is None:
        return None

    def read() -> ReplicaRead | None:
        answer = asyncio.run(read_for_restore(settings, store, timeout_s=READ_TIMEOUT_S))
        if answer is not None and answer.error is not None:
            log.warning("replica.unreadable", url=answer.url, error=answer.error)
        return answer

    return read


def replica_for(settings: Settings, store: StateStore) -> Replica | None:
    """The configured replica of ``store`` (``None`` when none is configured). Cheap: nothing
    is imported or connected until it is first used."""
    target = settings.replica_target
    if target is None:
        return None
    return Replica(
        target, endpoint=settings.replica_endpoint, instance=settings.instance, store=store
    )


def read_replica_record(state_dir: Path) -> dict[str, Any] | None:
    """The last push's record (``replica.json``), ``None`` if there is none or it is bad."""
    return read_json_record(state_dir / RECORD, _RECORD_MAX)


def _end(chain: list[ObjectName]) -> int:
    return chain[-1].end if chain else 0


def _read_range(path: Path, start: int, end: int) -> bytes | None:
    """Bytes ``[start, end)`` of a local file, ``None`` if it is gone or shorter."""
    try:
        with open(path, "rb") as journal:
            journal.seek(start)
            data = journal.read(end - start)
    except FileNotFoundError:
        return None
    return data if len(data) == end - start else None


def _pieces(data: bytes, limit: int) -> list[bytes]:
    """``data`` (whole records) cut at record ends into pieces of about ``limit`` bytes (a
    record longer than that is a piece of its own)."""
    pieces: list[bytes] = []
    at = 0
    while at < len(data):
        end = at + limit
        cut = len(data) if end >= len(data) else data.rfind(b"\n", at, end) + 1
        if cut <= at:
            cut = data.find(b"\n", end) + 1 or len(data)
        pieces.append(data[at:cut])
        at = cut
    return pieces


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(path: Path, limit: int) -> bytes | None:
    try:
        return read_capped_file(path, limit)
    except FileNotFoundError:
        return None
    except StateFileError:
        return None


def _complete_records(path: Path, start: int) -> tuple[bytes, int | None]:
    """The journal's complete records from byte ``start`` (up to its last newline), and the
    file's size (``None`` when it does not exist)."""
    try:
        with open(path, "rb") as journal:
            size = os.fstat(journal.fileno()).st_size
            if size < start:
                return b"", size
            journal.seek(start)
            data = journal.read(size - start)
    except FileNotFoundError:
        return b"", None
    return data[: data.rfind(b"\n") + 1], size


def _header_instance(generation: bytes) -> Instance | None:
    """The instance a generation's header names (``None``: it names none)."""
    line = generation[: generation.find(b"\n")]
    try:
        header = json.loads(line)
    except ValueError:
        return None
    return Instance.from_dict(header.get("instance")) if isinstance(header, dict) else None


#: How long ``status`` and ``doctor`` wait for the replica (the client's import included).
PROBE_S = 10.0
#: A replica this far behind the local copy (seconds of changes not uploaded) is a problem.
LAG_PROBLEM_S = 60.0


async def describe_replica(
    settings: Settings,
    store: StateStore,
    *,
    local_saved_at: datetime | None,
    probe_s: float = PROBE_S,
) -> tuple[dict[str, Any], list[str]]:
    """The replica as ``status`` and ``doctor`` show it, and its problems. ``store`` is the
    local copy as loaded (``local_saved_at``: its newest change): the lag is measured against
    it, by content; the seconds say how much older the replica's newest change is."""
    replica = replica_for(settings, store)
    if replica is None:
        return {"configured": False}, []
    facts: dict[str, Any] = {"url": replica.url, "endpoint": settings.replica_endpoint}
    problems: list[str] = []
    record = read_replica_record(store.directory) or {}
    facts["last_upload"] = record.get("last_ok_at") or "never"
    if record.get("ok") is False:
        facts["last_error"] = record.get("error")
        problems.append(f"The last replica upload failed: {record.get('error')}")
    read = await read_for_restore(settings, store, timeout_s=probe_s)
    assert read is not None
    if read.error is not None:
        facts["reachable"] = False
        facts["error"] = read.error
        problems.append(f"The replica at {replica.url} cannot be read: {read.error}")
        return facts, problems
    copy = read.copy
    assert copy is not None
    facts["reachable"] = True
    facts["holds"] = copy.describe()
    if copy.foreign is not None:
        problems.append(f"The replica at {replica.url} belongs to another instance: {copy.foreign}")
        return facts, problems
    problems.extend(f"Replica: {problem}" for problem in copy.problems)
    local = store.conversation
    theirs = copy.conversation
    if local is None:
        facts["restore_would"] = "take the replica's copy" if theirs else "find nothing"
        facts["lag_messages"] = 0
        return facts, problems
    if theirs is not None and copy.seq is not None:
        newer, relation = replica_is_newer(theirs, copy.seq, local, store.seq)
        if relation is Relation.SAME:
            facts.update(lag_messages=0, lag_s=0.0, restore_would="find the replica current")
            return facts, problems
        if newer:
            why = "it is ahead" if relation is Relation.A_AHEAD else "a later generation"
            facts.update(lag_messages=0, restore_would=f"take the replica's copy ({why})")
            return facts, problems
    their_n = len(theirs.messages) if theirs is not None else 0
    facts["lag_messages"] = len(local.messages) - their_n
    local_at = local_saved_at
    lag_s = None
    if local_at is not None:
        since = copy.saved_at or _parse(record.get("last_ok_at"))
        lag_s = (
            round((local_at - since).total_seconds(), 1)
            if since is not None
            else round((datetime.now(UTC) - local_at).total_seconds(), 1)
        )
    facts["lag_s"] = lag_s
    facts["restore_would"] = "keep the local copy (the replica is behind)"
    if lag_s is not None and lag_s > LAG_PROBLEM_S:
        problems.append(
            f"The replica is {facts['lag_messages']} messages and {lag_s:.0f}s behind the local "
            "copy: a lost volume now would lose those changes"
        )
    return facts, problems


def _parse(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None

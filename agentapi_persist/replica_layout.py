"""Where the replica's objects live in the bucket, and which of them make a complete state.

The replica copies the state directory's files as they are (``store``): a generation file
whole, and its journal as segments, each segment the bytes the journal gained since the last
upload. Names carry everything a reader needs, so one listing finds the newest state without
reading anything::

    s3://<bucket>/<prefix>/<instance dir name>/
        instance.json                                    whose conversation this is
        g000000000007-<sha256 of the object>.gen         generation 7, byte for byte
        j000000000007-000000000000-000000004096-<sha256>.seg   journal 7, bytes [0, 4096)
        j000000000007-000000004096-000000005120-<sha256>.seg   journal 7, bytes [4096, 5120)

``<instance dir name>`` is the local state directory's default name (``identity``): one
module directory, one place in the bucket, so several agents of one workspace, or several
workspaces sharing a bucket under one prefix, never meet. ``instance.json`` and every
generation's header name the instance, and a reader refuses a state that names another.

Segments are merged as they accumulate (the uploader sends two neighbours again as one, and
deletes them): a reader meets a few per generation, and where two start at the same byte it
takes the longer.

A complete state is a generation whose bytes match the SHA-256 in its name, plus the
segments of its journal that follow on from byte 0 without a gap, each matching its own
SHA-256. The uploader writes a generation before any segment of its journal, and a segment
only after the one before it, so a reader that takes the highest generation that verifies,
and as much of its journal as chains and verifies, always finds a state the sidecar once had
durable, and the newest one uploaded. A segment that is missing or damaged ends the chain:
the records before it are a state too (a journal is applied record by record), and nothing
after a gap is used.

Pure functions over names: no I/O, no S3.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

__all__ = [
    "INSTANCE_OBJECT",
    "ObjectName",
    "ReplicaTarget",
    "StatePlan",
    "generation_object",
    "parse_object",
    "parse_replica_url",
    "plans_newest_first",
    "segment_object",
]

INSTANCE_OBJECT = "instance.json"

_GENERATION = re.compile(r"g(\d{12})-([0-9a-f]{64})\.gen")
_SEGMENT = re.compile(r"j(\d{12})-(\d{12})-(\d{12})-([0-9a-f]{64})\.seg")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True, slots=True)
class ReplicaTarget:
    """``s3://bucket/prefix`` as configured, and the instance's place under it."""

    bucket: str
    prefix: str
    """Without leading or trailing ``/``; may be empty."""

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def instance_prefix(self, instance_name: str) -> str:
        """The key prefix (ending in ``/``) of one instance's objects."""
        return f"{self.prefix}/{instance_name}/" if self.prefix else f"{instance_name}/"


def parse_replica_url(url: str) -> ReplicaTarget:
    """``s3://bucket[/prefix]``; ``ValueError`` saying what is wrong otherwise."""
    parts = urlsplit(url.strip())
    if parts.scheme != "s3":
        raise ValueError(f"{url!r} is not an s3:// URL (s3://bucket/prefix)")
    if parts.query or parts.fragment or parts.username or parts.password or parts.port:
        raise ValueError(f"{url!r} must be s3://bucket/prefix, without credentials or a query")
    bucket = parts.hostname or ""
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ValueError(f"{url!r} does not name a valid bucket (3-63 of a-z, 0-9, '.', '-')")
    prefix = parts.path.strip("/")
    if any(piece in {"", ".", ".."} for piece in prefix.split("/")) and prefix:
        raise ValueError(f"{url!r} has an empty, '.' or '..' part in its prefix")
    return ReplicaTarget(bucket=bucket, prefix=prefix)


@dataclass(frozen=True, slots=True)
class ObjectName:
    """What a replica object's name says about it."""

    kind: Literal["generation", "segment"]
    seq: int
    sha256: str
    name: str
    start: int = 0
    end: int = 0


def generation_object(seq: int, sha256: str) -> str:
    """The object name of generation ``seq`` whose bytes hash to ``sha256``."""
    return f"g{seq:012d}-{sha256}.gen"


def segment_object(seq: int, start: int, end: int, sha256: str) -> str:
    """The object name of bytes ``[start, end)`` of journal ``seq``."""
    return f"j{seq:012d}-{start:012d}-{end:012d}-{sha256}.seg"


def parse_object(name: str) -> ObjectName | None:
    """The name's meaning, or ``None`` for any other object (never ours to touch)."""
    if match := _GENERATION.fullmatch(name):
        return ObjectName("generation", int(match[1]), match[2], name)
    if match := _SEGMENT.fullmatch(name):
        start, end = int(match[2]), int(match[3])
        if end <= start:
            return None
        return ObjectName("segment", int(match[1]), match[4], name, start, end)
    return None


@dataclass(frozen=True, slots=True)
class StatePlan:
    """One generation and the chain of its journal's segments from byte 0."""

    generation: ObjectName
    segments: tuple[ObjectName, ...]

    @property
    def journal_bytes(self) -> int:
        return self.segments[-1].end if self.segments else 0


def chain(segments: Iterable[ObjectName]) -> tuple[ObjectName, ...]:
    """The segments that follow on from byte 0 without a gap, in order. Where two start at
    the same byte (a re-upload after a local journal was cut back), the longer is tried."""
    by_start: dict[int, list[ObjectName]] = {}
    for segment in segments:
        by_start.setdefault(segment.start, []).append(segment)
    found: list[ObjectName] = []
    at = 0
    while candidates := by_start.get(at):
        best = max(candidates, key=lambda s: (s.end, s.sha256))
        found.append(best)
        at = best.end
    return tuple(found)


def plans_newest_first(names: Iterable[str]) -> list[StatePlan]:
    """Every generation in the listing, newest first, each with its segment chain."""
    generations: list[ObjectName] = []
    segments: dict[int, list[ObjectName]] = {}
    for name in names:
        parsed = parse_object(name)
        if parsed is None:
            continue
        if parsed.kind == "generation":
            generations.append(parsed)
        else:
            segments.setdefault(parsed.seq, []).append(parsed)
    generations.sort(key=lambda g: (g.seq, g.sha256), reverse=True)
    return [StatePlan(g, chain(segments.get(g.seq, ()))) for g in generations]

"""The off-volume replica against a real S3-compatible server on loopback (versitygw).

In-process: the ``Replica`` pushes a real state directory and reads it back; the judge is what
the server's own directory holds and what a fresh reader verifies. The sidecar, ``shutdown``,
``restore``, ``status`` and ``doctor`` as processes are in ``test_replica_process``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agentapi_persist.config import Settings
from agentapi_persist.errors import ReplicaError
from agentapi_persist.models import Conversation, Message
from agentapi_persist.replica import Replica, describe_replica, read_for_restore, replica_for
from agentapi_persist.replica_layout import (
    parse_object,
    parse_replica_url,
    plans_newest_first,
    segment_object,
)
from agentapi_persist.replica_uploader import ReplicaUploader
from agentapi_persist.restoring import RestoreReport, restore
from agentapi_persist.store import StateStore, read_archive

from .conftest import Workspace
from .s3_support import BUCKET, S3Server, s3_server

SHA = "0" * 64


def messages(n: int, *, text: str = "message") -> tuple[Message, ...]:
    return tuple(
        Message(
            id=i,
            role="user" if i % 2 == 0 else "agent",
            content=f"{text} {i}",
            time="2026-12-02T10:00:00Z",
        )
        for i in range(n)
    )


@pytest.fixture
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    with s3_server(tmp_path / "s3") as server:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        yield server


def settings_for(ws: Workspace, server: S3Server, prefix: str = "team/ws1") -> Settings:
    return ws.settings(replica=f"s3://{BUCKET}/{prefix}", replica_endpoint=server.endpoint)


def replica_of(ws: Workspace, server: S3Server, store: StateStore) -> Replica:
    replica = replica_for(settings_for(ws, server), store)
    assert replica is not None
    return replica


def store_of(ws: Workspace) -> StateStore:
    return StateStore(ws.state_dir, instance=ws.settings().instance.as_dict())


# --- names and plans (no server) ------------------------------------------------------------


def test_replica_urls_are_checked() -> None:
    assert parse_replica_url("s3://bucket/a/b/").prefix == "a/b"
    assert parse_replica_url("s3://bucket").prefix == ""


@pytest.mark.parametrize(
    "bad",
    ["http://bucket/x", "s3://B/x", "s3://bucket/a//b", "s3://key:secret@bucket/x",
     "s3://bucket/../x", "s3://b/x"],
)  # fmt: skip
def test_bad_replica_urls_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="s3://"):
        parse_replica_url(bad)


def test_the_newest_generation_comes_first_with_its_chain_up_to_a_gap() -> None:
    names = [
        f"g000000000003-{SHA}.gen",
        f"g000000000004-{SHA}.gen",
        segment_object(4, 0, 10, SHA),
        segment_object(4, 10, 25, SHA),
        segment_object(4, 30, 40, SHA),  # after a gap: never used
        segment_object(3, 0, 5, SHA),
        "instance.json",
        "archive/g000000000009-" + SHA + ".gen",  # not a live name
        "notes.txt",
    ]
    plans = plans_newest_first(names)
    assert [p.generation.seq for p in plans] == [4, 3]
    assert [(s.start, s.end) for s in plans[0].segments] == [(0, 10), (10, 25)]
    assert plans[0].journal_bytes == 25
    assert parse_object(segment_object(1, 5, 5, SHA)) is None  # empty range: not ours


# --- push and read against the real server ----------------------------------------------------


async def test_push_uploads_the_files_and_a_reader_gets_the_same_conversation(
    workspace: Workspace, s3: S3Server
) -> None:
    store = store_of(workspace)
    store.save(Conversation(messages=messages(4)))
    store.append(messages(6)[4:])
    replica = replica_of(workspace, s3, store)
    try:
        first = await replica.push()
        assert first.generation == 1
        assert first.objects == 2
        store.append(messages(8)[6:])
        second = await replica.push()
        assert second.objects == 1, "only the journal's new records go up"
        assert (await replica.push()).objects == 0

        keys = s3.objects()
        prefix = f"team/ws1/{workspace.state_dir.name}/"
        assert all(k.startswith(prefix) for k in keys), keys
        names = [k[len(prefix) :] for k in keys]
        assert "instance.json" in names
        for name in names:
            parsed = parse_object(name)
            if parsed is not None:  # every object's name carries its own checksum
                import hashlib

                assert hashlib.sha256(s3.object_path(prefix + name).read_bytes()).hexdigest() == (
                    parsed.sha256
                )

        fresh = replica_of(workspace, s3, StateStore(workspace.state_dir / "elsewhere"))
        try:
            copy = await fresh.read_newest()
        finally:
            await fresh.close()
        assert copy.conversation is not None
        assert copy.conversation.messages == messages(8)
        assert copy.seq == 1
        assert copy.journal_records == 2
    finally:
        await replica.close()


async def test_generations_are_pruned_with_the_local_ones(
    workspace: Workspace, s3: S3Server
) -> None:
    store = store_of(workspace)
    store.save(Conversation(messages=messages(2)))
    replica = replica_of(workspace, s3, store)
    try:
        for n in range(3, 7):
            store.append(messages(n)[n - 1 :])
            store.compact()
            await replica.push()
        local = sorted(p.name for p in workspace.state_dir.glob("conversation-*.json"))
        remote = sorted(
            k.rsplit("/", 1)[1][:14] for k in s3.objects() if k.endswith(".gen")
        )  # "g000000000005-"
        assert [f"g{name[13:25]}-" for name in local] == remote
        copy = await replica.read_newest()
        assert copy.conversation is not None
        assert copy.conversation.messages == messages(6)
    finally:
        await replica.close()


async def test_a_truncated_object_is_never_taken(workspace: Workspace, s3: S3Server) -> None:
    """Damage the newest generation in the server's own directory: the reader says so and
    takes the previous generation with its journal, which still holds everything up to the
    compaction; damage a journal segment and the records before it are the state."""
    store = store_of(workspace)
    store.save(Conversation(messages=messages(3)))
    store.append(messages(5)[3:])
    replica = replica_of(workspace, s3, store)
    try:
        await replica.push()
        store.compact()
        store.append(messages(7)[5:])
        await replica.push()
        newest = next(k for k in s3.objects() if k.endswith(".gen") and "g000000000002" in k)
        path = s3.object_path(newest)
        path.write_bytes(path.read_bytes()[:-7])

        copy = await replica.read_newest()
        assert copy.conversation is not None
        assert copy.seq == 1
        assert copy.conversation.messages == messages(5)
        assert any("failed its checksum" in p for p in copy.problems), copy.problems

        segment = next(k for k in s3.objects() if k.endswith(".seg") and "j000000000001" in k)
        s3.object_path(segment).write_bytes(b"")
        copy = await replica.read_newest()
        assert copy.conversation is not None
        assert copy.conversation.messages == messages(3)
    finally:
        await replica.close()


async def test_a_replica_of_another_instance_is_never_read_or_written(
    workspace: Workspace, s3: S3Server
) -> None:
    store = store_of(workspace)
    store.save(Conversation(messages=messages(2)))
    replica = replica_of(workspace, s3, store)
    other = workspace.settings().instance.as_dict() | {"module_dir": "/home/other/.codex-module"}
    s3.object_path(replica.prefix + "instance.json").parent.mkdir(parents=True)
    s3.object_path(replica.prefix + "instance.json").write_text(json.dumps(other))
    try:
        with pytest.raises(ReplicaError, match="belongs to another instance"):
            await replica.push()
        assert [k.rsplit("/", 1)[1] for k in s3.objects()] == ["instance.json"]
        copy = await replica.read_newest()
        assert copy.conversation is None
        assert copy.foreign is not None
    finally:
        await replica.close()


async def test_wrong_credentials_and_a_missing_bucket_are_said_and_the_secret_is_not(
    workspace: Workspace, s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_of(workspace)
    store.save(Conversation(messages=messages(2)))
    before = sorted(p.name for p in workspace.state_dir.iterdir())
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-at-all-0000")
    replica = replica_of(workspace, s3, store)
    try:
        with pytest.raises(ReplicaError) as refused:
            await replica.push()
        assert "wrong secret key" in str(refused.value)
        assert "not-the-secret" not in str(refused.value)
    finally:
        await replica.close()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.env()["AWS_SECRET_ACCESS_KEY"])
    missing = replica_for(
        workspace.settings(replica="s3://no-such-bucket/x", replica_endpoint=s3.endpoint), store
    )
    assert missing is not None
    try:
        with pytest.raises(ReplicaError, match="the bucket does not exist"):
            await missing.push()
    finally:
        await missing.close()
    # Nothing local changed but the record status reads.
    after = sorted(p.name for p in workspace.state_dir.iterdir())
    assert [n for n in after if n != "replica.json"] == before
    record = json.loads((workspace.state_dir / "replica.json").read_text())
    assert record["ok"] is False
    assert "bucket does not exist" in record["error"]
    assert "not-the-secret" not in (workspace.state_dir / "replica.json").read_text()


async def test_a_server_that_is_down_is_an_error_not_a_hang(
    workspace: Workspace, s3: S3Server
) -> None:
    store = store_of(workspace)
    store.save(Conversation(messages=messages(2)))
    s3.kill()
    read = await read_for_restore(settings_for(workspace, s3), store, timeout_s=20)
    assert read is not None
    assert read.copy is None
    assert read.error is not None
    assert "cannot connect" in read.error


# --- restore's decision between the local copy and the replica ---------------------------------


async def pushed(ws: Workspace, server: S3Server, store: StateStore) -> None:
    replica = replica_of(ws, server, store)
    try:
        await replica.push()
    finally:
        await replica.close()


async def restore_with_replica(ws: Workspace, server: S3Server) -> RestoreReport:
    settings = settings_for(ws, server)
    reader = StateStore(ws.state_dir, max_bytes=settings.max_body_bytes, read_only=True)
    read = await read_for_restore(settings, reader, timeout_s=30)
    return await asyncio.to_thread(restore, settings, replica=lambda: read)


def other(n: int) -> tuple[Message, ...]:
    return messages(n, text="another conversation")


async def test_restore_takes_a_replica_that_extends_the_local_copy(
    workspace: Workspace, s3: S3Server
) -> None:
    store = store_of(workspace)
    store.save(Conversation(messages=messages(5)))
    await pushed(workspace, s3, store)
    shutil.rmtree(workspace.state_dir)  # an older volume: it holds only the first 3
    store_of(workspace).save(Conversation(messages=messages(3)))
    report = await restore_with_replica(workspace, s3)
    assert report.copy_used == "replica", report.summary()
    assert "it extends the local one (3 messages)" in report.summary()
    assert workspace.stored().messages == messages(5)
    assert len(json.loads(workspace.state_file.read_text())["messages"]) == 5


async def test_restore_keeps_a_local_copy_that_is_ahead(workspace: Workspace, s3: S3Server) -> None:
    store = store_of(workspace)
    store.save(Conversation(messages=messages(3)))
    await pushed(workspace, s3, store)
    store.append(messages(5)[3:])  # not uploaded yet
    report = await restore_with_replica(workspace, s3)
    assert report.copy_used == "local"
    assert "The replica is behind the sidecar copy (3 vs 5 messages)" in report.summary()
    assert workspace.stored().messages == messages(5)


@pytest.mark.parametrize("newer", ["replica", "local"])
async def test_diverging_copies_are_settled_by_generation_and_the_loser_is_archived(
    workspace: Workspace, s3: S3Server, newer: str
) -> None:
    """Neither copy extends the other: the later generation of the lineage wins, never a
    clock, and the other is archived whole in the state directory."""
    store = store_of(workspace)
    store.save(Conversation(messages=messages(4)))
    for _ in range(2 if newer == "replica" else 0):
        store.compact()
    await pushed(workspace, s3, store)  # the replica: generation 3 (or 1)
    shutil.rmtree(workspace.state_dir)
    local = store_of(workspace)
    local.save(Conversation(messages=other(2)))  # generation 1
    for _ in range(3 if newer == "local" else 0):
        local.compact()  # generation 4
    # `status` says beforehand what the restore then does, by the same rule.
    looked = StateStore(workspace.state_dir, read_only=True)
    loaded = looked.load()
    facts, _ = await describe_replica(
        settings_for(workspace, s3), looked, local_saved_at=loaded.saved_at
    )
    expected = "take the replica's copy" if newer == "replica" else "keep the local copy"
    assert facts["restore_would"].startswith(expected), facts
    report = await restore_with_replica(workspace, s3)
    assert len(list((workspace.state_dir / "archive").iterdir())) == 1, report.summary()
    archive = read_archive(
        workspace.state_dir, next((workspace.state_dir / "archive").iterdir()).name,
        max_bytes=1 << 20,
    )  # fmt: skip
    if newer == "replica":
        assert report.copy_used == "replica", report.summary()
        assert workspace.stored().messages == messages(4)
        assert archive.messages == other(2)
    else:
        assert report.copy_used == "local", report.summary()
        assert workspace.stored().messages == other(2)
        assert archive.messages == messages(4)


# --- the bucket follows the local lineage -------------------------------------------------------


async def test_another_lineage_in_the_bucket_is_archived_and_ours_numbered_past_it(
    workspace: Workspace, s3: S3Server
) -> None:
    """The bucket holds generation 3 of a conversation this directory never had (its restore
    could not reach the bucket): the push keeps it under archive/, renumbers the local copy
    past it, and a reader then gets the local conversation."""
    store = store_of(workspace)
    store.save(Conversation(messages=messages(4)))
    store.compact()
    store.compact()
    await pushed(workspace, s3, store)
    shutil.rmtree(workspace.state_dir)
    fresh = store_of(workspace)
    fresh.save(Conversation(messages=other(2)))
    replica = replica_of(workspace, s3, fresh)
    try:
        report = await replica.push()
        assert any("renumbered to generation 4" in note for note in report.notes), report.notes
        assert any("/archive/g000000000003-" in key for key in s3.objects())
        copy = await replica.read_newest()
        assert copy.conversation is not None
        assert copy.conversation.messages == other(2)
        assert copy.seq == 4
    finally:
        await replica.close()


async def test_a_journal_the_bucket_holds_differently_is_uploaded_again(
    workspace: Workspace, s3: S3Server
) -> None:
    """The volume went back to an older copy of the same generation and took new records
    since: at the next start, the bucket's segments past the common part are replaced."""
    store = store_of(workspace)
    store.save(Conversation(messages=messages(2)))
    store.append(messages(3)[2:])
    saved = (workspace.state_dir / "journal-000000000001.log").read_bytes()
    store.append(messages(5)[3:])
    await pushed(workspace, s3, store)
    (workspace.state_dir / "journal-000000000001.log").write_bytes(saved)
    back = store_of(workspace)
    back.load()
    back.append(
        (Message(id=3, role="agent", content="a different answer", time="2026-12-02T10:00:01Z"),)
    )
    replica = replica_of(workspace, s3, back)
    try:
        await replica.push()
        copy = await replica.read_newest()
        assert copy.conversation is not None
        assert copy.conversation.messages == back.conversation.messages  # type: ignore[union-attr]
        segments = [k for k in s3.objects() if k.endswith(".seg")]
        starts = [parse_object(k.rsplit("/", 1)[1]).start for k in segments]  # type: ignore[union-attr]
        assert len(starts) == len(set(starts)), f"stale segments left: {segments}"
    finally:
        await replica.close()


# --- the sidecar's uploader ---------------------------------------------------------------------


async def test_uploads_coalesce_and_a_failing_store_is_retried_until_it_is_back(
    workspace: Workspace, s3: S3Server
) -> None:
    """Twenty durable changes in a burst cost one or two uploads, not twenty; with the store
    down the uploader says so and retries on its own, and catches up once it is back."""
    store = store_of(workspace)
    store.save(Conversation(messages=messages(1)))
    replica = replica_of(workspace, s3, store)
    uploader = ReplicaUploader(replica, coalesce_s=0.3)
    running = asyncio.create_task(uploader.run())
    try:
        await wait_until(lambda: uploader.pushes == 1)  # the catch-up at start
        for n in range(2, 22):
            store.append(messages(n)[n - 1 :])
            uploader.wake()
            await asyncio.sleep(0.01)
        await wait_until(lambda: uploader.pushes in (2, 3) and uploader.pending_since is None)
        copy = await replica.read_newest()
        assert copy.conversation is not None
        assert len(copy.conversation.messages) == 21
        assert uploader.pushes in (2, 3)

        s3.kill()
        store.append(messages(22)[21:])
        uploader.wake()
        await wait_until(lambda: uploader.failures == 2, within=10)  # 1 s, then 2 s
        assert uploader.ok is False
        assert "cannot connect" in str(uploader.error)
        s3.start()
        await wait_until(lambda: uploader.ok is True, within=15)
        copy = await replica.read_newest()
        assert copy.conversation is not None
        assert len(copy.conversation.messages) == 22
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await replica.close()


async def wait_until(check: Callable[[], bool], *, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.02)


async def test_a_journal_uploaded_in_many_pushes_is_read_in_a_few_requests(
    workspace: Workspace, s3: S3Server
) -> None:
    """Sixty pushes of one record each: the bucket keeps a handful of segments (merged as a
    binary counter), so a restore reads a few objects, not sixty, and gets every record."""
    store = store_of(workspace)
    store.save(Conversation(messages=messages(1)))
    replica = replica_of(workspace, s3, store)
    sent = 0
    try:
        for n in range(2, 62):
            store.append(messages(n)[n - 1 :])
            sent += (await replica.push()).bytes
        segments = [k for k in s3.objects() if k.endswith(".seg")]
        assert len(segments) <= 7, segments  # log2(60) + 1
        copy = await replica.read_newest()
        assert copy.conversation is not None
        assert copy.conversation.messages == messages(61)
        journal = (workspace.state_dir / "journal-000000000001.log").stat().st_size
        generation = (workspace.state_dir / "conversation-000000000001.json").stat().st_size
        assert sent - generation <= 8 * journal, "each record is sent again about log2(n) times"
    finally:
        await replica.close()

"""StateStore on real files: generations, the journal, corruption, real write faults, crashes."""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import signal
import stat
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agentapi_persist.errors import DurabilityError, StateFileError
from agentapi_persist.models import Conversation, Message
from agentapi_persist.store import StateStore

TIME = "2025-01-02T03:04:05.123456789Z"


def msg(i: int, content: str | None = None, *, role: str | None = None) -> Message:
    return Message(
        id=i,
        role=role or ("user" if i % 2 == 0 else "agent"),  # type: ignore[arg-type]
        content=f"message {i}" if content is None else content,
        time=TIME,
    )


def of(*messages: Message, **prompt) -> Conversation:
    return Conversation(messages=messages, **prompt)


def conv(n: int, **prompt) -> Conversation:
    return of(*(msg(i) for i in range(n)), **prompt)


def gen(directory: Path, seq: int) -> Path:
    return directory / f"conversation-{seq:012d}.json"


def journal(directory: Path, seq: int) -> Path:
    return directory / f"journal-{seq:012d}.log"


def names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(directory: Path) -> StateStore:
    store = StateStore(directory)
    store.load()
    return store


@contextmanager
def file_size_limit(limit: int):
    """A real write fault in this process: files may not grow past ``limit`` bytes (EFBIG).

    Only the soft limit is lowered, so it can be restored; SIGXFSZ is ignored meanwhile so the
    kernel reports EFBIG instead of killing the test process.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


class TestGenerations:
    def test_nothing_stored(self, directory):
        """A missing directory is "nothing stored yet", not an error."""
        report = StateStore(directory).load()
        assert report.conversation is None
        assert report.seq is None
        assert report.problems == ()
        assert not directory.exists()

    def test_roundtrip(self, directory, store):
        """What is saved loads back equal, with its prompt fields."""
        original = conv(
            5, initial_prompt="do it", initial_prompt_sent=True, prompt_origin="agentapi_state"
        )
        saved = store.save(original)
        assert saved.kind == "generation"
        assert saved.seq == 1
        assert saved.path == gen(directory, 1)
        assert saved.bytes_written == gen(directory, 1).stat().st_size
        report = StateStore(directory).load()
        assert report.conversation == original
        assert report.seq == 1
        assert report.journal_records == 0
        assert report.saved_at is not None
        assert report.problems == ()

    def test_file_format(self, directory, store):
        """Header line (format, version, seq, length, sha256) then exactly the body."""
        store.save(conv(2))
        data = gen(directory, 1).read_bytes()
        header_line, body = data.split(b"\n", 1)
        header = json.loads(header_line)
        assert header["format"] == "agentapi-persist"
        assert header["format_version"] == 1
        assert header["seq"] == 1
        assert header["length"] == len(body)
        assert header["sha256"] == hashlib.sha256(body).hexdigest()
        assert header["saved_at"].endswith("Z")
        assert Conversation.model_validate_json(body) == conv(2)

    def test_private_modes_under_open_umask(self, directory):
        """Directory 0700 and files 0600 whatever the umask, re-asserted on later writes."""
        old = os.umask(0)
        try:
            store = StateStore(directory)
            store.load()
            store.save(conv(1))
            store.append([msg(1)])
            assert mode_of(directory) == 0o700
            assert mode_of(gen(directory, 1)) == 0o600
            assert mode_of(journal(directory, 1)) == 0o600
            directory.chmod(0o755)  # someone's choice: kept (status reports it)
            store.append([msg(2)])
            assert mode_of(directory) == 0o755
        finally:
            os.umask(old)

    def test_keeps_two_generations(self, directory, store):
        """After several saves only the newest two generations (and their journals) remain."""
        for n in range(1, 5):
            store.save(conv(n))
            store.append([msg(n)])
        assert names(directory) == [
            "conversation-000000000003.json",
            "conversation-000000000004.json",
            "journal-000000000003.log",
            "journal-000000000004.log",
        ]

    def test_never_goes_back_to_an_older_generation(self, directory, store):
        """A newer valid generation wins even when an older one holds more messages."""
        store.save(conv(3))
        store.save(conv(1), allow_shrink=True)
        assert StateStore(directory).load().conversation == conv(1)

    def test_shrink_refused(self, directory, store):
        """Saving fewer messages than stored is refused and the stored copy is kept."""
        store.save(conv(3))
        with pytest.raises(StateFileError, match=r"refused to save 2 messages over the 3.*kept"):
            store.save(conv(2))
        assert names(directory) == ["conversation-000000000001.json"]
        assert store.conversation == conv(3)
        assert StateStore(directory).load().conversation == conv(3)

    def test_shrink_refused_without_prior_load(self, directory):
        """A fresh store reads what is on disk before deciding a save would shrink it."""
        first = StateStore(directory)
        first.load()
        first.save(conv(4))
        with pytest.raises(StateFileError, match="refused"):
            StateStore(directory).save(conv(1))

    def test_unvalidated_ids_refused(self, directory, store):
        """A conversation built without validation and with id gaps is never written."""
        broken = Conversation.model_construct(messages=(msg(0), msg(2)))
        with pytest.raises(ValueError, match="found id 2 at 1"):
            store.save(broken)
        assert not directory.exists()

    def test_sizes_for_compaction_decisions(self, directory, store):
        """generation_bytes and journal_bytes give the caller what it needs to compact."""
        saved = store.save(conv(3))
        appended = store.append([msg(3)])
        assert store.generation_bytes == saved.bytes_written
        assert store.journal_bytes == appended.bytes_written
        fresh = StateStore(directory)
        fresh.load()
        assert (fresh.generation_bytes, fresh.journal_bytes) == (
            saved.bytes_written,
            appended.bytes_written,
        )

    def test_over_cap_refused(self, directory):
        """A generation that could not be read back under max_bytes is not written."""
        store = StateStore(directory, max_bytes=2048)
        store.load()
        store.save(conv(1))
        with pytest.raises(StateFileError, match="over the 2048-byte cap"):
            store.save(of(msg(0, "x" * 5000)))
        assert StateStore(directory, max_bytes=2048).load().conversation == conv(1)

    def test_stale_temp_files_are_cleaned_after_a_while(self, directory, store):
        """Temps left by a killed writer go once they are old; a fresh one is left alone."""
        store.save(conv(1))
        old = directory / ".conversation-000000000009.json.0123abcd.tmp"
        fresh = directory / ".conversation-000000000010.json.4567abcd.tmp"
        old.write_bytes(b"partial")
        fresh.write_bytes(b"partial")
        an_hour_ago = time.time() - 3600
        os.utime(old, (an_hour_ago, an_hour_ago))
        store.save(conv(2))
        assert not old.exists()
        assert fresh.exists()


def corrupt_truncate(data: bytes) -> bytes:
    return data[:-7]


def corrupt_bit_flip(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[-20] ^= 0x04
    return bytes(flipped)


def corrupt_zero_fill(data: bytes) -> bytes:
    return b"\x00" * len(data)


def corrupt_sha(data: bytes) -> bytes:
    header, body = data.split(b"\n", 1)
    fields = json.loads(header)
    fields["sha256"] = hashlib.sha256(b"something else").hexdigest()
    return json.dumps(fields, separators=(",", ":")).encode() + b"\n" + body


def corrupt_version(data: bytes) -> bytes:
    header, body = data.split(b"\n", 1)
    fields = json.loads(header)
    fields["format_version"] = 2
    return json.dumps(fields, separators=(",", ":")).encode() + b"\n" + body


def corrupt_empty(data: bytes) -> bytes:
    return b""


class TestCorruption:
    @pytest.mark.parametrize(
        ("damage", "reason"),
        [
            (corrupt_truncate, "torn"),
            (corrupt_bit_flip, "checksum mismatch"),
            (corrupt_zero_fill, "no header line"),
            (corrupt_sha, "checksum mismatch"),
            (corrupt_version, "format_version 2"),
            (corrupt_empty, "no header line"),
        ],
        ids=["truncated", "bit-flip", "zero-fill", "wrong-sha", "wrong-version", "empty"],
    )
    def test_corrupt_newest_falls_back_to_previous(self, directory, store, damage, reason):
        """The previous generation plus its journal is used; the bad bytes are moved aside
        intact, its journal with them, and the problem is reported."""
        store.save(conv(2))
        store.append([msg(2), msg(3)])  # journal 1: the previous generation's changes
        store.save(conv(5))
        store.append([msg(5)])
        bad = damage(gen(directory, 2).read_bytes())
        gen(directory, 2).write_bytes(bad)
        bad_journal = journal(directory, 2).read_bytes()

        with capture_logs() as logs:
            report = StateStore(directory).load()

        assert report.seq == 1
        assert report.conversation == conv(4)
        assert report.journal_records == 1
        assert len(report.quarantined) == 2
        moved_gen, moved_journal = report.quarantined
        assert moved_gen.name.startswith("conversation-000000000002.json.corrupt-")
        assert moved_gen.read_bytes() == bad
        assert moved_journal.name.startswith("journal-000000000002.log.corrupt-")
        assert moved_journal.read_bytes() == bad_journal
        assert not gen(directory, 2).exists()
        assert any(reason in problem and "generation 2" in problem for problem in report.problems)
        assert any(e["event"] == "store.quarantined" for e in logs)

    def test_next_save_after_fallback_uses_a_fresh_seq(self, directory, store):
        """After a fallback, new generations and journals never mix with the quarantined ones."""
        store.save(conv(1))
        store.save(conv(2))
        gen(directory, 2).write_bytes(b"junk")
        fresh = StateStore(directory)
        assert fresh.load().seq == 1
        fresh.append([msg(1), msg(2)])
        fresh.save(conv(4))
        report = StateStore(directory).load()
        assert report.conversation == conv(4)
        assert report.seq is not None
        assert report.seq > 1
        assert report.problems == ()

    def test_every_generation_corrupt(self, directory, store):
        """Nothing usable: no conversation, every file moved aside, each one reported."""
        store.save(conv(1))
        store.save(conv(2))
        gen(directory, 1).write_bytes(b"x")
        gen(directory, 2).write_bytes(b"y")
        report = StateStore(directory).load()
        assert report.conversation is None
        assert len(report.quarantined) == 2
        assert len(report.problems) == 2
        assert [p.read_bytes() for p in sorted(report.quarantined)] == [b"x", b"y"]

    def test_foreign_journal_is_not_replayed(self, directory, store):
        """A journal bound to other generation bytes is moved aside, never applied."""
        store.save(conv(2))
        store.append([msg(2)])
        foreign = journal(directory, 1).read_bytes()
        store.save(conv(2), allow_shrink=True)  # generation 2, same messages, other bytes
        gen2 = StateStore(directory)
        gen2.load()
        assert gen2.seq == 2
        journal(directory, 2).write_bytes(foreign)  # seq 1's journal planted as seq 2's
        report = StateStore(directory).load()
        assert report.conversation == conv(2)
        assert report.journal_records == 0
        assert any("does not belong" in problem for problem in report.problems)


class TestJournal:
    def test_append_then_load_replays(self, directory, store):
        """Appended messages come back on load, applied over the generation."""
        store.save(conv(2))
        first = store.append([msg(2)])
        store.append([msg(3), msg(4)])
        assert first.kind == "journal"
        assert first.path == journal(directory, 1)
        report = StateStore(directory).load()
        assert report.conversation == conv(5)
        assert report.seq == 1
        assert report.journal_records == 2
        assert store.conversation == conv(5)
        assert store.journal_bytes == journal(directory, 1).stat().st_size

    def test_append_cost_is_the_change(self, directory, store):
        """A new message costs about its own size: the generation is not rewritten."""
        big = of(*(msg(i, "y" * 100_000) for i in range(20)))
        store.save(big)
        before = os.stat(gen(directory, 1))
        report = store.append([msg(20, "short reply")])
        after = os.stat(gen(directory, 1))
        assert report.bytes_written < 400
        assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
            before.st_ino,
            before.st_mtime_ns,
            before.st_size,
        )

    def test_growing_last_agent_message_is_replaced(self, directory, store):
        """Repeated upserts of the last id replace it; load sees only the latest text."""
        store.save(conv(2))
        for text in ("Th", "Thinking", "Thinking... done."):
            store.append([msg(1, text)])
        expected = of(msg(0), msg(1, "Thinking... done."))
        assert store.conversation == expected
        report = StateStore(directory).load()
        assert report.conversation == expected
        assert report.journal_records == 3

    def test_a_message_that_grows_costs_what_it_gained(self, directory, store):
        """A 1 MB last message that gains 1 KB is recorded as the 1 KB (``delta``), and a load
        rebuilds it exactly; a rewrite, a shrink or a new role is recorded whole."""
        big = "x" * (1 << 20)
        store.save(of(msg(0), msg(1, big)))
        sizes = []
        text = big
        for step in range(5):
            text += f" line {step} ─ ✓\n" * 64
            sizes.append(store.append([msg(1, text)]).bytes_written)
        assert max(sizes) < 2_000, sizes  # the gain plus the record's own fields
        grown = of(msg(0), msg(1, text))
        assert store.conversation == grown
        assert StateStore(directory).load().conversation == grown
        lines = journal(directory, 1).read_bytes().splitlines()
        assert [json.loads(line[9:])["op"] for line in lines[1:]] == ["delta"] * 5

        rewritten = "y" + text[1:]  # same length class, not a growth: whole
        shrunk = text[:100]
        for content, role in ((rewritten, None), (shrunk, None), (shrunk + "z", "user")):
            report = store.append([msg(1, content, role=role)])
            last = json.loads(journal(directory, 1).read_bytes().splitlines()[-1][9:])
            assert last["op"] == "update", last["op"]
            assert report.bytes_written > len(content)
        final = of(msg(0), msg(1, shrunk + "z", role="user"))
        assert StateStore(directory).load().conversation == final

    def test_a_growth_that_does_not_fit_its_message_stops_the_replay(self, directory, store):
        """A ``delta`` record whose ``from`` is not its message's length cannot apply: replay
        stops there, keeps what came before, and says so (never a spliced message)."""
        store.save(conv(2))
        store.append([msg(1, "message 1 and more")])
        path = journal(directory, 1)
        lines = path.read_bytes().splitlines(keepends=True)
        record = json.loads(lines[1][9:])
        assert record["grow"][0]["from"] == len("message 1")
        record["grow"][0]["from"] = 3
        payload = json.dumps(record, separators=(",", ":")).encode()
        lines[1] = b"%08x " % zlib.crc32(payload) + payload + b"\n"
        path.write_bytes(b"".join(lines))
        report = StateStore(directory).load()
        assert report.conversation == conv(2)
        assert any("grows message 1 from 3 characters" in p for p in report.problems), (
            report.problems
        )

    def test_unchanged_updates_write_nothing(self, directory, store):
        """Re-sent messages equal to the stored ones (a reconnect replay) cost no write."""
        store.save(conv(3))
        report = store.append([msg(0), msg(1), msg(2)])
        assert report.bytes_written == 0
        assert not journal(directory, 1).exists()

    def test_gap_refused(self, directory, store):
        """An id past the end would leave a hole: refused, nothing written."""
        store.save(conv(2))
        with pytest.raises(ValueError, match="gap"):
            store.append([msg(3)])
        assert not journal(directory, 1).exists()
        assert store.conversation == conv(2)

    def test_append_without_load_refused(self, directory):
        """append() needs to know what is stored first."""
        with pytest.raises(RuntimeError, match=r"load\(\) or save\(\)"):
            StateStore(directory).append([msg(0)])

    def test_append_when_nothing_stored_writes_a_generation(self, directory, store):
        """The first change ever becomes generation 1 (there is nothing to journal onto)."""
        report = store.append([msg(0), msg(1)])
        assert report.kind == "generation"
        assert StateStore(directory).load().conversation == conv(2)

    def test_prompt_fields_are_journaled(self, directory, store):
        """Prompt fields change through the journal and survive a reload."""
        store.save(conv(1))
        with_prompt = conv(
            1, initial_prompt="build it", initial_prompt_sent=True, prompt_origin="agentapi_state"
        )
        store.append([], prompt=with_prompt)
        report = StateStore(directory).load()
        assert report.conversation == with_prompt
        assert report.journal_records == 1

    def test_compact_folds_the_journal(self, directory, store):
        """compact() writes the in-memory copy as a new generation with an empty journal."""
        store.save(conv(1))
        store.append([msg(1)])
        report = store.compact()
        assert report.kind == "generation"
        assert report.seq == 2
        assert store.journal_bytes == 0
        loaded = StateStore(directory).load()
        assert loaded.conversation == conv(2)
        assert loaded.journal_records == 0

    def test_torn_last_line_dropped_then_cut_away(self, directory, store):
        """A torn last record is ignored and reported; the next append cuts it off first."""
        store.save(conv(1))
        store.append([msg(1)])
        store.append([msg(2)])
        store.append([msg(3)])
        data = journal(directory, 1).read_bytes()
        torn = data[:-15]
        journal(directory, 1).write_bytes(torn)
        good = data[: data.rindex(b"\n", 0, len(data) - 1) + 1]

        reader = StateStore(directory)
        with capture_logs() as logs:
            report = reader.load()
        assert report.conversation == conv(3)
        assert report.journal_records == 2
        assert any("torn last line" in problem for problem in report.problems)
        assert [e["event"] for e in logs if e["event"] == "store.journal_torn"] == [
            "store.journal_torn"
        ]
        assert journal(directory, 1).read_bytes() == torn  # loading changes nothing

        appended = reader.append([msg(3, "redone")])
        assert journal(directory, 1).read_bytes()[: len(good)] == good
        assert journal(directory, 1).stat().st_size == len(good) + appended.bytes_written
        again = StateStore(directory).load()
        assert again.problems == ()
        assert again.conversation == of(*conv(3).messages, msg(3, "redone"))
        assert [p for p in os.listdir(directory) if "corrupt" in p] == []

    def test_bad_record_in_the_middle_keeps_the_rest_aside(self, directory, store):
        """A bad complete record stops replay; later lines are copied aside before the cut."""
        store.save(conv(1))
        for i in (1, 2, 3):
            store.append([msg(i)])
        lines = journal(directory, 1).read_bytes().splitlines(keepends=True)
        damaged = bytearray(lines[2])
        damaged[20] ^= 0x01  # the second update record: its crc no longer matches
        lines[2] = bytes(damaged)
        journal(directory, 1).write_bytes(b"".join(lines))
        tail = b"".join(lines[2:])

        reader = StateStore(directory)
        report = reader.load()
        assert report.conversation == conv(2)
        assert any("crc mismatch" in problem for problem in report.problems)
        reader.append([msg(2, "again")])
        aside = [directory / name for name in os.listdir(directory) if "corrupt" in name]
        assert len(aside) == 1
        assert aside[0].read_bytes() == tail
        assert StateStore(directory).load().conversation == of(msg(0), msg(1), msg(2, "again"))

    def test_logs_are_events(self, directory, store):
        """Saves, appends and loads emit their stable event names with facts as fields."""
        with capture_logs() as logs:
            store.save(conv(1))
            store.append([msg(1)])
            StateStore(directory).load()
        events = {e["event"]: e for e in logs}
        assert events["store.saved"]["seq"] == 1
        assert events["store.appended"]["messages"] == 1
        assert events["store.loaded"]["journal_records"] == 1


class TestWriteFaults:
    """Real EFBIG from RLIMIT_FSIZE: nothing in memory or on disk changes, nothing is lost."""

    def test_failed_save_keeps_everything(self, directory, store):
        """A generation that cannot be written leaves the previous one and the in-memory copy."""
        store.save(conv(2))
        store.append([msg(2)])
        before = names(directory)
        big = of(*conv(3).messages, msg(3, "z" * 200_000))
        with file_size_limit(100_000), pytest.raises(DurabilityError, match="EFBIG"):
            store.save(big)
        assert store.conversation == conv(3)
        assert names(directory) == before
        assert StateStore(directory).load().conversation == conv(3)

    def test_failed_append_then_next_append_writes_a_generation(self, directory, store):
        """After a failed journal write the next change is written whole, as a generation."""
        store.save(conv(1))
        store.append([msg(1, "a" * 3000)])
        size = journal(directory, 1).stat().st_size
        with file_size_limit(size), pytest.raises(DurabilityError, match="append"):
            store.append([msg(2)])
        assert store.conversation == of(msg(0), msg(1, "a" * 3000))
        assert journal(directory, 1).stat().st_size == size

        report = store.append([msg(2)])
        assert report.kind == "generation"
        expected = of(msg(0), msg(1, "a" * 3000), msg(2))
        assert StateStore(directory).load().conversation == expected


class TestAsync:
    async def test_wrappers(self, directory):
        """The async wrappers do the same work from an event loop."""
        store = StateStore(directory)
        assert (await store.aload()).conversation is None
        assert (await store.asave(conv(1))).kind == "generation"
        assert (await store.aappend([msg(1)])).kind == "journal"
        assert (await store.acompact()).seq == 2
        assert (await StateStore(directory).aload()).conversation == conv(2)


# The crash-point test. A zygote process imports everything once, then for each trial forks a
# writer that saves and appends in a loop, SIGKILLs it after a random delay and reports the last
# step the writer had acknowledged. State k is a pure function of k, so the test can check that
# what loads is exactly state K (acknowledged) or K+1 (done but not yet acknowledged).
CRASH_MODEL = """
from agentapi_persist.models import Conversation, Message

TIME = "2025-01-02T03:04:05.123456789Z"


def state(k):
    count = k // 5 + 1
    messages = [
        Message(id=i, role="user" if i % 2 == 0 else "agent", content=f"m{i} final", time=TIME)
        for i in range(count - 1)
    ]
    size = (k * 7919) % 120_000
    last = f"step {k}|" + "x" * size
    messages.append(Message(id=count - 1, role="agent", content=last, time=TIME))
    sent = k >= 3
    return Conversation(messages=messages, initial_prompt="p", initial_prompt_sent=sent,
                        prompt_origin="agentapi_state")


def step_of(conversation):
    if conversation is None:
        return 0
    return int(conversation.messages[-1].content.split("|", 1)[0].split()[1])
"""

CRASH_ZYGOTE = """
import logging, os, signal, sys, time
from pathlib import Path
import structlog
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
from agentapi_persist.store import StateStore
from crash_model import state, step_of

directory = Path(sys.argv[1])


def writer(ack):
    store = StateStore(directory)
    k = step_of(store.load().conversation)
    while True:
        k += 1
        target = state(k)
        if k % 7 == 0:
            store.save(target)
        else:
            store.append(target.messages[-2:], prompt=target)
        os.write(ack, b"%d\\n" % k)


for line in sys.stdin:
    delay = int(line) / 1_000_000
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            writer(w)
        finally:
            os._exit(1)
    os.close(w)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    acked = b""
    while chunk := os.read(r, 65536):
        acked += chunk
    os.close(r)
    steps = acked.split()
    print(int(steps[-1]) if steps else -1, os.WIFSIGNALED(status), flush=True)
"""


@pytest.mark.faults
def test_sigkill_at_random_moments_never_loses_or_corrupts(tmp_path):
    """Killed at ~100 random points mid-save or mid-append, every survivor loads as exactly the
    last acknowledged state or the one after it, never an error and never a quarantine."""
    (tmp_path / "crash_model.py").write_text(CRASH_MODEL)
    (tmp_path / "zygote.py").write_text(CRASH_ZYGOTE)
    namespace: dict[str, object] = {}
    exec(compile(CRASH_MODEL, "crash_model", "exec"), namespace)
    state, step_of = namespace["state"], namespace["step_of"]
    directory = tmp_path / "state"
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "PYTHONDONTWRITEBYTECODE": "1"}
    rng = random.Random(20250102)
    loaded_step = 0
    with subprocess.Popen(
        [sys.executable, str(tmp_path / "zygote.py"), str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
        bufsize=1,
    ) as zygote:
        assert zygote.stdin is not None
        assert zygote.stdout is not None
        for _trial in range(100):
            zygote.stdin.write(f"{rng.randrange(0, 25_000)}\n")
            acked_text, killed = zygote.stdout.readline().split()
            assert killed == "True"
            acked = int(acked_text)
            base = acked if acked >= 0 else loaded_step
            report = StateStore(directory).load()
            assert report.quarantined == ()
            step = step_of(report.conversation)  # type: ignore[operator]
            assert step in (base, base + 1), (step, base)
            if step:
                assert report.conversation == state(step)  # type: ignore[operator]
            loaded_step = step
        zygote.stdin.close()
        assert zygote.wait(timeout=30) == 0
    assert loaded_step >= 10  # the writers made real progress across the trials


def test_read_only_store_reports_but_moves_nothing(tmp_path: Path) -> None:
    """A read-only look (status) reports a corrupt generation but leaves every byte in place."""
    writer = StateStore(tmp_path)
    writer.save(Conversation(messages=tuple(_ro_messages(3))))
    writer.save(Conversation(messages=tuple(_ro_messages(4))))
    newest = max(tmp_path.glob("conversation-*.json"))
    newest.write_bytes(newest.read_bytes()[:-5])
    before = sorted(p.name for p in tmp_path.iterdir())
    report = StateStore(tmp_path, read_only=True).load()
    assert report.conversation is not None
    assert len(report.conversation.messages) == 3
    assert any("left in place" in p for p in report.problems)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with pytest.raises(RuntimeError, match="read-only"):
        StateStore(tmp_path, read_only=True).save(Conversation())


def _ro_messages(n: int) -> list[Message]:
    return [
        Message(
            id=i,
            role="user" if i % 2 == 0 else "agent",
            content=f"m{i}",
            time="2025-01-02T03:04:05Z",
        )
        for i in range(n)
    ]


def test_a_journal_that_grew_beside_the_store_is_never_cut_back(tmp_path: Path) -> None:
    """Two stores on one directory (what the lock prevents; here, no lock): the second
    appends after the first loaded. The first's next append refuses instead of cutting the
    other's record, and its change then goes into a whole new generation; every record the
    other wrote is still on disk."""
    messages = [Message(id=i, role="user", content=f"m{i}", time=TIME) for i in range(5)]
    StateStore(tmp_path).save(Conversation(messages=tuple(messages[:3])))
    first, second = StateStore(tmp_path), StateStore(tmp_path)
    first.load()
    second.load()
    second.append([messages[3]])
    journal = tmp_path / "journal-000000000001.log"
    theirs = journal.read_bytes()
    with pytest.raises(DurabilityError, match="another process wrote to it"):
        first.append([messages[3].model_copy(update={"content": "other"})])
    assert journal.read_bytes() == theirs
    report = first.append([messages[3].model_copy(update={"content": "other"})])
    assert report.kind == "generation"
    assert journal.read_bytes() == theirs


@pytest.mark.parametrize("count", [0, 1, 1999, 2000, 2001, 4500])
def test_bodies_serialised_in_batches_are_the_bytes_of_one_call(count: int) -> None:
    """Generations and AgentAPI's file are written a batch of messages at a time (no call may
    hold the interpreter lock long under the stop's watchdog); the bytes are exactly what one
    call writes, across batch boundaries and with a prompt that mentions the messages key."""
    from pydantic_core import to_json

    from agentapi_persist.agentapi_state import render_agentapi_state
    from agentapi_persist.generation_body import CONVERSATION_ADAPTER as _CONVERSATION
    from agentapi_persist.generation_body import conversation_body as _conversation_body

    messages = tuple(
        Message(id=i, content=f'm{i} ─ "messages":[]', role=("user", "agent")[i % 2], time=TIME)
        for i in range(count)
    )
    conversation = Conversation(
        messages=messages, initial_prompt='"messages":[]', initial_prompt_sent=True
    )
    assert _conversation_body(conversation) == _CONVERSATION.dump_json(conversation)
    document = {
        "version": 1,
        "messages": [
            {"id": m.id, "message": m.content, "role": m.role, "time": m.time} for m in messages
        ],
        "initial_prompt": '"messages":[]',
        "initial_prompt_sent": True,
    }
    assert render_agentapi_state(conversation) == to_json(document) + b"\n"


@pytest.mark.parametrize("count", [1, 1999, 2000, 2001, 4500])
def test_a_big_generation_loads_exactly_whatever_its_text_holds(tmp_path: Path, count: int) -> None:
    """Bodies over 1 MiB are parsed a batch of messages at a time, split where one message
    object ends and the next begins; text that spells such a place (escaped, as JSON must)
    and batch boundaries change nothing in what loads."""
    size = max(2_000_000 // count, 10)
    tricky = '},{"id":7,"role":"user"}],"initial_prompt":"x" ─ '
    messages = tuple(
        Message(
            id=i,
            role=("user", "agent")[i % 2],
            content=f"{i} {tricky}" + "y" * size,
            time=TIME,
        )
        for i in range(count)
    )
    saved = Conversation(messages=messages, initial_prompt=tricky, initial_prompt_sent=True)
    StateStore(tmp_path).save(saved)
    assert gen(tmp_path, 1).stat().st_size > (1 << 20)
    report = StateStore(tmp_path).load()
    assert report.problems == ()
    assert report.conversation == saved

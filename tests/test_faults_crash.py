"""Crash points: nothing durable is ever lost, whenever the writer dies.

Two kinds of evidence, both checked against the same invariants (every survivor loads as the
old or the new state, never an error, never older than the last save the writer was told
was durable; generations never go backwards; bad bytes are moved aside, never deleted; temp
files do not pile up):

1. **SIGKILL at hundreds of moments**: a separate writer process saves 5-30 MB generations,
   appends to the journal and compacts, rewrites AgentAPI's state file, or runs ``restore``,
   and is SIGKILLed after a random delay (seeded: ``SEED``).
2. **Power loss at each step of the write protocol, in-process**: the real write runs, and
   before each file-system call it makes (after the temp write, after its fsync, after the
   rename, before the directory fsync, ...) every directory a power loss could leave is built
   (unsynced data kept, dropped, torn or garbled; directory changes kept or lost) and loaded.

Rerun: ``.venv/bin/pytest tests/test_faults_crash.py -m faults -s`` (``-s`` prints the counts).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from agentapi_persist.agentapi_state import (
    read_agentapi_state,
    render_agentapi_state,
    write_agentapi_state,
)
from agentapi_persist.config import Settings
from agentapi_persist.errors import StateFileError
from agentapi_persist.models import Conversation, Message
from agentapi_persist.ownership import INSTANCE_NAME
from agentapi_persist.restoring import restore
from agentapi_persist.store import StateStore

from . import evidence
from .conftest import make_messages
from .faults_support import (
    MB,
    Image,
    KillClock,
    PowerLossRecorder,
    Zygote,
    age,
    big_state,
    bytes_kept,
    journal_state,
    materialize,
    step_of,
    temp_files,
)

pytestmark = pytest.mark.faults

#: One seed for every random choice in this file (kill delays, cut points, garbage bytes).
SEED = 20251124
STALE_S = 600  # older than the 300 s after which the product sweeps its own temp files


def report(title: str, stats: Counter[str]) -> None:
    """Record what happened for the reliability notes (printed at the end of every run)."""
    evidence.record(title, stats, seed=str(SEED))


def loaded(directory: Path) -> tuple[Conversation | None, int]:
    result = StateStore(directory).load()
    assert result.quarantined == (), result.problems
    return result.conversation, result.seq or 0


# -- 1. SIGKILL at random moments --------------------------------------------------------------


@pytest.mark.timeout(240)
def test_sigkill_during_5_to_30_mb_saves(tmp_path: Path) -> None:
    """100 kills while 5-30 MB generations are saved: every survivor loads as exactly the last
    acknowledged state or the one after it, without a problem, and its generation number never
    goes down. A killed save leaves at most one temp file, swept by a later save."""
    directory = tmp_path / "state"
    clock = KillClock(random.Random(SEED), span=2.5)
    stats: Counter[str] = Counter()
    last_step = last_seq = 0
    with Zygote("generations", directory) as zygote:
        for _ in range(100):
            before = set(temp_files(directory))
            trial = zygote.trial(clock.next())
            clock.learn(trial)
            assert trial.ready
            assert trial.killed
            acked = [int(a) for a in trial.acks]
            base = acked[-1] if acked else last_step
            result = StateStore(directory).load()
            assert (result.problems, result.quarantined) == ((), ())
            conversation, seq = result.conversation, result.seq or 0
            step = step_of(conversation.messages if conversation else None)
            assert step in (base, base + 1), (step, base, trial)
            if step:
                assert conversation == big_state(step)
            assert seq >= last_seq
            temps = set(temp_files(directory))
            assert len(temps - before) <= 1
            if acked:  # a save completed: it swept the stale temps of earlier kills
                assert not (before & temps), before & temps
            age([directory / name for name in temps], STALE_S)
            stats["kills"] += 1
            stats["saves_acked"] += len(acked)
            stats["killed_mid_write"] += len(temps - before)
            stats["survivor_new_unacked"] += step == base + 1
            if conversation is not None:
                size_mb = len(conversation.messages) * 16 // 1024
                stats[f"survivor_size_{size_mb // 5 * 5:02d}-{size_mb // 5 * 5 + 4:02d}MB"] += 1
            last_step, last_seq = step, seq
    report("generations 5-30 MB", stats)
    assert stats["saves_acked"] >= 30  # the writers made real progress
    assert stats["killed_mid_write"] >= 5  # and kills did land in the middle of saves


@pytest.mark.timeout(240)
def test_sigkill_during_journal_appends_and_compactions(tmp_path: Path) -> None:
    """120 kills while a 10 MB conversation gets journal appends and, every fourth step, a
    compaction: survivors are the acknowledged state or the next, a torn journal tail is the
    only problem ever reported (and is ignored), and generations never go backwards."""
    directory = tmp_path / "state"
    StateStore(directory).save(journal_state(0))
    clock = KillClock(random.Random(SEED + 1), span=12, initial_us=20_000)  # ~3 compactions
    stats: Counter[str] = Counter()
    last_step = 0
    last_seq = 1
    with Zygote("journal", directory) as zygote:
        for _ in range(120):
            before = set(temp_files(directory))
            trial = zygote.trial(clock.next())
            clock.learn(trial)
            assert trial.ready
            assert trial.killed
            acked = [int(a) for a in trial.acks if not a.startswith("c")]
            compactions = [a for a in trial.acks if a.startswith("c")]
            base = acked[-1] if acked else last_step
            result = StateStore(directory).load()
            assert result.quarantined == ()
            for problem in result.problems:
                assert "torn last line" in problem, problem
            conversation = result.conversation
            assert conversation is not None
            step = step_of(conversation.messages)
            assert step in (base, base + 1), (step, base, trial)
            assert conversation == journal_state(step)
            assert (result.seq or 0) >= last_seq
            temps = set(temp_files(directory))
            assert len(temps - before) <= 1
            if compactions:
                assert not (before & temps), before & temps
            age([directory / name for name in temps], STALE_S)
            stats["kills"] += 1
            stats["appends_acked"] += len(acked)
            stats["compactions_acked"] += len(compactions)
            stats["survivor_with_torn_tail"] += bool(result.problems)
            stats["killed_mid_compaction"] += len(temps - before)
            stats["survivor_new_unacked"] += step == base + 1
            last_step, last_seq = step, result.seq or 0
    report("journal appends + compactions on 10 MB", stats)
    assert last_seq > 1  # compactions happened and stuck
    assert stats["compactions_acked"] >= 10
    assert stats["killed_mid_compaction"] >= 3
    assert stats["appends_acked"] >= 100


@pytest.mark.timeout(240)
def test_sigkill_while_writing_agentapi_state_file(tmp_path: Path) -> None:
    """100 kills while AgentAPI's state file is rewritten with 5-30 MB states: the file always
    parses as the last acknowledged state or the next (prompt fields included), and the temp
    file a kill leaves is swept by a later write instead of piling up."""
    path = tmp_path / "module" / "agentapi-state.json"
    clock = KillClock(random.Random(SEED + 2), span=2.5)
    stats: Counter[str] = Counter()
    last_step = 0
    with Zygote("agentapi_state", path) as zygote:
        for _ in range(100):
            before = set(temp_files(path.parent))
            trial = zygote.trial(clock.next(), last=last_step)
            clock.learn(trial)
            assert trial.ready
            assert trial.killed
            acked = [int(a) for a in trial.acks]
            base = acked[-1] if acked else last_step
            try:
                state = read_agentapi_state(path, max_bytes=64 * MB)
            except FileNotFoundError:
                assert base == 0
                step = 0
            else:
                messages = state.conversation_messages()
                step = step_of(messages)
                expected = big_state(step)
                assert messages == expected.messages
                assert (state.initial_prompt, state.initial_prompt_sent) == ("build it", step >= 3)
            assert step in (base, base + 1), (step, base, trial)
            temps = set(temp_files(path.parent))
            assert len(temps - before) <= 1
            if acked:
                assert not (before & temps), before & temps
            age([path.parent / name for name in temps], STALE_S)
            stats["kills"] += 1
            stats["writes_acked"] += len(acked)
            stats["killed_mid_write"] += len(temps - before)
            stats["survivor_new_unacked"] += step == base + 1
            last_step = step
    report("AgentAPI state file 5-30 MB", stats)
    assert stats["writes_acked"] >= 30
    assert stats["killed_mid_write"] >= 5


@pytest.mark.timeout(240)
def test_sigkill_during_restore_keeps_the_bad_bytes_and_a_rerun_repairs(tmp_path: Path) -> None:
    """60 kills during `restore` of a torn 10 MB AgentAPI file: at every moment the torn bytes
    are either still in place or kept aside (never both, never lost), the file is the torn one,
    absent or the complete repair (never a partial one), and the next `restore` finishes it."""
    state_dir = tmp_path / "state"
    module = tmp_path / "module"
    module.mkdir()
    path = module / "agentapi-state.json"
    conversation = journal_state(3)
    StateStore(state_dir).save(conversation)
    good = render_agentapi_state(conversation)
    flags = {
        "state_dir": str(state_dir),
        "agentapi_state_file": str(path),
        "agentapi_pid_file": str(module / "agentapi.pid"),
    }
    settings_file = tmp_path / "settings.json"
    settings_file.write_text(json.dumps(flags))
    settings = Settings.load(flags, env={})
    rng = random.Random(SEED + 3)
    clock = KillClock(rng, span=1.3, initial_us=150_000)
    stats: Counter[str] = Counter()
    with Zygote("restore", settings_file) as zygote:
        # 60 kills that land inside `restore`; a kill that came after it had finished (the
        # writer acknowledged) proves nothing about the operation and is counted apart.
        while stats["kills"] < 60:
            assert stats["landed_after_finish"] < 120, stats  # the clock never learned
            torn = good[: rng.randrange(1, len(good) - 1)]
            path.write_bytes(torn)
            before = set(temp_files(module))
            trial = zygote.trial(clock.next())
            clock.learn(trial)
            assert trial.ready
            aside = [p for p in module.iterdir() if ".corrupt-" in p.name]
            now = path.read_bytes() if path.exists() else None
            finished = bool(trial.acks)
            if finished:
                assert trial.acks == ["written"]
                assert now == good
            if now == torn:
                assert aside == []
                where = "killed_before_quarantine"
            else:
                assert [p.read_bytes() for p in aside] == [torn]
                assert now in (None, good)
                where = "killed_after_quarantine_before_write" if now is None else (
                    "killed_after_write_before_ack"
                )  # fmt: skip
            temps = set(temp_files(module))
            assert len(temps - before) <= 1
            if finished:
                stats["landed_after_finish"] += 1
            else:
                stats[where] += 1
                stats["killed_mid_write"] += len(temps - before)
                stats["kills"] += 1

            again = restore(settings, force=True)
            assert path.read_bytes() == good
            aside = [p for p in module.iterdir() if ".corrupt-" in p.name]
            assert [p.read_bytes() for p in aside] == [torn]
            if again.outcome == "written":  # a completed write sweeps stale temps
                assert not (before & set(temp_files(module)))
            for kept in aside:
                kept.unlink()
            age([module / name for name in temp_files(module)], STALE_S)
    report("restore of a torn 10 MB file", stats)
    assert stats["killed_before_quarantine"] >= 1
    assert stats["killed_after_quarantine_before_write"] >= 1
    assert stats["killed_mid_write"] >= 1  # the write is a small part of a restore


def test_a_completed_write_sweeps_old_temps_only(tmp_path: Path) -> None:
    """The next completed write of a file removes the temp files killed writes of that same
    file left behind, once they are 5 minutes old; a fresh one (a concurrent writer's), other
    files' temps and names that are not ours stay."""
    target = tmp_path / "agentapi-state.json"
    old = tmp_path / ".agentapi-state.json.0123456789abcdef.tmp"
    fresh = tmp_path / ".agentapi-state.json.fedcba9876543210.tmp"
    other = tmp_path / ".last-upload.json.0123456789abcdef.tmp"
    odd = tmp_path / ".agentapi-state.json.not-our-token.tmp"
    for path in (old, fresh, other, odd):
        path.write_bytes(b"left by a killed write")
    age([old, other, odd], STALE_S)
    write_agentapi_state(target, _conv(3))
    assert temp_files(tmp_path) == sorted(p.name for p in (fresh, other, odd))


# -- 2. Power loss at each step, in-process ------------------------------------------------------


def _messages(count: int, *, tail: str = "") -> list[Message]:
    messages = make_messages(count, size=2000)
    if tail:
        last = messages[-1]
        messages[-1] = last.model_copy(update={"content": last.content + tail})
    return messages


def _conv(count: int, *, tail: str = "", sent: bool = True) -> Conversation:
    return Conversation(
        messages=tuple(_messages(count, tail=tail)),
        initial_prompt="build it",
        initial_prompt_sent=sent,
        prompt_origin="agentapi_state",
    )


def _torn_tail(store: StateStore) -> StateStore:
    """A journal whose last record was cut by an earlier crash; a fresh store loads it."""
    path = store.directory / f"journal-{store.seq:012d}.log"
    with path.open("ab") as f:
        f.write(b'0badc0de {"op":"update","put":[{"id":')
    fresh = StateStore(store.directory)
    assert any("torn last line" in p for p in fresh.load().problems)
    return fresh


def _prepare(name: str, directory: Path) -> tuple[StateStore, Callable[[StateStore], object]]:
    """The store as it was just before the write under test, and that write."""
    directory.mkdir(mode=0o700)
    store = StateStore(directory)
    store.load()
    if name == "first save":
        return store, lambda s: s.save(_conv(30, sent=False))
    store.save(_conv(30))
    if name == "save over one generation":
        return store, lambda s: s.save(_conv(34))
    if name == "save that prunes the oldest":
        store.append(_messages(31)[-1:])
        store.save(_conv(33))
        return store, lambda s: s.save(_conv(36))
    if name == "first append (creates the journal)":
        return store, lambda s: s.append(_messages(31)[-1:])
    store.append(_messages(31)[-1:])
    if name == "append to the journal":
        return store, lambda s: s.append(_messages(32, tail=" more")[-2:])
    if name == "append after a torn tail":
        return _torn_tail(store), lambda s: s.append(_messages(32)[-1:])
    if name == "compact":
        store.append(_messages(32, tail=" more")[-2:])
        return store, lambda s: s.compact()
    raise AssertionError(name)


STORE_WRITES = [
    "first save",
    "save over one generation",
    "save that prunes the oldest",
    "first append (creates the journal)",
    "append to the journal",
    "append after a torn tail",
    "compact",
]


def judge(recorder: PowerLossRecorder, check: Callable[[Image], str]) -> Counter[str]:
    """Run ``check`` (-> "old" or "new") on every distinct image and apply the timing rules:
    once what is durable loads as the new state, every image at that point must; once the
    write returned, every image must load as new."""
    outcome: dict[str, str] = {}
    stats: Counter[str] = Counter(points=len(recorder.points), images=len(recorder.images))
    for image in recorder.images:
        if image.digest not in outcome:
            outcome[image.digest] = check(image)
            stats[outcome[image.digest]] += 1
    for point in recorder.points:
        here = [i for i in recorder.images if i.point == point]
        (durable,) = [i for i in here if i.durable_only]
        if outcome[durable.digest] == "new" or point.endswith(" returned"):
            late = [(i.variant, outcome[i.digest]) for i in here if outcome[i.digest] != "new"]
            assert not late, f"{point}: older than what was durable: {late}"
    stats["distinct_images"] = len(outcome)
    return stats


@pytest.mark.parametrize("write", STORE_WRITES)
def test_power_loss_at_each_step_of_a_store_write(tmp_path: Path, write: str) -> None:
    """Every image a power loss could leave at every step of a save, append or compaction
    loads (without an error and without a quarantine) as the old or the new state with the
    old or the new generation, keeps every byte it held, and takes the next append."""
    directory = tmp_path / "state"
    store, do = _prepare(write, directory)
    old, old_seq = loaded(directory)
    recorder = PowerLossRecorder(directory, seed=SEED)
    recorder.run(lambda: do(store))
    new, new_seq = loaded(directory)
    assert (old, old_seq) != (new, new_seq)
    scratch = tmp_path / "image"

    def check(image: Image) -> str:
        where = materialize(image, scratch)
        result = StateStore(where).load()
        assert result.quarantined == (), (image.point, image.variant, result.problems)
        got = (result.conversation, result.seq or 0)
        assert got in ((old, old_seq), (new, new_seq)), (image.point, image.variant)
        assert bytes_kept(image, where) == [], (image.point, image.variant)
        # Whatever survived takes the next change, and the change is there on the next load.
        messages = result.conversation.messages if result.conversation else ()
        extra = Message(id=len(messages), role="user", content="next", time="2025-01-02T03:04:05Z")
        store = StateStore(where)
        store.load()
        store.append([extra])
        after = StateStore(where).load().conversation
        assert after is not None
        assert after.messages == (*messages, extra), (image.point, image.variant)
        return "new" if got == (new, new_seq) else "old"

    stats = judge(recorder, check)
    report(f"power loss: {write}", stats)
    assert stats["new"] >= 1


@pytest.mark.parametrize("existing", [True, False], ids=["replace", "create"])
def test_power_loss_at_each_step_of_agentapi_state_write(tmp_path: Path, existing: bool) -> None:
    """AgentAPI's state file after a power loss at any step of its rewrite: the old file or
    the new one, parsing cleanly; missing only if there was none before."""
    path = tmp_path / "module" / "agentapi-state.json"
    path.parent.mkdir()
    old = _conv(20) if existing else None
    if old is not None:
        write_agentapi_state(path, old)
    new = _conv(25, tail=" and more")
    recorder = PowerLossRecorder(path.parent, seed=SEED)
    recorder.run(lambda: write_agentapi_state(path, new))
    scratch = tmp_path / "image"

    def check(image: Image) -> str:
        where = materialize(image, scratch) / path.name
        try:
            state = read_agentapi_state(where, max_bytes=64 * MB)
        except FileNotFoundError:
            assert old is None, (image.point, image.variant)
            return "old"
        except StateFileError as exc:
            raise AssertionError(f"{image.point} {image.variant}: {exc}") from None
        messages = state.conversation_messages()
        if old is not None and messages == old.messages:
            return "old"
        assert messages == new.messages, (image.point, image.variant)
        return "new"

    stats = judge(recorder, check)
    report(f"power loss: AgentAPI state file ({'replace' if existing else 'create'})", stats)


def test_power_loss_at_each_step_of_restore(tmp_path: Path) -> None:
    """`restore` of a torn AgentAPI file, cut by a power loss at any step: the torn bytes are
    at the file's name or kept aside (never lost), the file is torn, absent or the complete
    repair, and rerunning `restore` on what survived always ends with the repaired file."""
    state_dir = tmp_path / "state"
    conversation = _conv(40)
    StateStore(state_dir).save(conversation)
    good = render_agentapi_state(conversation)
    torn = good[: len(good) // 3]
    module = tmp_path / "module"
    module.mkdir()
    path = module / "agentapi-state.json"
    path.write_bytes(torn)

    def settings_for(directory: Path) -> Settings:
        flags = {
            "state_dir": str(state_dir),
            "agentapi_state_file": str(directory / path.name),
            "agentapi_pid_file": str(directory / "agentapi.pid"),
        }
        return Settings.load(flags, env={})

    recorder = PowerLossRecorder(module, seed=SEED)
    recorder.run(lambda: restore(settings_for(module), force=True))
    assert path.read_bytes() == good
    scratch = tmp_path / "image"

    def check(image: Image) -> str:
        where = materialize(image, scratch)
        at_name = image.files.get(path.name)
        aside = [data for name, data in image.files.items() if ".corrupt-" in name]
        assert torn in ([at_name] if at_name is not None else []) + aside, image.variant
        assert at_name in (torn, None, good), (image.point, image.variant)
        # The image is the module at another path: the same instance, as far as this test
        # goes, so the directory's record of its first path is dropped.
        (state_dir / INSTANCE_NAME).unlink(missing_ok=True)
        restore(settings_for(where), force=True)
        assert (where / path.name).read_bytes() == good, (image.point, image.variant)
        assert bytes_kept(image, where) == [], (image.point, image.variant)
        return "new" if at_name == good else "old"

    stats = judge(recorder, check)
    report("power loss: restore of a torn file", stats)

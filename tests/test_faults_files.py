"""Bad files at restore, and symlinks planted where the product reads and writes.

The sidecar's own files (generations and journals) and AgentAPI's state file are damaged the
ways disks damage files: one flipped bit at every byte offset, a cut, zeroes, a wrong checksum,
length or format version, a torn journal line, a journal that belongs to another generation.
Every trial ends in one of two ways, and the tests tell which one each trial must take:

* a correct restore: AgentAPI's file holds exactly one state the files really held (the newest
  that verifies), and anything unusable was moved aside byte-identical and reported; or
* exit 7 (no good copy anywhere), with every bad byte still kept.

Never a silent loss: when the restored conversation is older than the newest one written, the
report says which file was unusable. The sweeps run in-process (the same ``restore`` the CLI
calls): every byte of the generation header and a fixed random sample of the other offsets
(``SWEEP_ALL_OFFSETS=1``: every byte of every file); a random sample of the same trials runs
through the real ``agentapi-persist restore --json`` process. Symlinks are planted at
AgentAPI's state path, at temp-file names, and in place of the directories: the victim they
point at is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agentapi_persist import _fsutil
from agentapi_persist.agentapi_state import read_agentapi_state, render_agentapi_state
from agentapi_persist.errors import DurabilityError
from agentapi_persist.models import Conversation, Message
from agentapi_persist.restoring import RestoreReport, restore
from agentapi_persist.store import StateStore
from agentapi_persist.testing.agentapi import FakeAgentAPI

from . import evidence
from .cli_support import run_cli
from .conftest import Workspace
from .faults_support import STRACE, needs_strace, strace_prefix
from .peers_support import dead_url, new_workspace

TIME = "2025-01-02T03:04:05.123456789Z"
PROMPT: dict[str, Any] = {
    "initial_prompt": "do the thing",
    "initial_prompt_sent": True,
    "prompt_origin": "agentapi_state",
}
GEN1, GEN2 = "conversation-000000000001.json", "conversation-000000000002.json"
JOURNAL1, JOURNAL2 = "journal-000000000001.log", "journal-000000000002.log"
#: Trials per damage class that also run through the real CLI process (the rest in-process).
CLI_SAMPLE = 6
#: Byte offsets tried per file in-process (every header byte, the rest sampled from the body);
#: SWEEP_ALL_OFFSETS=1 tries every byte of every file (a few thousand trials, minutes).
SWEEP = 1 << 30 if os.environ.get("SWEEP_ALL_OFFSETS") == "1" else 240
SEED = 20250102


def msg(i: int, text: str) -> Message:
    return Message(id=i, role="user" if i % 2 == 0 else "agent", content=text, time=TIME)


def conv(messages: tuple[Message, ...]) -> Conversation:
    return Conversation(messages=messages, **PROMPT)


def rendered(messages: tuple[Message, ...]) -> bytes:
    """AgentAPI's file as restore writes it from a stored copy holding ``messages``."""
    return render_agentapi_state(conv(messages))


@dataclass(frozen=True)
class Layout:
    """What a sidecar leaves behind: two generations with journals, and every state a replay
    of them can stop at (``states[seq][k]``: generation ``seq`` plus its first ``k`` records)."""

    files: dict[str, bytes]
    states: dict[int, list[tuple[Message, ...]]]

    @property
    def newest(self) -> tuple[Message, ...]:
        return self.states[2][-1]

    def install(self, ws: Workspace, **replace: bytes | None) -> None:
        """Write the layout into ``ws``'s state dir; ``name=bytes`` swaps a file, ``None``
        leaves it out."""
        ws.state_dir.mkdir(parents=True, mode=0o700, exist_ok=True)
        for name, data in {**self.files, **replace}.items():
            if data is not None:
                (ws.state_dir / name).write_bytes(data)


def build_layout(directory: Path) -> Layout:
    """The real store writes it the way the sidecar does: save, journal, compact, journal."""
    store = StateStore(directory)
    store.load()
    first = tuple(msg(i, f"first {i}") for i in range(6))
    store.save(conv(first))
    states: dict[int, list[tuple[Message, ...]]] = {1: [first], 2: []}
    for updates in ([msg(6, "first 6")], [msg(6, "first 6, grown")]):
        store.append(updates)
        states[1].append(store.conversation.messages)  # type: ignore[union-attr]
    store.compact()
    states[2].append(states[1][-1])
    for updates in (
        [msg(7, "second 7")],
        [msg(7, "second 7, grown"), msg(8, "second 8")],
        [msg(9, "second 9 é ✓")],
    ):
        store.append(updates)
        states[2].append(store.conversation.messages)  # type: ignore[union-attr]
    files = {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}
    assert sorted(files) == [GEN1, GEN2, JOURNAL1, JOURNAL2]
    return Layout(files, states)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    return build_layout(tmp_path_factory.mktemp("layout"))


@pytest.fixture
def dead() -> Iterator[str]:
    """An AgentAPI address that refuses connections: restore's "is it running?" says no."""
    with dead_url() as url:
        yield url


def flip(data: bytes, offset: int, bit: int) -> bytes:
    damaged = bytearray(data)
    damaged[offset] ^= 1 << bit
    return bytes(damaged)


def quarantined_copies(directory: Path, name: str) -> list[bytes]:
    return [p.read_bytes() for p in sorted(directory.glob(f"{name}.corrupt-*"))]


def restore_here(ws: Workspace, url: str) -> tuple[int, dict[str, Any]]:
    """``restore`` in this process: the function the CLI calls, without the process start."""
    report: RestoreReport = restore(ws.settings(agentapi_url=url))
    return int(report.exit_code), report.as_dict()


async def restore_cli(ws: Workspace, url: str) -> tuple[int, dict[str, Any]]:
    """``agentapi-persist restore --json`` as a real process."""
    result = await run_cli(ws.process_env(), "restore", "--json", "--agentapi-url", url)
    assert result.stdout, result.stderr
    return result.code, json.loads(result.stdout)


# -- the checks every trial must pass -------------------------------------------------------


def check_generation_trial(
    ws: Workspace, layout: Layout, damaged: bytes, code: int, report: dict[str, Any]
) -> str:
    """Generation 2 damaged: the newest state (the damage missed everything that matters), or
    generation 1 with its journal and both generation-2 files kept aside byte-identical.
    Returns which of the two happened."""
    assert code == 0, report
    found = " ".join(report["found"])
    data = ws.state_file.read_bytes()
    if data == rendered(layout.newest):
        assert report["quarantined"] == []
        assert (ws.state_dir / GEN2).read_bytes() == damaged
        return "newest"
    assert data == rendered(layout.states[1][-1]), "restored something no file held"
    assert "generation 2 is unusable" in found, "an older state was restored silently"
    assert quarantined_copies(ws.state_dir, GEN2) == [damaged]
    assert quarantined_copies(ws.state_dir, JOURNAL2) == [layout.files[JOURNAL2]]
    assert not (ws.state_dir / GEN2).exists()
    return "fallback"


def journal_records_before(journal: bytes, damaged: bytes, offset: int) -> int | None:
    """Records a replay keeps when the byte at ``offset`` is damaged: those on the complete
    lines before it, minus the base record (a damaged newline spoils its own line). ``None``
    when the damage changes nothing a reader sees: a hex digit of a record's CRC that only
    changed case (``6d`` and ``6D`` are the same number)."""
    line_start = journal.rfind(b"\n", 0, offset) + 1
    if (
        offset - line_start < 8
        and damaged[offset : offset + 1].lower() == journal[offset : offset + 1]
    ):
        return None
    line = journal.count(b"\n", 0, offset)
    return max(line - 1, 0)


def check_journal_trial(
    ws: Workspace, layout: Layout, damaged: bytes, offset: int, report: dict[str, Any], code: int
) -> int:
    """Journal 2 damaged at ``offset``: exactly the records before the damaged one are
    restored, the problem is reported, and the damaged journal stays where it was."""
    assert code == 0, report
    kept = journal_records_before(layout.files[JOURNAL2], damaged, offset)
    problems = [sentence for sentence in report["found"] if "journal 2" in sentence]
    if kept is None:
        kept = len(layout.states[2]) - 1
        assert problems == []
    else:
        assert problems, report["found"]
    assert ws.state_file.read_bytes() == rendered(layout.states[2][kept])
    assert (ws.state_dir / JOURNAL2).read_bytes() == damaged
    return kept


def check_agentapi_file_trial(
    ws: Workspace, layout: Layout, damaged: bytes, code: int, report: dict[str, Any]
) -> str:
    """AgentAPI's file damaged, the sidecar copy good and newer: every message comes back
    exactly; a rewritten file's damaged bytes are kept aside; a file left alone can only have
    differed in its prompt text (which AgentAPI's file alone knows, so it is believed)."""
    assert code == 0, report
    state = read_agentapi_state(ws.state_file, max_bytes=1 << 20)
    assert [(m.role, m.message, m.time) for m in state.messages] == [
        (m.role, m.content, m.time) for m in layout.newest
    ]
    assert state.initial_prompt_sent is True  # else AgentAPI would run the prompt again
    stored = StateStore(ws.state_dir, read_only=True).load().conversation
    assert stored is not None
    assert stored.messages == layout.newest
    if report["outcome"] == "unchanged":
        assert ws.state_file.read_bytes() == damaged
        assert state.initial_prompt != PROMPT["initial_prompt"]
        return "unchanged"
    assert report["outcome"] == "written", report
    assert quarantined_copies(ws.module_dir, "agentapi-state.json") == [damaged]
    return "written"


# -- sweeps: in-process, and a sample of the same trials through the real CLI -----------------


def offsets(data: bytes, *, every_byte_of: int = 0) -> list[tuple[int, int]]:
    """Byte offsets to damage, each with one bit chosen at random (seeded: the same every
    run): every one of the first ``every_byte_of`` bytes, then a sample of the rest, up to
    ``SWEEP`` in all."""
    rng = random.Random(SEED + len(data))
    head = list(range(min(every_byte_of, len(data))))
    rest = list(range(len(head), len(data)))
    chosen = head + sorted(rng.sample(rest, min(len(rest), max(SWEEP - len(head), 0))))
    return [(offset, rng.randrange(8)) for offset in chosen]


def cli_sample(trials: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return random.Random(SEED).sample(trials, min(CLI_SAMPLE, len(trials)))


async def run_parallel(jobs: list[Callable[[], Any]], *, width: int = 2) -> list[Any]:
    """Run coroutine factories at most ``width`` at a time (the machine is shared)."""
    gate = asyncio.Semaphore(width)

    async def one(job: Callable[[], Any]) -> Any:
        async with gate:
            return await job()

    # A task group: the first failing trial cancels the others (their processes are killed)
    # and the test fails at once, instead of leaving tasks for the loop's teardown to hang on.
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(one(job)) for job in jobs]
    return [task.result() for task in tasks]


@pytest.mark.faults
def test_generation_bit_flips(tmp_path: Path, layout: Layout, dead: str) -> None:
    """One flipped bit in the newest generation (every header byte, sampled body bytes):
    never a wrong or silent restore."""
    outcomes: dict[str, int] = {}
    header = layout.files[GEN2].index(b"\n") + 1
    trials = offsets(layout.files[GEN2], every_byte_of=header)
    for offset, bit in trials:
        ws = new_workspace(tmp_path / f"g{offset}")
        damaged = flip(layout.files[GEN2], offset, bit)
        layout.install(ws, **{GEN2: damaged})
        code, report = restore_here(ws, dead)
        outcome = check_generation_trial(ws, layout, damaged, code, report)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        shutil.rmtree(ws.root)
    evidence.record("bit flips: generation 2", {"trials": len(trials), **outcomes})
    # Only header bytes the loader does not rely on (the saved_at text) may be hit harmlessly.
    assert outcomes["fallback"] >= len(trials) - 40
    assert 0 < outcomes.get("newest", 0) <= 40


@pytest.mark.faults
def test_journal_bit_flips(tmp_path: Path, layout: Layout, dead: str) -> None:
    """One flipped bit in the journal (sampled offsets): exactly the records before it,
    reported."""
    kept: dict[int, int] = {}
    trials = offsets(layout.files[JOURNAL2])
    for offset, bit in trials:
        ws = new_workspace(tmp_path / f"j{offset}")
        damaged = flip(layout.files[JOURNAL2], offset, bit)
        layout.install(ws, **{JOURNAL2: damaged})
        code, report = restore_here(ws, dead)
        records = check_journal_trial(ws, layout, damaged, offset, report, code)
        kept[records] = kept.get(records, 0) + 1
        shutil.rmtree(ws.root)
    evidence.record(
        "bit flips: journal 2",
        {"trials": len(trials), **{f"records_kept_{n}": k for n, k in kept.items()}},
    )
    # Damage in record 3 keeps 2, and so on; all 3 only when a CRC digit merely changed case.
    assert {0, 1, 2} <= set(kept) <= {0, 1, 2, 3}


@pytest.mark.faults
def test_agentapi_file_bit_flips(tmp_path: Path, layout: Layout, dead: str) -> None:
    """One flipped bit in AgentAPI's file (sampled offsets): every message restored, the
    prompt-sent flag never lost, the damaged bytes kept."""
    good = rendered(layout.newest)
    outcomes: dict[str, int] = {}
    trials = offsets(good)
    for offset, bit in trials:
        ws = new_workspace(tmp_path / f"a{offset}")
        layout.install(ws)
        damaged = flip(good, offset, bit)
        ws.state_file.write_bytes(damaged)
        hour_ago = time.time() - 3600  # AgentAPI saved before the sidecar's last checkpoint
        os.utime(ws.state_file, (hour_ago, hour_ago))
        code, report = restore_here(ws, dead)
        outcome = check_agentapi_file_trial(ws, layout, damaged, code, report)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        shutil.rmtree(ws.root)
    evidence.record("bit flips: AgentAPI's file", {"trials": len(trials), **outcomes})
    prompt = good.index(b'"initial_prompt":"')
    assert outcomes.get("unchanged", 0) <= len(PROMPT["initial_prompt"]) + len(good) - prompt


@pytest.mark.faults
async def test_bit_flips_through_the_real_cli(tmp_path: Path, layout: Layout, dead: str) -> None:
    """A random sample of the three sweeps above, each as a real ``restore --json`` process."""

    def generation(offset: int, bit: int) -> Callable[[], Any]:
        async def trial() -> str:
            ws = new_workspace(tmp_path / f"cg{offset}")
            damaged = flip(layout.files[GEN2], offset, bit)
            layout.install(ws, **{GEN2: damaged})
            code, report = await restore_cli(ws, dead)
            return check_generation_trial(ws, layout, damaged, code, report)

        return trial

    def journal(offset: int, bit: int) -> Callable[[], Any]:
        async def trial() -> int:
            ws = new_workspace(tmp_path / f"cj{offset}")
            damaged = flip(layout.files[JOURNAL2], offset, bit)
            layout.install(ws, **{JOURNAL2: damaged})
            code, report = await restore_cli(ws, dead)
            return check_journal_trial(ws, layout, damaged, offset, report, code)

        return trial

    good = rendered(layout.newest)

    def agentapi_file(offset: int, bit: int) -> Callable[[], Any]:
        async def trial() -> str:
            ws = new_workspace(tmp_path / f"ca{offset}")
            layout.install(ws)
            damaged = flip(good, offset, bit)
            ws.state_file.write_bytes(damaged)
            hour_ago = time.time() - 3600
            os.utime(ws.state_file, (hour_ago, hour_ago))
            code, report = await restore_cli(ws, dead)
            return check_agentapi_file_trial(ws, layout, damaged, code, report)

        return trial

    jobs = [generation(o, b) for o, b in cli_sample(offsets(layout.files[GEN2]))]
    jobs += [journal(o, b) for o, b in cli_sample(offsets(layout.files[JOURNAL2]))]
    jobs += [agentapi_file(o, b) for o, b in cli_sample(offsets(good))]
    results = await run_parallel(jobs)
    assert len(results) == 3 * CLI_SAMPLE
    evidence.record("bit flips: through the restore process", {"processes": len(results)})


# -- each named kind of damage to the sidecar's files, through the CLI ------------------------


def _header(data: bytes) -> tuple[dict[str, Any], bytes]:
    head, body = data.split(b"\n", 1)
    return json.loads(head), body


def _with_header(data: bytes, **fields: Any) -> bytes:
    header, body = _header(data)
    header.update(fields)
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + body


def _damage_generation(kind: str, data: bytes) -> bytes:
    _, body = _header(data)
    match kind:
        case "empty":
            return b""
        case "truncated":
            return data[: len(data) // 2]
        case "zero-filled":
            return b"\0" * len(data)
        case "zeroed-sector":
            return data[:100] + b"\0" * 512 + data[612:]
        case "wrong-sha256":
            return _with_header(data, sha256=hashlib.sha256(b"other").hexdigest())
        case "wrong-length":
            return _with_header(data, length=len(body) + 1)
        case "wrong-format-version":
            return _with_header(data, format_version=2)
        case "format-version-true":
            return _with_header(data, format_version=True)
        case "wrong-seq":
            return _with_header(data, seq=1)
        case "extra-bytes":
            return data + b"\n"
        case _:
            raise AssertionError(kind)


GENERATION_DAMAGE = [
    "empty",
    "truncated",
    "zero-filled",
    "zeroed-sector",
    "wrong-sha256",
    "wrong-length",
    "wrong-format-version",
    "format-version-true",
    "wrong-seq",
    "extra-bytes",
]
GENERATION_REASON = {
    "empty": "no header line",
    "truncated": "torn",
    "zero-filled": "no header line",
    "zeroed-sector": "generation 2 is unusable",
    "wrong-sha256": "checksum mismatch",
    "wrong-length": "torn",
    "wrong-format-version": "format_version 2",
    "format-version-true": "format_version True",
    "wrong-seq": "seq 1",
    "extra-bytes": "torn",
}


@pytest.mark.parametrize("kind", GENERATION_DAMAGE)
async def test_damaged_newest_generation(
    tmp_path: Path, layout: Layout, dead: str, kind: str
) -> None:
    """Each kind of damage to the newest generation: generation 1 and its journal are
    restored, the damage is named, and both generation-2 files are kept byte-identical."""
    evidence.tally("damaged files at restore", "generation_kinds")
    ws = new_workspace(tmp_path)
    damaged = _damage_generation(kind, layout.files[GEN2])
    layout.install(ws, **{GEN2: damaged})
    code, report = await restore_cli(ws, dead)
    assert check_generation_trial(ws, layout, damaged, code, report) == "fallback"
    assert GENERATION_REASON[kind] in " ".join(report["found"])


async def test_torn_journal_line(tmp_path: Path, layout: Layout, dead: str) -> None:
    """A journal whose last record was cut mid-line: the complete records are restored."""
    evidence.tally("damaged files at restore", "journal_cases")
    ws = new_workspace(tmp_path)
    journal = layout.files[JOURNAL2]
    torn = journal[: journal.rindex(b"\n", 0, len(journal) - 1) + 12]
    layout.install(ws, **{JOURNAL2: torn})
    code, report = await restore_cli(ws, dead)
    assert code == 0, report
    assert ws.state_file.read_bytes() == rendered(layout.states[2][2])
    assert "torn last line" in " ".join(report["found"])
    assert (ws.state_dir / JOURNAL2).read_bytes() == torn


async def test_journal_of_another_generation(tmp_path: Path, layout: Layout, dead: str) -> None:
    """Journal 1 planted as journal 2 (its base record names generation 1): it is moved aside
    unchanged, never replayed onto generation 2."""
    evidence.tally("damaged files at restore", "journal_cases")
    ws = new_workspace(tmp_path)
    layout.install(ws, **{JOURNAL2: layout.files[JOURNAL1]})
    code, report = await restore_cli(ws, dead)
    assert code == 0, report
    assert ws.state_file.read_bytes() == rendered(layout.states[2][0])
    assert "does not belong to generation 2" in " ".join(report["found"])
    assert quarantined_copies(ws.state_dir, JOURNAL2) == [layout.files[JOURNAL1]]


async def test_every_generation_damaged_and_no_agentapi_file_exits_7(
    tmp_path: Path, layout: Layout, dead: str
) -> None:
    """Both generations unusable and AgentAPI's file missing: there is no good copy, and the
    exit code says so (7) instead of calling it a first start; every byte is kept aside."""
    evidence.tally("damaged files at restore", "every_copy_cases")
    ws = new_workspace(tmp_path)
    bad1 = flip(layout.files[GEN1], len(layout.files[GEN1]) - 5, 2)
    bad2 = b"\0" * len(layout.files[GEN2])
    layout.install(ws, **{GEN1: bad1, GEN2: bad2})
    code, report = await restore_cli(ws, dead)
    assert code == 7, report
    assert report["outcome"] == "no_good_copy"
    assert quarantined_copies(ws.state_dir, GEN1) == [bad1]
    assert quarantined_copies(ws.state_dir, GEN2) == [bad2]
    assert quarantined_copies(ws.state_dir, JOURNAL1) == [layout.files[JOURNAL1]]
    assert quarantined_copies(ws.state_dir, JOURNAL2) == [layout.files[JOURNAL2]]
    assert not ws.state_file.exists()


async def test_every_copy_damaged_exits_7_and_keeps_every_byte(
    tmp_path: Path, layout: Layout, dead: str
) -> None:
    """Generations and AgentAPI's file all unusable: exit 7, all five files kept aside."""
    evidence.tally("damaged files at restore", "every_copy_cases")
    ws = new_workspace(tmp_path)
    bad_file = rendered(layout.newest)[:-30]
    layout.install(ws, **{GEN1: b"", GEN2: b"garbage"})
    ws.state_file.write_bytes(bad_file)
    code, report = await restore_cli(ws, dead)
    assert code == 7, report
    assert len(report["quarantined"]) == 5
    assert quarantined_copies(ws.module_dir, "agentapi-state.json") == [bad_file]
    assert quarantined_copies(ws.state_dir, GEN1) == [b""]
    assert quarantined_copies(ws.state_dir, GEN2) == [b"garbage"]


async def test_damaged_generations_but_a_good_agentapi_file(
    tmp_path: Path, layout: Layout, dead: str
) -> None:
    """The sidecar's files unusable, AgentAPI's file good: it becomes the copy, exit 0."""
    evidence.tally("damaged files at restore", "every_copy_cases")
    ws = new_workspace(tmp_path)
    layout.install(ws, **{GEN1: b"x", GEN2: b"y"})
    ws.state_file.write_bytes(rendered(layout.states[1][-1]))
    code, report = await restore_cli(ws, dead)
    assert code == 0, report
    assert report["outcome"] == "adopted"
    stored = StateStore(ws.state_dir, read_only=True).load().conversation
    assert stored is not None
    assert stored.messages == layout.states[1][-1]


# -- symlinks -----------------------------------------------------------------------------------


def victim(root: Path, data: bytes = b"victim: not the product's file\n") -> Path:
    """A file outside the workspace that a planted symlink points at."""
    path = root / "outside" / "victim.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    old = time.time() - 7200
    os.utime(path, (old, old))
    return path


def untouched(path: Path, data: bytes) -> None:
    """The victim's bytes, mode and mtime are what the test left there."""
    assert path.read_bytes() == data
    assert path.stat().st_mtime < time.time() - 3600


@pytest.mark.parametrize("with_copy", [True, False], ids=["with-copy", "no-copy"])
async def test_symlink_at_agentapi_state_path(
    tmp_path: Path, layout: Layout, dead: str, with_copy: bool
) -> None:
    """A symlink planted at AgentAPI's state path (pointing at a valid-looking file elsewhere)
    is never read through nor written through: the link is moved aside as a link, and the file
    is written fresh from the copy (or exit 7 without one). The output names the symlink."""
    ws = new_workspace(tmp_path / "ws")
    target = victim(tmp_path, rendered(layout.states[1][0]))
    before = target.read_bytes()
    if with_copy:
        layout.install(ws)
    ws.state_file.symlink_to(target)
    code, report = await restore_cli(ws, dead)
    untouched(target, before)
    assert "symlink" in " ".join(report["found"])
    (aside,) = ws.module_dir.glob("agentapi-state.json.corrupt-*")
    assert aside.is_symlink()
    assert aside.readlink() == target
    if with_copy:
        assert code == 0, report
        assert not ws.state_file.is_symlink()
        assert ws.state_file.read_bytes() == rendered(layout.newest)
    else:
        assert code == 7, report
        assert not ws.state_file.exists()


async def test_symlinks_at_temp_names_are_never_followed(
    tmp_path: Path, layout: Layout, dead: str
) -> None:
    """Symlinks planted at AgentAPI's fixed temp name and at temp names of the shape the
    product uses, in both directories it writes: restore and shutdown write around them and
    leave every planted link and its victim as they were."""
    ws = new_workspace(tmp_path / "ws")
    layout.install(ws)
    ws.state_file.write_bytes(rendered(layout.states[1][0]))
    target = victim(tmp_path)
    before = target.read_bytes()
    planted = [
        ws.module_dir / "agentapi-state.json.tmp",
        *(ws.module_dir / f".agentapi-state.json.{i:016x}.tmp" for i in range(16)),
        *(ws.state_dir / f".conversation-000000000003.json.{i:016x}.tmp" for i in range(16)),
        *(ws.state_dir / f".last-shutdown.json.{i:016x}.tmp" for i in range(16)),
    ]
    for link in planted:
        link.symlink_to(target)
    code, report = await restore_cli(ws, dead)
    assert code == 0, report
    assert ws.state_file.read_bytes() == rendered(layout.newest)
    async with FakeAgentAPI(messages=list(layout.newest)) as agent:
        result = await run_cli(ws.process_env(), "shutdown", "--json", "--agentapi-url", agent.url)
    assert result.code == 0, result.stdout + result.stderr
    untouched(target, before)
    for link in planted:
        assert link.is_symlink()
        assert link.readlink() == target


def test_a_temp_name_collision_with_a_planted_symlink_fails_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forcing the random temp name onto a planted symlink: the exclusive, no-follow create
    fails, the write is refused with the reason, and the victim and the target are intact."""
    target = victim(tmp_path)
    before = target.read_bytes()
    directory = tmp_path / "dir"
    directory.mkdir()
    (directory / "state.json").write_bytes(b"previous")
    (directory / ".state.json.00000000000000aa.tmp").symlink_to(target)
    monkeypatch.setattr(secrets, "token_hex", lambda n: "00000000000000aa")
    with pytest.raises(DurabilityError, match=r"create temp file failed: File exists \[EEXIST\]"):
        _fsutil.write_atomic(directory / "state.json", b"new")
    untouched(target, before)
    assert (directory / "state.json").read_bytes() == b"previous"
    assert (directory / ".state.json.00000000000000aa.tmp").is_symlink()


_OPENAT = re.compile(
    r'openat\((?:AT_FDCWD|\d+<(?P<dir>[^>]*)>), "(?P<name>[^"]*)", (?P<flags>[A-Z_|]+)'
)


@needs_strace
async def test_every_file_the_cli_creates_is_created_exclusively_without_following(
    tmp_path: Path, layout: Layout, dead: str
) -> None:
    """Under strace, every ``open`` that can create a file in the state or module directory
    (restore, then shutdown) carries O_EXCL and O_NOFOLLOW: a name planted between the check
    and the create can never be followed."""
    ws = new_workspace(tmp_path / "ws")
    layout.install(ws, **{JOURNAL2: None})  # shutdown will have to create the journal
    ws.state_file.write_bytes(b"torn")
    log = tmp_path / "strace.log"
    assert STRACE is not None
    prefix = strace_prefix(log, "trace=openat,open,creat")
    result = await run_cli(
        ws.process_env(), "restore", "--json", "--agentapi-url", dead, prefix=prefix
    )
    assert result.code == 0, result.stdout + result.stderr
    async with FakeAgentAPI(messages=list(layout.newest)) as agent:
        shutdown_log = tmp_path / "strace-shutdown.log"
        result = await run_cli(
            ws.process_env(),
            "shutdown",
            "--agentapi-url",
            agent.url,
            prefix=strace_prefix(shutdown_log, "trace=openat,open,creat"),
        )
    assert result.code == 0, result.stdout + result.stderr
    creates = []
    logs = [log, shutdown_log]
    logs = [p for p in logs if p.exists()] + [p for g in logs for p in g.parent.glob(g.name + ".*")]
    for path in logs:  # one log, or one per thread (strace -ff)
        for line in path.read_text(errors="replace").splitlines():
            match = _OPENAT.search(line)
            if match is None or "O_CREAT" not in match["flags"]:
                continue
            where = os.path.join(match["dir"] or "", match["name"])
            if str(ws.state_dir) in where or str(ws.module_dir) in where:
                creates.append((where, match["flags"]))
    names = {os.path.basename(where).split(".")[1] for where, _ in creates}
    assert {"agentapi-state", "last-shutdown"} <= names, creates  # temp names of write_atomic
    assert any(where.endswith(JOURNAL2) for where, _ in creates), creates  # append_durable
    for where, flags in creates:
        assert "O_EXCL" in flags, (where, flags)
        assert "O_NOFOLLOW" in flags, (where, flags)


async def _sidecar_briefly(ws: Workspace, env: dict[str, str]) -> tuple[int, str]:
    """Start ``run``, stop it with SIGTERM once it has tried its first checkpoint (or let it
    fail before), return the exit code and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentapi_persist", "run", "--checkpoint-interval", "0.05",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=ws.process_env(**env),
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(20):
            while line := await proc.stderr.readline():
                lines.append(line.decode(errors="replace"))
                if '"daemon.resync_checkpoint"' in lines[-1] or "checkpoint_failed" in lines[-1]:
                    proc.send_signal(signal.SIGTERM)
            code = await proc.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
    return code, "".join(lines)


def _tree(root: Path) -> dict[str, bytes | str]:
    """Every name under ``root`` with its bytes (or link target)."""
    out: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        out[key] = str(path.readlink()) if path.is_symlink() else (
            path.read_bytes() if path.is_file() else "dir"
        )  # fmt: skip
    return out


async def test_state_dir_that_is_a_symlink(tmp_path: Path, layout: Layout, dead: str) -> None:
    """The sidecar's state directory replaced by a symlink to another directory (holding files
    with the product's own names, one of them damaged): restore, shutdown and run write
    nothing there and move nothing there, and each says the directory is a symlink."""
    ws = new_workspace(tmp_path / "ws")
    outside = tmp_path / "outside-dir"
    outside.mkdir()
    (outside / GEN2).write_bytes(b"damaged, but not ours to move")
    (outside / "notes.txt").write_bytes(b"someone's file")
    ws.state_dir.parent.mkdir(parents=True)
    ws.state_dir.symlink_to(outside)
    ws.state_file.write_bytes(rendered(layout.states[1][0]))
    before = _tree(outside)

    # With a good AgentAPI file to adopt, the copy cannot be written there: exit 3.
    code, report = await restore_cli(ws, dead)
    assert code == 3, report
    assert "refusing to use directory" in report["error"]
    assert "it is a symlink (not following it)" in report["error"]
    # Without one, the files there can be neither used nor moved: no good copy, exit 7.
    ws.state_file.unlink()
    code, report = await restore_cli(ws, dead)
    assert code == 7, report
    assert "it is a symlink (not following it)" in json.dumps(report)
    async with FakeAgentAPI(messages=list(layout.newest)) as agent:
        result = await run_cli(ws.process_env(), "shutdown", "--agentapi-url", agent.url)
        assert result.code == 3, result.stdout + result.stderr
        assert "symlink" in result.stdout + result.stderr
        code, logs = await _sidecar_briefly(ws, {"AGENTAPI_PERSIST_AGENTAPI_URL": agent.url})
    assert code == 3, logs
    assert "it is a symlink (not following it)" in logs
    assert _tree(outside) == before
    assert ws.state_dir.is_symlink()


async def test_agentapi_dir_that_is_a_symlink(tmp_path: Path, layout: Layout, dead: str) -> None:
    """AgentAPI's directory replaced by a symlink to another directory whose state file is
    damaged: restore refuses to move or write anything there, and says why."""
    ws = new_workspace(tmp_path / "ws")
    layout.install(ws)
    outside = tmp_path / "outside-dir"
    outside.mkdir()
    (outside / "agentapi-state.json").write_bytes(b"{torn")
    shutil.rmtree(ws.module_dir)
    ws.module_dir.symlink_to(outside)
    before = _tree(outside)
    code, report = await restore_cli(ws, dead)
    assert code == 3, report
    assert "symlink" in report["error"]
    assert _tree(outside) == before

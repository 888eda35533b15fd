"""Real disk faults under the whole product: a full disk, a read-only mount, EIO and ENOSPC
injected by strace into the real interpreter, and RLIMIT_FSIZE.

For `agentapi-persist shutdown` (a real process, AgentAPI and Coder on loopback) every fault
must end the same way: exit 3 (not durable) with a summary naming what failed and saying the
previous copy was kept; that previous generation still loads, byte for byte; no temp file is
left; the snapshot was still delivered; the process exits inside its grace budget. A failed
fsync is reported once and never retried (the strace log shows every fsync and its path).

The sidecar (`agentapi-persist run`) on a tmpfs that fills up mid-run reports each failed
checkpoint, loses nothing it had saved, and catches up by itself once space is freed.

Rerun: ``.venv/bin/pytest tests/test_faults_disk.py -m faults`` (as root, with strace).
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from agentapi_persist.models import Conversation, Message
from agentapi_persist.store import StateStore
from agentapi_persist.testing.agentapi import FakeAgentAPI
from agentapi_persist.testing.coder import FakeCoder

from . import evidence
from .cli_support import CliRun, run_cli
from .conftest import Workspace, coder_env, make_messages
from .faults_support import (
    fill,
    fsize_prefix,
    fsync_retried,
    injected_calls,
    needs_strace,
    read_only,
    strace_prefix,
    temp_files,
    thread_logs,
    tmpfs,
)
from .sidecar_support import eventually, sidecar_process, stored_count

pytestmark = pytest.mark.faults

GRACE_S = 10.0
GEN1 = "conversation-000000000001.json"
JOURNAL1 = "journal-000000000001.log"

#: What the sidecar had saved before the stop: generation 1.
PREVIOUS = make_messages(20, size=3000)
#: AgentAPI is ahead of it: the stop appends the new messages to the journal.
AHEAD = [*PREVIOUS, *make_messages(30, size=9000, prefix="newer")[20:]]
#: AgentAPI restarted with another conversation: the old one is archived, a new generation
#: is written.
DIVERGED = make_messages(30, size=3000, prefix="another")


@dataclass
class Stop:
    run: CliRun
    state_dir: Path
    gen1_before: bytes
    coder: FakeCoder
    live: list[Message]

    def assert_previous_copy_kept(self, failed: str) -> None:
        """Exit 3, the failing step named, the previous copy intact and reported as kept, the
        snapshot delivered anyway, no temp file, inside the grace budget."""
        out = self.run.stdout
        print(f"\n[shutdown under fault] exit {self.run.code} in {self.run.seconds:.2f}s: {out}")
        assert self.run.code == 3, out + self.run.stderr
        assert out.startswith("shutdown FAILED (exit 3):"), out
        assert "state=failed" in out
        assert failed in out, out
        assert f"kept: previous copy intact in {self.state_dir} ({len(PREVIOUS)} messages)" in out
        assert (self.state_dir / GEN1).read_bytes() == self.gen1_before
        stored = StateStore(self.state_dir, read_only=True).load().conversation
        assert stored is not None
        assert stored.messages[: len(PREVIOUS)] == tuple(PREVIOUS)
        self.assert_snapshot_delivered()
        assert temp_files(self.state_dir) == []
        assert temp_files(self.state_dir / "archive") == []
        assert self.run.seconds < GRACE_S
        assert self.run.said_last_s <= self.run.seconds

    def assert_snapshot_delivered(self) -> None:
        assert "snapshot=delivered" in self.run.stdout
        (upload,) = self.coder.uploads
        sent = upload.json["messages"]
        assert sent[-1]["id"] == self.live[-1].id
        assert sent[-1]["content"] == self.live[-1].content


def save_previous(state_dir: Path) -> bytes:
    StateStore(state_dir).save(Conversation(messages=tuple(PREVIOUS)))
    return (state_dir / GEN1).read_bytes()


@asynccontextmanager
async def stopping(
    ws: Workspace, coder: FakeCoder, live: list[Message]
) -> AsyncIterator[Callable[..., Awaitable[Stop]]]:
    """AgentAPI holding ``live``; yields ``stop(prefix=...)`` -> ``Stop`` (runs `shutdown`)."""
    async with FakeAgentAPI(messages=live) as agent:
        env = ws.process_env(**coder_env(coder), AGENTAPI_PERSIST_AGENTAPI_URL=agent.url)

        async def stop(
            gen1_before: bytes, prefix: list[str] | None = None, grace: float = GRACE_S
        ) -> Stop:
            result = await run_cli(env, "shutdown", "--grace", str(grace), prefix=prefix)
            return Stop(result, ws.state_dir, gen1_before, coder, live)

        yield stop


@contextmanager
def small_disk(ws: Workspace, size: str) -> Iterator[Path]:
    with tmpfs(ws.state_dir, size=size) as mounted:
        yield mounted


# -- disk full -----------------------------------------------------------------------------------


async def test_full_disk_journal_append(workspace: Workspace, coder: FakeCoder) -> None:
    """The disk is full when the stop comes: the journal append gets ENOSPC."""
    evidence.tally("disk faults", "tmpfs")
    with small_disk(workspace, "1m") as state_dir:
        gen1 = save_previous(state_dir)
        fill(state_dir)
        async with stopping(workspace, coder, AHEAD) as stop:
            result = await stop(gen1)
        result.assert_previous_copy_kept(
            f"could not append to {state_dir / JOURNAL1}: write failed: No space left on device "
            "[ENOSPC]; the records written before this append were kept"
        )


async def test_full_disk_new_generation(workspace: Workspace, coder: FakeCoder) -> None:
    """The disk is full and the conversation diverged (a new generation is due): the archive
    of the old conversation cannot be written, so nothing replaces it."""
    evidence.tally("disk faults", "tmpfs")
    with small_disk(workspace, "1m") as state_dir:
        gen1 = save_previous(state_dir)
        fill(state_dir)
        async with stopping(workspace, coder, DIVERGED) as stop:
            result = await stop(gen1)
        result.assert_previous_copy_kept("No space left on device [ENOSPC]")


async def test_disk_fills_up_during_the_write(workspace: Workspace, coder: FakeCoder) -> None:
    """Room for the archive but not for the 1.5 MB new generation: ENOSPC half way through
    its write; the temp file is removed and generation 1 stays the current one."""
    evidence.tally("disk faults", "tmpfs")
    big = make_messages(30, size=50_000, prefix="another")
    with small_disk(workspace, "1m") as state_dir:
        gen1 = save_previous(state_dir)
        async with stopping(workspace, coder, big) as stop:
            result = await stop(gen1)
        result.assert_previous_copy_kept(
            f"could not write {state_dir / 'conversation-000000000002.json'}: write failed: "
            "No space left on device [ENOSPC]; the previous copy was kept"
        )


# -- read-only -----------------------------------------------------------------------------------


async def test_read_only_state_dir(workspace: Workspace, coder: FakeCoder) -> None:
    """The state directory was remounted read-only: nothing can be written, and the summary
    says so while the snapshot still goes out."""
    evidence.tally("disk faults", "read_only_mount")
    gen1 = save_previous(workspace.state_dir)
    with read_only(workspace.state_dir):
        async with stopping(workspace, coder, AHEAD) as stop:
            result = await stop(gen1)
        result.assert_previous_copy_kept("Read-only file system [EROFS]")
    assert sorted(p.name for p in workspace.state_dir.iterdir()) == [GEN1]


# -- strace: EIO / ENOSPC on the real interpreter --------------------------------------------------


@needs_strace
@pytest.mark.parametrize(
    ("live", "qualifiers", "failed", "target"),
    [
        pytest.param(
            AHEAD,
            ("trace=pwrite64", "inject=pwrite64:error=EIO"),
            f"{JOURNAL1}: write failed: Input/output error [EIO]",
            JOURNAL1,
            id="journal-write-EIO",
        ),
        pytest.param(
            AHEAD,
            ("trace=pwrite64", "inject=pwrite64:error=ENOSPC"),
            f"{JOURNAL1}: write failed: No space left on device [ENOSPC]",
            JOURNAL1,
            id="journal-write-ENOSPC",
        ),
        pytest.param(
            AHEAD,
            ("trace=fsync", "inject=fsync:error=EIO:when=1"),
            f"{JOURNAL1}: fsync failed: Input/output error [EIO]",
            JOURNAL1,
            id="journal-fsync-EIO",
        ),
        pytest.param(
            AHEAD,  # the journal is new: its directory entry is fsynced second
            ("trace=fsync", "inject=fsync:error=EIO:when=2"),
            f"{JOURNAL1}: directory fsync failed: Input/output error [EIO]",
            "<state dir>>",  # the state directory itself (its name is per module)
            id="journal-directory-fsync-EIO",
        ),
        pytest.param(
            # A read-only volume where no mount can be made (no CAP_SYS_ADMIN): only opens of
            # the journal's name are traced (-P; the product opens it relative to the state
            # directory), and the second, its create, is refused as a read-only mount would
            # (the first is an O_WRONLY probe, ENOENT there as here).
            AHEAD,
            ("trace=openat", "inject=openat:error=EROFS:when=2", f"path={JOURNAL1}"),
            f"{JOURNAL1}: open failed: Read-only file system [EROFS]",
            JOURNAL1,
            id="journal-open-EROFS",
        ),
        pytest.param(
            DIVERGED,  # writes 1-3 are the archive's, 4 is the new generation's first
            ("trace=write", "inject=write:error=EIO:when=4"),
            "conversation-000000000002.json: write failed: Input/output error [EIO]",
            ".conversation-000000000002.json.",
            id="generation-write-EIO",
        ),
        pytest.param(
            DIVERGED,  # fsyncs: archive file, archive directory, new generation, ...
            ("trace=fsync", "inject=fsync:error=EIO:when=3"),
            "conversation-000000000002.json: fsync failed: Input/output error [EIO]",
            ".conversation-000000000002.json.",
            id="generation-fsync-EIO",
        ),
        pytest.param(
            DIVERGED,  # renames: the archive's, then the new generation's
            ("trace=/^rename", "inject=/^rename:error=EIO:when=2"),
            "conversation-000000000002.json: rename failed: Input/output error [EIO]",
            ".conversation-000000000002.json.",
            id="generation-rename-EIO",
        ),
    ],
)
async def test_injected_fault_in_shutdown(
    workspace: Workspace,
    coder: FakeCoder,
    tmp_path: Path,
    live: list[Message],
    qualifiers: tuple[str, ...],
    failed: str,
    target: str,
) -> None:
    """strace makes one syscall of the real `shutdown` fail: the step that hit it is named, the
    previous copy is kept, the failed fsync is not retried, the snapshot is delivered."""
    evidence.tally("disk faults", "strace_injection")
    gen1 = save_previous(workspace.state_dir)
    log = tmp_path / "strace.log"
    # ``path=NAME``: trace (and so inject into) only the calls naming that file (strace -P
    # matches the name as the call gives it: relative to the state directory's descriptor).
    paths = [q.removeprefix("path=") for q in qualifiers if q.startswith("path=")]
    prefix = strace_prefix(
        log, *[q for q in qualifiers if not q.startswith("path=")], per_thread=True
    )
    for name in paths:
        prefix += ["-P", name]
    async with stopping(workspace, coder, live) as stop:
        result = await stop(gen1, prefix=prefix)
    result.assert_previous_copy_kept(failed)
    target = target.replace("<state dir>", workspace.state_dir.name)
    hit = [line for line in injected_calls(log) if target in line]
    assert hit, injected_calls(log)  # the call under test was the one that failed
    if "EROFS" in failed:  # as a read-only mount would: a create, not a read or a probe
        assert "O_CREAT" in hit[0], hit
    if hit[0].startswith("fsync("):  # reported, never retried
        assert not fsync_retried(log, hit[0])


@needs_strace
async def test_directory_fsync_failure_of_a_new_generation(
    workspace: Workspace, coder: FakeCoder, tmp_path: Path
) -> None:
    """EIO on the directory fsync after the new generation was renamed into place: the file
    is there but not proven durable, so the stop says exit 3 rather than claiming success,
    and generation 1 is still on disk, byte for byte, as the fallback."""
    evidence.tally("disk faults", "strace_injection")
    gen1 = save_previous(workspace.state_dir)
    log = tmp_path / "strace.log"
    qualifiers = ("trace=fsync", "inject=fsync:error=EIO:when=4")
    async with stopping(workspace, coder, DIVERGED) as stop:
        stopped = await stop(gen1, prefix=strace_prefix(log, *qualifiers, per_thread=True))
    out = stopped.run.stdout
    assert stopped.run.code == 3, out + stopped.run.stderr
    assert "but the directory fsync failed: Input/output error [EIO]" in out
    assert "not proven durable" in out
    # The thread that wrote the new generation is the one whose directory fsync failed.
    (writer,) = [t for t in thread_logs(log) if any(".conversation-000000000002" in x for x in t)]
    ending = f"<{workspace.state_dir}>) = -1 EIO (Input/output error) (INJECTED)"
    (hit,) = [line for line in writer if line.endswith(ending)]
    assert not fsync_retried(log, hit)
    assert (workspace.state_dir / GEN1).read_bytes() == gen1
    assert temp_files(workspace.state_dir) == []
    stopped.assert_snapshot_delivered()


# -- RLIMIT_FSIZE ------------------------------------------------------------------------------


async def test_file_size_limit(workspace: Workspace, coder: FakeCoder) -> None:
    """RLIMIT_FSIZE of 256 KiB and a 1.5 MB new generation: EFBIG part way through."""
    evidence.tally("disk faults", "rlimit_fsize")
    gen1 = save_previous(workspace.state_dir)
    big = make_messages(30, size=50_000, prefix="another")
    async with stopping(workspace, coder, big) as stop:
        result = await stop(gen1, prefix=fsize_prefix(256 * 1024))
    result.assert_previous_copy_kept("write failed: File too large [EFBIG]")


# -- the sidecar on a disk that fills up -----------------------------------------------------------


async def test_sidecar_on_a_disk_that_fills_up(workspace: Workspace) -> None:
    """Checkpoints fail while the disk is full and each failure is logged; what was saved
    stays loadable; once space is freed the sidecar catches up on its own, with no new
    change needed, and later checkpoints succeed."""
    evidence.tally("disk faults", "tmpfs")
    async with FakeAgentAPI(messages=make_messages(10, size=2000)) as agent:
        env = {"AGENTAPI_PERSIST_AGENTAPI_URL": agent.url}
        with small_disk(workspace, "2m") as state_dir:
            async with sidecar_process(workspace, "--snapshot-interval", "0", env=env) as sidecar:
                await eventually(lambda: stored_count(workspace) == 10)
                filler = fill(state_dir)
                saved = {
                    p.name: p.read_bytes()
                    for p in state_dir.iterdir()
                    if p.name.startswith(("conversation-", "journal-"))
                }
                agent.add_message("user", "u" * 20_000)
                agent.add_message("agent", "a" * 20_000)
                await eventually(lambda: sidecar.saw("daemon.checkpoint_failed"))
                failures = [e for e in sidecar.events if e["event"] == "daemon.checkpoint_failed"]
                assert "No space left on device [ENOSPC]" in failures[0]["error"]
                assert stored_count(workspace) == 10
                for name, data in saved.items():  # appended to, never rewritten or cut short
                    assert (state_dir / name).read_bytes()[: len(data)] == data
                assert temp_files(state_dir) == []

                filler.unlink()  # space is back; AgentAPI says nothing new
                await eventually(lambda: stored_count(workspace) == 12, within=10)
                agent.add_message("user", "after the disk was freed")
                await eventually(lambda: stored_count(workspace) == 13)
                sidecar.proc.send_signal(signal.SIGTERM)
                assert await sidecar.wait() == 0, "".join(sidecar.other)
            conversation = StateStore(state_dir).load().conversation
            assert conversation is not None
            assert [m.content for m in conversation.messages] == [m.content for m in agent.messages]
            assert temp_files(state_dir) == []
    assert json.dumps(sidecar.events).count("daemon.checkpoint_failed") >= 1


@needs_strace
async def test_hung_disk_still_exits_on_time(
    workspace: Workspace, coder: FakeCoder, tmp_path: Path
) -> None:
    """A disk that hangs (every fsync stalls 4 s, like a stuck network volume) under a 3 s
    grace: the stop ends on its own before the grace does, says the budget ran out (exit 5)
    and what was kept, and the snapshot, uploaded alongside the write, was delivered."""
    evidence.tally("disk faults", "strace_delay")
    gen1 = save_previous(workspace.state_dir)
    log = tmp_path / "strace.log"
    qualifiers = ("trace=fsync", "inject=fsync:delay_enter=4000000")
    async with stopping(workspace, coder, AHEAD) as stop:
        stopped = await stop(gen1, prefix=strace_prefix(log, *qualifiers, per_thread=True), grace=3)
    run = stopped.run
    print(f"\n[hung disk, grace 3 s] exit {run.code} at {run.said_last_s:.2f}s: {run.stdout}")
    assert run.code == 5, run.stdout + run.stderr
    assert "shutdown FAILED (exit 5)" in run.stdout
    assert "state=unfinished" in run.stdout
    assert f"previous copy intact in {workspace.state_dir}" in run.stdout
    # The last line, not the exit: strace itself lingers until its 4 s delay is over (a thread
    # held in the kernel, as on a hung volume, keeps any process alive until the call returns).
    assert run.said_last_s < 3.0, run.said_last_s
    assert (workspace.state_dir / GEN1).read_bytes() == gen1
    stopped.assert_snapshot_delivered()


@needs_strace
async def test_a_stuck_event_loop_still_exits_before_the_grace(
    workspace: Workspace, coder: FakeCoder, tmp_path: Path
) -> None:
    """The stop's own thread stuck in the kernel (strace holds its open of AgentAPI's pid file
    for 5 s, as a hung network filesystem would): no deadline in the event loop can fire,
    so the watchdog thread must end the stop. It does so before the grace ends, printing how
    far the stop got, measured from outside: the watchdog's line comes before 3 s of a 3 s
    grace (a watchdog armed 0.3 s after the grace passed the earlier, looser bounds)."""
    evidence.tally("disk faults", "strace_delay")
    workspace.pid_file.write_text("999999\n")
    log = tmp_path / "strace.log"
    prefix = [
        *strace_prefix(log, "trace=openat", "inject=openat:delay_enter=5000000:when=1"),
        "-P",
        str(workspace.pid_file),
    ]
    async with stopping(workspace, coder, make_messages(4)) as stop:
        stopped = await stop(b"", prefix=prefix, grace=3)
    run = stopped.run
    print(f"\n[stuck loop, grace 3 s] exit {run.code}, last line at {run.said_last_s:.2f}s")
    assert run.code == 5, run.stdout + run.stderr
    assert run.stdout.startswith("shutdown FAILED (exit 5)"), run.stdout + run.stderr
    assert 2.5 < run.said_last_s < 3.0, run.said_last_s
    assert str(workspace.pid_file) in log.read_text()  # the open that was held

"""``agentapi-persist export``: the saved conversation in every format, read-only.

The HTML page is judged by a real browser (Debian's chromium, headless): the DOM it built
from the file, and a screenshot it rendered, not the string we wrote.
"""

from __future__ import annotations

import hashlib
import html.parser
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agentapi_persist.agentapi_state import read_agentapi_state, render_agentapi_state
from agentapi_persist.export import terminal_safe
from agentapi_persist.models import Conversation, Message
from agentapi_persist.ownership import take_lock
from agentapi_persist.store import StateStore, list_archives

from .cli_support import cli
from .conftest import Workspace

TIME = "2025-01-02T03:04:05.123456789Z"
# What an agent's screen can hold: escape sequences, backtick fences, markup, wide text.
CONTENTS = [
    "Summarise the repository",
    "\x1b[31mred\x1b[0m and a bell\x07\n```python\nprint('<b>&amp;</b>')\n```\n````nested````",
    "┌──────┐\n│ 日本語 │  </pre><script>alert(1)</script>\n└──────┘\n\ttabbed",
    "done.",
]


def conversation() -> Conversation:
    return Conversation(
        messages=tuple(
            Message(id=i, role=("user", "agent")[i % 2], content=text, time=TIME)
            for i, text in enumerate(CONTENTS)
        ),
        initial_prompt=CONTENTS[0],
        initial_prompt_sent=True,
    )


def snapshot_of(directory: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``directory``: its mtime and content hash (what "changed nothing" means)."""
    return {
        str(path.relative_to(directory)): (
            path.stat().st_mtime_ns,
            hashlib.sha256(path.read_bytes()).hexdigest(),
        )
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def stored(workspace: Workspace) -> Conversation:
    saved = conversation()
    StateStore(workspace.state_dir).save(saved)
    return saved


async def test_text_is_for_a_terminal(workspace: Workspace, stored: Conversation) -> None:
    run = await cli(workspace, "export")
    assert run.code == 0, run.stderr
    assert "\x1b" not in run.stdout
    assert "\x07" not in run.stdout
    assert run.stdout.startswith("Conversation: 4 messages, saved ")
    for message in stored.messages:
        assert f"── #{message.id} {message.role} · {TIME} " in run.stdout
        assert terminal_safe(message.content) in run.stdout
    assert "\u241b[31mred\u241b[0m and a bell\u2407" in run.stdout


async def test_markdown_fences_hold_the_text_exactly(
    workspace: Workspace, stored: Conversation
) -> None:
    run = await cli(workspace, "export", "--format", "markdown")
    assert run.code == 0, run.stderr
    lines = run.stdout.splitlines()
    for message in stored.messages:
        heading = f"## {message.id}. {message.role.capitalize()} · {TIME}"
        at = lines.index(heading)
        fence = lines[at + 2].removesuffix("text")
        assert set(fence) == {"`"}
        assert len(fence) >= 3
        end = lines.index(fence, at + 3)
        assert "\n".join(lines[at + 3 : end]) == terminal_safe(message.content)
        assert fence not in terminal_safe(message.content)


async def test_json_is_agentapis_own_file(
    workspace: Workspace, stored: Conversation, tmp_path: Path
) -> None:
    run = await cli(workspace, "export", "--format", "json")
    assert run.code == 0, run.stderr
    assert run.stdout.encode() == render_agentapi_state(stored)
    written = tmp_path / "agentapi-state.json"
    written.write_text(run.stdout)
    state = read_agentapi_state(written, max_bytes=1 << 20)
    assert [m.message for m in state.messages] == CONTENTS  # exactly, escapes and all
    assert state.initial_prompt == CONTENTS[0]
    assert state.initial_prompt_sent is True


async def test_output_file_is_written_whole_and_private(
    workspace: Workspace, stored: Conversation, tmp_path: Path
) -> None:
    target = tmp_path / "out" / "chat.md"
    target.parent.mkdir()
    target.write_text("an older export")
    run = await cli(workspace, "export", "--format", "markdown", "--output", str(target))
    assert run.code == 0, run.stderr
    assert run.stdout == ""
    assert "exported 4 messages as markdown to" in run.stderr
    again = await cli(workspace, "export", "--format", "markdown")
    assert target.read_text() == again.stdout
    assert (target.stat().st_mode & 0o777) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["chat.md"]  # no temp file left


async def test_export_changes_nothing_and_never_waits_for_the_sidecar(
    workspace: Workspace, stored: Conversation
) -> None:
    """A torn journal tail that a writer would cut away, and the directory's lock held by a
    "sidecar": the export reads past the tear, takes no lock, and moves or writes nothing."""
    store = StateStore(workspace.state_dir)
    store.load()
    store.append([Message(id=4, role="user", content="appended", time=TIME)])
    journal = next(workspace.state_dir.glob("journal-*.log"))
    with journal.open("ab") as file:
        file.write(b"0000dead {torn")
    lock = take_lock(workspace.state_dir, purpose="sidecar")
    before = snapshot_of(workspace.state_dir)
    try:
        for fmt in ("text", "markdown", "json", "html"):
            run = await cli(workspace, "export", "--format", fmt)
            assert run.code == 0, run.stderr
            assert "appended" in run.stdout
    finally:
        lock.release()
    assert snapshot_of(workspace.state_dir) == before


async def test_nothing_stored_is_said_and_exits_7(workspace: Workspace) -> None:
    run = await cli(workspace, "export", "--json")
    assert run.code == 7
    assert "no stored conversation in" in run.stderr
    assert "nothing exported" in run.stderr
    assert json.loads(run.stdout)["exit_code"] == 7
    assert not workspace.state_dir.exists()  # looking did not create it


async def test_an_archived_conversation_is_listed_by_status_and_exported_by_name(
    workspace: Workspace, stored: Conversation
) -> None:
    store = StateStore(workspace.state_dir)
    store.load()
    archived = store.archive(reason="AgentAPI restarted without its history")
    assert archived is not None
    newer = Conversation(
        messages=(Message(id=0, role="user", content="a new conversation", time=TIME),)
    )
    store.save(newer, allow_shrink=True)

    status = await cli(workspace, "status", "--json")
    listed = json.loads(status.stdout)["archived"]
    assert [entry["name"] for entry in listed] == [archived.name]
    assert listed[0]["reason"] == "AgentAPI restarted without its history"
    text_status = await cli(workspace, "status")
    assert f"archived       {archived.name}" in text_status.stdout

    current = await cli(workspace, "export")
    assert "a new conversation" in current.stdout
    assert "done." not in current.stdout
    old = await cli(workspace, "export", "--archive", archived.name, "--format", "json")
    assert old.code == 0, old.stderr
    assert old.stdout.encode() == render_agentapi_state(stored)
    by_stem = await cli(workspace, "export", "--archive", archived.stem)
    assert by_stem.code == 0
    assert "done." in by_stem.stdout

    unknown = await cli(workspace, "export", "--archive", "../conversation-000000000001.json")
    assert unknown.code == 2
    assert archived.name in unknown.stderr
    assert "status" in unknown.stderr
    assert [a.name for a in list_archives(workspace.state_dir)] == [archived.name]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _browser(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    browser = _chromium()
    if browser is None:
        if os.environ.get("AGENTAPI_PERSIST_NO_SKIPS"):
            pytest.fail("chromium is required here (scripts/install --dev installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium): the HTML is not judged")
    return subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",  # root in a container has no user namespaces to sandbox with
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={home / 'chromium-profile'}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": str(home)},
        check=False,
    )


class _Articles(html.parser.HTMLParser):
    """The messages as the browser's DOM holds them: role, time and the text of each <pre>."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[dict[str, str]] = []
        self.external: list[str] = []
        self._in: str | None = None
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "script":
            self.scripts += 1
        for name in ("src", "href"):
            if found.get(name):
                self.external.append(str(found[name]))
        if tag == "article":
            self.messages.append({"class": str(found.get("class")), "text": "", "time": ""})
        elif tag in ("pre", "time") and self.messages:
            self._in = tag
            if tag == "time":
                self.messages[-1]["time"] = str(found.get("datetime"))

    def handle_endtag(self, tag: str) -> None:
        if tag == self._in:
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "pre":
            self.messages[-1]["text"] += data


async def test_html_is_one_page_a_browser_renders(
    workspace: Workspace, stored: Conversation, tmp_path: Path
) -> None:
    page = tmp_path / "chat.html"
    run = await cli(workspace, "export", "--format", "html", "--output", str(page))
    assert run.code == 0, run.stderr

    dom = _browser("--dump-dom", page.as_uri(), home=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    articles = _Articles()
    articles.feed(dom.stdout)
    assert [m["class"] for m in articles.messages] == [f"message {m.role}" for m in stored.messages]
    # The browser read back every message's text exactly (as shown: controls pictured).
    assert [m["text"] for m in articles.messages] == [
        terminal_safe(m.content) for m in stored.messages
    ]
    assert {m["time"] for m in articles.messages} == {TIME}
    assert articles.scripts == 0  # the "<script>" in a message stayed text
    assert articles.external == []  # nothing to fetch: one self-contained page

    shot = tmp_path / "chat.png"
    rendered = _browser(
        f"--screenshot={shot}", "--window-size=1000,800", page.as_uri(), home=tmp_path
    )
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    png = shot.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 5000


async def test_an_output_that_cannot_be_written_is_said_and_nothing_is_made(
    workspace: Workspace, stored: Conversation, tmp_path: Path
) -> None:
    """A mistyped directory: exit 2, nothing created (it was created, 0700, silently). A
    directory given as the file: exit 1 naming it, not 3 (whose meaning is the stop's)."""
    missing = tmp_path / "no-such-dir" / "chat.txt"
    run = await cli(workspace, "export", "--output", str(missing))
    assert run.code == 2, run.stderr
    assert f"the directory {missing.parent} does not exist" in run.stderr
    assert not missing.parent.exists()
    run = await cli(workspace, "export", "--output", str(tmp_path))
    assert run.code == 1, run.stderr
    assert f"cannot write {tmp_path}" in run.stderr
    assert "the stored conversation was not touched" in run.stderr

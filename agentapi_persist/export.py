"""``export``: the saved conversation in a form a person (or AgentAPI) can read.

Read-only by construction: the store is opened with ``read_only=True`` (nothing is moved, cut
or written in the state directory) and no lock is taken, so a running sidecar never waits for
an export, and an export never changes what the next stop or restore sees. The result goes to
stdout, or to ``--output FILE`` written atomically (temp file, fsync, rename).

Formats:

- ``text``: for a terminal. Each message under a rule naming its number, role and time.
- ``markdown``: a heading per message and the text in a fence longer than any run of
  backticks inside it, so the terminal-formatted text shows exactly.
- ``json``: AgentAPI's own state file (version 1), so AgentAPI can load it as its history.
- ``html``: one self-contained page (inline style, no script, and a Content-Security-Policy
  that forbids loading anything), roles and times, the text in monospace.

Text and markdown are meant for terminals, where a control character in the agent's output
(an escape sequence, say) would act instead of show: those are shown as the Unicode "control
pictures" (ESC as U+241B) instead. JSON carries the text exactly; HTML escapes it.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ._fsutil import write_atomic
from .agentapi_state import agentapi_state_pieces
from .errors import ConfigError, DurabilityError, ExitCode, PersistError
from .models import Conversation
from .store import StateStore, list_archives, read_archive

__all__ = [
    "FORMATS",
    "ExportNotWritten",
    "ExportSource",
    "NothingToExport",
    "load_for_export",
    "render",
    "write",
]

Format = Literal["text", "markdown", "json", "html"]
FORMATS: tuple[Format, ...] = ("text", "markdown", "json", "html")


class NothingToExport(PersistError):
    """No stored conversation: nothing was written."""

    exit_code = ExitCode.NO_GOOD_COPY


@dataclass(frozen=True, slots=True)
class ExportSource:
    """Where the exported conversation came from, said in the header of every format but
    JSON (which must stay AgentAPI's file, nothing more)."""

    conversation: Conversation
    origin: str
    """``stored copy in DIR (generation N)`` or ``archived copy NAME``."""
    saved_at: str | None
    problems: tuple[str, ...] = ()


def load_for_export(state_dir: Path, *, archive: str | None = None, max_bytes: int) -> ExportSource:
    """The stored conversation, or the archived one named ``archive``. Never writes.

    Raises ``NothingToExport`` when nothing is stored, ``ConfigError`` for an archive name
    that is not one ``status`` lists, ``StateFileError`` for an archive that does not read.
    """
    if archive is not None:
        known = {copy.name: copy for copy in list_archives(state_dir)}
        chosen = known.get(archive) or known.get(f"{archive}.json")
        if chosen is None:
            listed = ", ".join(sorted(known)) or "none"
            raise ConfigError(
                f"no archived conversation named {archive!r} in {state_dir / 'archive'} "
                f"(archived: {listed}); `agentapi-persist status` lists them"
            )
        return ExportSource(
            conversation=read_archive(state_dir, chosen.name, max_bytes=max_bytes),
            origin=f"archived copy {chosen.name} ({chosen.reason or 'no reason recorded'})",
            saved_at=chosen.saved_at,
        )
    store = StateStore(state_dir, max_bytes=max_bytes, read_only=True)
    loaded = store.load()
    if loaded.conversation is None:
        why = f" ({'; '.join(loaded.problems)})" if loaded.problems else ""
        raise NothingToExport(f"no stored conversation in {state_dir}{why}: nothing exported")
    return ExportSource(
        conversation=loaded.conversation,
        origin=f"stored copy in {state_dir} (generation {loaded.seq})",
        saved_at=loaded.saved_at.isoformat() if loaded.saved_at else None,
        problems=loaded.problems,
    )


def render(source: ExportSource, fmt: Format) -> Iterator[bytes]:
    """The export as UTF-8 pieces, in order (a big conversation is never one string)."""
    if fmt == "json":
        yield from agentapi_state_pieces(source.conversation)
        return
    pieces = {"text": _text, "markdown": _markdown, "html": _html}[fmt](source)
    for piece in pieces:
        yield piece.encode("utf-8", errors="replace")


class ExportNotWritten(PersistError):
    """``--output`` could not be written; nothing in the state directory was touched."""


def write(source: ExportSource, fmt: Format, output: Path) -> None:
    """Write the export to ``output`` atomically (0600: a conversation may hold secrets).

    The directory must exist (a mistyped path is said, not created); raises ``ConfigError``
    then, and ``ExportNotWritten`` when the write itself fails."""
    if not output.parent.is_dir():
        raise ConfigError(
            f"--output {output}: the directory {output.parent} does not exist; nothing written"
        )
    try:
        write_atomic(output, render(source, fmt))
    except DurabilityError as exc:
        raise ExportNotWritten(
            f"cannot write {output}: {exc}; the stored conversation was not touched"
        ) from None


# -- formats -----------------------------------------------------------------------------------

_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f\x80-\x9f]")


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x20:
        return chr(0x2400 + code)  # the control pictures block: ESC shows as U+241B
    return "\u2421" if code == 0x7F else "\ufffd"


def terminal_safe(text: str) -> str:
    """``text`` with every control character but tab and newline shown, not obeyed."""
    return _CONTROLS.sub(_visible, text)


def _summary(source: ExportSource) -> str:
    count = len(source.conversation.messages)
    saved = f", saved {source.saved_at}" if source.saved_at else ""
    return f"{count} message{'s' if count != 1 else ''}{saved}, from the {source.origin}"


def _prompt_line(conversation: Conversation) -> str | None:
    if not conversation.initial_prompt:
        return None
    sent = {True: "sent", False: "not sent yet", None: "unknown whether sent"}
    return (
        f"initial prompt ({sent[conversation.initial_prompt_sent]}): {conversation.initial_prompt}"
    )


def _text(source: ExportSource) -> Iterator[str]:
    yield f"Conversation: {terminal_safe(_summary(source))}\n"
    prompt = _prompt_line(source.conversation)
    if prompt is not None:
        yield terminal_safe(prompt) + "\n"
    for message in source.conversation.messages:
        title = f"── #{message.id} {message.role} · {message.time} "
        yield f"\n{title}{'─' * max(72 - len(title), 3)}\n"
        yield terminal_safe(message.content).rstrip("\n") + "\n"


def _fence(text: str) -> str:
    longest = max((len(run) for run in re.findall("`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _markdown(source: ExportSource) -> Iterator[str]:
    yield "# Conversation\n\n"
    yield terminal_safe(_summary(source)).replace("_", "\\_") + "\n"
    prompt = _prompt_line(source.conversation)
    if prompt is not None:
        fence = _fence(prompt)
        yield f"\n{fence}text\n{terminal_safe(prompt)}\n{fence}\n"
    for message in source.conversation.messages:
        content = terminal_safe(message.content).rstrip("\n")
        fence = _fence(content)
        yield f"\n## {message.id}. {message.role.capitalize()} · {message.time}\n\n"
        yield f"{fence}text\n{content}\n{fence}\n"


_STYLE = """
body{margin:0;background:#f6f7f9;color:#1f2328;font:15px/1.5 system-ui,sans-serif}
header.page{padding:16px 24px;background:#fff;border-bottom:1px solid #d0d7de}
header.page h1{margin:0;font-size:20px}
header.page p{margin:4px 0 0;color:#59636e}
main{max-width:1100px;margin:0 auto;padding:16px 24px}
article{margin:0 0 14px;background:#fff;border:1px solid #d0d7de;border-radius:8px}
article>header{display:flex;gap:12px;align-items:baseline;padding:6px 12px;
border-bottom:1px solid #d0d7de;font-size:13px;color:#59636e}
article.user>header{background:#ddf4ff}
article.agent>header{background:#f6f8fa}
.role{font-weight:600;color:#1f2328}
.number{margin-left:auto}
pre{margin:0;padding:10px 12px;overflow-x:auto;white-space:pre;
font:13px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
""".strip()


def _html(source: ExportSource) -> Iterator[str]:
    esc = html.escape
    count = len(source.conversation.messages)
    yield (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; style-src 'unsafe-inline'\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>Conversation ({count} messages)</title>\n<style>\n{_STYLE}\n</style>\n"
        '</head>\n<body>\n<header class="page">\n<h1>Conversation</h1>\n'
        f'<p class="summary">{esc(terminal_safe(_summary(source)))}</p>\n'
    )
    prompt = _prompt_line(source.conversation)
    if prompt is not None:
        yield f'<p class="prompt">{esc(terminal_safe(prompt))}</p>\n'
    yield "</header>\n<main>\n"
    for message in source.conversation.messages:
        role = "user" if message.role == "user" else "agent"
        yield (
            f'<article class="message {role}" id="m{message.id}">\n'
            f'<header><span class="role">{esc(message.role.capitalize())}</span>'
            f'<time datetime="{esc(message.time)}">{esc(message.time)}</time>'
            f'<span class="number">#{message.id}</span></header>\n'
            f"<pre>{esc(terminal_safe(message.content))}</pre>\n</article>\n"
        )
    yield "</main>\n</body>\n</html>\n"

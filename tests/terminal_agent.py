#!/usr/bin/env python3
"""A scripted terminal agent for running the real AgentAPI in tests.

AgentAPI (``agentapi server --type custom -- python terminal_agent.py ...``) wraps a program in
a terminal and reads its screen. This program behaves like the agents it wraps, just enough for
AgentAPI's screen tracker (coder/agentapi lib/screentracker, lib/msgfmt):

- It shows a start-up screen, then, once "ready", an input box of the shape AgentAPI's generic
  readiness check looks for (lib/msgfmt/agent_readiness.go, message_box.go): a line holding
  ``>`` right under a horizontal border of 15+ ``─``. AgentAPI sends the initial prompt and
  loads its state file only once it sees that box (pty_conversation.go, the snapshot loop).
- Input arrives as a bracketed paste (``ESC[200~ text ESC[201~``, lib/httpapi/claude.go) then a
  carriage return; the terminal is raw, so nothing is echoed unless this program draws it. The
  pasted text is drawn in the box at once, so AgentAPI's echo detection sees a change.
- Each submitted line gets a deterministic answer: ``reply <n>: <text>``; ``long <k>`` prints
  ``k`` numbered lines; ``slow <s>`` waits ``s`` seconds (status ``running``) before answering.
- Every input is appended to ``--log`` as one JSON line and fsynced, so a test can tell whether
  the initial prompt was sent to the agent again after a restart.

It exits on end of input or on SIGTERM/SIGINT/SIGHUP.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import termios
import time
import tty

BORDER = "─" * 40
PASTE_START = b"\x1b[200~"
PASTE_END = b"\x1b[201~"


class Screen:
    """Draws the transcript and the input box at the bottom of the terminal."""

    def __init__(self) -> None:
        self.box_drawn = False
        self.answers = 0

    def write(self, text: str) -> None:
        os.write(1, text.replace("\n", "\r\n").encode())

    def erase_box(self) -> None:
        if self.box_drawn:
            # The cursor sits at the end of the bottom border: clear the box's three lines.
            self.write("\r\x1b[2K\x1b[1A\x1b[2K\x1b[1A\x1b[2K\r")
            self.box_drawn = False

    def draw_box(self, typed: str) -> None:
        self.erase_box()
        self.write(f"{BORDER}\n> {typed}\n{BORDER}")
        self.box_drawn = True

    def answer(self, text: str) -> None:
        self.erase_box()
        self.answers += 1
        words = text.split()
        self.write(f"you said: {text}\n")
        if len(words) == 2 and words[0] == "slow":
            self.write(f"thinking for {words[1]} s\n")
            time.sleep(float(words[1]))
        if len(words) == 2 and words[0] == "long":
            for line in range(int(words[1])):
                self.write(f"answer {self.answers} line {line}: {'x' * 40}\n")
        self.write(f"reply {self.answers}: {text}\n\n")


def _record(log_path: str | None, text: str) -> None:
    if not log_path:
        return
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(json.dumps({"time": time.time(), "input": text}) + "\n")
        log.flush()
        os.fsync(log.fileno())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", help="append every input here, one JSON line each")
    parser.add_argument("--ready-after", type=float, default=0.0, help="seconds of start-up")
    parser.add_argument("--banner", default="Scripted agent 1.0", help="start-up screen text")
    args = parser.parse_args()

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, lambda *_: os._exit(0))
    if os.isatty(0):
        tty.setraw(0, termios.TCSANOW)
    screen = Screen()
    screen.write(f"{args.banner}\nstarting up...\n")
    if args.ready_after > 0:
        time.sleep(args.ready_after)
    screen.write("ready for input\n\n")
    typed = ""
    screen.draw_box(typed)
    pending = b""
    in_paste = False
    while True:
        try:
            chunk = os.read(0, 65536)
        except OSError:
            return 0
        if not chunk:
            return 0
        pending += chunk
        while pending:
            if pending.startswith(PASTE_START):
                in_paste, pending = True, pending[len(PASTE_START) :]
            elif pending.startswith(PASTE_END):
                in_paste, pending = False, pending[len(PASTE_END) :]
            elif (
                PASTE_START.startswith(pending[:6]) and len(pending) < 6 and pending[:1] == b"\x1b"
            ):
                break  # an escape sequence cut across reads: wait for the rest
            elif not in_paste and pending[:1] in (b"\r", b"\n"):
                pending = pending[1:]
                if typed:
                    _record(args.log, typed)
                    screen.answer(typed)
                    typed = ""
                    screen.draw_box(typed)
            elif pending[:1] == b"\x03" and not in_paste:
                return 0
            else:
                end = len(pending)
                for marker in (PASTE_START, PASTE_END, b"\r", b"\n", b"\x1b"):
                    found = pending.find(marker)
                    if 0 < found < end and not (in_paste and marker in (b"\r", b"\n")):
                        end = found
                if end == 0:
                    end = 1
                typed += pending[:end].decode("utf-8", errors="replace")
                pending = pending[end:]
                screen.draw_box(typed.replace("\r", " ").replace("\n", " "))


if __name__ == "__main__":
    sys.exit(main())

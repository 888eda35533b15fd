"""The log snapshot: the latest messages, shaped and sized for the Coder server.

Pure: no I/O, no clock, no logging, so the shutdown sequence can build it at any point and the
rules can be tested exhaustively. The server stores at most 65,536 bytes *as sent* (compact
UTF-8 JSON), so every size here is measured on the encoded bytes, never on characters: a
newline in a message costs 2 bytes once escaped, a control character 6, "─" 3 and "😀" 4.

The rules, in order:

1. keep the last ``max_messages`` messages;
2. while the body is too big, drop the oldest;
3. if the newest message alone is still too big, keep the tail of its content (the end of an
   agent's answer is what a reader of a paused task needs) behind :data:`TRUNCATION_MARKER`,
   as long a tail as fits. Python strings are sequences of code points, so cutting one never
   splits a UTF-8 character.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .models import Message, dump_compact

__all__ = [
    "MIN_MAX_BYTES",
    "TRUNCATION_MARKER",
    "Snapshot",
    "build_snapshot",
]

TRUNCATION_MARKER = "[... {cut_bytes} bytes truncated by agentapi-persist ...]\n"
"""Placed before the kept tail of a truncated message; ``cut_bytes`` is the decimal count of
UTF-8 bytes removed from the head of the content, e.g.
``"[... 145000 bytes truncated by agentapi-persist ...]\\n"``. It ends with a newline so the tail
starts on a line of its own on the task page."""

MIN_MAX_BYTES = 256
"""The smallest size limit accepted: room for the empty body plus one message holding only the
marker (ids and times are bounded by the models, so this always suffices for valid messages)."""

_HEAD = b'{"messages":['
_TAIL = b"]}"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A built log snapshot: the exact bytes to upload and what went into them."""

    payload: bytes
    """Exactly the body to POST: compact UTF-8 JSON ``{"messages":[{id,content,role,time}]}``."""
    messages: tuple[Message, ...]
    """The messages in the payload, oldest first; a truncated one carries its new content."""
    total: int
    """How many messages the conversation had."""
    dropped: int
    """Older messages left out, beyond ``max_messages`` or for size."""
    truncated_bytes: int
    """UTF-8 bytes cut from the head of the one oversize message; 0 when nothing was cut."""

    @property
    def size(self) -> int:
        """The payload size in bytes, as the server counts it."""
        return len(self.payload)


def build_snapshot(
    messages: Sequence[Message], *, max_messages: int = 30, max_bytes: int = 65_536
) -> Snapshot:
    """Build the snapshot of ``messages`` (oldest first) within both limits.

    The result keeps the longest run of newest messages that fits; only when not even the
    newest fits on its own is its content cut to the longest tail that does. The payload is
    always ``<= max_bytes``. Inputs are not modified.

    Raises ``ValueError`` when ``max_messages < 1``, when ``max_bytes < MIN_MAX_BYTES``, or when
    a message's id and time alone would not fit (impossible for validated messages).
    """
    if max_messages < 1:
        raise ValueError(f"max_messages must be at least 1, got {max_messages}")
    if max_bytes < MIN_MAX_BYTES:
        raise ValueError(f"max_bytes must be at least {MIN_MAX_BYTES}, got {max_bytes}")

    total = len(messages)
    window = messages[max(0, total - max_messages) :]
    room = max_bytes - len(_HEAD) - len(_TAIL)
    kept: list[bytes] = []  # newest first
    used = 0
    for message in reversed(window):
        comma = 1 if kept else 0
        # Every character costs at least one byte: skip encoding a content that cannot fit
        # (a 10 MB message must not be serialised just to learn it is too big).
        if used + comma + len(message.content) > room:
            break
        encoded = _encode(message, message.content)
        if used + comma + len(encoded) > room:
            break
        kept.append(encoded)
        used += comma + len(encoded)

    if kept or not window:
        kept.reverse()
        return Snapshot(
            payload=_HEAD + b",".join(kept) + _TAIL,
            messages=tuple(window[len(window) - len(kept) :]),
            total=total,
            dropped=total - len(kept),
            truncated_bytes=0,
        )

    newest = window[-1]
    encoded, content, cut = _longest_tail(newest, room=room)
    return Snapshot(
        payload=_HEAD + encoded + _TAIL,
        messages=(newest.model_copy(update={"content": content}),),
        total=total,
        dropped=total - 1,
        truncated_bytes=cut,
    )


def _encode(message: Message, content: str) -> bytes:
    """One message as the server expects it: keys in the order id, content, role, time."""
    return dump_compact(
        {"id": message.id, "content": content, "role": message.role, "time": message.time}
    )


def _longest_tail(message: Message, *, room: int) -> tuple[bytes, str, int]:
    """Encode ``message`` with the longest content tail that fits in ``room`` bytes.

    Returns the encoded message, its new content (marker + tail) and the bytes cut.

    A search on the number of tail characters ``k``. The encoded size never decreases as
    ``k`` grows: one more character adds at least its UTF-8 length (more once escaped) and
    lowers the cut count by that same length, which shortens the marker by at most one digit.
    Each trial encodes at most ``room`` characters (each costs at least a byte), never the
    whole content. Plain bisection takes about 16 trials for a 64 KiB limit; since the size
    grows almost linearly with ``k``, the byte density of the last characters predicts the
    answer, so the search gallops out from that guess (two trials when it is right) and
    bisects only what is left.
    """
    content = message.content
    length = len(content)
    # ASCII text needs no encoding to count its bytes.
    total_bytes = length if content.isascii() else _utf8_size(content)

    def trial(k: int) -> tuple[bytes, str, int]:
        tail = content[length - k :] if k else ""
        cut = total_bytes - len(tail.encode("utf-8"))
        new_content = TRUNCATION_MARKER.format(cut_bytes=cut) + tail
        return _encode(message, new_content), new_content, cut

    best = trial(0)
    if len(best[0]) > room:
        raise ValueError(
            f"message {message.id} does not fit in the snapshot even with an empty content: "
            f"{len(best[0])} bytes for {room} available"
        )
    # Invariant: trial(lo) fits; anything above hi does not (the whole content did not fit).
    lo, hi = 0, min(length - 1, room)
    if hi > 0:
        sample_bytes = len(dump_compact(content[length - hi :])) - 2  # escaped, no quotes
        guess = (room - len(best[0])) * hi // sample_bytes
        step = 1
        if lo < guess <= hi:
            candidate = trial(guess)
            if len(candidate[0]) <= room:
                lo, best = guess, candidate
                while lo < hi:  # gallop up: guess+1, +2, +4, ...
                    probe = min(lo + step, hi)
                    candidate = trial(probe)
                    if len(candidate[0]) > room:
                        hi = probe - 1
                        break
                    lo, best, step = probe, candidate, step * 2
            else:
                hi = guess - 1
                while lo < hi:  # gallop down: guess-1, -2, -4, ...
                    probe = max(hi - step + 1, lo + 1)
                    candidate = trial(probe)
                    if len(candidate[0]) <= room:
                        lo, best = probe, candidate
                        break
                    hi, step = probe - 1, step * 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        candidate = trial(mid)
        if len(candidate[0]) <= room:
            lo, best = mid, candidate
        else:
            hi = mid - 1
    return best


def _utf8_size(text: str) -> int:
    """The UTF-8 size of ``text``, encoded a megabyte at a time: one 10 MB ``encode`` needs a
    fresh 10 MB buffer, and faulting its pages in can double the time; the pieces' buffers
    are reused. Slicing a ``str`` never splits a character."""
    step = 1 << 20
    return sum(len(text[i : i + step].encode("utf-8")) for i in range(0, len(text), step))

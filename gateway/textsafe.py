"""Make tenant-supplied text safe to print on a terminal: controls are shown, never obeyed."""

from __future__ import annotations

import re
import unicodedata

# A plain SGR sequence (colours, bold...): CSI, numeric parameters, 'm'. Nothing else in the
# ESC family is let through in allow_sgr mode: cursor moves, erases, OSC (titles, OSC 8
# hyperlinks, OSC 52 clipboard writes), DCS, private modes... all get escaped.
_SGR = re.compile(r"\x1b\[[0-9;:]{0,64}m")
# The SGR parameters let through: reset, bold, dim, italic, underline, and the 16 foreground
# colours. Not conceal (8), reverse (7), backgrounds or 256/RGB colours: with them text
# (the gateway's own status line included) can be made invisible.
_SGR_ALLOWED = frozenset(
    {"", "0", "1", "2", "3", "4", "22", "23", "24", "39"}
    | {str(n) for n in range(30, 38)}
    | {str(n) for n in range(90, 98)}
)
RESET = "\x1b[0m"


def _plain_sgr(sequence: str) -> bool:
    return all(p in _SGR_ALLOWED for p in re.split(r"[;:]", sequence[2:-1]))


# Joiners shape emoji and scripts such as Persian; they cannot reorder or hide text.
_KEPT_FORMAT = frozenset("\u200c\u200d")
# Unicode categories that never reach the terminal raw: controls (C0, DEL, C1), format
# characters (bidi embeddings/overrides/isolates, zero-width space, BOM...), line and
# paragraph separators, and lone surrogates (undecodable bytes).
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _unsafe(char: str) -> bool:
    if char in "\n\t":
        return False
    if char < " " or "\x7f" <= char <= "\x9f":
        return True
    if char.isascii():
        return False
    return char not in _KEPT_FORMAT and unicodedata.category(char) in _UNSAFE_CATEGORIES


# Every character but printable ASCII, newline and tab: only these may need escaping.
_CANDIDATE = re.compile(r"[^\x20-\x7e\n\t]")


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    return _escape(char) if _unsafe(char) else char


def _escape_plain(text: str) -> str:
    # Found at C speed, then judged one by one: a deploy log streamed to hundreds of
    # watchers is mostly plain ASCII, which a loop over every character made the gateway's
    # busiest code (issue 20).
    return _CANDIDATE.sub(_escape_one, text)


def terminal_safe(text: str, *, allow_sgr: bool = False) -> str:
    """Return `text` with every control, escape sequence and invisible format character
    shown as a visible escape (`\\x1b`, `\\u202e`), keeping newlines and tabs.

    CRLF line ends become plain newlines; a lone carriage return (which could overwrite what
    was printed before it) is escaped. With `allow_sgr`, pure SGR colour sequences pass.
    """
    text = text.replace("\r\n", "\n")
    if not allow_sgr:
        return _escape_plain(text)
    out: list[str] = []
    position = 0
    for match in _SGR.finditer(text):
        out.append(_escape_plain(text[position : match.start()]))
        sequence = match.group()
        out.append(sequence if _plain_sgr(sequence) else _escape_plain(sequence))
        position = match.end()
    out.append(_escape_plain(text[position:]))
    return "".join(out)


# The longest tail held back by a stream filter: an SGR sequence that may still complete.
_MAX_PENDING = 68


class TerminalStream:
    """`terminal_safe` for text that arrives in chunks (a live deploy log): a CRLF or an SGR
    sequence cut between two chunks is held back until the next one completes it, instead
    of being escaped half by half."""

    def __init__(self, *, allow_sgr: bool = False) -> None:
        self.allow_sgr = allow_sgr
        self._pending = ""

    def feed(self, chunk: str) -> str:
        text = self._pending + chunk
        cut = len(text)
        if text.endswith("\r"):
            cut -= 1
        elif self.allow_sgr:
            escape = text.rfind("\x1b", max(0, len(text) - _MAX_PENDING))
            if escape != -1 and _could_become_sgr(text[escape:]):
                cut = escape
        self._pending = text[cut:]
        safe = terminal_safe(text[:cut], allow_sgr=self.allow_sgr)
        if self.allow_sgr and "\x1b[" in safe and not safe.endswith(RESET):
            # Colours never outlive the chunk that set them: whatever comes next (the
            # gateway's own lines) is shown as it is.
            safe += RESET
        return safe

    def flush(self) -> str:
        """Whatever is still held back, escaped (the stream has ended)."""
        text, self._pending = self._pending, ""
        return terminal_safe(text, allow_sgr=self.allow_sgr)


def _could_become_sgr(tail: str) -> bool:
    """True if `tail` (starting with ESC) is an unfinished SGR sequence."""
    return re.fullmatch(r"\x1b(\[[0-9;:]{0,64})?", tail) is not None

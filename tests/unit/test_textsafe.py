"""The terminal escaper: controls and escape sequences are shown, never passed through."""

from __future__ import annotations

import re
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.tables import one_line, render
from gateway.textsafe import RESET, TerminalStream, terminal_safe

SGR = re.compile(r"\x1b\[[0-9;:]*m")


def raw_controls(text: str) -> list[str]:
    """Characters a terminal could act on (or that hide or reorder text)."""
    return [
        c
        for c in text
        if c not in "\n\t"
        and unicodedata.category(c) in {"Cc", "Cf", "Zl", "Zp", "Cs"}
        and c not in "\u200c\u200d"
    ]


# Text rich in what hostile output carries: ESC, CSI/OSC introducers, BEL, C1, bidi.
hostile = st.text(
    alphabet=st.one_of(
        st.sampled_from(list("\x1b[]0123456789;:m?lhH\x07\x9b\x9d\r\n\t\x7f\\PST")),
        st.sampled_from(["\u202e", "\u2066", "\u2069", "\u200b", "\ufeff", "\u2028", "\u00ad"]),
        st.characters(),
    ),
    max_size=200,
)


@given(hostile)
def test_strict_output_has_no_control_characters(text):
    assert raw_controls(terminal_safe(text)) == []


@given(hostile)
def test_sgr_mode_lets_only_sgr_through(text):
    safe = terminal_safe(text, allow_sgr=True)
    without_sgr = SGR.sub("", safe)
    assert raw_controls(without_sgr) == []
    # Every SGR sequence in the output was in the input: nothing is made up.
    assert all(seq in text for seq in SGR.findall(safe))


@given(st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Zl", "Zp"))))
def test_ordinary_text_is_unchanged(text):
    assert terminal_safe(text) == text


@given(hostile, st.lists(st.integers(min_value=0, max_value=200), max_size=6))
@settings(max_examples=300)
def test_stream_in_chunks_equals_the_whole(text, cuts):
    points = sorted({min(c, len(text)) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    for allow_sgr in (False, True):
        stream = TerminalStream(allow_sgr=allow_sgr)
        streamed = "".join(stream.feed(c) for c in chunks) + stream.flush()
        assert streamed == terminal_safe(text, allow_sgr=allow_sgr)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("\x1b]52;c;ZXZpbA==\x07", "\\x1b]52;c;ZXZpbA==\\x07"),  # OSC 52 clipboard write
        ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),  # window title
        (
            "\x1b]8;;http://evil/\x1b\\x\x1b]8;;\x1b\\",
            "\\x1b]8;;http://evil/\\x1b\\x\\x1b]8;;\\x1b\\",
        ),
        ("\x1b[2J\x1b[1;1H", "\\x1b[2J\\x1b[1;1H"),  # clear screen, cursor home
        ("abc\u202edcba", "abc\\u202edcba"),  # bidi override
        ("\x9b31m", "\\x9b31m"),  # C1 CSI
        ("ok\rFAKE", "ok\\x0dFAKE"),  # a lone CR would overwrite the line
        ("line\r\nnext\n\tindent", "line\nnext\n\tindent"),
        ("été 日本 👨\u200d👩", "été 日本 👨\u200d👩"),
    ],
)
def test_known_sequences(text, shown):
    assert terminal_safe(text) == shown


def test_sgr_mode_keeps_colours_only():
    text = "\x1b[1;31mred\x1b[0m \x1b[2Kerase \x1b]0;t\x07"
    assert (
        terminal_safe(text, allow_sgr=True) == "\x1b[1;31mred\x1b[0m \\x1b[2Kerase \\x1b]0;t\\x07"
    )


def test_table_cells_stay_on_one_line():
    assert one_line("a\nb\tc\x1b[A") == "a\\nb\\tc\\x1b[A"
    table = render([["#1", "fix\x1b]0;pwned\x07\nrm -rf"]], ["ID", "SUBJECT"])
    assert "\x1b" not in table and "\x07" not in table
    assert len(table.splitlines()) == 2


@pytest.mark.parametrize(
    "sequence",
    ["\x1b[8m", "\x1b[30;40m", "\x1b[7m", "\x1b[38;5;16m", "\x1b[48;2;0;0;0m", "\x1b[1;8m"],
)
def test_regression_sgr_that_can_hide_text_is_escaped(sequence):
    """Conceal, reverse, backgrounds and 256/RGB colours could make the gateway's own status
    line invisible after a deploy's output: shown, not obeyed."""
    shown = terminal_safe(f"{sequence}fake: deploy succeeded\n", allow_sgr=True)
    assert "\x1b" not in shown and "\\x1b[" in shown


def test_colours_never_outlive_their_chunk():
    stream = TerminalStream(allow_sgr=True)
    out = stream.feed("\x1b[31mred and unterminated ")
    assert out.startswith("\x1b[31m") and out.endswith(RESET)
    assert stream.feed("plain\n") == "plain\n"

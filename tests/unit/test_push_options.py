"""Push options as the hooks forward them: the allow-list and what it refuses."""

from __future__ import annotations

import pytest

from gateway.deploys.options import NONE, OptionError, PushOptions, parse


def test_no_options_and_the_known_ones():
    assert parse(None) == NONE and parse([]) == NONE and not NONE.given
    found = parse(["deploy.detach", "deploy.note=  v1.2 hotfix "])
    assert found == PushOptions(detach=True, note="v1.2 hotfix")
    assert found.words() == ["deploy.detach", "deploy.note=v1.2 hotfix"]
    assert parse(["deploy.attach", "deploy.attach"]).attach  # a repeated flag is harmless


@pytest.mark.parametrize(
    ("configured", "options", "mode"),
    [
        ("attached", PushOptions(detach=True), "detached"),
        ("detached", PushOptions(attach=True), "attached"),
        ("gate", PushOptions(attach=True), "gate"),
        ("attached", NONE, "attached"),
    ],
)
def test_mode_follows_the_push_except_gate(configured, options, mode):
    assert options.mode(configured) == mode


@pytest.mark.parametrize(
    "raw",
    [
        "deploy.skip",  # not a list
        [1, 2],
        [None],
        {"deploy.skip": True},
        ["deploy.note=\udcff"],  # undecodable bytes, as os.environ gives them
        ["deploy.note=a\u200bb"],  # a zero-width (format) character
        ["deploy.note=line\nbreak"],
        ["deploy.note=line\u2028separator"],  # Zl: some viewers break the line there
        ["deploy.note=paragraph\u2029separator"],  # Zp
        ["deploy.note=c1\x85control"],  # NEL, a C1 control
        ["Deploy.Skip"],  # names are exact
        ["deploy.skip "],
        [""],
    ],
)
def test_regression_malformed_options_are_refused(raw):
    with pytest.raises(OptionError):
        parse(raw)


def test_regression_a_refused_option_is_shown_short_and_printable():
    with pytest.raises(OptionError) as refused:
        parse(["\x1b]52;c;" + "A" * 400])
    text = str(refused.value)
    assert "\x1b" not in text and len(text) < 200 and text.isprintable()

"""Public key vetting at registration, checked against what ssh-keygen says of the same keys."""

from __future__ import annotations

import base64
import contextlib
import os
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import InvalidKey
from gateway.keys import parse_public_key
from tests.helpers import keygen, keygen_fingerprint


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def sk_ed25519_line(comment: str = "yubikey") -> str:
    """A FIDO key line, built by hand: no hardware token is needed to test parsing."""
    blob = _string(b"sk-ssh-ed25519@openssh.com") + _string(os.urandom(32)) + _string(b"ssh:")
    return f"sk-ssh-ed25519@openssh.com {base64.b64encode(blob).decode()} {comment}"


def sk_ecdsa_line(comment: str = "token") -> str:
    point = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )
    blob = (
        _string(b"sk-ecdsa-sha2-nistp256@openssh.com")
        + _string(b"nistp256")
        + _string(point)
        + _string(b"ssh:")
    )
    return f"sk-ecdsa-sha2-nistp256@openssh.com {base64.b64encode(blob).decode()} {comment}"


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys")


@pytest.mark.parametrize(
    ("kind", "bits", "algorithm", "expected_bits"),
    [
        ("ed25519", None, "ssh-ed25519", 256),
        ("ecdsa", 256, "ecdsa-sha2-nistp256", 256),
        ("ecdsa", 384, "ecdsa-sha2-nistp384", 384),
        ("ecdsa", 521, "ecdsa-sha2-nistp521", 521),
        ("rsa", 2048, "ssh-rsa", 2048),
        ("rsa", 3072, "ssh-rsa", 3072),
    ],
)
def test_accepted_keys_match_ssh_keygen(keydir, kind, bits, algorithm, expected_bits):
    path = keygen(keydir / f"{kind}{bits}", kind, bits, comment="me@laptop")
    pub = Path(f"{path}.pub")
    key = parse_public_key("  \n" + pub.read_text() + "\n\n")
    assert key.algorithm == algorithm
    assert key.bits == expected_bits
    assert key.comment == "me@laptop"
    assert key.fingerprint == keygen_fingerprint(pub)
    assert key.fingerprint_md5 == keygen_fingerprint(pub, md5=True)
    assert pub.read_text().startswith(key.openssh)


@pytest.mark.parametrize("make", [sk_ed25519_line, sk_ecdsa_line])
def test_security_key_types(keydir, make):
    line = make()
    pub = keydir / "sk.pub"
    pub.write_text(line + "\n")
    key = parse_public_key(line)
    assert key.bits == 256
    assert key.fingerprint == keygen_fingerprint(pub)
    assert key.keygen_type.endswith("-SK")


def test_private_key_is_refused_with_a_warning(keydir):
    path = keygen(keydir / "private", "ed25519")
    text = path.read_text()
    # Whole, or its body pasted without the armour lines (one line or several).
    body = text.splitlines()[1:-1]
    for pasted in (text, "".join(body), "\n".join(body)):
        with pytest.raises(InvalidKey, match="PRIVATE key"):
            parse_public_key(pasted)


def test_dsa_refused(keydir):
    path = keygen(keydir / "dsa", "dsa")
    with pytest.raises(InvalidKey, match="DSA"):
        parse_public_key(Path(f"{path}.pub").read_text())


def test_small_rsa_refused(keydir):
    path = keygen(keydir / "rsa1024", "rsa", 1024)
    with pytest.raises(InvalidKey, match="1024 bits"):
        parse_public_key(Path(f"{path}.pub").read_text())


def test_several_keys_refused(keydir):
    one = Path(f"{keygen(keydir / 'one', 'ed25519')}.pub").read_text().strip()
    two = Path(f"{keygen(keydir / 'two', 'ed25519')}.pub").read_text().strip()
    with pytest.raises(InvalidKey, match="one key at a time"):
        parse_public_key(f"{one}\n{two}\n")
    with pytest.raises(InvalidKey, match="one key at a time"):
        parse_public_key(f"{one} {two}")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "no key given"),
        ("hello world", "not an OpenSSH public key"),
        ("ssh-ed25519", "missing"),
        ("ssh-ed25519 !!!notbase64", "damaged"),
        ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5", "not a valid public key"),
        ("ssh-ed25519 AAAA", "truncated"),
        ("ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIPLQ9lS1gW4o+8W3+dD5tF2B3Bg5R4q8gJ6Z9p8iT6bq", "says"),
        ('command="id" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA x', "options"),
        ("ssh-ed25519-cert-v01@openssh.com AAAA", "certificates"),
        ("---- BEGIN SSH2 PUBLIC KEY ----\nAAAA\n---- END SSH2 PUBLIC KEY ----", "RFC 4716"),
        ("x" * 20000, "too large"),
    ],
)
def test_garbage_refused(text, reason):
    with pytest.raises(InvalidKey, match=reason):
        parse_public_key(text)


def test_comment_is_sanitized(keydir):
    pub = Path(f"{keygen(keydir / 'c', 'ed25519')}.pub").read_text().split()
    key = parse_public_key(f"{pub[0]} {pub[1]} evil\x1b[31m name")
    assert "\x1b" not in key.comment
    assert key.comment.startswith("evil")


@given(st.text(max_size=400))
def test_key_parser_never_crashes(text):
    try:
        key = parse_public_key(text)
    except InvalidKey as exc:
        assert "\n" not in str(exc)
        return
    assert key.fingerprint.startswith("SHA256:")


@given(st.binary(max_size=300), st.sampled_from(["ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256"]))
def test_key_parser_on_random_blobs(blob, algorithm):
    line = f"{algorithm} {base64.b64encode(blob).decode()}"
    with contextlib.suppress(InvalidKey):  # refusing is fine; crashing is not
        parse_public_key(line)

"""Certificate policy (gateway/ssh/certs.py) on certificates asyncssh makes: the checks OpenSSH
clients never let us see (host certificates as user certificates), and revocation files."""

from __future__ import annotations

import time

import asyncssh
import pytest

from gateway.ssh import certs

NOW = time.time()


@pytest.fixture(scope="module")
def ca() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


@pytest.fixture(scope="module")
def user_key() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


def trusted(ca: asyncssh.SSHKey) -> frozenset[str]:
    return frozenset({ca.get_fingerprint("sha256")})


def user_cert(ca, key, principals=("alice",), **kw):
    return ca.generate_user_certificate(key, "alice@laptop", principals=principals, **kw)


def test_fields_asyncssh_keeps_private_are_still_there(ca, user_key):
    """certs.Fields reads attributes asyncssh does not document: an upgrade that renames them
    must fail here, not let certificates through unchecked."""
    cert = user_cert(ca, user_key, serial=12, valid_before=NOW + 60)
    fields = certs.Fields.of(cert)
    assert (fields.serial, fields.key_id) == (12, "alice@laptop")
    assert fields.valid_before == int(NOW + 60) and fields.cert_type == 1


def test_a_good_certificate_passes(ca, user_key, tmp_path):
    cert = user_cert(ca, user_key, source_address=["127.0.0.0/8"])
    info = certs.check(cert, trusted(ca), certs.Revocations(None), "127.0.0.1")
    assert info.ca_fingerprint == ca.get_fingerprint("sha256")
    assert info.key_fingerprint == user_key.get_fingerprint("sha256")


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (
            lambda ca, key: ca.generate_host_certificate(key, "host", principals=["alice"]),
            "not a user",
        ),
        (lambda ca, key: user_cert(ca, key, principals=()), "names no principal"),
        (lambda ca, key: user_cert(ca, key, valid_before=NOW - 1), "expired"),
        (lambda ca, key: user_cert(ca, key, valid_after=NOW + 3600), "not valid yet"),
        (lambda ca, key: user_cert(ca, key, force_command="/bin/sh"), "force-command"),
        (
            lambda ca, key: user_cert(ca, key, source_address=["10.0.0.0/8"]),
            "source-address",
        ),
    ],
)
def test_regression_what_the_gateway_cannot_honour_is_refused(ca, user_key, make, why):
    with pytest.raises(certs.CertificateRefused, match=why):
        certs.check(make(ca, user_key), trusted(ca), certs.Revocations(None), "127.0.0.1")


def test_regression_an_untrusted_ca_is_refused(ca, user_key):
    rogue = asyncssh.generate_private_key("ssh-ed25519")
    with pytest.raises(certs.CertificateRefused, match="CA is not trusted"):
        certs.check(user_cert(rogue, user_key), trusted(ca), certs.Revocations(None), "127.0.0.1")


def test_revocations_by_serial_key_id_and_key_are_reread_when_the_file_changes(
    ca, user_key, tmp_path
):
    path = tmp_path / "revoked"
    path.write_text("# none\n")
    revocations = certs.Revocations(path)
    cert = user_cert(ca, user_key, serial=5)
    certs.check(cert, trusted(ca), revocations, "127.0.0.1")
    for line in ("serial 5", "key-id alice@laptop", f"key {user_key.get_fingerprint('sha256')}"):
        path.write_text(f"# revoked by the test\n{line}\n")
        revocations.refresh()
        with pytest.raises(certs.CertificateRefused, match="revoked"):
            certs.check(cert, trusted(ca), revocations, "127.0.0.1")
    path.write_text("serial five\n")
    with pytest.raises(ValueError, match="expected `serial N`"):
        revocations.refresh()


def test_regression_a_principal_map_ignores_unmapped_principals(ca, user_key):
    cert = user_cert(ca, user_key, principals=("alice", "ops@corp"))
    assert certs.candidates(cert, {"ops@corp": "bob"}) == [("ops@corp", "bob")]
    assert certs.candidates(cert, {}) == [("alice", "alice"), ("ops@corp", "ops@corp")]


def test_plain_keys_and_unreadable_certificates(ca, user_key):
    assert certs.decode(user_key.convert_to_public().public_data) is None
    cert = user_cert(ca, user_key)
    assert isinstance(certs.decode(cert.public_data), asyncssh.SSHCertificate)
    broken = cert.public_data[:-10]
    assert isinstance(certs.decode(broken), str)


def test_ca_files(tmp_path, ca):
    path = tmp_path / "cas"
    path.write_text("# comment\n\n" + ca.export_public_key().decode())
    assert certs.load_cas(path) == trusted(ca)
    path.write_text("# only a comment\n")
    with pytest.raises(ValueError, match="no CA public key"):
        certs.load_cas(path)


def test_regression_key_ids_are_revoked_exactly_as_written(ca, user_key, tmp_path):
    """A key id may hold `#` and spaces: only whole lines are comments."""
    path = tmp_path / "revoked"
    path.write_text("key-id alice#laptop\nkey-id  ci-bot \n")
    revocations = certs.Revocations(path)
    assert revocations.key_ids == {"alice#laptop", " ci-bot "}
    assert not revocations.revoked(1, "alice", "SHA256:x")


def test_trusted_cas_are_reread_when_the_file_changes(ca, tmp_path):
    path = tmp_path / "cas"
    path.write_text(ca.export_public_key().decode())
    cas = certs.TrustedCAs(path)
    assert ca.get_fingerprint("sha256") in cas and bool(cas)
    other = asyncssh.generate_private_key("ssh-ed25519")
    path.write_text("# rotated\n" + other.export_public_key().decode())
    cas.refresh()
    assert ca.get_fingerprint("sha256") not in cas and other.get_fingerprint("sha256") in cas
    assert not certs.TrustedCAs(None)

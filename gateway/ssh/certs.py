"""SSH user certificates: the trusted CAs, what a certificate may carry, whom it names.

A certificate signed by a CA in `[ssh] trusted_user_ca_keys` logs in as the user its principal
names: the principal itself when it is a registered user name, or the user `[ssh] principals`
maps it to (then only mapped principals count). It must name exactly one account, be of the
user type, within its validity window, from an address its `source-address` allows, and carry
no critical option but `source-address` (`force-command` would make the gateway run something
else than what the client asked; an option it does not know, it cannot honour). Certificates
are revoked by serial, key id or certified key in `[ssh] revoked_certificates`, re-read when
the file changes. asyncssh checks the CA's signature on the certificate and the client's
signature with the certified key; this module decides everything else.
"""

from __future__ import annotations

import ipaddress
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import asyncssh
from asyncssh.public_key import CERT_TYPE_USER, SSHOpenSSHCertificate, decode_ssh_certificate

from ..models import CertInfo

ALLOWED_CRITICAL = frozenset({"source-address"})
MAX_PRINCIPALS = 256


class CertificateRefused(Exception):
    """Why a certificate does not log in; said to the client once it proved possession."""


def load_cas(path: Path | None) -> frozenset[str]:
    """SHA256 fingerprints of the CA public keys in `path` (one OpenSSH line each; `#`
    comments and blank lines skipped). Raises ValueError naming the line that is not a key."""
    if path is None:
        return frozenset()
    found = set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            key = asyncssh.import_public_key(text)
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise ValueError(f"{path}:{number}: not an OpenSSH public key ({exc})") from None
        found.add(key.get_fingerprint("sha256"))
    if not found:
        raise ValueError(f"{path}: no CA public key in it")
    return frozenset(found)


class TrustedCAs:
    """The CA keys of `[ssh] trusted_user_ca_keys`, re-read when the file changes (a CA
    removed there stops logging anyone in, at the next login and the next session)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self.fingerprints: frozenset[str] = frozenset()
        self.refresh()

    def __bool__(self) -> bool:
        return self.path is not None

    def __contains__(self, fingerprint: object) -> bool:
        return fingerprint in self.fingerprints

    def __len__(self) -> int:
        return len(self.fingerprints)

    def refresh(self) -> None:
        """Blocking; raises OSError or ValueError (callers refuse certificates then)."""
        if self.path is None:
            return
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self.fingerprints = load_cas(self.path)
            self._stamp = stamp


class Revocations:
    """`serial N`, `key-id TEXT` and `key SHA256:...` lines, re-read when the file changes."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self.serials: frozenset[int] = frozenset()
        self.key_ids: frozenset[str] = frozenset()
        self.keys: frozenset[str] = frozenset()
        self.refresh()

    def refresh(self) -> None:
        """Read the file again if it changed (blocking: run it off the event loop). Raises
        OSError or ValueError when it cannot be read or parsed: callers refuse certificates
        then (fail closed) and log why."""
        if self.path is None:
            return
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        serials, key_ids, keys = set(), set(), set()
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue  # comments are whole lines: a key id may hold `#` and spaces
            kind, _, value = line.lstrip().partition(" ")
            if kind == "serial" and value.strip().isascii() and value.strip().isdigit():
                serials.add(int(value.strip()))
            elif kind == "key-id" and value:
                key_ids.add(value)  # exactly as written after `key-id `
            elif kind == "key" and value.strip().startswith("SHA256:"):
                keys.add(value.strip())
            else:
                raise ValueError(
                    f"{self.path}:{number}: expected `serial N`, `key-id TEXT` or `key SHA256:...`"
                )
        self.serials, self.key_ids, self.keys = (
            frozenset(serials),
            frozenset(key_ids),
            frozenset(keys),
        )
        self._stamp = stamp

    def revoked(self, serial: int, key_id: str, key_fingerprint: str) -> bool:
        return serial in self.serials or key_id in self.key_ids or key_fingerprint in self.keys


@dataclass(frozen=True)
class Fields:
    """The certificate fields asyncssh parses but keeps private (its attribute names are
    checked by the tests, so an asyncssh upgrade that renames them fails there)."""

    serial: int
    key_id: str
    cert_type: int
    valid_after: int
    valid_before: int

    @classmethod
    def of(cls, cert: SSHOpenSSHCertificate) -> Fields:
        key_id = cert._key_id
        if isinstance(key_id, bytes):
            key_id = key_id.decode("utf-8", "replace")
        return cls(
            int(cert._serial),
            str(key_id),
            int(cert._cert_type),
            int(cert._valid_after),
            int(cert._valid_before),
        )


def decode(key_data: bytes) -> SSHOpenSSHCertificate | str | None:
    """The OpenSSH certificate in an auth request; a reason string for a certificate that
    asyncssh refuses to read (an unknown critical option); None for a plain key."""
    try:
        cert = decode_ssh_certificate(key_data)
    except asyncssh.KeyImportError as exc:
        algorithm = _algorithm(key_data)
        if algorithm.endswith("-cert-v01@openssh.com"):
            return f"the certificate cannot be used here ({exc})"
        return None
    if not isinstance(cert, SSHOpenSSHCertificate):
        return "X.509 certificates are not accepted"
    return cert


def _algorithm(key_data: bytes) -> str:
    if len(key_data) < 4:
        return ""
    size = int.from_bytes(key_data[:4], "big")
    return key_data[4 : 4 + min(size, 64)].decode("ascii", "replace")


def check(
    cert: SSHOpenSSHCertificate,
    cas: TrustedCAs | frozenset[str],
    revocations: Revocations,
    client_address: str,
    now: float | None = None,
) -> CertInfo:
    """Everything but whom it names and the signatures; raises CertificateRefused. The
    revocation list is taken as it is (refresh it first, off the event loop)."""
    now = time.time() if now is None else now
    fields = Fields.of(cert)
    ca = cert.signing_key.get_fingerprint("sha256")
    if ca not in cas:
        raise CertificateRefused("its CA is not trusted here")
    if fields.cert_type != CERT_TYPE_USER:
        raise CertificateRefused("it is not a user certificate")
    if now < fields.valid_after:
        raise CertificateRefused("it is not valid yet")
    if now >= fields.valid_before:
        raise CertificateRefused("it has expired")
    critical = set(cert.options) - {
        "permit-X11-forwarding",
        "permit-agent-forwarding",
        "permit-port-forwarding",
        "permit-pty",
        "permit-user-rc",
        "no-touch-required",
    }
    if critical - ALLOWED_CRITICAL:
        raise CertificateRefused(
            f"it carries the critical option {', '.join(sorted(critical - ALLOWED_CRITICAL))}"
        )
    # asyncssh parses source-address into networks (its options are typed as objects).
    allowed = cast(
        "list[ipaddress.IPv4Network | ipaddress.IPv6Network] | None",
        cert.options.get("source-address"),
    )
    if allowed:
        try:
            address = ipaddress.ip_address(client_address)
        except ValueError:
            raise CertificateRefused("its source-address cannot be checked") from None
        if not any(address in network for network in allowed):
            raise CertificateRefused("its source-address does not allow this address")
    if not cert.principals or len(cert.principals) > MAX_PRINCIPALS:
        raise CertificateRefused("it names no principal")
    if revocations.revoked(fields.serial, fields.key_id, cert.key.get_fingerprint("sha256")):
        raise CertificateRefused("it has been revoked")
    return CertInfo(
        key_id=fields.key_id,
        serial=fields.serial,
        ca_fingerprint=ca,
        key_fingerprint=cert.key.get_fingerprint("sha256"),
        valid_before=float(fields.valid_before),
        principal="",
    )


def candidates(cert: SSHOpenSSHCertificate, principal_map: dict[str, str]) -> list[tuple[str, str]]:
    """(principal, user name) pairs the certificate may log in as: through the map when one
    is configured, else principals as user names."""
    if principal_map:
        return [(p, principal_map[p]) for p in cert.principals if p in principal_map]
    return [(p, p) for p in cert.principals]

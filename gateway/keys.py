"""Parse and vet one OpenSSH public key line offered for registration; compute fingerprints."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from dataclasses import dataclass

import asyncssh

from .errors import InvalidKey

MIN_RSA_BITS = 2048

# Allow-list: algorithm -> fixed size in bits (None: read it from the key).
ACCEPTED = {
    "ssh-ed25519": 256,
    "ecdsa-sha2-nistp256": 256,
    "ecdsa-sha2-nistp384": 384,
    "ecdsa-sha2-nistp521": 521,
    "ssh-rsa": None,
    "sk-ssh-ed25519@openssh.com": 256,
    "sk-ecdsa-sha2-nistp256@openssh.com": 256,
}

# Shown in listings the way `ssh-keygen -l` names the key type.
KEYGEN_TYPE = {
    "ssh-ed25519": "ED25519",
    "ecdsa-sha2-nistp256": "ECDSA",
    "ecdsa-sha2-nistp384": "ECDSA",
    "ecdsa-sha2-nistp521": "ECDSA",
    "ssh-rsa": "RSA",
    "sk-ssh-ed25519@openssh.com": "ED25519-SK",
    "sk-ecdsa-sha2-nistp256@openssh.com": "ECDSA-SK",
}

MAX_INPUT = 16 * 1024
_KEY_TOKEN = re.compile(r"(ssh-|ecdsa-|sk-)[A-Za-z0-9@.-]+")
_B64_TOKEN = re.compile(r"AAAA[A-Za-z0-9+/]+=*")


@dataclass(frozen=True, slots=True)
class PublicKey:
    algorithm: str
    bits: int
    blob: bytes
    comment: str

    @property
    def openssh(self) -> str:
        """The canonical `type base64` form, without the comment."""
        return f"{self.algorithm} {base64.b64encode(self.blob).decode('ascii')}"

    @property
    def fingerprint(self) -> str:
        return sha256_fingerprint(self.blob)

    @property
    def fingerprint_md5(self) -> str:
        return md5_fingerprint(self.blob)

    @property
    def keygen_type(self) -> str:
        return KEYGEN_TYPE[self.algorithm]


def sha256_fingerprint(blob: bytes) -> str:
    """Byte-identical to `ssh-keygen -lf`: SHA256: and unpadded base64."""
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")
    return f"SHA256:{digest}"


def md5_fingerprint(blob: bytes) -> str:
    """As `ssh-keygen -E md5 -lf` prints it."""
    digest = hashlib.md5(blob, usedforsecurity=False).hexdigest()
    return "MD5:" + ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _blob_type(blob: bytes) -> str:
    """The algorithm name encoded at the start of the key blob."""
    if len(blob) < 4:
        raise InvalidKey("invalid key data: the base64 part is truncated")
    (length,) = struct.unpack(">I", blob[:4])
    if length > 64 or len(blob) < 4 + length:
        raise InvalidKey("invalid key data: the base64 part is not an SSH key")
    return blob[4 : 4 + length].decode("ascii", "replace")


def _clean_comment(text: str) -> str:
    # The comment is only a hint for the owner; keep it printable and short.
    cleaned = "".join(c for c in text if c.isprintable()).strip()
    return cleaned[:200]


# What only private key material looks like: PEM and OpenSSH headers, PuTTY's file, and the
# base64 of "openssh-key-v1" that opens an OpenSSH private key's body pasted without them.
_PRIVATE_MARKS = ("PRIVATE KEY", "PuTTY-User-Key-File", "b3BlbnNzaC1rZXktdjE")


def looks_private(text: str) -> bool:
    """Whether pasted text holds (part of) a private key: it is refused, and never shown."""
    return any(mark in text for mark in _PRIVATE_MARKS)


def parse_public_key(text: str) -> PublicKey:
    """Vet one OpenSSH public key line, or raise InvalidKey with the reason for the user."""
    if len(text) > MAX_INPUT:
        raise InvalidKey("input too large: paste one public key line (the .pub file)")
    stripped = text.strip()
    if not stripped:
        raise InvalidKey("no key given: paste the content of your .pub file")
    if looks_private(stripped):
        raise InvalidKey(
            "this is a PRIVATE key: never share it; give the public key (the .pub file) instead"
        )
    if stripped.startswith("---- BEGIN SSH2 PUBLIC KEY"):
        raise InvalidKey(
            "RFC 4716 key format: convert it first with `ssh-keygen -i -f KEY` and add that line"
        )
    lines = [line for line in stripped.splitlines() if line.strip()]
    if len(lines) > 1:
        raise InvalidKey(f"{len(lines)} lines given: add one key at a time, each on one line")
    tokens = stripped.split()
    algorithm = tokens[0]
    if algorithm not in ACCEPTED:
        if algorithm == "ssh-dss":
            raise InvalidKey("DSA keys are refused (insecure): create an ed25519 key instead")
        if "-cert-v01@openssh.com" in algorithm:
            raise InvalidKey("certificates are not accepted: add the plain public key")
        if any(t in ACCEPTED or t == "ssh-dss" for t in tokens[1:]):
            raise InvalidKey("key options before the key type are not accepted: add the bare key")
        raise InvalidKey(
            "not an OpenSSH public key: expected a line like 'ssh-ed25519 AAAA... comment'"
        )
    if len(tokens) < 2:
        raise InvalidKey("the key data is missing after the key type")
    comment_tokens = tokens[2:]
    for i, token in enumerate(comment_tokens):
        following = comment_tokens[i + 1] if i + 1 < len(comment_tokens) else ""
        if _KEY_TOKEN.fullmatch(token) and _B64_TOKEN.match(following):
            raise InvalidKey("several keys given: add one key at a time")
    try:
        blob = base64.b64decode(tokens[1], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidKey("invalid key data: the base64 part is damaged") from None
    inner = _blob_type(blob)
    if inner != algorithm:
        raise InvalidKey(f"invalid key data: the line says {algorithm} but the key is {inner}")
    try:
        key = asyncssh.import_public_key(f"{algorithm} {tokens[1]}")
    except (asyncssh.KeyImportError, ValueError):
        raise InvalidKey("invalid key data: not a valid public key") from None
    bits = ACCEPTED[algorithm]
    if bits is None:
        bits = int(getattr(key.pyca_key, "key_size", 0))  # RSA only (the only unsized entry)
        if bits < MIN_RSA_BITS:
            raise InvalidKey(
                f"RSA key too small ({bits} bits): at least {MIN_RSA_BITS} bits are required; "
                "better, create an ed25519 key"
            )
    return PublicKey(algorithm, bits, blob, _clean_comment(" ".join(comment_tokens)))

"""Server host keys: generated once (ed25519 + RSA for old clients), then reused forever."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Any

import asyncssh

from ..errors import ConfigError

log = logging.getLogger("gateway.hostkeys")

# file name -> (algorithm, generation options). ed25519 first: it is what modern clients pick.
HOST_KEYS: dict[str, tuple[str, dict[str, Any]]] = {
    "ssh_host_ed25519_key": ("ssh-ed25519", {}),
    "ssh_host_rsa_key": ("ssh-rsa", {"key_size": 3072}),
}


def _write_private(path: Path, key: asyncssh.SSHKey) -> None:
    """Publish a new key pair at `path` (and `path`.pub), or raise FileExistsError if another
    process (another node on a shared directory) got there first.

    The key is written whole to a private temporary file, then hard-linked into place:
    link() is atomic and fails if the name exists (on NFS too), so a node starting at the
    same moment never reads a half-written key, and two nodes never end up with two keys."""
    stem = f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
    private, public = path.with_name(stem), path.with_name(stem + ".pub")
    try:
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key.export_private_key("openssh"))
            out.flush()
            os.fsync(out.fileno())
        public.write_bytes(key.export_public_key("openssh"))
        os.link(private, path)  # the decision: ours, or FileExistsError
        os.replace(public, path.with_name(path.name + ".pub"))
    finally:
        for leftover in (private, public):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def load_or_create(directory: Path) -> list[asyncssh.SSHKey]:
    """Return the host keys, generating the missing ones."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(f"config: [ssh] host_key_dir: cannot create {directory}: {exc}") from None
    keys = []
    for name, (algorithm, options) in HOST_KEYS.items():
        path = directory / name
        if not path.exists():
            try:
                _write_private(path, asyncssh.generate_private_key(algorithm, **options))
                log.info("event=host_key_generated path=%s", path)
            except FileExistsError:
                pass  # another process just wrote it; read theirs
            except OSError as exc:
                raise ConfigError(
                    f"config: [ssh] host_key_dir: cannot write {path}: {exc}"
                ) from None
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("event=host_key_permissions path=%s mode=%o fixed=0600", path, mode)
            path.chmod(0o600)
        try:
            keys.append(asyncssh.read_private_key(path))
        except (OSError, asyncssh.KeyImportError) as exc:
            raise ConfigError(f"config: [ssh] host_key_dir: cannot read {path}: {exc}") from None
    return keys


def offered(keys: list[asyncssh.SSHKey], allowed: tuple[str, ...]) -> list[asyncssh.SSHKeyPair]:
    """Key pairs advertising only the allowed signature algorithms, in the configured order.

    asyncssh would otherwise offer every algorithm a key supports, SHA-1 `ssh-rsa`
    included, whatever `signature_algs` says.
    """
    wanted = [a.encode() for a in allowed]
    pairs = []
    for pair in asyncssh.load_keypairs(keys):
        algorithms = [a for a in wanted if a in pair.host_key_algorithms]
        if not algorithms:
            raise ConfigError(
                f"config: [ssh] signature_algorithms: nothing usable for the "
                f"{pair.get_algorithm()} host key"
            )
        pair.host_key_algorithms = algorithms
        pairs.append(pair)
    return pairs

"""The [cluster] section: this node among the others sharing the registry, and the internal
listener its repositories' operations are forwarded to (see gateway.domain.homes)."""

from __future__ import annotations

from dataclasses import dataclass

from .parse import (
    _choice,
    _networks,
    _node_name,
    _optional_listen,
    _public_address,
    _seconds,
    _seconds_or_zero,
    _setting,
)


@dataclass(frozen=True)
class ClusterSettings:
    node_name: str = _setting(
        "",
        _node_name,
        "this machine's name among the gateways sharing the registry ('' = host name); "
        "max_parallel counts per name",
    )
    node_timeout: float = _setting(
        15,
        _seconds,
        "seconds without a sign of life after which the other gateways declare one gone "
        "and mark its running deploys interrupted (and its repositories' homes move); at "
        "least the repositories filesystem's attribute cache lifetime (docs/cluster.md)",
    )
    # Each repository is served by one home node; the others forward its git operations
    # there over an SSH channel both ends authenticate with the shared host keys.
    listen: tuple[str, int] | None = _setting(
        "",
        _optional_listen,
        "internal listener the other nodes forward git operations to (HOST:PORT, private "
        "network); empty = none (this node forwards nothing and is forwarded nothing)",
    )
    advertise: str = _setting(
        "",
        _public_address,
        "HOST:PORT the other nodes dial to reach listen ('' = listen's address, which must "
        "then name one host)",
    )
    peers: tuple[str, ...] = _setting(
        [],
        _networks,
        "addresses (CIDR) of the other nodes: the only ones the internal listener accepts; "
        "required with listen",
    )
    cache_seconds: float = _setting(
        20,
        _seconds_or_zero,
        "seconds the repositories filesystem may show one node an old view of what another "
        "wrote (sshfs cache_timeout: 20; NFS acdirmax: 60); a drain keeps serving its "
        "repositories this long before another node takes them",
    )
    forward: str = _setting(
        "auto",
        _choice("auto", "always", "never"),
        "serve each repository on its home node and forward to it: auto (when listen is set "
        "and the repositories root is a network filesystem) | always (when listen is set) "
        "| never",
    )

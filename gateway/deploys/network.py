"""A deploy sandbox's network: isolated (own namespace, outbound through pasta), none or host."""

# `isolated` runs pasta (Debian's passt) as the sandbox user: it makes a user and network
# namespace, runs bubblewrap in it and relays the namespace's outbound TCP and UDP through
# ordinary sockets of the host. Nothing is forwarded from the namespace to the host's ports
# (`-T none -U none`) or from the host into it (`-t none -u none`), and the gateway address
# is not mapped to the host's loopback (`--no-map-gw`): the host's loopback, its abstract
# unix sockets and its /proc/net stay out of reach. The host's other addresses are reached
# as any machine on the network reaches them, from the node's own address: a PROXY protocol
# balancer list that includes one of them would let a deploy pass for any client (`refusal`).

from __future__ import annotations

import ipaddress
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..errors import ConfigError

PASTA_HINT = (
    "install passt (Debian/Ubuntu: apt-get install passt), or set [deploy] network = "
    '"none" (no network) or "host" (the host\'s network, loopback included)'
)
# Where an isolated deploy sends DNS queries when the host's resolver listens on its
# loopback (systemd-resolved's 127.0.0.53, a local dnsmasq): pasta relays port 53 of this
# address, and only that, to the host's first nameserver. Link-local, so no real network.
DNS_FORWARD = "169.254.0.53"
RESOLV_CONF = Path("/etc/resolv.conf")
TUN = "/dev/net/tun"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)


class NetworkError(ConfigError):
    """The network asked for cannot be given here: one line saying why and what to do."""


@dataclass(frozen=True)
class Network:
    """One sandbox's network, with the tools `isolated` needs found on PATH."""

    mode: str
    pasta: str = ""
    setpriv: str = ""
    unshare: str = ""

    @classmethod
    def of(cls, mode: str) -> Network:
        if mode != "isolated":
            return cls(mode)
        pasta = shutil.which("pasta")
        if pasta is None:
            raise NetworkError(f'network = "isolated": pasta not found: {PASTA_HINT}')
        if not Path(TUN).exists():
            # pasta would wait for ever for the tap device it cannot make (2023.03).
            raise NetworkError(
                f'network = "isolated": pasta needs {TUN}, which is missing here (in a '
                f"container: run it with `--device {TUN}`); or set "
                '[deploy] network = "none" (no network) or "host"'
            )
        tools = {name: shutil.which(name) for name in ("setpriv", "unshare")}
        for name, path in tools.items():
            if path is None:
                raise NetworkError(
                    f'network = "isolated": {name} not found: install util-linux '
                    "(Debian/Ubuntu: apt-get install util-linux)"
                )
        return cls(mode, pasta, tools["setpriv"] or "", tools["unshare"] or "")

    def but(self, mode: str | None) -> Network:
        """This network, or a stricter one for a step that needs none (the export)."""
        if mode is None or mode == self.mode:
            return self
        if mode != "none":
            raise ValueError(f"a sandbox step can only drop the network, not ask for {mode}")
        return Network("none")

    def prefix(self) -> list[str]:
        """What runs bubblewrap: pasta for `isolated`, nothing otherwise.

        setpriv gives pasta a parent-death signal (kept across its exec and its move into
        the namespace it makes): when the gateway dies, even by SIGKILL, pasta dies, and
        bubblewrap (--die-with-parent) and the whole sandbox with it.

        pasta (2023.03) runs its command as PID 1 of a new PID namespace, under the host's
        /proc: bubblewrap, which finds its child by PID in /proc, would read another
        process's entries (on the host) or none (in a container). unshare gives it a /proc
        of its own PID namespace, in a mount namespace of pasta's user namespace.
        """
        if self.mode != "isolated":
            return []
        dns = ["--dns-forward", DNS_FORWARD] if _loopback_resolver() else []
        return [
            self.setpriv,
            "--pdeathsig",
            "KILL",
            "--",
            self.pasta,
            "--config-net",
            "--foreground",
            "--quiet",
            "--tcp-ports",
            "none",
            "--udp-ports",
            "none",
            "--tcp-ns",
            "none",
            "--udp-ns",
            "none",
            "--no-map-gw",
            *dns,
            "--",
            self.unshare,
            "--mount",
            "--mount-proc",
            "--",
        ]

    def bwrap_args(self, uid: int, gid: int) -> list[str]:
        """bubblewrap's network arguments (it is given --unshare-all before them)."""
        if self.mode == "none":
            return []
        if self.mode == "host":
            return ["--share-net"]
        # In pasta's namespace bubblewrap runs as that namespace's root: keep pasta's
        # network, and map the sandbox user back to its own ids.
        return ["--share-net", "--uid", str(uid), "--gid", str(gid)]

    def resolv_conf(self) -> bytes | None:
        """The sandbox's own /etc/resolv.conf, when the host's would not work in it."""
        if self.mode != "isolated" or not _loopback_resolver():
            return None
        kept = [
            line
            for line in _read_resolv_conf().splitlines()
            if line.split()[:1] in (["search"], ["domain"], ["options"])
        ]
        return "".join(f"{line}\n" for line in [f"nameserver {DNS_FORWARD}", *kept]).encode()


def reason_lines(stderr: str) -> list[str]:
    """A failed sandbox's own words, without pasta's complaints that it has no syslog."""
    return [
        line.strip()
        for line in stderr.splitlines()
        if line.strip() and not line.startswith("Failed to send")
    ]


def pasta_failed(line: str) -> str:
    """One line for a pasta that could not give a deploy its network."""
    return (
        f'network = "isolated": pasta could not make the deploy\'s network namespace: {line}: '
        "it needs unprivileged user namespaces and a default route (to relay outbound "
        "connections through; in a container, the flags in docs/container.md); or set "
        '[deploy] network = "none" (no network) or "host"'
    )


def _read_resolv_conf() -> str:
    try:
        return RESOLV_CONF.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _loopback_resolver() -> bool:
    """Whether the host's first nameserver (the one pasta relays to) is on its loopback."""
    for line in _read_resolv_conf().splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                return ipaddress.ip_address(words[1].split("%")[0]).is_loopback
            except ValueError:
                return False
    return False


# -- what deploys can reach of this node, against [ssh] proxy_allowed --


def node_networks() -> list[IPNetwork]:
    """This node's own addresses (its network namespace's), read from /proc without a
    shell: IPv4 from the kernel's local routes, IPv6 from the interface list."""
    found: list[IPNetwork] = list(LOOPBACK)
    address = ""
    for line in _read_proc("/proc/net/fib_trie").splitlines():
        leaf = re.fullmatch(r"\s*\|--\s+(\S+)", line)
        if leaf:
            address = leaf.group(1)
            continue
        local = re.fullmatch(r"\s*/(\d+)\s+host\s+LOCAL", line)
        if local and address:
            found.append(ipaddress.ip_network(f"{address}/{local.group(1)}", strict=False))
    for line in _read_proc("/proc/net/if_inet6").splitlines():
        words = line.split()
        if words and re.fullmatch(r"[0-9a-f]{32}", words[0]):
            found.append(ipaddress.IPv6Network((int(words[0], 16), 128)))
    unique: dict[str, IPNetwork] = {str(net): net for net in found}
    return list(unique.values())


def _read_proc(path: str) -> str:
    try:
        return Path(path).read_text(encoding="ascii", errors="replace")
    except OSError:
        return ""


def reachable(mode: str, own: Iterable[IPNetwork]) -> list[IPNetwork]:
    """Which of the node's own addresses a deploy with this network connects to, arriving
    from that same address: all of them on the host network; through pasta, all but the
    loopback (the namespace's own) — counted even where pasta gave the namespace a copy of
    the address, which keeps the rule simple and on the safe side."""
    if mode == "host":
        return list(own)
    if mode == "isolated":
        return [net for net in own if not _is_loopback(net)]
    return []


def _same(a: IPNetwork, b: IPNetwork) -> bool:
    return a.version == b.version


def _is_loopback(net: IPNetwork) -> bool:
    return any(_same(net, lo) and net.subnet_of(lo) for lo in LOOPBACK)  # type: ignore[arg-type]


def refusal(cfg: Config, modes: dict[str, str], own: Iterable[IPNetwork] | None = None) -> str:
    """One line refusing [ssh] proxy_allowed if it trusts an address deploys can connect
    from, given each command pipeline's network ("[deploy]" -> "host"); "" when sound."""
    if cfg.ssh.proxy_protocol == "off" or not cfg.ssh.proxy_allowed:
        return ""
    mine = node_networks() if own is None else list(own)
    allowed = [ipaddress.ip_network(text) for text in cfg.ssh.proxy_allowed]
    for label, mode in modes.items():
        for net in reachable(mode, mine):
            hit = next((a for a in allowed if _same(a, net) and a.overlaps(net)), None)
            if hit is None:
                continue
            return (
                f"[ssh] proxy_allowed trusts {hit}, which holds this node's own address {net} "
                f'that deploys can connect from ({label} network = "{mode}"): a deploy could '
                "send its own PROXY header and pass for any client; list only the balancers' "
                'addresses in proxy_allowed, or set network = "none"'
                + (' or "isolated"' if mode == "host" and _is_loopback(net) else "")
                + " for those deploys"
            )
    return ""


def host_warning(label: str) -> str:
    return (
        f'{label} network = "host": deploys share the host network: they reach its loopback '
        "(the gateway's HTTP API and /metrics, a local PostgreSQL), its abstract unix sockets "
        'and /proc/net; use "isolated" (the default) where tenants are not trusted'
    )

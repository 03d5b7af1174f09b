"""A deploy sandbox's network: isolated (own namespace, outbound through pasta), none or host."""

# `isolated`: bubblewrap makes the deploy's namespaces (its network namespace among them, as
# for `none`) and stops before running the command (--block-fd); pasta (Debian's passt), run
# as the sandbox user, joins that namespace by its PID, configures it and relays its outbound
# TCP and UDP through ordinary sockets of the host; then the command starts. Nothing is
# forwarded from the namespace to the host's ports (`-T none -U none`) or from the host into
# it (`-t none -u none`), and the gateway address is not mapped to the host's loopback
# (`--no-map-gw`): the host's loopback, its abstract unix sockets and its /proc/net stay out
# of reach. The host's other addresses are reached as any machine on the network reaches
# them, from the node's own address: a PROXY protocol balancer list that includes one of
# them would let a deploy pass for any client (`refusal`).
#
# Why bubblewrap first and pasta second, not pasta running bubblewrap: under no_new_privs
# (systemd's hardening implies it, as does a container's no-new-privileges) a user namespace
# nested in pasta's cannot write its uid map, so bubblewrap could not start. Joining needs no
# new namespace. pasta holds the namespace open, so it never notices the sandbox's end: it
# runs in the foreground as the gateway's child, stopped once the sandbox's first process has
# exited, and killed by a parent-death signal (setpriv) if the gateway itself dies.

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..config import Config
from ..errors import ConfigError

# How long pasta and bubblewrap get for their part of the handshake.
ATTACH_TIMEOUT = 20.0
# ioctl(2) on a namespace file: the user namespace that owns it (linux/nsfs.h).
NS_GET_USERNS = 0xB701

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
    """One sandbox's network, with pasta found on PATH for `isolated`."""

    mode: str
    pasta: str = ""
    setpriv: str = ""

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
                f"container: run it with `--device {TUN}`; under systemd: PrivateDevices=no "
                f"or BindPaths={TUN}); or set "
                '[deploy] network = "none" (no network) or "host"'
            )
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise NetworkError(
                'network = "isolated": setpriv not found: install util-linux '
                "(Debian/Ubuntu: apt-get install util-linux)"
            )
        return cls(mode, pasta, setpriv)

    def but(self, mode: str | None) -> Network:
        """This network, or a stricter one for a step that needs none (the export)."""
        if mode is None or mode == self.mode:
            return self
        if mode != "none":
            raise ValueError(f"a sandbox step can only drop the network, not ask for {mode}")
        return Network("none")

    def bwrap_args(self, handshake: Handshake | None = None) -> list[str]:
        """bubblewrap's network arguments (it is given --unshare-all before them)."""
        if self.mode == "host":
            return ["--share-net"]
        if self.mode == "isolated" and handshake is not None:
            return handshake.bwrap_args()
        return []

    def pasta_argv(self, userns: int, netns: int) -> list[str]:
        """pasta joining the sandbox's network namespace, open on descriptor `netns`, from
        the user namespace that owns it (`userns`).

        Not `pasta PID`: that joins the process's own user namespace, and bubblewrap's
        --disable-userns puts the command in a nested one, without rights on the network
        namespace made a level up.
        """
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
            "--userns",
            f"/proc/self/fd/{userns}",
            "--netns",
            f"/proc/self/fd/{netns}",
        ]

    async def attach(self, pid: int, privileges: dict[str, object]) -> asyncio.subprocess.Process:
        """Give the sandbox of `pid` its network: pasta, running once the namespace has its
        routes; NetworkError with pasta's reason if it cannot. The caller stops it."""
        try:
            netns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise NetworkError(pasta_failed(f"the sandbox's namespace: {exc.strerror}")) from None
        try:
            userns = fcntl.ioctl(netns, NS_GET_USERNS)
        except OSError as exc:
            os.close(netns)
            raise NetworkError(pasta_failed(f"its user namespace: {exc.strerror}")) from None
        # A file, not a pipe: pasta runs as long as the deploy, and a pipe nobody reads
        # would stop it at its first screenful of complaints.
        errors = tempfile.TemporaryFile()  # noqa: SIM115 (closed below, in every case)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.pasta_argv(userns, netns),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=errors,
                env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin"},
                pass_fds=(userns, netns),
                **privileges,  # type: ignore[arg-type]
            )
        except BaseException:
            errors.close()
            raise
        finally:
            os.close(userns)
            os.close(netns)
        with errors:
            return await _ready(proc, pid, errors)

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


class Handshake:
    """bubblewrap's two pipes for an isolated sandbox: it says its child's PID on one
    (--info-fd), and waits on the other (--block-fd) until pasta has made the network."""

    def __init__(self) -> None:
        self.info_read, self.info_write = os.pipe()
        self.block_read, self.block_write = os.pipe()

    def child_fds(self) -> list[int]:
        return [self.info_write, self.block_read]

    def bwrap_args(self) -> list[str]:
        return ["--info-fd", str(self.info_write), "--block-fd", str(self.block_read)]

    def spawned(self) -> None:
        """Close the child's ends in the gateway, so that bubblewrap's exit reads as EOF."""
        for fd in self.child_fds():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.info_write = self.block_read = -1

    async def child_pid(self) -> int | None:
        """The sandbox's first PID, or None if bubblewrap ended without one (its own error
        is on its stderr)."""
        data = await asyncio.wait_for(asyncio.to_thread(_read_all, self.info_read), ATTACH_TIMEOUT)
        match = re.search(rb'"child-pid"\s*:\s*(\d+)', data)
        return int(match.group(1)) if match else None

    def release(self) -> None:
        """Let the command run: the network is ready."""
        os.write(self.block_write, b"1")

    def close(self) -> None:
        for fd in (self.info_read, self.info_write, self.block_read, self.block_write):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.info_read = self.info_write = self.block_read = self.block_write = -1


async def _ready(
    proc: asyncio.subprocess.Process, pid: int, errors: IO[bytes]
) -> asyncio.subprocess.Process:
    """pasta, once the namespace of `pid` is ready; NetworkError if it never is."""
    # pasta says nothing when the namespace is ready: its default route, the last thing
    # it sets, is the sign (read through the sandbox's own /proc/PID/net).
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ATTACH_TIMEOUT
    while not _has_default_route(pid):
        if proc.returncode is not None or loop.time() > deadline:
            break
        if _gone(pid):  # bubblewrap failed: its stderr says why
            await stop(proc)
            raise NetworkError(pasta_failed("the sandbox ended before its network was made"))
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), 0.01)
        except TimeoutError:
            continue
    else:
        return proc
    if proc.returncode is None:
        await stop(proc)
        raise NetworkError(pasta_failed(f"no route after {ATTACH_TIMEOUT:.0f} s"))
    errors.seek(0)
    reason = reason_lines(errors.read(65536).decode("utf-8", "replace"))
    raise NetworkError(pasta_failed(reason[-1] if reason else f"exit code {proc.returncode}"))


async def stop(proc: asyncio.subprocess.Process) -> None:
    """Stop a pasta (it would hold its namespace, and run, for ever)."""
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()  # /proc: never blocks


def _has_default_route(pid: int) -> bool:
    """Whether the network namespace of `pid` has a default route (IPv4 or IPv6)."""
    for line in _read_proc(f"/proc/{pid}/net/route").splitlines()[1:]:
        words = line.split()
        if len(words) > 1 and words[0] != "lo" and words[1] == "00000000":
            return True
    for line in _read_proc(f"/proc/{pid}/net/ipv6_route").splitlines():
        words = line.split()
        if len(words) == 10 and words[0] == "0" * 32 and words[1] == "00" and words[9] != "lo":
            return True
    return False


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
        if sum(map(len, chunks)) > 65536:  # bubblewrap writes one small JSON object
            break
    return b"".join(chunks)


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

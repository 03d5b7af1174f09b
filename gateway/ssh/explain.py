"""What a refused SSH client is told, in authentication banners, and how much.

"Permission denied (publickey)" is every gateway's most common support question: an agent
offering five keys, the wrong one registered, a key on another account, `ssh root@host`. The
client is told, as each of its attempts fails, what the gateway saw: the user name it asked
for, the fingerprint of each key it offered that is not registered, where keys are added.
Nothing it did not send or prove: an unregistered key is named by the fingerprint the client
computed itself, and a registered key's details come only after a signature (possession.py).

Banners cost a packet each; they are counted per connection and per source address, so a
client cannot make the gateway write without bound, and past the budget it gets OpenSSH's
plain answer.

An agent that offers an unregistered key before the registered one would otherwise hear about
that key on every successful `git fetch`. Whether a login will succeed is not known when a
key is refused (the client's next key comes only after the answer), so the gateway learns it:
once a login from an address succeeds, the unregistered keys offered first from there are not
named again (for QUIET_SECONDS); the welcome still lists them. A login from that address that
fails makes the gateway forget, so the next attempt is explained in full. The memory is per
source address, so nobody elsewhere learns that a key's holder has an account here.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable

from .limits import RateLimiter

LINES_PER_MINUTE = 60  # per source address
MAX_LINES_PER_CONNECTION = 24
ADDRESSES_TRACKED = 10_000
QUIET_SECONDS = 24 * 3600  # a working day and more: the first fetch of a day explains
QUIET_KEYS_PER_ADDRESS = 12  # the default [limits] max_auth_attempts


class Explainer:
    """The gateway's banner budget, shared by its connections."""

    def __init__(self, help_url: str, ssh_user: str, login: Callable[[], str]) -> None:
        self.help_url = help_url
        self.ssh_user = ssh_user
        self.login = login  # how to log in, `ssh -p 2222 git@host` (known once listening)
        self.rate = RateLimiter(LINES_PER_MINUTE, max_keys=ADDRESSES_TRACKED)
        # source -> {fingerprint: until}: unregistered keys a login from there got past.
        self._quiet: OrderedDict[str, dict[str, float]] = OrderedDict()
        self.clock = time.monotonic

    def allow(self, address: str, lines: int) -> bool:
        """Spend `lines` of this address's budget, all or (past it) nothing more. IPv6
        clients are counted per /64: one host usually holds a whole one."""
        source = _source(address)
        return all(self.rate.take(source) == 0 for _ in range(lines))

    def logged_in_after(self, address: str, fingerprints: list[str]) -> None:
        """A login from `address` succeeded after these unregistered keys were refused: do
        not name them to that address again for a while."""
        if not fingerprints:
            return
        source = _source(address)
        until = self.clock() + QUIET_SECONDS
        keys = self._quiet.pop(source, {})
        keys.update(dict.fromkeys(fingerprints, until))
        while len(keys) > QUIET_KEYS_PER_ADDRESS:
            del keys[next(iter(keys))]
        self._quiet[source] = keys
        while len(self._quiet) > ADDRESSES_TRACKED:
            self._quiet.popitem(last=False)

    def login_failed(self, address: str) -> None:
        """A login from `address` failed: explain everything to it again."""
        self._quiet.pop(_source(address), None)

    def quiet(self, address: str, fingerprint: str) -> bool:
        """Whether this unregistered key is known to be followed by a successful login."""
        until = self._quiet.get(_source(address), {}).get(fingerprint)
        return until is not None and until > self.clock()

    def where_keys_are_added(self) -> str:
        if self.help_url:
            return f"Add your public key (the .pub file) at {self.help_url}"
        return "Ask your platform's operator to register your public key (the .pub file)"


def _source(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class Told:
    """What one connection was told so far (each line once)."""

    def __init__(self, explainer: Explainer, address: str) -> None:
        self.explainer = explainer
        self.address = address
        self.lines = 0
        self.said: set[str] = set()
        self.unknown: list[str] = []  # fingerprints offered that are not registered

    def lines_for_unknown_key(self, fingerprint: str, algorithm: str) -> list[str]:
        if fingerprint not in self.unknown:
            self.unknown.append(fingerprint)
        if self.explainer.quiet(self.address, fingerprint):
            return []
        lines = [f"git-gateway: the key {fingerprint} ({algorithm}) is not registered here."]
        if "help" not in self.said:
            self.said.add("help")
            lines.append(
                f"{self.explainer.where_keys_are_added()}; `ssh-keygen -lf KEY.pub` prints "
                "a key's fingerprint, `ssh -v` shows which keys your client offers."
            )
        return lines

    def lines_for_bad_user(self) -> list[str]:
        if "user" in self.said:
            return []
        self.said.add("user")
        user, login = self.explainer.ssh_user, self.explainer.login()
        return [f'git-gateway: log in as "{user}" ({login}), not as another user.']

    def lines_for_too_many(self, limit: int) -> list[str]:
        return [
            f"git-gateway: your client offered more than {limit} keys. Pick the registered "
            "one: ssh -i KEY -o IdentitiesOnly=yes (or IdentityFile in ~/.ssh/config)."
        ]

    def take(self, lines: list[str]) -> str | None:
        """The banner text to send for these lines, or None when over budget."""
        if not lines or self.lines + len(lines) > MAX_LINES_PER_CONNECTION:
            return None
        if not self.explainer.allow(self.address, len(lines)):
            return None
        self.lines += len(lines)
        return "".join(f"{line}\n" for line in lines)

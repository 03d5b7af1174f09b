"""[deploy] network: the modes and their aliases, the sandbox's resolv.conf, and the refusal
of a PROXY balancer list that trusts an address deploys can connect from."""

from __future__ import annotations

import ipaddress

import pytest

from gateway import config
from gateway.deploys import network
from gateway.errors import ConfigError


def deploy(**values: object) -> config.DeploySettings:
    return config.from_mapping({"deploy": values}).deploy


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        (True, "isolated"),
        (False, "none"),
        ("isolated", "isolated"),
        ("none", "none"),
        ("HOST", "host"),
    ],
)
def test_modes_and_the_booleans_of_earlier_versions(value, mode):
    assert deploy(network=value).network == mode


def test_default_is_isolated():
    assert deploy().network == "isolated"


@pytest.mark.parametrize("value", ["bridge", "", 1, ["host"]])
def test_regression_unknown_network_is_refused(value):
    with pytest.raises(ConfigError, match="network"):
        deploy(network=value)


def test_per_app_override():
    cfg = config.from_mapping(
        {"deploy": {"command": ["true"]}, "apps": {"legacy": {"network": "host"}}}
    )
    assert cfg.deploy_for("legacy").network == "host"
    assert cfg.deploy_for("other").network == "isolated"


def test_loopback_resolver_gets_dns_forwarding(tmp_path, monkeypatch):
    resolv = tmp_path / "resolv.conf"
    monkeypatch.setattr(network, "RESOLV_CONF", resolv)
    box = network.Network("isolated", "/usr/bin/pasta")
    resolv.write_text(
        "# systemd-resolved\nnameserver 127.0.0.53\noptions edns0 trust-ad\nsearch lan\n"
    )
    assert box.resolv_conf() == b"nameserver 169.254.0.53\noptions edns0 trust-ad\nsearch lan\n"
    assert box.pasta_argv(7, 8)[-7:] == [
        "--no-map-gw",
        "--dns-forward",
        "169.254.0.53",
        "--userns",
        "/proc/self/fd/7",
        "--netns",
        "/proc/self/fd/8",
    ]
    resolv.write_text("nameserver 10.0.0.53\nnameserver 127.0.0.1\n")
    assert box.resolv_conf() is None  # the host's own file works through pasta
    assert "--dns-forward" not in box.pasta_argv(7, 8)
    assert network.Network("host").resolv_conf() is None
    assert network.Network("none").bwrap_args() == []
    assert network.Network("host").bwrap_args() == ["--share-net"]


def test_pasta_forwards_no_port_either_way():
    argv = network.Network("isolated", "pasta", "setpriv").pasta_argv(7, 8)
    assert argv[:5] == ["setpriv", "--pdeathsig", "KILL", "--", "pasta"]
    assert argv[-2:] == ["--netns", "/proc/self/fd/8"]
    for option in ("--tcp-ports", "--udp-ports", "--tcp-ns", "--udp-ns"):
        assert argv[argv.index(option) + 1] == "none"
    assert "--no-map-gw" in argv


def test_an_export_step_can_only_drop_the_network():
    box = network.Network("isolated", "pasta")
    assert box.but(None) is box and box.but("none") == network.Network("none")
    with pytest.raises(ValueError):
        network.Network("none").but("host")


def test_node_networks_hold_loopback():
    own = network.node_networks()
    assert ipaddress.ip_network("127.0.0.0/8") in own and ipaddress.ip_network("::1/128") in own


OWN = [
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
    ipaddress.ip_network("10.0.0.5/32"),
    ipaddress.ip_network("fd00::5/128"),
]


def refusal(mode: str, allowed: list[str], protocol: str = "required") -> str:
    cfg = config.from_mapping(
        {
            "ssh": {"proxy_protocol": protocol, "proxy_allowed": allowed},
            "deploy": {"command": ["true"]},
        }
    )
    return network.refusal(cfg, {"[deploy]": mode}, OWN)


def test_regression_host_network_cannot_use_a_trusted_balancer_address():
    line = refusal("host", ["127.0.0.1/32"])
    assert line.startswith("[ssh] proxy_allowed trusts 127.0.0.1/32")
    assert 'or "isolated"' in line
    assert refusal("host", ["10.0.0.0/8"]).startswith("[ssh] proxy_allowed trusts 10.0.0.0/8")
    assert refusal("host", ["::1/128"])
    assert refusal("host", ["192.0.2.7/32"]) == ""  # the balancer elsewhere


def test_regression_isolated_reaches_the_nodes_other_addresses_through_pasta():
    assert refusal("isolated", ["127.0.0.1/32"]) == ""  # out of the namespace's reach
    line = refusal("isolated", ["10.0.0.0/24"])
    assert "10.0.0.5/32" in line and 'network = "isolated"' in line
    assert refusal("isolated", ["fd00::/64"])
    assert refusal("isolated", ["10.0.0.7/32"]) == ""


def test_no_refusal_without_network_or_proxy_protocol():
    assert refusal("none", ["0.0.0.0/0", "::/0"]) == ""
    assert refusal("host", ["127.0.0.1/32"], protocol="off") == ""


def test_regression_isolated_without_a_tun_device_is_one_line(tmp_path, monkeypatch):
    """pasta 2023.03 without /dev/net/tun (a container without `--device`) waits for ever:
    refused before it is ever started."""
    monkeypatch.setattr(network, "TUN", str(tmp_path / "tun"))
    monkeypatch.setattr(network.shutil, "which", lambda name: f"/usr/bin/{name}")
    with pytest.raises(network.NetworkError, match=r"--device .*/tun"):
        network.Network.of("isolated")
    assert network.Network.of("none") == network.Network("none")

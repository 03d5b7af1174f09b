"""SSH user certificates made by `ssh-keygen -s`, used by the real OpenSSH client: who they
log in as, and everything that refuses them."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.helpers import Client, keygen, run, unique, write_config


class CA:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.key = keygen(directory / "ca")
        self.directory = directory
        self.count = 0

    def sign(
        self, key: Path, principals: str, *options: str, serial: int = 1, key_id: str = ""
    ) -> Path:
        """A copy of `key` with a certificate beside it (OpenSSH loads KEY-cert.pub)."""
        self.count += 1
        folder = self.directory / f"cert{self.count}"
        folder.mkdir()
        copy = folder / key.name
        shutil.copy(key, copy)
        shutil.copy(key.with_suffix(".pub"), copy.with_suffix(".pub"))
        copy.chmod(0o600)
        argv = ["ssh-keygen", "-q", "-s", str(self.key), "-I", key_id or f"id-{self.count}"]
        argv += ["-n", principals, "-z", str(serial), *options, str(copy.with_suffix(".pub"))]
        run(argv, check=True)
        assert Path(f"{copy}-cert.pub").exists()
        return copy


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> CA:
    return CA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def revoked(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("revocations") / "revoked"
    path.write_text("# nothing revoked yet\n")
    return path


@pytest.fixture(scope="module")
def gw(module_gateways, tmp_path_factory, ca, revoked):
    cas = tmp_path_factory.mktemp("cas") / "user_ca.pub"
    cas.write_text("# the platform's user CA\n" + ca.key.with_suffix(".pub").read_text())
    return module_gateways(
        name="certs",
        ssh={"trusted_user_ca_keys": str(cas), "revoked_certificates": str(revoked)},
    )


@pytest.fixture
def alice(gw, admin) -> str:
    name = unique("alice")
    admin.ok("user", "add", name)
    return name


def login(gw, key: Path, tmp_path: Path, *args: str):
    """ssh with this key (and its certificate beside it) only."""
    client = Client(tmp_path / f"home-{key.parent.name}", key, gw)
    return client, client.ssh(*(args or ("whoami",)))


def test_a_certificate_logs_in_as_its_principal(gw, admin, ca, alice, tmp_path):
    user_key = keygen(tmp_path / "id")  # never registered: the certificate is the credential
    cert = ca.sign(user_key, alice, "-V", "-5m:+1h", serial=7, key_id=f"{alice}@laptop")
    client, result = login(gw, cert, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"user: {alice}"
    assert lines[1].startswith(
        f"certificate: {alice}@laptop (serial 7, principal {alice}, CA SHA256:"
    )
    assert lines[2].startswith("expires: 20")
    # It has the account's roles.
    app = unique("web")
    admin.ok("app", "create", app, "--owner", alice)
    assert client.git("ls-remote", client.url(app)).returncode == 0
    welcome = client.ssh().stdout
    assert f'authenticated with the certificate "{alice}@laptop" (serial 7' in welcome
    [login_event] = [
        e
        for e in json.loads(admin.ok("audit", "--user", alice, "--json"))
        if e["event"] == "auth_ok"
    ][:1]
    assert login_event["detail"]["certificate"] == f"{alice}@laptop"
    assert login_event["detail"]["serial"] == 7


@pytest.mark.parametrize(
    ("options", "why"),
    [
        (("-V", "20200101:20200102"), "the certificate is refused: it has expired"),
        (("-V", "+1d:+2d"), "the certificate is refused: it is not valid yet"),
        (
            ("-O", "source-address=10.9.8.0/24"),
            "the certificate is refused: its source-address does not allow this address",
        ),
        (
            ("-O", "force-command=/bin/sh"),
            "the certificate is refused: it carries the critical option force-command",
        ),
        (("-O", "critical:verify-required"), "the certificate cannot be used here"),
    ],
)
def test_regression_certificates_the_gateway_cannot_honour_are_refused(
    gw, ca, alice, tmp_path, options, why
):
    cert = ca.sign(keygen(tmp_path / "id"), alice, *options)
    _, result = login(gw, cert, tmp_path)
    assert result.returncode == 255
    assert f"git-gateway: {why}" in result.stderr


def test_a_matching_source_address_is_accepted(gw, ca, alice, tmp_path):
    cert = ca.sign(keygen(tmp_path / "id"), alice, "-O", "source-address=127.0.0.1/32,::1/128")
    _, result = login(gw, cert, tmp_path)
    assert result.returncode == 0, result.stderr


def test_regression_a_certificate_from_another_ca_is_refused(gw, alice, tmp_path):
    rogue = CA(tmp_path / "rogue")
    cert = rogue.sign(keygen(tmp_path / "id"), alice)
    _, result = login(gw, cert, tmp_path)
    assert result.returncode == 255
    assert "git-gateway: the certificate is refused: its CA is not trusted here" in result.stderr


def test_regression_principals_must_name_exactly_one_account(gw, admin, ca, alice, tmp_path):
    bob = unique("bob")
    admin.ok("user", "add", bob)
    for principals, why in [
        ("nobody-here", "the certificate names no account here"),
        (f"{alice},{bob}", "the certificate names several accounts"),
        ("../etc", "the certificate names no account here"),
    ]:
        cert = ca.sign(keygen(tmp_path / f"id-{len(principals)}"), principals)
        _, result = login(gw, cert, tmp_path)
        assert result.returncode == 255
        assert f"git-gateway: {why}" in result.stderr, result.stderr


def test_revocation_by_serial_and_key_id_also_on_an_open_connection(
    gw, ca, alice, revoked, tmp_path
):
    from tests.e2e.test_multiplexing import control_master

    cert = ca.sign(keygen(tmp_path / "id"), alice, serial=4242, key_id=f"{alice}-ci")
    client, result = login(gw, cert, tmp_path)
    assert result.returncode == 0
    with control_master(client, tmp_path / "ctl") as mux:
        assert mux.ssh("whoami").returncode == 0
        revoked.write_text(revoked.read_text() + "serial 4242\n")
        result = mux.ssh("whoami")
        assert result.returncode == 1
        assert result.stderr == "error: access denied: this certificate has been revoked\n"
    _, result = login(gw, cert, tmp_path)
    assert "git-gateway: the certificate is refused: it has been revoked" in result.stderr
    other = ca.sign(keygen(tmp_path / "id2"), alice, key_id=f"{alice}-stolen", serial=9)
    revoked.write_text(revoked.read_text() + f"key-id {alice}-stolen\n")
    _, result = login(gw, other, tmp_path)
    assert result.returncode == 255 and "it has been revoked" in result.stderr


def test_a_principal_map_names_the_account(gateway_factory, tmp_path):
    ca = CA(tmp_path / "ca")
    cas = tmp_path / "user_ca.pub"
    cas.write_text(ca.key.with_suffix(".pub").read_text())
    user = unique("carol")
    server = gateway_factory(
        f'[ssh.principals]\n"carol@corp.example" = "{user}"\n',
        ssh={"trusted_user_ca_keys": str(cas)},
    )
    server.admin.ok("user", "add", user)
    mapped = ca.sign(keygen(tmp_path / "id"), "carol@corp.example")
    _, result = login(server, mapped, tmp_path)
    assert result.returncode == 0 and result.stdout.startswith(f"user: {user}\n")
    # With a map, a principal that is a user name but not in the map does not count.
    direct = ca.sign(keygen(tmp_path / "id2"), user)
    _, result = login(server, direct, tmp_path)
    assert result.returncode == 255


def test_regression_an_unreadable_ca_file_stops_the_start(tmp_path):
    bad = tmp_path / "bad_ca.pub"
    bad.write_text("not a key\n")
    config = write_config(tmp_path / "gw", ssh={"trusted_user_ca_keys": str(bad)})
    result = run([sys.executable, "-m", "gateway", "--config", str(config), "check"], timeout=60)
    assert result.returncode != 0
    assert f"{bad}:1: not an OpenSSH public key" in result.stderr
    assert "Traceback" not in result.stderr


def test_regression_a_certificate_login_adds_no_key_that_outlives_it(gw, ca, alice, tmp_path):
    cert = ca.sign(keygen(tmp_path / "id"), alice, "-V", "-1m:+2h")
    client, _ = login(gw, cert, tmp_path)
    keygen(tmp_path / "plain")
    text = (tmp_path / "plain.pub").read_text()
    refused = client.ssh("keys", "add", "plain", input=text)
    assert "a key it adds must expire no later" in refused.stderr
    assert client.ssh("keys", "add", "plain", "--expires", "1h", input=text).returncode == 0


def test_regression_a_stranger_with_a_public_certificate_learns_nothing(
    gw, ca, alice, revoked, tmp_path
):
    """Review finding: refusals of a revoked certificate (or an untrusted CA) were told to
    anyone offering it; now only to whoever signs with the certified key."""
    cert = ca.sign(keygen(tmp_path / "id"), alice, serial=777)
    revoked.write_text(revoked.read_text() + "serial 777\n")
    stranger_dir = tmp_path / "stranger"
    stranger_dir.mkdir()
    shutil.copy(cert.with_suffix(".pub"), stranger_dir / "id.pub")
    shutil.copy(f"{cert}-cert.pub", stranger_dir / "id-cert.pub")
    stranger = Client(tmp_path / "home-stranger", stranger_dir / "id.pub", gw)
    argv = [*stranger.ssh_base, "-o", f"CertificateFile={stranger_dir / 'id-cert.pub'}"]
    result = run([*argv, "-v", "-T", "git@127.0.0.1", "whoami"], env=stranger.env)
    assert result.returncode == 255
    # The certificate was offered and answered "go on", as any would be; no key to sign.
    assert "Server accepts key" in result.stderr and "CERT" in result.stderr
    told = "\n".join(line for line in result.stderr.splitlines() if not line.startswith("debug"))
    assert "revoked" not in told and "refused" not in told
    _, holder = login(gw, cert, tmp_path)
    assert "git-gateway: the certificate is refused: it has been revoked" in holder.stderr

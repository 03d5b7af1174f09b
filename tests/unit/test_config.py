"""Configuration: defaults, file overlay, validation naming the key, file selection."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import pytest

from gateway import config
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def load_text(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "gw.toml"
    path.write_text(text)
    return config.load(path)


def test_defaults():
    cfg = config.from_mapping({})
    assert cfg.ssh.listen == ("127.0.0.1", 2222)
    assert cfg.ssh.user == "git"
    assert cfg.storage.repos == Path("repos").absolute()
    assert cfg.git.max_input_size == 2 * 1024**3


def test_committed_default_file_matches_embedded_defaults():
    committed = config.load(ROOT / "config" / "gateway.toml")
    embedded = config.from_mapping({})
    for section in config.SECTIONS:
        assert getattr(committed, section) == getattr(embedded, section)


def test_committed_example_is_generated_from_the_settings_table():
    # Regenerate with: python -m gateway.config > config/gateway.toml
    assert (ROOT / "config" / "gateway.toml").read_text() == config.example()


def test_the_reference_documents_every_key_with_its_real_default():
    """docs/configuration.md is checked against the settings table: every key is there, once,
    with the default the code has (`see below` for the long algorithm lists), and nothing
    else."""
    import re

    text = (ROOT / "docs" / "configuration.md").read_text()
    rows = re.findall(r"^\| `\[(\w+)\] (\w+)` \| (.+?) \| ", text, re.M)
    documented = {(section, key): default for section, key, default in rows}
    assert len(documented) == len(rows), "a key is documented twice"
    expected = {}
    for section, cls in config.SECTIONS.items():
        for spec in dataclasses.fields(cls):
            value = spec.metadata["default"]
            if isinstance(value, bool):
                shown = "true" if value else "false"
            elif isinstance(value, str | list | dict):
                shown = json.dumps(value)
            else:
                shown = str(value)
            expected[(section, spec.name)] = f"`{shown}`"
    assert set(documented) == set(expected)
    for key, default in documented.items():
        assert default in (expected[key], "see below"), (key, default, expected[key])


def test_file_overrides(tmp_path):
    cfg = load_text(
        tmp_path,
        '[ssh]\nlisten = "[::1]:0"\nuser = "deploy"\n[git]\nmax_input_size = "512M"\n'
        '[storage]\nrepos = "/srv/repos"\n',
    )
    assert cfg.ssh.listen == ("::1", 0)
    assert cfg.ssh.user == "deploy"
    assert cfg.git.max_input_size == 512 * 1024**2
    assert cfg.storage.repos == Path("/srv/repos")


def test_drain_accept_seconds_may_be_zero(tmp_path):
    assert config.from_mapping({}).server.drain_accept_seconds == 5
    cfg = load_text(tmp_path, "[server]\ndrain_accept_seconds = 0\n")
    assert cfg.server.drain_accept_seconds == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[ssh]\nlisten = 2222\n", "[ssh] listen"),
        ('[ssh]\nlisten = "localhost"\n', "[ssh] listen"),
        ('[ssh]\nlisten = "127.0.0.1:70000"\n', "[ssh] listen"),
        ('[ssh]\nlistne = "127.0.0.1:22"\n', "unknown key [ssh] listne"),
        ("[sssh]\n", "unknown section [sssh]"),
        ('[git]\nmax_input_size = "lots"\n', "[git] max_input_size"),
        ("[git]\nmax_input_size = 0\n", "[git] max_input_size"),
        ('[log]\nlevel = "loud"\n', "[log] level"),
        ("[ssh]\nlogin_timeout = -1\n", "[ssh] login_timeout"),
        ("[server]\ndrain_accept_seconds = -1\n", "[server] drain_accept_seconds"),
        ('[server]\ndrain_accept_seconds = "5s"\n', "[server] drain_accept_seconds"),
        ('[ssh]\nuser = "Root User"\n', "[ssh] user"),
        ('ssh = "x"\n', "[ssh] must be a table"),
        ("[ssh\n", "gw.toml"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, text)
    assert message in str(err.value)
    assert err.value.exit_code == 2


def test_file_selection(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config.load(env={}).source is None  # no default file: embedded defaults
    other = tmp_path / "other.toml"
    other.write_text('[ssh]\nuser = "envuser"\n')
    assert config.load(env={"GATEWAY_CONFIG": str(other)}).ssh.user == "envuser"
    explicit = tmp_path / "explicit.toml"
    explicit.write_text('[ssh]\nuser = "explicit"\n')
    cfg = config.load(explicit, env={"GATEWAY_CONFIG": str(other)})
    assert cfg.ssh.user == "explicit"
    with pytest.raises(ConfigError, match="file not found"):
        config.load(tmp_path / "missing.toml", env={})


def test_clone_urls():
    cfg = config.from_mapping({"ssh": {"public_address": "git.example.com"}})
    assert cfg.clone_url("myapp") == "git@git.example.com:myapp.git"
    cfg = config.from_mapping({"ssh": {"public_address": "git.example.com:2222"}})
    assert cfg.clone_url("myapp") == "ssh://git@git.example.com:2222/myapp.git"
    cfg = config.from_mapping({})
    assert cfg.clone_url("myapp") == "ssh://git@127.0.0.1:2222/myapp.git"


def test_reference_lists_every_key():
    text = config.reference()
    tomllib.loads("\n".join(line.split("  #")[0] for line in text.splitlines()))
    assert "max_input_size" in text


def test_app_overrides():
    cfg = config.from_mapping(
        {
            "deploy": {"command": ["./deploy"], "timeout": 30},
            "apps": {
                "web": {"mode": "gate", "timeout": 5},
                "api": {"webhook_url": "https://ci.example.com/hook"},
            },
        }
    )
    assert cfg.deploy_for("web").mode == "gate" and cfg.deploy_for("web").timeout == 5
    assert cfg.deploy_for("web").command == ("./deploy",)
    assert cfg.deploy_for("other").mode == "attached"
    api = cfg.deploy_for("api")  # picking the webhook replaces the global command
    assert api.command == () and api.webhook_url == "https://ci.example.com/hook"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"apps": {"web": {"branch": "x"}}}, "unknown key [apps.web] branch"),
        ({"apps": {"Bad!": {}}}, "[apps.Bad!]: invalid app name"),
        ({"apps": {"web": {"mode": "sometimes"}}}, "[apps.web] mode"),
        ({"deploy": {"command": "./deploy.sh"}}, "[deploy] command: expected a list"),
        ({"deploy": {"webhook_url": "ftp://x"}}, "[deploy] webhook_url"),
        (
            {"deploy": {"command": ["x"], "webhook_url": "https://x"}},
            "set only one of command, webhook_url",
        ),
        ({"deploy": {"max_parallel": 0}}, "[deploy] max_parallel"),
        ({"http": {"listen": "nowhere"}}, "[http] listen"),
    ],
)
def test_bad_deploy_settings(data, message):
    with pytest.raises(ConfigError) as err:
        config.from_mapping(data)
    assert message in str(err.value)


def test_secrets_are_masked_in_config_show():
    cfg = config.from_mapping({"deploy": {"webhook_secret": "hunter2"}})
    text = config.render(cfg)
    assert "hunter2" not in text and 'webhook_secret = "********"' in text


def test_database_is_a_sqlite_path_or_a_postgresql_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.from_mapping({"storage": {"database": "var/x.db"}})
    assert cfg.storage.database == tmp_path / "var" / "x.db"
    url = "postgresql://gw@db.internal:5432/gateway"
    assert config.from_mapping({"storage": {"database": url}}).storage.database == url
    for bad in ("mysql://u:pw@db/gw", "postgresql://db/ gw"):
        with pytest.raises(ConfigError, match=r"\[storage\] database: ") as err:
            config.from_mapping({"storage": {"database": bad}})
        assert "pw" not in str(err.value)
    # The sandbox path checks skip a registry that is not a file.
    config.from_mapping(
        {"storage": {"database": url}, "deploy": {"sandbox_read_paths": ["/srv/tools"]}}
    )


def test_database_url_from_the_environment_overrides_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = "postgresql://gw:pw@db/gateway"
    file = tmp_path / "gw.toml"
    file.write_text('[storage]\ndatabase = "var/file.db"\nrepos = "r"\n')
    cfg = config.load(file, env={"GATEWAY_DATABASE_URL": url})
    assert cfg.storage.database == url and cfg.storage.repos == tmp_path / "r"
    assert config.load(file, env={}).storage.database == tmp_path / "var" / "file.db"
    assert config.load(env={"GATEWAY_DATABASE_URL": url}).storage.database == url  # no file
    assert config.load(file, env={"GATEWAY_DATABASE_URL": ""}).storage.database != url
    with pytest.raises(ConfigError, match=r"^config: \$GATEWAY_DATABASE_URL: unsupported") as err:
        config.load(file, env={"GATEWAY_DATABASE_URL": "mysql://u:topsecret@db/x"})
    assert "topsecret" not in str(err.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://gw:hunter2@db:5432/gateway", "postgresql://gw:********@db:5432/gateway"),
        ("postgres://gw@db/gateway", "postgres://gw@db/gateway"),
        (
            "postgresql://db/gateway?sslmode=require&password=hunter2",
            "postgresql://db/gateway?sslmode=require&password=%2A%2A%2A%2A%2A%2A%2A%2A",
        ),
        ("postgresql://gw:hun@ter2@db/gateway", "postgresql://gw:********@db/gateway"),
    ],
)
def test_database_password_is_masked_in_config_show(url, shown):
    text = config.render(config.from_mapping({"storage": {"database": url}}))
    assert "hunter2" not in text and "ter2" not in text
    assert f"database = {json.dumps(shown)}" in text


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("ciphers", ["rot13"], "unsupported cipher algorithm(s): rot13"),
        ("ciphers", [], "non-empty list"),
        ("kex_algorithms", "curve25519-sha256", "non-empty list"),
        ("signature_algorithms", ["ssh-foo"], "unsupported public key algorithm(s): ssh-foo"),
    ],
)
def test_crypto_lists_are_validated(key, value, message):
    with pytest.raises(ConfigError) as err:
        config.from_mapping({"ssh": {key: value}})
    assert f"[ssh] {key}" in str(err.value) and message in str(err.value)


def cluster(**keys: object) -> dict[str, object]:
    return {"cluster": keys}


def test_a_cluster_config_with_listen_and_peers_is_accepted():
    cfg = config.from_mapping(
        cluster(listen="10.0.0.11:2300", peers=["10.0.0.12", "10.0.1.0/24"], forward="always")
    )
    assert cfg.cluster.listen == ("10.0.0.11", 2300)
    assert cfg.cluster.peers == ("10.0.0.12/32", "10.0.1.0/24")
    assert cfg.cluster.forward == "always" and cfg.cluster.advertise == ""
    every = cluster(listen="0.0.0.0:0", advertise="gw1.internal:2300", peers=["10.0.0.0/24"])
    assert config.from_mapping(every).cluster.advertise == "gw1.internal:2300"
    alone = config.from_mapping({}).cluster  # no listener: a node that forwards nothing
    assert alone.listen is None and alone.peers == () and alone.forward == "auto"
    assert config.from_mapping(cluster(forward="never")).cluster.forward == "never"


def test_regression_internal_listener_never_open_to_all():
    """The internal listener runs git for whoever it lets in: with no peers there is nobody to
    let in, and the gateway does not start rather than guess."""
    for peers in ([], None):
        keys = {"listen": "10.0.0.11:2300", **({"peers": peers} if peers is not None else {})}
        with pytest.raises(ConfigError) as err:
            config.from_mapping(cluster(**keys))
        message = str(err.value)
        assert message == (
            "config: [cluster] listen needs [cluster] peers (the other nodes' addresses)"
        )
        assert err.value.exit_code == 2
    for everyone in ("0.0.0.0/0", "::/0"):
        with pytest.raises(ConfigError) as err:
            config.from_mapping(cluster(listen="10.0.0.11:2300", peers=["10.0.0.12", everyone]))
        assert str(err.value).startswith(f"config: [cluster] peers: {everyone} is every address")


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (
            {"forward": "always"},
            'config: [cluster] forward = "always" needs [cluster] listen',
        ),
        (
            {"listen": "0.0.0.0:2300", "peers": ["10.0.0.0/24"]},
            "config: [cluster] listen on 0.0.0.0 needs [cluster] advertise",
        ),
        (
            {"listen": "[::]:2300", "peers": ["fd00::/64"]},
            "config: [cluster] listen on :: needs [cluster] advertise",
        ),
        (
            {"listen": "10.0.0.11:2300", "peers": ["10.0.0.0/33"]},
            "config: [cluster] peers: invalid address or CIDR block '10.0.0.0/33'",
        ),
        (
            {"listen": "10.0.0.11:2300", "peers": ["everyone"]},
            "config: [cluster] peers: invalid address or CIDR block 'everyone'",
        ),
        ({"peers": "10.0.0.0/24"}, "config: [cluster] peers: expected a list"),
        (
            {"forward": "sometimes"},
            "config: [cluster] forward: invalid value 'sometimes': expected one of auto, "
            "always, never",
        ),
        ({"listen": "10.0.0.11"}, "config: [cluster] listen"),
        ({"advertise": "gw1 internal"}, "config: [cluster] advertise: invalid address"),
    ],
)
def test_bad_cluster_settings_are_refused_in_one_line_naming_the_key(keys, message):
    with pytest.raises(ConfigError) as err:
        config.from_mapping(cluster(**keys))
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)
    assert err.value.exit_code == 2

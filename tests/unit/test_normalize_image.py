"""scripts/normalize_image.py: two builds' configurations differ only where it blanks them."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location(
    "normalize_image", ROOT / "scripts/normalize_image.py"
)
assert spec is not None and spec.loader is not None
normalize_image = importlib.util.module_from_spec(spec)
spec.loader.exec_module(normalize_image)


def build_dir(path: Path, container: str, hostname: str) -> Path:
    """A `dir:` copy as buildah pushes it: manifest, config blob, one layer blob."""
    path.mkdir()
    config = {
        "architecture": "amd64",
        "config": {"Hostname": hostname, "User": "10001:10001", "Cmd": ["serve"]},
        "container": container,
        "container_config": {"Hostname": hostname, "Cmd": ["/bin/sh", "-c", "#(nop) CMD"]},
        "created": "2026-12-07T04:30:01Z",
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "1" * 64]},
    }
    blob = json.dumps(config).encode()
    digest = hashlib.sha256(blob).hexdigest()
    (path / digest).write_bytes(blob)
    (path / ("2" * 64)).write_bytes(b"layer")
    manifest = {
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "size": len(blob), "digest": f"sha256:{digest}"},
        "layers": [{"size": 5, "digest": "sha256:" + "2" * 64}],
    }  # fmt: skip
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_two_builds_become_one_image(tmp_path):
    first = build_dir(tmp_path / "a", "f00d" * 16, "3da993fb3b36")
    second = build_dir(tmp_path / "b", "beef" * 16, "79b8b4cd550c")
    digest = normalize_image.normalize(first)
    assert normalize_image.normalize(second) == digest
    assert (first / "manifest.json").read_bytes() == (second / "manifest.json").read_bytes()
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted([digest.split(":")[1], "2" * 64, "manifest.json"])  # old config gone
    blob = (first / digest.split(":")[1]).read_bytes()
    assert "sha256:" + hashlib.sha256(blob).hexdigest() == digest
    config = json.loads(blob)
    assert "container" not in config
    assert config["config"] == {"Hostname": "", "User": "10001:10001", "Cmd": ["serve"]}
    assert config["container_config"]["Hostname"] == ""
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["config"]["size"] == len(blob)
    assert manifest["layers"] == [{"size": 5, "digest": "sha256:" + "2" * 64}]


def test_normalizing_twice_changes_nothing(tmp_path):
    path = build_dir(tmp_path / "a", "f00d" * 16, "host")
    digest = normalize_image.normalize(path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    assert normalize_image.normalize(path) == digest
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before

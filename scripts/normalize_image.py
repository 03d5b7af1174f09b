"""Blank what differs between two builds of one commit in a docker-format image (a `dir:` copy).

buildah writes the ID of the container it built in ("container") and that container's random
host name ("Hostname") into a docker-format image's configuration; nothing else in it depends
on the build (scripts/build-image gives every date SOURCE_DATE_EPOCH). Blanking both, then
rewriting the manifest to the new configuration's digest, makes two builds one image.
Usage: normalize_image.py DIR (a directory written by `buildah push IMAGE dir:DIR`).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any


def normalize_config(config: dict[str, Any]) -> dict[str, Any]:
    """The configuration without the build container's identity."""
    config = dict(config)
    config.pop("container", None)
    for section in ("config", "container_config"):
        if isinstance(config.get(section), dict):
            config[section] = {**config[section], "Hostname": ""}
    return config


def normalize(directory: Path) -> str:
    """Rewrite DIR's configuration and manifest in place; return the new config digest."""
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    old = manifest["config"]["digest"]
    old_path = directory / old.split(":", 1)[1]
    config = normalize_config(json.loads(old_path.read_bytes()))
    blob = json.dumps(config, separators=(",", ":")).encode()
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    (directory / digest.split(":", 1)[1]).write_bytes(blob)
    if digest != old:
        old_path.unlink()
    manifest["config"] = {**manifest["config"], "digest": digest, "size": len(blob)}
    manifest_path.write_text(json.dumps(manifest, indent=3))
    return digest


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    print(f"config {normalize(Path(argv[0]))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Clone, commit and push with libgit2 (run by Debian's python3 with its python3-pygit2, so
the system libgit2 and its libssh2 do the SSH, as for any libgit2-based tool on Debian 12).

    pygit2_client.py URL KEY DEST
libgit2 checks the host key against ~/.ssh/known_hosts (HOME is set by the caller). Prints
one JSON line: the libgit2 version, the cloned head, the pushed commit and push errors.
"""

from __future__ import annotations

import json
import sys

import pygit2


class Callbacks(pygit2.RemoteCallbacks):
    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key
        self.rejected: dict[str, str] = {}

    def credentials(self, url: str, username_from_url: str | None, allowed_types: int):
        return pygit2.Keypair(username_from_url or "git", f"{self.key}.pub", self.key, "")

    def certificate_check(self, certificate: object, valid: bool, host: bytes) -> bool:
        return valid  # libgit2's own verdict from known_hosts: unknown or changed is refused

    def push_update_reference(self, refname: str, message: str | None) -> None:
        if message is not None:
            self.rejected[refname] = message


def main() -> int:
    url, key, dest = sys.argv[1:]
    callbacks = Callbacks(key)
    repo = pygit2.clone_repository(url, dest, callbacks=callbacks)
    cloned = str(repo.head.target)
    with open(f"{dest}/from-libgit2.txt", "w") as handle:
        handle.write("pushed by libgit2\n")
    repo.index.add("from-libgit2.txt")
    repo.index.write()
    who = pygit2.Signature("libgit2 user", "libgit2@example.com", 1767225600, 0)
    commit = repo.create_commit(
        "refs/heads/main", who, who, "from libgit2", repo.index.write_tree(), [repo.head.target]
    )
    repo.remotes["origin"].push(["refs/heads/main:refs/heads/main"], callbacks=callbacks)
    print(
        json.dumps(
            {
                "libgit2": pygit2.LIBGIT2_VERSION,
                "cloned": cloned,
                "pushed": str(commit),
                "rejected": callbacks.rejected,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The git hooks installed in every app repository, and the wire format they speak.

git's receive-pack runs `pre-receive` (objects still in quarantine) and `post-receive` (refs
updated) with the exact ref updates of this push on stdin. The hooks are tiny standalone
programs: they pass those updates to the running gateway over its control socket, print
what it streams back (git relays it to the pusher as `remote:` lines, live) and exit with
the code it decides. Everything else (queueing, pipelines, logs) lives in the gateway, so a
deploy survives the pusher hitting Ctrl-C.
"""

from __future__ import annotations

import sys

HOOK_NAMES = ("pre-receive", "post-receive")

# Environment given to receive-pack (never taken from the client) that the hooks read.
SOCKET_ENV = "GATEWAY_HOOK_SOCKET"
TOKEN_ENV = "GATEWAY_HOOK_TOKEN"  # noqa: S105 - the name of a variable, not a secret
# Push options (`git push -o`) are forwarded cut to one more than these, so that the gateway
# sees too many or too long ones without a request growing with them (deploys/options.py).
MAX_OPTIONS = 16
MAX_OPTION_LENGTH = 512

# -IS: isolated and without site-packages: the hooks need the standard library only, and
# site's start-up (the virtualenv's .pth files) cost 12 ms of each push's two hook runs.
ISOLATION = "-IS"
_TEMPLATE = """#!{python} {isolation}
# git-gateway {hook} hook (generated; rewritten at every gateway start).
# Relays this push's ref updates to the gateway and streams its answer back to git.
import json, os, socket, sys

HOOK = "{hook}"
GATE = HOOK == "pre-receive"


{options_fn}def main():
    updates = [line.split() for line in sys.stdin.read().splitlines() if line.strip()]
    path, token = os.environ.get("{socket_env}"), os.environ.get("{token_env}")
    if not path or not token:
        return 0  # not a push through the gateway (an operator's local push): nothing to do
    request = {{
        "hook": HOOK,
        "token": token,
        "updates": updates,
        "quarantine": os.environ.get("GIT_QUARANTINE_PATH"),
{options_field}    }}
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(path)
        conn.sendall(json.dumps(request).encode() + b"\\n")
        for line in conn.makefile("rb"):
            message = json.loads(line)
            if "out" in message:
                sys.stdout.write(message["out"])
                sys.stdout.flush()
            if "exit" in message:
                return int(message["exit"])
    except (OSError, ValueError) as exc:
        print("gateway: cannot reach the deploy service: %s" % exc, flush=True)
    # The gateway went away: refuse a gated push rather than let it through unchecked.
    return 1 if GATE else 0


sys.exit(main())
"""


_OPTIONS_FN = """def push_options():
    # git sets these when the client sent push options (`git push -o`). Forwarded cut short:
    # the gateway validates them and only needs to see that there were too many or too long.
    count = os.environ.get("GIT_PUSH_OPTION_COUNT")
    if count is None:
        return None
    try:
        count = min(int(count), {max_count} + 1)
    except ValueError:
        count = {max_count} + 1
    return [
        os.environ.get("GIT_PUSH_OPTION_%d" % i, "")[: {max_length} + 1] for i in range(count)
    ]


"""
_OPTIONS_FIELD = """        "options": push_options(),
"""


def script(
    hook: str, python: str | None = None, isolation: str = ISOLATION, push_options: bool = True
) -> str:
    """The source of one hook, run by this gateway's own interpreter in isolated mode
    (`isolation` and `push_options` other than the defaults only to recognize what earlier
    versions wrote)."""
    if hook not in HOOK_NAMES:
        raise ValueError(hook)
    options_fn = _OPTIONS_FN.format(max_count=MAX_OPTIONS, max_length=MAX_OPTION_LENGTH)
    return _TEMPLATE.format(
        python=python or sys.executable,
        isolation=isolation,
        hook=hook,
        socket_env=SOCKET_ENV,
        token_env=TOKEN_ENV,
        options_fn=options_fn if push_options else "",
        options_field=_OPTIONS_FIELD if push_options else "",
    )

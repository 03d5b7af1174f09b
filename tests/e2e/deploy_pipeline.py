"""The deploy command used by the tests. Its behaviour is set by files in the pushed tree
(it runs in an export of the pushed commit), so each test scripts it through git."""

import json
import os
import subprocess
import sys
import time


def setting(name: str) -> str | None:
    try:
        with open(name) as handle:
            return handle.read().strip()
    except FileNotFoundError:
        return None


print(f"deploying {os.environ['GATEWAY_APP']} {os.environ['GATEWAY_NEW_SHA'][:8]}", flush=True)
if (path := setting("env-dump")) is not None:
    with open(path, "w") as out:
        kinds = {
            name: "link" if os.path.islink(name) else "exec" if os.access(name, os.X_OK) else "file"
            for name in os.listdir(".")
        }
        json.dump({"env": dict(os.environ), "cwd": os.getcwd(), "files": kinds}, out)
if (text := setting("stderr")) is not None:
    print(text, file=sys.stderr, flush=True)
if (fifo := setting("wait-fifo")) is not None:
    print("waiting for the test", flush=True)
    with open(fifo) as gate:  # blocks until the test opens the FIFO for writing
        gate.read()
    print("released by the test", flush=True)
if (count := setting("spam")) is not None:
    for i in range(int(count)):
        print(f"line {i:06d} " + "x" * 80)
if (seconds := setting("chatter")) is not None:
    # A chatty build: a line every 5 ms until it is cancelled (or the time is up).
    end = time.monotonic() + float(seconds)
    i = 0
    while time.monotonic() < end:
        print(f"chatter {i:07d} " + "y" * 60, flush=True)
        i += 1
        time.sleep(0.005)
if (pid_file := setting("hang")) is not None:
    child = subprocess.Popen(["sleep", "300"])
    with open(pid_file, "w") as out:
        out.write(f"{os.getpid()} {child.pid}")
    print("hanging", flush=True)
    time.sleep(300)
print("done", flush=True)
sys.exit(int(setting("exit") or 0))

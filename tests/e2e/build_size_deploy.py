"""A deploy that writes on purpose, as the file `mode` in its pushed tree says, then stays
running (the gateway must stop it, not wait for it to end): each mode is a way to take disk
or memory past [deploy] max_build_size while every file stays under max_file_size."""

import ctypes
import mmap
import os
import sys
import time

CHUNK = 512 * 1024  # under the tests' max_file_size (1M)
FALLOC_FL_KEEP_SIZE = 1


def write(path, size=CHUNK):
    with open(path, "wb") as out:
        out.write(os.urandom(size))


def many_files(count):
    os.makedirs("out", exist_ok=True)
    for i in range(count):
        write(f"out/part-{i:04d}")


def unlinked_open(count):
    """Written, then deleted while kept open: no name left, the blocks stay taken."""
    kept = []
    for i in range(count):
        handle = open(f"hidden-{i}", "wb+")  # noqa: SIM115 - kept open on purpose
        handle.write(os.urandom(CHUNK))
        handle.flush()
        os.unlink(f"hidden-{i}")
        kept.append(handle)
    return kept


def unlinked_mapped(count):
    """A sparse file mapped, closed and deleted, then filled through the mapping: only the
    mapping is left to show it."""
    maps = []
    for i in range(count):
        fd = os.open(f"mapped-{i}", os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, CHUNK)
        area = mmap.mmap(fd, CHUNK)
        os.close(fd)
        os.unlink(f"mapped-{i}")
        area[:] = os.urandom(CHUNK)
        area.flush()
        maps.append(area)
    return maps


def preallocated(count):
    """fallocate with KEEP_SIZE: blocks reserved past the end, the file's size stays 0, and
    RLIMIT_FSIZE (which checks the size) never sees them."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    for i in range(count):
        fd = os.open(f"prealloc-{i}", os.O_RDWR | os.O_CREAT, 0o600)
        if libc.fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 4 * CHUNK) != 0:
            raise OSError(ctypes.get_errno(), "fallocate")
        os.close(fd)


def sparse(count):
    """Large apparent sizes, nothing written: they take (almost) no disk."""
    for i in range(count):
        with open(f"sparse-{i}", "wb") as out:
            out.truncate(CHUNK * 2 - 1)  # under max_file_size, mostly holes
            out.seek(CHUNK)
            out.write(b"x")


def in_tmp(count):
    for i in range(count):
        write(f"/tmp/part-{i}")


def hard_links(count):
    write("original")
    for i in range(count):
        os.link("original", f"link-{i}")


MODES = {
    "many": lambda: many_files(20),
    "unlinked": lambda: unlinked_open(20),
    "mapped": lambda: unlinked_mapped(20),
    "preallocated": lambda: preallocated(10),
    "tmp": lambda: in_tmp(20),
    "small": lambda: many_files(4),
    "sparse": lambda: sparse(40),
    "hard-links": lambda: hard_links(40),
}

with open("mode") as handle:
    mode = handle.read().strip()
held = MODES[mode]()
print(f"wrote ({mode})", flush=True)
if os.path.exists("stay"):
    time.sleep(120)  # the gateway stops it long before (the test's timeout is 60 s)
    print("still running: not stopped", flush=True)
sys.exit(0)

"""The pack-objects hook: one pack-objects run per identical request, and a small disk cache.

upload-pack runs this program (`uploadpack.packObjectsHook`, set by the gateway on its
command line) instead of `git pack-objects`, with pack-objects' argv and stdin. The request
is keyed by the repository, that argv, the gateway's git settings and that stdin (wants,
haves, shallow lines): everything that shapes the pack. Then, in order:
- a cache entry for the key (written at a key's second request, checksummed, renamed into
  place whole) is verified and served;
- else one process per key, elected with a record lock, runs the real pack-objects and
  copies its output both to upload-pack and to a spool file; identical requests arriving
  meanwhile tail that spool as it grows, so they stream the one run's output live;
- anything unusable (a missing or foreign directory, a full disk, a bad entry) falls back
  to plain pack-objects: the cache may make a fetch faster, never wrong.
Its disk is bounded whatever clients do: every byte it holds counts, files removed while a
client still reads them included, a spool reserves its disk as it grows, and a request that
finds no room is answered without a spool (Cache, lead).
Each run sends one datagram to its gateway worker (metrics, and log lines for problems).
Standard library only, and little of it: every fetch with wants pays this start-up, so no
json, subprocess, socket or contextlib (about 16 ms of imports, more than a small fetch's
pack-objects run): git is started with posix_spawn, the report is sent with _socket.
Size: one module on purpose: the hook imports it alone, and every import is start-up time.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # signal's C half, without signal's imports
import _socket
import errno
import fcntl
import hashlib
import os
import stat
import struct
import sys
import time

# Environment given to upload-pack by the gateway (never taken from the client).
DIR_ENV = "GATEWAY_PACK_CACHE_DIR"
MAX_SIZE_ENV = "GATEWAY_PACK_CACHE_MAX_SIZE"
MAX_AGE_ENV = "GATEWAY_PACK_CACHE_MAX_AGE"
MAX_MARKERS_ENV = "GATEWAY_PACK_CACHE_MAX_MARKERS"
STATS_ENV = "GATEWAY_PACK_CACHE_STATS"
GIT_ENV = "GATEWAY_GIT"

ENTRIES, SPOOL, SEEN, GONE, LOCK = "entries", "spool", "seen", "gone", "lock"
SUBDIRS = (ENTRIES, SPOOL, SEEN, GONE)
KEY_VERSION = b"git-gateway pack cache 1\0"
# Entry = pack bytes, then: magic, pack length, key, sha256(key + pack). The key inside the
# checksum means an entry renamed to another key (another tenant's) never verifies.
TRAILER = struct.Struct(">8sQ32s32s")
MAGIC = b"GGPACK01"
CHUNK = 256 * 1024
# A request larger than this (a fetch with a huge have list) is not cached.
MAX_REQUEST = 16 * 1024 * 1024
# Entries up to this size are verified in memory and written from there (one read).
IN_MEMORY = 32 * 1024 * 1024
# A follower polls a spool that has no new bytes yet at this pace.
POLL = 0.005
# How long a request waits for a leader's spool to appear before running git itself.
JOIN_WAIT = 2.0
# Spool files older than this with no live writer were left by a killed leader.
STALE_SPOOL = 60.0
# A leader reserves disk for its spool in steps, from FIRST_STEP doubling up to STEP (at
# most max_size/16 each), under the budget lock.
FIRST_STEP, STEP = 1024 * 1024, 16 * 1024 * 1024
# Removing entries to make room frees this fraction of max_size more than needed, so that
# the next reservations fit in the budget without counting the whole cache again.
HEADROOM = 8
# Block rounding: a spool file takes up to a page more than it holds.
PAGE = 4096
# The lock file's contents: 8-byte counters (its byte 0 is also the budget's record lock,
# its other offsets the keys'): an upper bound of the cache's usage, the markers' number.
LEDGER, MARKERS = 0, 1
UNKNOWN = 1 << 62
# Opening a cache file to remove it: a write lock needs a writable descriptor; never a
# symlink, and never waiting on a FIFO or device someone put there.
_WRITE_NOFOLLOW = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK
# seen/ markers kept (one empty file per distinct recent request) unless configured.
MAX_MARKERS = 10_000
# struct flock for F_OFD_SETLK (Linux, 64-bit): type, whence, start, len, pid (0).
_FLOCK = struct.Struct("hhqqi4x")


class _quiet:
    """contextlib.suppress, without importing contextlib."""

    def __init__(self, *exceptions: type[BaseException]) -> None:
        self.exceptions = exceptions

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is not None and issubclass(kind, self.exceptions)


class Child:
    """A process started with posix_spawn (subprocess' import costs more than this whole
    hook's work on a small fetch): its stdin a pipe, its stdout a pipe or inherited."""

    def __init__(self, command: list[str], capture: bool) -> None:
        fds: list[int] = []
        try:
            read_in, self.stdin = os.pipe()
            fds += [read_in, self.stdin]
            actions = [(os.POSIX_SPAWN_DUP2, read_in, 0)]
            read_out = write_out = -1
            if capture:
                read_out, write_out = os.pipe()
                fds += [read_out, write_out]
                actions.append((os.POSIX_SPAWN_DUP2, write_out, 1))
            spawn = os.posix_spawn if os.path.isabs(command[0]) else os.posix_spawnp
            # SIGPIPE and SIGXFSZ back to their defaults, as subprocess does: Python ignores
            # them, and git must die of a closed pipe the way it would under upload-pack.
            self.pid = spawn(
                command[0],
                command,
                os.environ,
                file_actions=actions,
                setsigdef=(_signal.SIGPIPE, _signal.SIGXFSZ),
            )
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        os.close(read_in)
        if write_out >= 0:
            os.close(write_out)
        self.stdout = read_out
        self.code: int | None = None

    def feed(self, data: bytes) -> None:
        """Write to its stdin; a child that stopped reading is not an error here."""
        with _quiet(BrokenPipeError):
            write_all(self.stdin, data)

    def close_stdin(self) -> None:
        if self.stdin >= 0:
            os.close(self.stdin)
            self.stdin = -1

    def wait(self) -> int:
        if self.code is None:
            _, status = os.waitpid(self.pid, 0)
            self.code = os.waitstatus_to_exitcode(status)
            self.close_stdin()
            if self.stdout >= 0:
                os.close(self.stdout)
                self.stdout = -1
        return self.code

    def kill(self) -> None:
        if self.code is None:
            with _quiet(ProcessLookupError):
                os.kill(self.pid, _signal.SIGKILL)


class Unusable(Exception):
    """The cache cannot be used for this request: fall back to plain pack-objects."""


class Reporter:
    """Collects what this run did and sends it as one datagram to the gateway worker."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.message: dict[str, object] = {"result": "bypass", "served": 0, "written": 0}
        self.problems: list[dict[str, str]] = []

    def problem(self, event: str, reason: str, key: str = "") -> None:
        self.problems.append({"event": event, "reason": reason[:300], "key": key[:64]})

    def send(self) -> None:
        if not self.path:
            return
        self.message["problems"] = self.problems[:8]
        data = to_json(self.message).encode()[:8192]
        try:
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
        except OSError:
            return
        try:
            sock.setblocking(False)
            sock.sendto(data, self.path)
        except OSError:
            pass
        finally:
            sock.close()


def _json_text(text: str) -> str:
    out = []
    for char in text:
        if char in '"\\' or ord(char) < 0x20 or 0xD800 <= ord(char) < 0xE000:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def to_json(value: object) -> str:
    """JSON for the report's few shapes (str, int, list, dict): the json module's import
    alone costs more than this hook's own work on a small fetch."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _json_text(value)
    if isinstance(value, list):
        return "[" + ",".join(to_json(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{_json_text(str(k))}:{to_json(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot report {type(value).__name__}")


def pack_objects_argv(argv: list[str], git: str) -> list[str]:
    """The real pack-objects command for the argv upload-pack gave: exactly `git
    [--shallow-file ""] pack-objects ...`, with `git` being the gateway's own binary."""
    rest = argv[1:]
    if rest[:2] == ["--shallow-file", ""]:
        rest = rest[2:]
        prefix = ["--shallow-file", ""]
    else:
        prefix = []
    if not argv or argv[0] != "git" or not rest or rest[0] != "pack-objects":
        raise ValueError("not a pack-objects command")
    return [git, *prefix, *rest]


# Arguments that change what pack-objects prints on stderr, never the pack: not in the key,
# so a terminal's clone and a CI job's share answers.
NOT_SHAPING = frozenset({"--progress"})


def request_key(repository: str, argv: list[str], request: bytes) -> str:
    digest = hashlib.sha256(KEY_VERSION)
    shaping = [arg for arg in argv if arg not in NOT_SHAPING]
    for part in (repository, os.environ.get("GIT_CONFIG_PARAMETERS", ""), *shaping):
        digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
    digest.update(b"\0")
    digest.update(request)
    return digest.hexdigest()


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Cache:
    """The node's cache directory, reached only through descriptors opened without
    following symlinks, and only if it is a directory private to this user.

    Disk: every byte of every file in entries/, spool/ and gone/ counts against max_size,
    and claims (sparse files in gone/ whose size is what a leader may still write) too.
    A data file is never unlinked while a process holds it open (an open file's bytes stay
    on disk, unseen by any directory listing): each holder keeps an OFD read lock on it,
    and one that is still held moves to gone/, counted, until its last holder is done."""

    def __init__(
        self, path: str, max_size: int, max_age: float, max_markers: int = MAX_MARKERS
    ) -> None:
        self.max_size = max_size
        self.max_age = max_age
        self.max_markers = max_markers
        try:
            self.root = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as exc:
            raise Unusable(f"cannot open {path}: {exc.strerror}") from None
        self.dirs: dict[str, int] = {}
        try:
            _check_private(os.fstat(self.root), path)
            for name in SUBDIRS:
                fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=self.root)
                self.dirs[name] = fd
                _check_private(os.fstat(fd), f"{path}/{name}")
            self.lock = os.open(LOCK, os.O_RDWR | os.O_NOFOLLOW, dir_fd=self.root)
        except OSError as exc:
            self.close()
            raise Unusable(f"cannot open {path}: {exc.strerror}") from None
        except Unusable:
            self.close()
            raise

    def close(self) -> None:
        for fd in (*self.dirs.values(), getattr(self, "lock", None), self.root):
            if fd is not None:
                with _quiet(OSError):
                    os.close(fd)

    # -- entries --

    def read_entry(self, key: str) -> tuple[int, bytes | None, int] | None:
        """A verified entry for key: (fd, its bytes if small, pack length); None if there is
        none or it has expired. Raises ValueError (with why) for an entry that must not be
        served; the caller removes it."""
        try:
            fd = os.open(key, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.dirs[ENTRIES])
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ValueError("a symlink") from None
            raise
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                raise ValueError("not a regular file of the gateway's user")
            if not hold(fd):  # removed (or being removed) since we opened it: a miss
                os.close(fd)
                return None
            if info.st_nlink != 1:
                raise ValueError("a file with other names (hard link)")
            if time.time() - info.st_mtime > self.max_age:
                os.close(fd)
                self.retire(ENTRIES, key)
                return None
            if info.st_size <= IN_MEMORY + TRAILER.size:
                # Small: one read, checked and served from memory.
                whole = os.pread(fd, info.st_size, 0)
                length = verify_bytes(whole, key)
                data: bytes | None = whole[:length]
            else:
                length, data = verify(fd, info.st_size, key), None
            return fd, data, length
        except BaseException:
            with _quiet(OSError):
                os.close(fd)
            raise

    def remove(self, where: str, name: str) -> None:
        with _quiet(OSError):
            os.unlink(name, dir_fd=self.dirs[where])

    def retire(self, where: str, name: str) -> str | None:
        """Take a data file out of use: unlinked if nobody holds it open, else moved to
        gone/ (its bytes still counted) until its last holder is done. Returns its name in
        gone/ (its holder may unlink it once done: forget()), or None if it was unlinked."""
        try:
            fd = os.open(name, _WRITE_NOFOLLOW, dir_fd=self.dirs[where])
        except OSError:
            self.remove(where, name)  # gone already, or a symlink (never followed)
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode) or _ofd_lock(fd, fcntl.F_WRLCK):
                self.remove(where, name)  # under the write lock: no holder can start now
                return None
            parked = f"{name}.{os.fstat(fd).st_ino}"
            try:
                os.rename(name, parked, src_dir_fd=self.dirs[where], dst_dir_fd=self.dirs[GONE])
            except OSError:
                return None
            return parked
        finally:
            os.close(fd)

    def forget(self, name: str) -> None:
        """Unlink a file of gone/ if nobody holds it any more."""
        try:
            fd = os.open(name, _WRITE_NOFOLLOW, dir_fd=self.dirs[GONE])
        except OSError:
            self.remove(GONE, name)
            return
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode) or _ofd_lock(fd, fcntl.F_WRLCK):
                self.remove(GONE, name)
        finally:
            os.close(fd)

    def reap(self, claims: bool) -> None:
        """Unlink what gone/ holds that nobody holds any more; claims only under the budget
        lock (a claim is made and locked under it)."""
        for name in os.listdir(self.dirs[GONE]):
            if claims or not name.startswith("claim-"):
                self.forget(name)

    # -- second requests --

    def mark_seen(self, key: str) -> tuple[bool, int]:
        """Record a request for key: (was it requested recently, the marker's mtime now)."""
        seen = self.dirs[SEEN]
        try:
            before = os.stat(key, dir_fd=seen, follow_symlinks=False)
            recent = time.time() - before.st_mtime <= self.max_age
        except FileNotFoundError:
            before, recent = None, False
        try:
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600, dir_fd=seen)
            os.close(fd)
            os.utime(key, dir_fd=seen, follow_symlinks=False)
            marked = os.stat(key, dir_fd=seen, follow_symlinks=False).st_mtime_ns
        except OSError:
            return recent, 0
        if before is None:  # one more marker: keep their number bounded
            with _quiet(OSError):
                self.bound_markers()
        return recent, marked

    def bound_markers(self) -> None:
        """At most max_markers markers. Their number is kept in the lock file (an upper
        bound: a new marker adds one) rather than listed at each request; past the cap,
        the expired and then the least recently requested go, down to three quarters of
        it (so a new key lists the directory once in max_markers/4, not each time)."""
        fcntl.lockf(self.lock, fcntl.LOCK_EX, 1, 0)
        try:
            count = self._word(MARKERS)
            count = UNKNOWN if count is None else count + 1
            if count > self.max_markers:
                count = self._trim_markers()
            self._set_word(MARKERS, count)
        finally:
            self._budget_unlock()

    def _trim_markers(self) -> int:
        now = time.time()
        items = []
        for item in _scan(self.dirs[SEEN]):
            if now - item.st_mtime > self.max_age:
                self.remove(SEEN, item.name)
            else:
                items.append(item)
        keep = self.max_markers * 3 // 4 if len(items) > self.max_markers else len(items)
        items.sort(key=lambda i: i.st_mtime)
        for item in items[: len(items) - keep]:
            self.remove(SEEN, item.name)
        return keep

    def seen_since(self, key: str, mtime_ns: int) -> bool:
        try:
            return (
                os.stat(key, dir_fd=self.dirs[SEEN], follow_symlinks=False).st_mtime_ns > mtime_ns
            )
        except OSError:
            return False

    # -- leadership --

    def try_lead(self, key: str) -> bool:
        """One leader per key on this node: a record lock on one byte of the lock file, at
        an offset taken from the key (released by the kernel if the process dies)."""
        try:
            fcntl.lockf(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _offset(key))
        except OSError:
            return False
        return True

    def unlock(self, key: str) -> None:
        with _quiet(OSError):
            fcntl.lockf(self.lock, fcntl.LOCK_UN, 1, _offset(key))

    def new_spool(self, key: str) -> int:
        """A fresh spool for key, locked (flock) while written, then published as
        spool/<key> for followers."""
        spool = self.dirs[SPOOL]
        temp = f".tmp-{key}-{os.getpid()}"
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=spool)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.retire(SPOOL, key)  # a killed leader's, maybe still read: never renamed over
            os.rename(temp, key, src_dir_fd=spool, dst_dir_fd=spool)
        except OSError:
            os.close(fd)
            self.remove(SPOOL, temp)
            raise
        return fd

    def open_spool(self, key: str) -> int | None:
        try:
            fd = os.open(key, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.dirs[SPOOL])
        except OSError:
            return None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or not hold(fd):
            os.close(fd)
            return None
        return fd

    def publish(self, key: str) -> None:
        """The finished spool becomes the entry, atomically (it was complete before)."""
        self.retire(ENTRIES, key)  # an expired one, maybe still read: never renamed over
        os.rename(key, key, src_dir_fd=self.dirs[SPOOL], dst_dir_fd=self.dirs[ENTRIES])

    # -- bounds --

    def usage(self) -> int:
        """Bytes the cache holds on disk now: entries, spools, files still read after their
        removal, what leaders have reserved but not written yet, and the lock file (whose
        counters take a block)."""
        files = sum(
            item.st_bytes for where in (ENTRIES, SPOOL, GONE) for item in _scan(self.dirs[where])
        )
        return files + os.fstat(self.lock).st_blocks * 512

    def _try_budget_lock(self) -> bool:
        try:
            fcntl.lockf(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
        except OSError:
            return False
        return True

    def _budget_unlock(self) -> None:
        fcntl.lockf(self.lock, fcntl.LOCK_UN, 1, 0)

    # The budget: the lock file's first 8 bytes hold an upper bound of usage() (what the
    # last full count found, plus what was reserved since, less what leaders gave back),
    # so that most reservations read one number instead of listing the whole cache.

    def _word(self, index: int) -> int | None:
        """One of the lock file's counters (LEDGER, MARKERS); None if never written."""
        raw = os.pread(self.lock, 8, 8 * index)
        return int.from_bytes(raw, "big") if len(raw) == 8 else None

    def _set_word(self, index: int, value: int) -> None:
        if index and os.fstat(self.lock).st_size < 8 * index:
            # The words before were never written: unknown, so the next use counts.
            os.pwrite(self.lock, UNKNOWN.to_bytes(8, "big") * index, 0)
        os.pwrite(self.lock, min(max(value, 0), UNKNOWN).to_bytes(8, "big"), 8 * index)

    def _ledger(self) -> int | None:
        return self._word(LEDGER)

    def _set_ledger(self, value: int) -> None:
        self._set_word(LEDGER, value)

    def reserve(self, claim: Claim, written: int, need: int) -> bool:
        """Let a leader that has `written` bytes in its spool write `need` more (at least),
        within max_size counted over the whole cache; the oldest entries nobody reads are
        removed to make room. Under the budget lock, so that two leaders never both take
        the same free bytes. False if there is no room; OSError if the cache is unusable
        (a full disk: its budget cannot even be written)."""
        fcntl.lockf(self.lock, fcntl.LOCK_EX, 1, 0)
        try:
            if claim.fd < 0:
                claim.make(self)
            want = max(need, min(claim.next_step, self.max_size // 16))
            ledger = self._ledger()
            if ledger is not None and ledger + want <= self.max_size:
                self._set_ledger(ledger + want)
            else:  # the bound says full: count for real, and make room
                self.reap(claims=True)
                others = self.usage() - claim.size  # ours is replaced by the new claim
                free = self.max_size - others
                if free < need:
                    # Some headroom too, so that the next reservations need no count.
                    self._evict(need - free + self.max_size // HEADROOM)
                    others = self.usage() - claim.size  # what eviction really freed
                    free = self.max_size - others
                if free < need:
                    self._set_ledger(others + claim.size)
                    return False
                want = min(free, want)
                self._set_ledger(others + want)
            os.ftruncate(claim.fd, want)
            claim.grant(written, want)
            return True
        finally:
            self._budget_unlock()

    def refund(self, unused: int) -> None:
        """Give back reserved bytes a leader did not write."""
        try:
            fcntl.lockf(self.lock, fcntl.LOCK_EX, 1, 0)
        except OSError:
            return
        try:
            ledger = self._ledger()
            if ledger is not None:
                self._set_ledger(ledger - unused)
        except OSError:
            pass
        finally:
            self._budget_unlock()

    def _evict(self, want: int) -> int:
        """Remove entries (expired, then oldest) until about `want` bytes are free (the
        caller counts again for the exact figure). One still being read moves to gone/ and
        frees nothing yet."""
        now = time.time()
        items = sorted(
            _scan(self.dirs[ENTRIES]),
            key=lambda i: (now - i.st_mtime <= self.max_age, i.st_mtime),
        )
        freed = 0
        for item in items:
            if freed >= want:
                break
            if self.retire(ENTRIES, item.name) is None:
                freed += item.st_bytes
        return freed

    def sweep(self) -> None:
        """Drop expired entries, then the oldest until the whole cache fits in max_size;
        drop spools of killed leaders and removed files nobody reads any more (markers
        are bounded as they are made). One sweeper at a time; others skip."""
        if not self._try_budget_lock():
            return
        try:
            self._sweep()
        except OSError:
            pass  # a full disk, say: the next sweep or reservation counts again
        finally:
            self._budget_unlock()

    def _sweep(self) -> None:
        now = time.time()
        for item in _scan(self.dirs[SPOOL]):
            if now - item.st_mtime > STALE_SPOOL:
                self._remove_dead_spool(item.name)
        for item in _scan(self.dirs[ENTRIES]):
            if now - item.st_mtime > self.max_age:
                self.retire(ENTRIES, item.name)
        self.reap(claims=True)
        total = self.usage()
        if total > self.max_size:
            self._evict(total - self.max_size + self.max_size // HEADROOM)
            total = self.usage()
        self._set_ledger(total)

    def _remove_dead_spool(self, name: str) -> None:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.dirs[SPOOL])
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no live leader writes it
            self.retire(SPOOL, name)
        except OSError:
            pass
        finally:
            os.close(fd)


class Claim:
    """Disk a leader may still write to its spool: a sparse file in gone/ (no blocks, its
    size counted), held with a read lock while the leader lives (a killed leader's is
    reaped)."""

    def __init__(self) -> None:
        self.fd = -1
        self.size = self.base = 0
        self.next_step = FIRST_STEP
        self.name = f"claim-{os.getpid()}"

    @property
    def limit(self) -> int:
        """Spool bytes the leader may have written before it reserves more."""
        return self.base + self.size

    def grant(self, written: int, size: int) -> None:
        self.base, self.size = written, size
        self.next_step = min(self.next_step * 2, STEP)  # a large pack: fewer, larger steps

    def make(self, cache: Cache) -> None:
        """Under the budget lock (reapers of claims take it too). Raises OSError."""
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        try:
            self.fd = os.open(self.name, flags, 0o600, dir_fd=cache.dirs[GONE])
        except FileExistsError:  # left by a killed process that had our pid
            cache.forget(self.name)
            self.fd = os.open(self.name, flags, 0o600, dir_fd=cache.dirs[GONE])
        if not hold(self.fd):  # pragma: no cover - made under the budget lock
            self.drop(cache)
            raise OSError(errno.ESTALE, "claim removed while made")

    def drop(self, cache: Cache, written: int | None = None) -> None:
        """Give the unwritten rest back (what was written counts as the spool's own):
        to the budget too if we know how much of it was written."""
        if self.fd >= 0:
            cache.remove(GONE, self.name)
            os.close(self.fd)
            self.fd = -1
            if written is not None:
                taken = -(-written // PAGE) * PAGE  # in blocks, as the disk counts it
                if self.limit > taken:
                    cache.refund(self.limit - taken)
            self.size = 0


def hold(fd: int) -> bool:
    """Mark fd's file as held open (an OFD read lock, dropped by the kernel with the
    descriptor): it is never unlinked while held. False if it was removed meanwhile, or is
    being removed (then it must not be used)."""
    if not _ofd_lock(fd, fcntl.F_RDLCK):
        return False
    return os.fstat(fd).st_nlink > 0


def _ofd_lock(fd: int, kind: int) -> bool:
    """An open-file-description lock on the whole file, without waiting: independent of
    flock (the spool's writer lock) and owned by the descriptor, not the process. False
    if it is taken, or if this file system has no such locks: then nothing is served or
    spooled (no hold) and what is removed stays in gone/, counted (no write lock), so the
    cache stops being used rather than outgrowing its bound."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, 0, 0, 0))
    except OSError:
        return False
    return True


class _Item:
    def __init__(self, name: str, info: os.stat_result) -> None:
        self.name, self.st_size, self.st_mtime = name, info.st_size, info.st_mtime
        # Disk taken: blocks, or the size of a sparse claim (its blocks are not written yet).
        self.st_bytes = max(info.st_size, info.st_blocks * 512)


def _scan(fd: int) -> list[_Item]:
    items = []
    for name in os.listdir(fd):
        with _quiet(OSError):
            info = os.stat(name, dir_fd=fd, follow_symlinks=False)
            items.append(_Item(name, info))
    return items


def _offset(key: str) -> int:
    # Offset 0 is the sweep lock; keys take 60 bits of their hash, plus one.
    return int(key[:15], 16) + 1


def _check_private(info: os.stat_result, path: str) -> None:
    if not stat.S_ISDIR(info.st_mode):
        raise Unusable(f"{path} is not a directory")
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise Unusable(f"{path} is not private to the gateway's user (0700)")


def trailer(key: str, length: int, digest: bytes) -> bytes:
    return TRAILER.pack(MAGIC, length, bytes.fromhex(key), digest)


def _check_trailer(raw: bytes, size: int, key: str) -> tuple[int, bytes]:
    if size < TRAILER.size or len(raw) != TRAILER.size:
        raise ValueError("truncated (no trailer)")
    magic, length, stored_key, digest = TRAILER.unpack(raw)
    if magic != MAGIC or length != size - TRAILER.size:
        raise ValueError("truncated or not an entry")
    if stored_key != bytes.fromhex(key):
        raise ValueError("written for another key")
    return length, digest


def verify_bytes(whole: bytes, key: str) -> int:
    """Check a complete entry read whole; return its pack length or raise ValueError."""
    length, digest = _check_trailer(whole[-TRAILER.size :], len(whole), key)
    check = hashlib.sha256(bytes.fromhex(key))
    check.update(memoryview(whole)[:length])
    if check.digest() != digest:
        raise ValueError("checksum mismatch")
    return length


def verify(fd: int, size: int, key: str) -> int:
    """Check a complete spool or entry for key; return its pack length or raise ValueError."""
    raw = os.pread(fd, TRAILER.size, max(size - TRAILER.size, 0))
    length, digest = _check_trailer(raw, size, key)
    check = hashlib.sha256(bytes.fromhex(key))
    offset = 0
    while offset < length:
        data = os.pread(fd, min(CHUNK * 4, length - offset), offset)
        if not data:
            raise ValueError("truncated while read")
        check.update(data)
        offset += len(data)
    if check.digest() != digest:
        raise ValueError("checksum mismatch")
    return length


def copy_range(fd: int, start: int, end: int, out: int) -> None:
    """Bytes [start, end) of fd to out: by sendfile (the kernel copies from the page cache
    into upload-pack's pipe), or through memory where sendfile cannot take out."""
    offset = start
    try:
        while offset < end:
            sent = os.sendfile(out, fd, offset, min(CHUNK * 4, end - offset))
            if not sent:
                raise ValueError("truncated while read")
            offset += sent
        return
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    while offset < end:
        data = os.pread(fd, min(CHUNK, end - offset), offset)
        if not data:
            raise ValueError("truncated while read")
        write_all(out, data)
        offset += len(data)


# -- the three ways a request is answered --


def serve_entry(cache: Cache, key: str, out: int, report: Reporter) -> bool:
    try:
        found = cache.read_entry(key)
    except ValueError as exc:
        report.problem("pack_cache_bad_entry", str(exc), key)
        cache.retire(ENTRIES, key)
        return False
    if found is None:
        return False
    fd, data, length = found
    try:
        if data is not None:
            write_all(out, data)
        else:
            copy_range(fd, 0, length, out)
    finally:
        os.close(fd)
    report.message.update(result="hit", served=length)
    return True


RETRY = -1


def follow(cache: Cache, key: str, out: int, report: Reporter) -> int:
    """Stream the leader's spool as it grows; RETRY if there is no live spool to follow
    yet and nothing was sent."""
    cache.mark_seen(key)  # a second request: the leader keeps its answer
    fd = cache.open_spool(key)
    if fd is None:
        return RETRY
    sent = 0
    try:
        while True:
            size = os.fstat(fd).st_size
            ready = size - TRAILER.size
            if ready > sent:
                copy_range(fd, sent, ready, out)
                sent = ready
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                time.sleep(POLL)  # the leader is still writing
                continue
            # No writer: a finished answer, or what a failed or killed leader left.
            size = os.fstat(fd).st_size
            try:
                length = verify(fd, size, key)
            except ValueError as exc:
                if sent == 0:
                    return RETRY
                report.problem("pack_cache_leader_failed", str(exc), key)
                return 1
            copy_range(fd, sent, length, out)
            report.message.update(result="shared", served=length)
            return 0
    finally:
        os.close(fd)


class _Client:
    """The leader's own client (upload-pack's pipe), fed so that it never holds up the
    spool: while spooling, writes are non-blocking and what the pipe cannot take yet is
    sent later from the spool file; a slow reader delays only itself, not the followers."""

    def __init__(self, out: int) -> None:
        self.out = out
        self.sent = 0
        self.alive = True
        self.blocking = True

    def _blocking(self, blocking: bool) -> None:
        if self.blocking != blocking:
            os.set_blocking(self.out, blocking)
            self.blocking = blocking

    def _write(self, data: bytes) -> int:
        try:
            return os.write(self.out, data)
        except BlockingIOError:
            return 0
        except OSError:
            self.alive = False  # upload-pack is gone
            return 0

    def offer(self, reader: int, end: int) -> None:
        """Send what the pipe takes now of bytes [sent, end) of the spool."""
        self._blocking(False)
        while self.alive and self.sent < end:
            data = os.pread(reader, min(CHUNK, end - self.sent), self.sent)
            if not data:
                return
            written = self._write(data)
            self.sent += written
            if written < len(data):
                return  # the pipe is full: the rest waits in the spool

    def finish(self, reader: int, end: int) -> None:
        """Send the rest of bytes [sent, end) of the spool, waiting on the pipe."""
        self._blocking(True)
        if self.alive and self.sent < end:
            try:
                copy_range(reader, self.sent, end, self.out)
            except (OSError, ValueError):
                self.alive = False
        self.sent = end

    def send(self, data: bytes) -> None:
        self._blocking(True)
        if self.alive:
            try:
                write_all(self.out, data)
            except OSError:
                self.alive = False
        self.sent += len(data)


def lead(
    cache: Cache, key: str, command: list[str], request: bytes, out: int, report: Reporter
) -> int:
    """Run pack-objects; copy its output, at its own pace, to the spool followers read
    (and the leader's client from it); keep it as an entry if the key was requested
    before or meanwhile. Entries, spools and removed files still being read together
    stay within max_size: a spool reserves disk as it grows, and one that cannot (a pack
    larger than the cache, or a cache full of others' bytes) stops being spooled there,
    its request answered straight from pack-objects, whole."""
    if serve_entry(cache, key, out, report):  # written by a leader that just finished
        return 0
    report.message["result"] = "miss"
    recent, marked = cache.mark_seen(key)
    claim = Claim()
    spool: int | None = None
    reader: int | None = None
    parked: str | None = None  # our spool, in gone/, while our client still reads it
    spooled = 0  # bytes in the spool
    # A full cache means this request runs without a spool rather than waiting for room:
    # room comes back only as other tenants' clients read (a stalled one holds its bytes
    # until idle_timeout), and no fetch should wait on another tenant. Uncached costs one
    # pack-objects run of CPU, never disk; memory stays a pipe's worth.
    try:
        if cache.reserve(claim, 0, CHUNK + TRAILER.size + PAGE):
            spool = cache.new_spool(key)
            # Our own descriptor to read it back: not a dup, which would share (and keep)
            # the writer's lock after the writer is closed.
            reader = os.open(key, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=cache.dirs[SPOOL])
            if not hold(reader):
                raise OSError(errno.ESTALE, "spool removed while opened")
    except OSError as exc:
        report.problem("pack_cache_write_failed", exc.strerror or str(exc), key)
        if reader is not None:
            os.close(reader)
            reader = None
        if spool is not None:
            parked, spool = _abandon(cache, key, spool), None
    if spool is None:
        claim.drop(cache, 0)
    digest = hashlib.sha256(bytes.fromhex(key))
    length = 0
    client = _Client(out)
    proc = Child(command, capture=True)
    proc.feed(request)
    proc.close_stdin()
    try:
        while True:
            data = os.read(proc.stdout, CHUNK)
            if not data:
                break
            start, length = length, length + len(data)
            if spool is not None and reader is not None:
                try:
                    # A page more than the bytes: what the file may take in blocks.
                    need = len(data) + TRAILER.size + PAGE
                    if start + need > claim.limit and not cache.reserve(claim, start, need):
                        raise _TooLarge
                    write_all(spool, data)
                    spooled = length
                    digest.update(data)
                    client.offer(reader, length)
                    continue
                except (OSError, _TooLarge) as exc:
                    if isinstance(exc, OSError):
                        report.problem("pack_cache_write_failed", exc.strerror or str(exc), key)
                    # The chunks before this one are whole in the spool (kept, and counted,
                    # in gone/ while we read it): our client gets them from there, this one
                    # and the rest directly. Followers see a spool without a trailer and do
                    # not use it.
                    parked, spool = _abandon(cache, key, spool, keep_data=True), None
                    claim.drop(cache, spooled)
                    client.finish(reader, start)
            client.send(data)
            if not client.alive and spool is None:
                proc.kill()
                break
        code = proc.wait()
        if spool is not None:
            if code != 0:
                parked, spool, spooled = _abandon(cache, key, spool), None, 0
            else:
                try:
                    write_all(spool, trailer(key, length, digest.digest()))
                    spooled = length + TRAILER.size
                except OSError as exc:
                    report.problem("pack_cache_write_failed", exc.strerror or str(exc), key)
                    parked, spool = _abandon(cache, key, spool, keep_data=True), None
        if spool is not None:
            if recent or cache.seen_since(key, marked):
                try:
                    cache.publish(key)
                    report.message["written"] = length + TRAILER.size
                except OSError as exc:
                    report.problem("pack_cache_write_failed", exc.strerror or str(exc), key)
                    parked = cache.retire(SPOOL, key)
                claim.drop(cache, spooled)  # what it holds now counts as the entry
                cache.sweep()
            else:
                parked = cache.retire(SPOOL, key)  # ours until our client has it all
            os.close(spool)  # releases the flock: followers see the end
            spool = None
        claim.drop(cache, spooled)
        if reader is not None and code == 0:
            client.finish(reader, length)  # after the followers were released
        return code if client.alive else 1
    finally:
        if spool is not None:
            os.close(spool)
        claim.drop(cache)
        if reader is not None:
            os.close(reader)
        if parked is not None:
            cache.forget(parked)
        if proc.code is None:
            proc.kill()
            proc.wait()


class _TooLarge(Exception):
    """The pack outgrows what the cache has left: it is answered without a spool."""


def _abandon(cache: Cache, key: str, spool: int, keep_data: bool = False) -> str | None:
    """Stop spooling: the file is taken out of spool/ and closed without a trailer, so
    followers that had not started yet run git themselves, and none ever treats it as
    complete. With keep_data, its bytes stay readable through the leader's own reader
    until it closes (in gone/, counted); returns that name, for forget()."""
    if not keep_data:
        with _quiet(OSError):
            os.ftruncate(spool, 0)
    parked = cache.retire(SPOOL, key)
    os.close(spool)
    return parked


def run_plain(command: list[str], request: bytes, stdin: int) -> int:
    """pack-objects without the cache: the request read so far, then the rest of stdin."""
    proc = Child(command, capture=False)
    proc.feed(request)
    while proc.stdin >= 0 and (data := os.read(stdin, CHUNK)):
        try:
            write_all(proc.stdin, data)
        except BrokenPipeError:
            break
    proc.close_stdin()
    return proc.wait()


def read_request(fd: int) -> tuple[bytes, bool]:
    """stdin up to MAX_REQUEST bytes; (data, complete)."""
    parts: list[bytes] = []
    size = 0
    while size <= MAX_REQUEST:
        data = os.read(fd, CHUNK)
        if not data:
            return b"".join(parts), True
        parts.append(data)
        size += len(data)
    return b"".join(parts), False


def main(argv: list[str]) -> int:
    report = Reporter(os.environ.get(STATS_ENV))
    git = os.environ.get(GIT_ENV, "")
    try:
        command = pack_objects_argv(argv, git)
    except ValueError:
        sys.stderr.write("gateway: unexpected pack-objects hook call\n")
        return 128
    if not git:
        sys.stderr.write("gateway: pack-objects hook run outside the gateway\n")
        return 128
    stdin, out = 0, 1
    request, complete = read_request(stdin)
    cache = None
    try:
        if not complete:
            return run_plain(command, request, stdin)
        try:
            cache = Cache(
                os.environ[DIR_ENV],
                int(os.environ.get(MAX_SIZE_ENV, "0")),
                float(os.environ.get(MAX_AGE_ENV, "0")),
                int(os.environ.get(MAX_MARKERS_ENV, str(MAX_MARKERS))),
            )
        except (Unusable, KeyError, ValueError) as exc:
            report.problem("pack_cache_unusable", str(exc))
            return run_plain(command, request, stdin)
        repository = os.path.realpath(os.environ.get("GIT_DIR", "."))
        key = request_key(repository, argv, request)
        report.message["key"] = key
        if serve_entry(cache, key, out, report):
            return 0
        deadline = time.monotonic() + JOIN_WAIT
        while True:
            if cache.try_lead(key):
                try:
                    return lead(cache, key, command, request, out, report)
                finally:
                    cache.unlock(key)
            code = follow(cache, key, out, report)
            if code != RETRY:
                return code
            if time.monotonic() > deadline:
                report.problem("pack_cache_join_timeout", "no spool to follow", key)
                report.message["result"] = "bypass"
                return run_plain(command, request, stdin)
            time.sleep(POLL)
    finally:
        if cache is not None:
            with _quiet(OSError):
                cache.reap(claims=False)  # what others removed while we still read it
            cache.close()
        report.send()


HOOK_NAME = "pack-objects"

_TEMPLATE = """#!{python} -IS
# git-gateway pack-objects hook (generated; rewritten at every gateway start).
import sys
sys.path.insert(0, {package_root!r})
from {module} import main
sys.exit(main(sys.argv[1:]))
"""
MODULE = "gateway.git.packhook"
# Where this module lived before the layer packages (hooks written then are still recognized).
EARLIER_MODULE = "gateway.packhook"


def script(python: str | None = None, package_root: str | None = None, module: str = MODULE) -> str:
    """The hook's source: this gateway's interpreter, isolated and without site-packages
    (start-up time), importing only this module (`module` other than this one only to
    recognize what earlier versions wrote)."""
    here = os.path.abspath(__file__)
    root = package_root or os.path.dirname(os.path.dirname(os.path.dirname(here)))
    return _TEMPLATE.format(python=python or sys.executable, package_root=root, module=module)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

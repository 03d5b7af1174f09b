"""The sandbox's seccomp filter: io_uring refused (ENOSYS), every other system call allowed."""

# Why io_uring. A file registered with a ring (IORING_REGISTER_FILES) stays open in the ring
# after its descriptor is closed and its name deleted, where no /proc/PID/fd or maps entry
# shows it: the build-size watcher could not count it, and each ring holds up to
# RLIMIT_NOFILE such files (a process may open as many rings), so a deploy could fill the
# build disk that every app shares. Refused as if the kernel had no io_uring (ENOSYS): the
# runtimes that use it (libuv, as Node does) fall back to ordinary system calls. Container
# runtimes' default profiles refuse it too.
#
# A classic BPF program, as bubblewrap's --seccomp takes it (struct sock_filter, native
# byte order). The io_uring calls are 425-427 in every ABI of x86_64, i386, aarch64, arm,
# riscv, s390x and ppc64; the x32 bit (0x40000000) is masked off first, so that x32's
# numbering of the same calls is refused too. No architecture check is needed: nothing is
# refused but these numbers.

from __future__ import annotations

import errno
import struct

IO_URING_SETUP, IO_URING_ENTER, IO_URING_REGISTER = 425, 426, 427
X32_BIT = 0x40000000

_LD_W_ABS = 0x20  # A = seccomp_data.nr (offset 0)
_ALU_AND_K = 0x54
_JEQ_K = 0x15
_RET_K = 0x06
_ALLOW = 0x7FFF0000  # SECCOMP_RET_ALLOW
_ERRNO = 0x00050000  # SECCOMP_RET_ERRNO


def _op(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def program() -> bytes:
    """The compiled filter bubblewrap loads before it runs the deploy's command."""
    return b"".join(
        [
            _op(_LD_W_ABS, 0),
            _op(_ALU_AND_K, ~X32_BIT & 0xFFFFFFFF),
            _op(_JEQ_K, IO_URING_SETUP, jt=3),
            _op(_JEQ_K, IO_URING_ENTER, jt=2),
            _op(_JEQ_K, IO_URING_REGISTER, jt=1),
            _op(_RET_K, _ALLOW),
            _op(_RET_K, _ERRNO | errno.ENOSYS),
        ]
    )

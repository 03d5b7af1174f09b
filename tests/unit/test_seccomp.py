"""The sandbox's seccomp program, run by a small classic-BPF interpreter: io_uring's three
calls are refused with ENOSYS in every numbering (x32's too), every other call allowed."""

from __future__ import annotations

import errno
import struct

import pytest

from gateway.deploys import seccomp


def verdict(nr: int) -> int:
    """What the program returns for system call `nr` (only the opcodes it uses)."""
    code = seccomp.program()
    ops = [struct.unpack("=HBBI", code[i : i + 8]) for i in range(0, len(code), 8)]
    acc, pc = 0, 0
    while True:
        op, jt, jf, k = ops[pc]
        if op == 0x20:  # BPF_LD | BPF_W | BPF_ABS at offset 0: seccomp_data.nr
            assert k == 0
            acc = nr
        elif op == 0x54:  # BPF_ALU | BPF_AND | BPF_K
            acc &= k
        elif op == 0x15:  # BPF_JMP | BPF_JEQ | BPF_K
            pc += jt if acc == k else jf
        elif op == 0x06:  # BPF_RET | BPF_K
            return k
        else:
            raise AssertionError(f"unexpected opcode {op:#x}")
        pc += 1


REFUSED = 0x00050000 | errno.ENOSYS


@pytest.mark.parametrize("nr", [425, 426, 427, 425 | 0x40000000, 427 | 0x40000000])
def test_io_uring_is_refused(nr):
    assert verdict(nr) == REFUSED


@pytest.mark.parametrize("nr", [0, 1, 2, 56, 59, 231, 424, 428, 435, 0x40000000 | 1])
def test_everything_else_is_allowed(nr):
    assert verdict(nr) == 0x7FFF0000

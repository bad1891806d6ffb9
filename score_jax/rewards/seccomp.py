"""The seccomp filter of a sandbox: a classic-BPF program, built for this CPU, that bwrap installs
(`bwrap --seccomp FD`) before it starts the supervisor, so it binds every program in the sandbox.

It denies the syscalls in _DENIED_SYSCALLS (why: score_jax/rewards/sandbox.py's docstring) and
clone() with CLONE_NEWUSER. Standard library only.
"""
from __future__ import annotations

import platform
import struct


def bpf_program(machine: str | None = None) -> bytes | None:
    """Classic-BPF seccomp program for this CPU, or None on CPUs other than x86_64 / aarch64.

    Denies (EPERM) _DENIED_SYSCALLS and clone() with CLONE_NEWUSER, so no nested user
    namespace can be made even where bwrap lacks --disable-userns; clone3() gets ENOSYS (its
    flags sit in memory a filter cannot read; libc then falls back to clone()). Other ABIs
    (i386 on x86_64: killed; x32: denied) cannot sidestep the filter.
    """
    machine = machine or platform.machine()
    arch = {"x86_64": 0, "amd64": 0, "aarch64": 1, "arm64": 1}.get(machine.lower())
    if arch is None:
        return None
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, JMP|JEQ/JGE/JSET|K, RET
    allow, kill = 0x7FFF0000, 0x80000000  # SECCOMP_RET_ALLOW, SECCOMP_RET_KILL_PROCESS
    eperm, enosys = 0x00050000 | 1, 0x00050000 | 38  # SECCOMP_RET_ERRNO | errno
    clone, clone3 = (56, 220)[arch], 435
    denied = sorted({numbers[arch] for numbers in _DENIED_SYSCALLS.values()})
    # (code, true target label or None, k); labels are resolved to jump offsets below.
    body = [(ld, None, 4), (jeq, "check_nr", (0xC000003E, 0xC00000B7)[arch]), (ret, None, kill),
            ("check_nr", None, None), (ld, None, 0)]
    if arch == 0:
        body.append((jge, "deny", 0x40000000))  # x32 syscall numbers
    body += [(jeq, "deny", nr) for nr in denied]
    body += [(jeq, "enosys", clone3), (jeq, "check_clone", clone), (ret, None, allow),
             ("check_clone", None, None), (ld, None, 16),  # low word of args[0]: clone flags
             (jset, "deny", 0x10000000), (ret, None, allow),  # CLONE_NEWUSER
             ("deny", None, None), (ret, None, eperm), ("enosys", None, None), (ret, None, enosys)]
    labels, program = {}, []
    for code, target, k in body:
        if isinstance(code, str):
            labels[code] = len(program)
        else:
            program.append((code, target, k))
    out = []
    for i, (code, target, k) in enumerate(program):
        jt = labels[target] - i - 1 if target else 0
        out.append(struct.pack("HBBI", code, jt, 0, k))
    return b"".join(out)


_DENIED_SYSCALLS = {  # name: (x86_64, aarch64)
    "shmget": (29, 194), "shmat": (30, 196), "shmctl": (31, 195), "semget": (64, 190),
    "msgget": (68, 186), "mq_open": (240, 180), "memfd_create": (319, 279),
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "add_key": (248, 217), "request_key": (249, 218), "keyctl": (250, 219), "bpf": (321, 280),
    "perf_event_open": (298, 241), "userfaultfd": (323, 282), "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426), "io_uring_register": (427, 427), "unshare": (272, 97),
    "setns": (308, 268),
}

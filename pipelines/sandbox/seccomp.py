"""A seccomp deny-list, emitted as raw classic-BPF for `bwrap --seccomp FD`.

bwrap applies the filter itself just before it executes the command, which is
the only place it can go: a filter installed in a preexec hook would also bind
bwrap and break its own namespace set-up.  We emit the BPF ourselves rather
than depend on libseccomp's Python binding, which is not on PyPI for every
interpreter we run on.
"""

import platform
import struct

# Offsets into struct seccomp_data: int nr; u32 arch; u64 ip; u64 args[6].
_NR_OFFSET = 0
_ARCH_OFFSET = 4
_ARG0_LOW_OFFSET = 16  # little-endian: the low 32 bits of args[0]

_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06

_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_RET_ALLOW = 0x7FFF0000
_EPERM = 1
_ENOSYS = 38

_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000

# x86_64 numbers of calls no test program needs and an escape attempt might:
# debugging other processes, (un)mounting, kernel modules and keys, namespaces,
# eBPF and perf, io_uring (which bypasses this filter for the ops it queues).
DENIED_SYSCALLS: dict[str, int] = {
    "ptrace": 101,
    "syslog": 103,
    "pivot_root": 155,
    "chroot": 161,
    "acct": 163,
    "mount": 165,
    "umount2": 166,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "sethostname": 170,
    "setdomainname": 171,
    "iopl": 172,
    "ioperm": 173,
    "init_module": 175,
    "delete_module": 176,
    "lookup_dcookie": 212,
    "kexec_load": 246,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "unshare": 272,
    "perf_event_open": 298,
    "name_to_handle_at": 303,
    "open_by_handle_at": 304,
    "setns": 308,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "finit_module": 313,
    "kexec_file_load": 320,
    "bpf": 321,
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "mount_setattr": 442,
}
_CLONE = 56
_CLONE3 = 435
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME
_NAMESPACE_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000
_NAMESPACE_FLAGS |= 0x20000000 | 0x40000000 | 0x00000080


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


def supported() -> bool:
    """The filter is written for x86_64 syscall numbers only."""
    return platform.machine() == "x86_64"


def build_filter() -> bytes:
    """The BPF program, as the array of `struct sock_filter` bwrap reads from its fd."""
    deny = _RET_ERRNO | _EPERM
    program = [
        # A process of another ABI would see different syscall numbers: kill it.
        _insn(_LD_W_ABS, _ARCH_OFFSET),
        _insn(_JEQ_K, _AUDIT_ARCH_X86_64, jt=1, jf=0),
        _insn(_RET_K, _RET_KILL_PROCESS),
        _insn(_LD_W_ABS, _NR_OFFSET),
        _insn(_JGE_K, _X32_SYSCALL_BIT, jt=0, jf=1),
        _insn(_RET_K, _RET_KILL_PROCESS),
    ]
    for number in DENIED_SYSCALLS.values():
        program += [_insn(_JEQ_K, number, jt=0, jf=1), _insn(_RET_K, deny)]
    # clone3 passes its flags in memory BPF cannot read; ENOSYS makes libc fall back to clone.
    program += [_insn(_JEQ_K, _CLONE3, jt=0, jf=1), _insn(_RET_K, _RET_ERRNO | _ENOSYS)]
    program += [
        _insn(_JEQ_K, _CLONE, jt=0, jf=3),
        _insn(_LD_W_ABS, _ARG0_LOW_OFFSET),
        _insn(_JSET_K, _NAMESPACE_FLAGS, jt=0, jf=1),
        _insn(_RET_K, deny),
        _insn(_RET_K, _RET_ALLOW),
    ]
    return b"".join(program)

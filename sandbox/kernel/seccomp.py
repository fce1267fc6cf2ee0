"""Seccomp: compile a policy's syscall allowlist to BPF in the parent; the C child installs it.

This is the one module that talks to libseccomp (through pyseccomp). It

- resolves a policy's `[seccomp]` section (syscall groups from `policies/seccomp/*.toml`,
  extra `allow`, extra `deny`, granted socket families) into a set of rules,
- adds the fixed deny list no policy can re-allow (FIXED_DENY),
- compiles the rules once per distinct input (cached in memory) with libseccomp's
  binary-tree optimisation, and hands back raw `struct sock_filter[]` bytes that the C
  command child installs as its very last step before execve (docs/internals.md).

Actions (seccomp(2), "Filter return values"):

- allowlisted syscalls: SECCOMP_RET_ALLOW;
- everything else: ERRNO(EPERM), not kill: build tools probe syscalls and degrade gracefully;
- the deny list (fixed + the policy's `deny`): SECCOMP_RET_USER_NOTIF when reporting is on,
  so sandbox/runtime/supervisor.py sees each attempt, refuses it with EPERM and audits it;
  ERRNO(EPERM) when reporting is off. If the supervisor is gone the kernel fails a
  notifying syscall with ENOSYS (seccomp_unotify(2)): refused either way, never let through;
- clone3: ERRNO(ENOSYS) directly (see ENOSYS_DIRECT);
- a foreign architecture (i386 via `int 0x80`, x32 numbers): same as the deny list.

Only x86_64 is supported; compiling anywhere else fails closed with a clear error.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import os
import struct
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pyseccomp as _scmp

from sandbox.errors import PolicyError, SeccompError, UnsupportedError

# --- kernel ABI constants (include/uapi/linux/seccomp.h, include/uapi/linux/audit.h) ---
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
X32_SYSCALL_BIT = 0x40000000            # arch/x86/include/uapi/asm/unistd.h
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_ERRNO = 0x00050000
BPF_MAXINSNS = 4096                     # include/uapi/linux/bpf_common.h: longest filter
SOCK_FILTER = struct.Struct("=HBBI")    # struct sock_filter {u16 code; u8 jt, jf; u32 k}

# seccomp_data offsets (struct seccomp_data: int nr; u32 arch; u64 ip; u64 args[6]),
# little-endian: the low 32 bits of args[i] are at 16 + 8*i, the high ones 4 bytes later.
_OFF_NR, _OFF_ARCH = 0, 4


def _arg_lo(i: int) -> int:
    return 16 + 8 * i


def _arg_hi(i: int) -> int:
    return 16 + 8 * i + 4


# --- the fixed deny list: name -> why. No policy can allow these (PolicyError). ---
FIXED_DENY: dict[str, str] = {
    "mount": "changes the mount table (mount(2))",
    "umount2": "changes the mount table (umount(2))",
    "pivot_root": "changes the root of the mount namespace (pivot_root(2))",
    "chroot": "changes the root directory; classic escape with an open dir fd (chroot(2))",
    "setns": "joins another namespace (setns(2))",
    "unshare": "makes new namespaces: kernel attack surface of user namespaces (unshare(2))",
    "ptrace": "reads and writes other processes (ptrace(2))",
    "process_vm_readv": "reads another process's memory (process_vm_readv(2))",
    "process_vm_writev": "writes another process's memory (process_vm_readv(2))",
    "pidfd_getfd": "steals a descriptor from another process (pidfd_getfd(2))",
    "keyctl": "kernel keyrings are not namespaced (keyrings(7))",
    "add_key": "kernel keyrings are not namespaced (keyrings(7))",
    "request_key": "kernel keyrings are not namespaced (keyrings(7))",
    "bpf": "eBPF verifier bugs are a steady source of privilege escalation (CVE-2021-3490)",
    "perf_event_open": "kernel profiling; side channels and repeated CVEs (CVE-2023-2235)",
    "userfaultfd": "stalls kernel copies at will, making kernel races winnable (the reason for the "
                   "vm.unprivileged_userfaultfd sysctl, Documentation/admin-guide/mm/userfaultfd.rst)",
    "kexec_load": "replaces the running kernel (kexec_load(2))",
    "kexec_file_load": "replaces the running kernel (kexec_load(2))",
    "init_module": "loads kernel code (init_module(2))",
    "finit_module": "loads kernel code (init_module(2))",
    "delete_module": "unloads kernel code (delete_module(2))",
    "open_by_handle_at": "opens files outside the mount namespace by handle: the 2014 "
                         "'shocker' container breakout (open_by_handle_at(2))",
    "name_to_handle_at": "makes file handles for open_by_handle_at (open_by_handle_at(2))",
    "iopl": "raw I/O port access (iopl(2))",
    "ioperm": "raw I/O port access (ioperm(2))",
    "modify_ldt": "x86 LDT; several kernel CVEs, only old 16-bit code needs it (CVE-2017-17053)",
    "swapon": "host swap configuration (swapon(2))",
    "swapoff": "host swap configuration (swapon(2))",
    "reboot": "host power state (reboot(2))",
    "acct": "host process accounting (acct(2))",
    "settimeofday": "sets the host clock; time is not namespaced for writing (settimeofday(2))",
    "clock_settime": "sets the host clock (clock_settime(2))",
    "clock_adjtime": "adjusts the host clock (clock_adjtime(2))",
    "adjtimex": "adjusts the host clock (adjtimex(2))",
    "io_uring_setup": "io_uring runs operations the filter never sees, many CVEs (CVE-2023-2598)",
    "io_uring_enter": "io_uring runs operations the filter never sees (io_uring(7))",
    "io_uring_register": "io_uring runs operations the filter never sees (io_uring(7))",
    "fanotify_init": "filesystem-wide event monitoring (fanotify_init(2))",
    "lookup_dcookie": "kernel profiling internals (lookup_dcookie(2))",
    "quotactl": "host disk quotas (quotactl(2))",
    "quotactl_fd": "host disk quotas (quotactl(2))",
    "vhangup": "hangs up the terminal (vhangup(2))",
    "nfsservctl": "kernel NFS server control (nfsservctl(2))",
    "uselib": "legacy a.out loader, abused in CVE-2004-1235 (uselib(2))",
    "syslog": "reads and clears the kernel log: kernel addresses (syslog(2))",
    "move_mount": "new mount API: changes the mount table (move_mount(2))",
    "fsopen": "new mount API: creates filesystem contexts (fsopen(2))",
    "fsmount": "new mount API: creates mounts (fsmount(2))",
    "fspick": "new mount API: reconfigures mounted filesystems (fspick(2))",
    "open_tree": "new mount API: clones mount trees (open_tree(2))",
    "mount_setattr": "new mount API: changes mount properties (mount_setattr(2))",
    # Argument-dependent entries: the syscall itself may be allowed, these uses never are.
    "clone": "with namespace flags (CLONE_NEW*): same as unshare",
    "socket": "AF_NETLINK, AF_PACKET, SOCK_RAW and families the policy does not grant",
    "socketpair": "families other than AF_UNIX",
    "ioctl": "TIOCSTI (types into the terminal, CVE-2017-5226) and TIOCLINUX",
    "personality": "anything but PER_LINUX, PER_LINUX32 and the query 0xffffffff "
                   "(ADDR_NO_RANDOMIZE turns ASLR off, READ_IMPLIES_EXEC makes data executable)",
    "mknod": "character and block devices",
    "mknodat": "character and block devices",
    "seccomp": "with SECCOMP_FILTER_FLAG_NEW_LISTENER: of stacked USER_NOTIF filters the newest "
               "wins, so the agent's own listener could answer our deny list with "
               "SECCOMP_USER_NOTIF_FLAG_CONTINUE (include/uapi/linux/seccomp.h)",
}

# Refused with ENOSYS, never reported: glibc (>= 2.34) tries clone3 in every
# pthread_create/posix_spawn and falls back to clone on ENOSYS (sysdeps/unix/sysv/linux/
# clone-internal.c). clone3 passes its flags in memory, which a filter cannot read, so
# ENOSYS is the only answer that both keeps libc working and lets us check the flags.
# Reporting it would flood the audit log with one record per thread.
ENOSYS_DIRECT = ("clone3",)

# Syscalls with argument rules; being in a group allows their harmless uses only.
ARG_FILTERED = ("clone", "socket", "socketpair", "ioctl", "personality", "mknod", "mknodat",
                "seccomp")

# The C child calls these after the filter is installed (send the listener fd, close it,
# report a failure, execve): a policy that denies them could never start a command.
REQUIRED = ("execve", "sendmsg", "close", "write", "exit", "exit_group")

# clone(2) flags that make namespaces (include/uapi/linux/sched.h). CLONE_NEWTIME
# (0x80) is not here: in clone(2) that bit is part of CSIGNAL (the exit signal); only
# clone3 and unshare, both refused, can ask for a time namespace.
CLONE_NS_FLAGS = {
    "CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
CLONE_NS_MASK = sum(CLONE_NS_FLAGS.values())

# Socket families (include/linux/socket.h), AF_UNSPEC .. AF_MCTP; AF_MAX = 46.
SOCKET_FAMILIES = {
    "unspec": 0, "unix": 1, "inet": 2, "ax25": 3, "ipx": 4, "appletalk": 5, "netrom": 6,
    "bridge": 7, "atmpvc": 8, "x25": 9, "inet6": 10, "rose": 11, "decnet": 12, "netbeui": 13,
    "security": 14, "key": 15, "netlink": 16, "packet": 17, "ash": 18, "econet": 19,
    "atmsvc": 20, "rds": 21, "sna": 22, "irda": 23, "pppox": 24, "wanpipe": 25, "llc": 26,
    "ib": 27, "mpls": 28, "can": 29, "tipc": 30, "bluetooth": 31, "iucv": 32, "rxrpc": 33,
    "isdn": 34, "phonet": 35, "ieee802154": 36, "caif": 37, "alg": 38, "nfc": 39, "vsock": 40,
    "kcm": 41, "qipcrtr": 42, "smc": 43, "xdp": 44, "mctp": 45,
}
GRANTABLE_FAMILIES = ("unix", "inet", "inet6")
AF_UNIX, AF_NETLINK = 1, 16
NETLINK_ROUTE = 0
SOCK_TYPE_MASK = 0xF                    # the rest of `type` is SOCK_NONBLOCK|SOCK_CLOEXEC
SOCK_STREAM, SOCK_DGRAM, SOCK_RAW, SOCK_SEQPACKET = 1, 2, 3, 5
SOCKET_TYPES = (SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET)

# mknod(2) mode & S_IFMT: regular files, FIFOs and sockets yes; devices never.
S_IFMT, S_IFSOCK, S_IFREG, S_IFBLK, S_IFCHR, S_IFIFO = 0o170000, 0o140000, 0o100000, 0o060000, 0o020000, 0o010000
MKNOD_OK = (0, S_IFREG, S_IFIFO, S_IFSOCK)

TIOCSTI, TIOCLINUX = 0x5412, 0x541C     # include/uapi/asm-generic/ioctls.h
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3  # include/uapi/linux/seccomp.h
PERSONALITY_OK = (0x0000, 0x0008, 0xFFFFFFFF)  # PER_LINUX, PER_LINUX32, query

# Arguments worth recording when a deny-listed syscall is attempted: (label, index).
REPORT_ARGS: dict[str, tuple[tuple[str, int], ...]] = {
    "clone": (("flags", 0),), "unshare": (("flags", 0),), "setns": (("fd", 0), ("nstype", 1)),
    "socket": (("family", 0), ("type", 1), ("protocol", 2)),
    "socketpair": (("family", 0), ("type", 1), ("protocol", 2)),
    "ioctl": (("fd", 0), ("request", 1)), "personality": (("persona", 0),),
    "mknod": (("mode", 1), ("dev", 2)), "mknodat": (("mode", 2), ("dev", 3)),
    "ptrace": (("request", 0), ("pid", 1)), "process_vm_readv": (("pid", 0),),
    "process_vm_writev": (("pid", 0),), "pidfd_getfd": (("pidfd", 0), ("targetfd", 1)),
    "keyctl": (("operation", 0),), "bpf": (("cmd", 0),), "perf_event_open": (("pid", 1), ("cpu", 2)),
    "umount2": (("flags", 1),), "mount": (("flags", 3),), "reboot": (("cmd", 2),),
    "iopl": (("level", 0),), "ioperm": (("from", 0), ("num", 1), ("turn_on", 2)),
    "io_uring_setup": (("entries", 0),), "fanotify_init": (("flags", 0),),
    "kexec_load": (("flags", 3),), "kexec_file_load": (("flags", 4),),
    "userfaultfd": (("flags", 0),), "clock_settime": (("clock", 0),),
    "syslog": (("type", 0),), "open_tree": (("flags", 2),), "seccomp": (("op", 0), ("flags", 1)),
}


# --------------------------------------------------------------------------- groups

@dataclass(frozen=True)
class Group:
    name: str               # "@file-system"
    path: Path
    description: str
    syscalls: tuple[str, ...]
    include: tuple[str, ...]


def group_dirs() -> list[Path]:
    """policies/seccomp/ under each policy directory, first match wins (like policies)."""
    from sandbox.policy.load import policy_dirs
    return [d / "seccomp" for d in policy_dirs()]


def known_groups() -> list[str]:
    names = set()
    for d in group_dirs():
        if d.is_dir():
            names.update("@" + p.stem for p in d.glob("*.toml"))
    return sorted(names)


def load_group(name: str) -> Group:
    if not name.startswith("@") or not all(c.isalnum() or c in "-_" for c in name[1:]) or len(name) < 2:
        raise ValueError(f"not a group name: {name!r} (groups start with @, e.g. @default)")
    for d in group_dirs():
        path = d / f"{name[1:]}.toml"
        if path.is_file():
            return _parse_group(name, path)
    raise ValueError(f"unknown group {name!r} (known: {', '.join(known_groups())})")


def _parse_group(name: str, path: Path) -> Group:
    # Parsed once per file version: every sandbox resolves its policy's groups, and parsing
    # the TOML each time was most of the seccomp step (~2.5 ms of 3.7). A changed file
    # (mtime, size) is read again.
    try:
        st = path.stat()
    except OSError as e:
        raise ValueError(f"group {name}: cannot read {path}: {e}") from None
    return _parse_group_version(name, path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=256)
def _parse_group_version(name: str, path: Path, _mtime_ns: int, _size: int) -> Group:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"group {name}: cannot read {path}: {e}") from None
    unknown = set(data) - {"description", "syscalls", "include"}
    if unknown:
        raise ValueError(f"group {name} ({path}): unknown keys {sorted(unknown)}")
    for key in ("syscalls", "include"):
        v = data.get(key, [])
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ValueError(f"group {name} ({path}): {key} must be a list of strings")
    return Group(name, path, str(data.get("description", "")), tuple(data.get("syscalls", [])),
                 tuple(data.get("include", [])))


def expand_groups(names) -> dict[str, str]:
    """syscall -> the group that brought it in, following includes (cycles are an error)."""
    out: dict[str, str] = {}
    done: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]):
        if name in stack:
            raise ValueError(f"group {name} includes itself: {' -> '.join(stack + (name,))}")
        if name in done:
            return
        group = load_group(name)
        for inc in group.include:
            visit(inc, stack + (name,))
        for sc in group.syscalls:
            if resolve(sc) is None:
                raise ValueError(f"group {name} ({group.path}): unknown syscall {sc!r}")
            if never_allowed(sc):
                raise ValueError(f"group {name} ({group.path}): {sc!r} is on the fixed deny list")
            out.setdefault(sc, name)
        done.add(name)

    for n in names:
        visit(n, ())
    return out


# --------------------------------------------------------------------------- names

def never_allowed(name: str) -> bool:
    """On the fixed deny list as a whole (not just some of its arguments), or ENOSYS."""
    return name in FIXED_DENY and name not in ARG_FILTERED or name in ENOSYS_DIRECT


@functools.lru_cache(maxsize=4096)
def resolve(name: str) -> int | None:
    """The x86_64 number of syscall NAME, or None when libseccomp does not know it."""
    if not name or not all(c.isalnum() or c == "_" for c in name):
        return None
    nr = _scmp.resolve_syscall(_scmp.Arch.X86_64, name)
    return nr if nr >= 0 else None


def syscall_name(nr: int, arch: int = AUDIT_ARCH_X86_64) -> str:
    """A readable name for a syscall a notification reports ("i386:getpid", "x32:42")."""
    if nr < 0:
        return f"invalid:{nr}"
    if arch == AUDIT_ARCH_X86_64 and nr & X32_SYSCALL_BIT:
        return f"x32:{nr & ~X32_SYSCALL_BIT}"
    table, prefix = {AUDIT_ARCH_X86_64: (_scmp.Arch.X86_64, ""),
                     AUDIT_ARCH_I386: (_scmp.Arch.X86, "i386:")}.get(arch, (None, f"arch{arch:#x}:"))
    if table is not None:
        try:
            return prefix + _scmp.resolve_syscall(table, nr).decode()
        except ValueError:
            pass
    return f"{prefix}{nr}"


def family_name(family: int) -> str:
    for name, num in SOCKET_FAMILIES.items():
        if num == family:
            return name
    return str(family)


# --------------------------------------------------------------------------- policy

@dataclass(frozen=True)
class Rules:
    """What a policy's [seccomp] section resolves to (the input of the compiler)."""
    allow: tuple[str, ...]      # allowlisted, ARG_FILTERED ones get their argument rules
    deny: tuple[str, ...]       # reported/refused: the fixed list plus the policy's own
    families: tuple[str, ...]   # socket families granted
    notify: bool

    def digest(self) -> str:
        blob = json.dumps([self.allow, self.deny, self.families, self.notify, _libseccomp_version()])
        return hashlib.sha256(blob.encode()).hexdigest()


def check_section(sec) -> None:
    """Validate a SeccompPolicy; raises ValueError("field: why") (schema.py's convention)."""
    resolve_rules(sec)


def resolve_rules(sec) -> Rules:
    try:
        from_groups = expand_groups(sec.groups)
    except ValueError as e:
        raise ValueError(f"groups: {e}") from None
    for field_name in ("allow", "deny"):
        for sc in getattr(sec, field_name):
            if resolve(sc) is None:
                raise ValueError(f"{field_name}: unknown syscall {sc!r}")
    for sc in sec.allow:
        if never_allowed(sc):
            raise ValueError(f"allow: {sc!r} is on the fixed deny list ({FIXED_DENY.get(sc, 'ENOSYS')}) "
                             "and cannot be allowed")
    for sc in sec.deny:
        if sc in REQUIRED:
            raise ValueError(f"deny: {sc!r} is needed to start every command and cannot be denied")
    for fam in sec.socket_families:
        if fam not in SOCKET_FAMILIES:
            raise ValueError(f"socket_families: unknown family {fam!r} "
                             f"(grantable: {', '.join(GRANTABLE_FAMILIES)})")
        if fam not in GRANTABLE_FAMILIES:
            raise ValueError(f"socket_families: {fam!r} cannot be granted "
                             f"(grantable: {', '.join(GRANTABLE_FAMILIES)})")
    denied = set(sec.deny)
    allow = (set(from_groups) | set(sec.allow) | set(REQUIRED)) - denied
    deny = (set(FIXED_DENY) - set(ARG_FILTERED)) | denied
    return Rules(tuple(sorted(allow)), tuple(sorted(deny)), tuple(sorted(set(sec.socket_families))),
                 sec.notify)


# --------------------------------------------------------------------------- compiler

_CACHE: dict[str, bytes] = {}
_CACHE_LOCK = threading.Lock()


def compile_policy(sec) -> bytes:
    """The BPF program (struct sock_filter[] bytes) for a SeccompPolicy, cached."""
    try:
        return _compile_policy_version(sec, _groups_signature())
    except ValueError as e:
        raise PolicyError(str(e), field="seccomp") from None


def _groups_signature() -> tuple:
    """(path, mtime, size) of every group file: a changed group file compiles anew."""
    sig = []
    for d in group_dirs():
        try:
            with os.scandir(d) as it:
                for ent in it:
                    if ent.name.endswith(".toml"):
                        st = ent.stat()
                        sig.append((ent.path, st.st_mtime_ns, st.st_size))
        except FileNotFoundError:
            continue
    return tuple(sorted(sig))


@functools.lru_cache(maxsize=64)
def _compile_policy_version(sec, _signature: tuple) -> bytes:
    # Resolving the groups is ~0.7 ms of Python per sandbox; a policy and its group files
    # give the same program every time.
    return compile_rules(resolve_rules(sec))


def compile_rules(rules: Rules) -> bytes:
    key = rules.digest()
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    prog = _guard_prologue(_deny_action(rules.notify)) + _libseccomp_program(rules)
    n = len(prog) // SOCK_FILTER.size
    if n > BPF_MAXINSNS:
        raise SeccompError(f"compiled filter has {n} instructions, more than the kernel's {BPF_MAXINSNS}")
    with _CACHE_LOCK:
        _CACHE[key] = prog
    return prog


DEFAULT_ACTION = _scmp.ERRNO(errno.EPERM)


def _deny_action(notify: bool) -> int:
    return _scmp.NOTIFY if notify else _scmp.ERRNO(errno.EPERM)


def _check_arch() -> None:
    if _scmp.system_arch() != _scmp.Arch.X86_64:
        raise UnsupportedError(f"seccomp filters are only built for x86_64; this host's libseccomp "
                               f"reports arch {_scmp.system_arch():#x}")


def _libseccomp_program(rules: Rules) -> bytes:
    _check_arch()
    deny = _deny_action(rules.notify)
    try:
        f = _scmp.SyscallFilter(DEFAULT_ACTION)
        # i386 (int 0x80) and any other foreign arch: denied and reported like the deny list.
        f.set_attr(_scmp.Attr.ACT_BADARCH, deny)
        # no_new_privs is set by the C child itself (docs/internals.md), before installing.
        f.set_attr(_scmp.Attr.CTL_NNP, 0)
        # Binary tree of syscall numbers instead of a linear chain (libseccomp >= 2.5).
        f.set_attr(_scmp.Attr.CTL_OPTIMIZE, 2)
        for sc in rules.allow:
            if sc not in ("clone", "socket", "socketpair", "mknod", "mknodat", "seccomp"):
                # ioctl and personality: allowed here; their arguments are checked by the
                # guard prologue (_guard_prologue) before this program runs.
                f.add_rule(_scmp.ALLOW, resolve(sc))
        for sc in rules.deny:
            _deny(f, deny, resolve(sc))
        for sc in ENOSYS_DIRECT:
            f.add_rule(_scmp.ERRNO(errno.ENOSYS), resolve(sc))
        _clone_rules(f, rules, deny)
        _socket_rules(f, rules, deny)
        _mknod_rules(f, rules, deny)
        _seccomp_rules(f, rules, deny)
        return _export(f)
    except OSError as e:
        raise SeccompError("libseccomp could not build the filter", errno=e.errno,
                           syscall="seccomp_rule_add") from None


def _deny(f, deny: int, nr: int, *args) -> None:
    """Add a deny rule. Without notification the deny action is the default action, which
    libseccomp refuses as a rule (EACCES): the default already refuses, so nothing to add."""
    if deny != DEFAULT_ACTION:
        f.add_rule(deny, nr, *args)


def _allowed(rules: Rules, name: str) -> bool:
    return name in rules.allow


def _clone_rules(f, rules: Rules, deny: int) -> None:
    if "clone" in rules.deny:
        return
    nr = resolve("clone")
    if _allowed(rules, "clone"):
        f.add_rule(_scmp.ALLOW, nr, _scmp.Arg(0, _scmp.MASKED_EQ, CLONE_NS_MASK, 0))
    for flag in CLONE_NS_FLAGS.values():
        _deny(f, deny, nr, _scmp.Arg(0, _scmp.MASKED_EQ, flag, flag))


def _socket_rules(f, rules: Rules, deny: int) -> None:
    """socket(family, type, protocol): granted families with ordinary types are allowed;
    SOCK_RAW, AF_NETLINK, AF_PACKET and every family not granted are reported.
    Values with high bits set match nothing and get the default EPERM (fail closed)."""
    granted = {SOCKET_FAMILIES[n] for n in rules.families}
    sock, pair = resolve("socket"), resolve("socketpair")
    if "socket" not in rules.deny:
        for fam in sorted(granted):
            if _allowed(rules, "socket"):
                for t in SOCKET_TYPES:
                    f.add_rule(_scmp.ALLOW, sock, _scmp.Arg(0, _scmp.EQ, fam),
                               _scmp.Arg(1, _scmp.MASKED_EQ, SOCK_TYPE_MASK, t))
            _deny(f, deny, sock, _scmp.Arg(0, _scmp.EQ, fam),
                       _scmp.Arg(1, _scmp.MASKED_EQ, SOCK_TYPE_MASK, SOCK_RAW))
        for fam in sorted(set(SOCKET_FAMILIES.values()) - granted):
            if fam == AF_NETLINK:
                # glibc's getaddrinfo(AI_ADDRCONFIG) and getifaddrs open a NETLINK_ROUTE socket
                # and carry on without it when refused (sysdeps/unix/sysv/linux/check_pf.c):
                # refuse that quietly (EAFNOSUPPORT, as if the kernel had no netlink);
                # every other netlink protocol is reported.
                f.add_rule(_scmp.ERRNO(errno.EAFNOSUPPORT), sock, _scmp.Arg(0, _scmp.EQ, fam),
                           _scmp.Arg(2, _scmp.EQ, NETLINK_ROUTE))
                _deny(f, deny, sock, _scmp.Arg(0, _scmp.EQ, fam), _scmp.Arg(2, _scmp.NE, NETLINK_ROUTE))
            else:
                _deny(f, deny, sock, _scmp.Arg(0, _scmp.EQ, fam))
    if "socketpair" not in rules.deny:
        if _allowed(rules, "socketpair") and "unix" in rules.families:
            f.add_rule(_scmp.ALLOW, pair, _scmp.Arg(0, _scmp.EQ, AF_UNIX))
        for fam in sorted(set(SOCKET_FAMILIES.values()) - {AF_UNIX}):
            _deny(f, deny, pair, _scmp.Arg(0, _scmp.EQ, fam))


def _mknod_rules(f, rules: Rules, deny: int) -> None:
    for name, mode_arg in (("mknod", 1), ("mknodat", 2)):
        if name in rules.deny:
            continue
        nr = resolve(name)
        if _allowed(rules, name):
            for fmt in MKNOD_OK:
                f.add_rule(_scmp.ALLOW, nr, _scmp.Arg(mode_arg, _scmp.MASKED_EQ, S_IFMT, fmt))
        for fmt in (S_IFCHR, S_IFBLK):
            _deny(f, deny, nr, _scmp.Arg(mode_arg, _scmp.MASKED_EQ, S_IFMT, fmt))


def _seccomp_rules(f, rules: Rules, deny: int) -> None:
    """A program may add filters of its own (they can only take rights away), but never
    with its own listener: the kernel hands a syscall that several filters send to
    USER_NOTIF to the newest one, whose listener could answer "continue"."""
    if "seccomp" in rules.deny:
        return
    nr, flag = resolve("seccomp"), SECCOMP_FILTER_FLAG_NEW_LISTENER
    if _allowed(rules, "seccomp"):
        f.add_rule(_scmp.ALLOW, nr, _scmp.Arg(1, _scmp.MASKED_EQ, flag, 0))
    _deny(f, deny, nr, _scmp.Arg(1, _scmp.MASKED_EQ, flag, flag))


def _export(f) -> bytes:
    fd = os.memfd_create("sbx-seccomp-bpf", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "rb") as out:
            f.export_bpf(out)
        size = os.lseek(fd, 0, os.SEEK_END)
        data = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    if not data or len(data) % SOCK_FILTER.size:
        raise SeccompError(f"libseccomp exported {len(data)} bytes, not a sock_filter array")
    return data


# --- the guard prologue: argument checks libseccomp cannot express ---
#
# The kernel reads ioctl's cmd and personality's persona as 32-bit `unsigned int`, but a
# filter sees the full 64-bit register. A rule "ioctl with cmd == TIOCSTI" is bypassed by
# setting high bits (CVE-2019-10063, flatpak), and "everything except these values" cannot
# be written in libseccomp, whose unconditional rule for a syscall swallows its argument
# rules. So a few hand-written instructions run first, compare the low 32 bits (and, for
# personality, insist the high ones are zero) and fall through to libseccomp's program for
# everything else. Only seccomp_data loads and constant jumps: the kernel's allow-cache
# (kernel/seccomp.c, seccomp_is_const_allow) still treats all other syscalls as constant.

BPF_LD_W_ABS = 0x20
BPF_JEQ_K, BPF_JSET_K, BPF_JA = 0x15, 0x45, 0x05
BPF_RET_K = 0x06


def _guard_prologue(deny: int) -> bytes:
    ioctl, pers = resolve("ioctl"), resolve("personality")
    # Each entry: (code, jt_label_or_0, jf_label_or_0, k); labels resolved below.
    prog = [
        ("ld", _OFF_ARCH),
        ("jeq", AUDIT_ARCH_X86_64, None, "END"),       # foreign arch: libseccomp's badarch
        ("ld", _OFF_NR),
        ("jset", X32_SYSCALL_BIT, "DENY", None),       # x32 ABI numbers: never
        ("jeq", ioctl, None, "PERS"),
        ("ld", _arg_lo(1)),
        ("jeq", TIOCSTI, "DENY", None),
        ("jeq", TIOCLINUX, "DENY", "END"),
        ("PERS:jeq", pers, None, "END"),
        ("ld", _arg_hi(0)),
        ("jeq", 0, None, "DENY"),
        ("ld", _arg_lo(0)),
    ]
    for i, v in enumerate(PERSONALITY_OK):
        prog.append(("jeq", v, "END", "DENY" if i == len(PERSONALITY_OK) - 1 else None))
    prog.append(("DENY:ret", deny))
    return _assemble(prog)


def _assemble(prog) -> bytes:
    labels, ops = {}, []
    for i, ins in enumerate(prog):
        op = ins[0]
        if ":" in op:
            label, op = op.split(":")
            labels[label] = i
        ops.append((op,) + tuple(ins[1:]))
    labels["END"] = len(ops)

    def rel(i, target):
        if target is None:
            return 0
        off = labels[target] - i - 1
        assert 0 <= off < 256, "guard prologue jump out of range"
        return off

    out = bytearray()
    for i, ins in enumerate(ops):
        op = ins[0]
        if op == "ld":
            out += SOCK_FILTER.pack(BPF_LD_W_ABS, 0, 0, ins[1])
        elif op in ("jeq", "jset"):
            code = BPF_JEQ_K if op == "jeq" else BPF_JSET_K
            out += SOCK_FILTER.pack(code, rel(i, ins[2]), rel(i, ins[3]), ins[1])
        elif op == "ret":
            out += SOCK_FILTER.pack(BPF_RET_K, 0, 0, ins[1])
        else:
            raise AssertionError(op)
    return bytes(out)


# --------------------------------------------------------------------------- the engine's step

def make_step(ctx):
    """Compile the policy's filter (cached) into ctx.plan; the C child installs it last."""
    from sandbox.runtime.lifecycle import Step

    sec = ctx.policy.seccomp

    def do():
        notify = sec.notify
        if notify and not user_notif_supported():
            raise UnsupportedError("seccomp user notification is not available on this kernel, so "
                                   "violations cannot be reported; set seccomp.notify = false")
        ctx.plan.seccomp_bpf = compile_policy(sec)
        ctx.plan.seccomp_notify = notify
        return None

    return Step("seccomp", do, None, describe="compile the syscall filter for the command child")


# --------------------------------------------------------------------------- doctor

@functools.cache
def _libseccomp_version() -> str:
    class _Ver(ctypes.Structure):
        _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]
    fn = _scmp._libseccomp.seccomp_version  # noqa: SLF001 - pyseccomp does not wrap it
    fn.restype = ctypes.POINTER(_Ver)
    v = fn().contents
    return f"{v.major}.{v.minor}.{v.micro}"


def actions_available() -> list[str]:
    try:
        return Path("/proc/sys/kernel/seccomp/actions_avail").read_text().split()
    except OSError:
        return []


@functools.cache
def user_notif_supported() -> bool:
    """A kernel feature: it cannot change while we run (read once, not per sandbox)."""
    return "user_notif" in actions_available()


def probe() -> dict:
    """What `sandboxctl doctor` shows about seccomp on this host."""
    info = {"libseccomp": _libseccomp_version(), "api_level": None, "arch": f"{_scmp.system_arch():#x}",
            "actions": actions_available(), "user_notif": user_notif_supported(), "optimize": False}
    try:
        info["api_level"] = _scmp.get_api()
        f = _scmp.SyscallFilter(_scmp.ERRNO(errno.EPERM))
        f.set_attr(_scmp.Attr.CTL_OPTIMIZE, 2)
        info["optimize"] = True
    except (OSError, NotImplementedError):
        pass
    # What a default policy needs: x86_64, ERRNO and USER_NOTIF actions (seccomp.notify).
    info["ok"] = (info["arch"] == f"{_scmp.Arch.X86_64:#x}" and "errno" in info["actions"]
                  and info["user_notif"])
    return info

"""The policy as frozen dataclasses. One section per facility; each field says what it is.

A field's `metadata["conv"]` turns the TOML value into the field's value (sizes,
durations, ...) and raises ValueError with a reason; `metadata["doc"]` documents it.
Cross-field checks live in each section's `check()`, raising ValueError("field: why").
The loader (sandbox/policy/load.py) names the file and the dotted field in every error.
"""
from dataclasses import dataclass, field
import re

from sandbox.policy.units import parse_duration, parse_rate, parse_size


def _f(default, doc, conv=None):
    """A policy field with its default, its documentation and its converter."""
    meta = {"doc": doc}
    if conv is not None:
        meta["conv"] = conv
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults (policies are frozen)")
    return field(default=default, metadata=meta)


def _tuple_of_str(value):
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of strings")
    return tuple(value)


def _str_map(value):
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError("expected a table of string values")
    for k, v in value.items():
        if "\0" in v:
            # execve(2) and the files these end up in take NUL-terminated strings.
            raise ValueError(f"the value of {k!r} contains NUL")
    return tuple(sorted(value.items()))


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class UserPolicy:
    uid: int = _f(1000, "uid of the agent inside the sandbox (mapped to a per-sandbox host uid)")
    gid: int = _f(1000, "gid of the agent inside the sandbox")
    name: str = _f("agent", "user name written to the sandbox's /etc/passwd")
    allow_root: bool = _f(False, "allow uid 0 inside (still no capabilities on the host)")

    def check(self):
        for name in ("uid", "gid"):
            v = getattr(self, name)
            if not 0 <= v < 65534:
                raise ValueError(f"{name}: must be between 0 and 65533, got {v}")
        for name in ("uid", "gid"):
            if getattr(self, name) == 0 and not self.allow_root:
                raise ValueError(f"{name}: 0 needs allow_root = true")
        if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", self.name):
            raise ValueError(f"name: not a valid user name: {self.name!r}")


@dataclass(frozen=True)
class EnvironmentPolicy:
    set: tuple = _f((), "variables every command gets, NAME = value; the host's environment never leaks in",
                    _str_map)
    allow: tuple = _f((), "names a caller may set per command (--env NAME=value); others are refused",
                      _tuple_of_str)

    def check(self):
        for name, _ in self.set:
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"set: not a variable name: {name!r}")
        for name in self.allow:
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"allow: not a variable name: {name!r}")


@dataclass(frozen=True)
class FilesystemPolicy:
    ro_binds: tuple = _f(("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"),
                         "host paths bound read-only at the same place (missing ones are skipped)",
                         _tuple_of_str)
    etc_binds: tuple = _f(("/etc/alternatives", "/etc/ld.so.cache", "/etc/ssl/certs",
                           "/etc/ca-certificates"),
                          "host /etc entries bound read-only into the generated /etc (no secrets here)",
                          _tuple_of_str)
    tmp_size: int = _f(512 * 1024**2, "size of the tmpfs /tmp (counted against the memory limit)", parse_size)
    workspace: str = _f("rw", "how /home/agent/workspace is mounted: rw or ro")
    context: str = _f("ro", "how /home/agent/context is mounted: ro (never rw)")
    shared: str = _f("", "host directory kept across sessions, mounted rw at /home/agent/shared "
                         "(empty: none)")
    keep_workspace: bool = _f(False, "keep a daemon-made workspace after destroy")

    def check(self):
        for name in ("ro_binds", "etc_binds"):
            for p in getattr(self, name):
                _check_abs_path(p, name)
        if name_ok := self.shared:
            _check_abs_path(name_ok, "shared")
        if self.workspace not in ("rw", "ro"):
            raise ValueError(f"workspace: must be 'rw' or 'ro', got {self.workspace!r}")
        if self.context != "ro":
            raise ValueError(f"context: must be 'ro', got {self.context!r}")
        if not 1024**2 <= self.tmp_size <= 64 * 1024**3:
            raise ValueError("tmp_size: must be between 1 MiB and 64 GiB")


@dataclass(frozen=True)
class LimitsPolicy:
    cpus: float = _f(2.0, "CPU bandwidth in cores (cgroup cpu.max / CFS quota); 0 = no limit")
    memory: int = _f(4 * 1024**3, "memory limit (memory.max / memory.limit_in_bytes)", parse_size)
    swap: int = _f(0, "swap allowed on top of memory (memory.swap.max / memsw)", parse_size)
    disk: int = _f(10 * 1024**3, "bytes the agent may write to its workspace and /tmp", parse_size)
    pids: int = _f(200, "processes and threads at once (pids.max)")
    nofile: int = _f(1024, "RLIMIT_NOFILE for every process")
    core: int = _f(0, "RLIMIT_CORE (0: no core dumps, which could hold secrets)", parse_size)
    fsize: int = _f(0, "RLIMIT_FSIZE per file; 0 = no per-file limit", parse_size)
    host_workspace: str = _f("refuse", "a caller's host workspace directory cannot be bounded by the "
                                       "disk limit: 'refuse' it (fail closed) or accept it as "
                                       "'unbounded' (only /tmp and daemon-made workspaces are bounded)")

    def check(self):
        if not 0 <= self.cpus <= 1024:
            raise ValueError(f"cpus: must be between 0 and 1024, got {self.cpus}")
        if not 4 * 1024**2 <= self.memory <= 1024**4:
            raise ValueError("memory: must be between 4 MiB and 1 TiB")
        # The sandbox's init is one of its processes: a limit below 2 leaves no room for
        # the command itself, so nothing could ever run.
        if not 2 <= self.pids <= 4194304:
            raise ValueError(f"pids: must be between 2 (init and one command) and 4194304, "
                             f"got {self.pids}")
        if not 16 <= self.nofile <= 1048576:
            raise ValueError(f"nofile: must be between 16 and 1048576, got {self.nofile}")
        if self.disk and self.disk < 16 * 1024**2:
            raise ValueError("disk: must be 0 (no limit) or at least 16 MiB")
        if self.host_workspace not in ("refuse", "unbounded"):
            raise ValueError(f"host_workspace: must be 'refuse' or 'unbounded', got {self.host_workspace!r}")


@dataclass(frozen=True)
class AllowEntry:
    """One egress allowlist entry: a host name, a `*.` wildcard or an IP literal, with ports."""
    text: str
    host: str          # lowercase name without the "*." / an IP address without brackets
    wildcard: bool     # "*.example.com": any name strictly under example.com (not itself)
    is_ip: bool
    ports: tuple

    def matches(self, name: str) -> bool:
        name = name.lower().rstrip(".")
        if self.wildcard:
            return name.endswith("." + self.host)
        return name == self.host


_DNS_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")


def parse_allow_entry(text: str) -> AllowEntry:
    """'host[:port[,port...]]', '*.domain[:port]', '1.2.3.4[:port]', '[::1][:port]' (443)."""
    import ipaddress
    if not isinstance(text, str) or not text or text != text.strip():
        raise ValueError(f"not an allow entry: {text!r}")
    if text.startswith("["):                       # [v6]:port
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: write IPv6 addresses as [addr]:port")
        portspec = rest[1:] if rest else ""
        if rest == ":":
            raise ValueError(f"{text!r}: empty port")
    elif text.count(":") > 1:
        raise ValueError(f"{text!r}: write IPv6 addresses in brackets, e.g. [2001:db8::1]:443")
    else:
        host, sep, portspec = text.partition(":")
        if sep and not portspec:
            raise ValueError(f"{text!r}: empty port")
    ports = []
    for p in (portspec.split(",") if portspec else ["443"]):
        if not p.isdigit() or not 1 <= int(p) <= 65535:
            raise ValueError(f"{text!r}: port must be a number from 1 to 65535, got {p!r}")
        ports.append(int(p))
    host = host.lower().rstrip(".")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        addr = None
    if addr is not None:
        if text.startswith("[") != (addr.version == 6):
            raise ValueError(f"{text!r}: IPv6 addresses go in brackets, IPv4 ones do not")
        if addr.is_unspecified or addr.is_multicast or addr.is_loopback:
            raise ValueError(f"{text!r}: not a usable destination address")
        return AllowEntry(text, str(addr), False, True, tuple(ports))
    if text.startswith("["):
        raise ValueError(f"{text!r}: not an IPv6 address")
    wildcard = host.startswith("*.")
    name = host[2:] if wildcard else host
    if "*" in name:
        raise ValueError(f"{text!r}: a wildcard is only allowed as the whole first label ('*.domain')")
    labels = name.split(".")
    if len(name) > 253 or not all(_DNS_LABEL.fullmatch(l) for l in labels):
        raise ValueError(f"{text!r}: not a valid host name")
    if wildcard and len(labels) < 2:
        raise ValueError(f"{text!r}: a wildcard needs a domain with at least two labels")
    if re.fullmatch(r"[0-9.]+", name):
        raise ValueError(f"{text!r}: not a valid IPv4 address")
    return AllowEntry(text, name, wildcard, False, tuple(ports))


def _allow_list(value):
    entries = _tuple_of_str(value)
    for e in entries:
        parse_allow_entry(e)
    return entries


def _upstream_list(value):
    import ipaddress
    entries = _tuple_of_str(value)
    for e in entries:
        host, _, port = e.rpartition(":") if e.count(":") == 1 else (e, "", "")
        try:
            ipaddress.ip_address(host.strip("[]") if host else e)
        except ValueError:
            raise ValueError(f"{e!r}: an upstream resolver is an IP address[:port]") from None
        if port and (not port.isdigit() or not 1 <= int(port) <= 65535):
            raise ValueError(f"{e!r}: bad port")
    return entries


@dataclass(frozen=True)
class NetworkPolicy:
    mode: str = _f("none", "none (no interface but a down lo), loopback, or egress (allowlist)")
    allow: tuple = _f((), "egress entries: 'host:port', '*.domain:port', 'ip:port', '[v6]:port' "
                          "(port 443 if omitted; several as 'host:443,8443')", _allow_list)
    rate: int = _f(0, "egress rate limit, e.g. 10mbit (0: none)", parse_rate)
    dns_upstream: tuple = _f((), "upstream resolvers (IP[:port]) for allowlisted names "
                                 "(empty: the host's /etc/resolv.conf)", _upstream_list)
    dns_qps: int = _f(20, "DNS queries per second a sandbox may make before being refused")
    dns_ttl_min: float = _f(30.0, "floor of a pinned answer's lifetime in the allow set", parse_duration)
    dns_ttl_max: float = _f(3600.0, "ceiling of a pinned answer's lifetime", parse_duration)
    dns_private: bool = _f(False, "pin DNS answers in private, shared or link-local ranges "
                                  "(10/8, 192.168/16, 169.254/16...); off: an allowlisted name "
                                  "cannot be pointed at internal hosts (use IP entries for those)")

    def check(self):
        if self.mode not in ("none", "loopback", "egress"):
            raise ValueError(f"mode: must be none, loopback or egress, got {self.mode!r}")
        if self.allow and self.mode != "egress":
            raise ValueError("allow: entries need mode = 'egress'")
        for e in self.allow:
            try:
                parse_allow_entry(e)
            except ValueError as err:
                raise ValueError(f"allow: {err}") from None
        if not 1 <= self.dns_qps <= 10000:
            raise ValueError("dns_qps: must be between 1 and 10000")
        if self.rate and self.rate < 8000:
            raise ValueError("rate: must be 0 (no limit) or at least 8kbit")
        if not 1 <= self.dns_ttl_min <= self.dns_ttl_max:
            raise ValueError("dns_ttl_min: must be at least 1s and not exceed dns_ttl_max")


@dataclass(frozen=True)
class SeccompPolicy:
    groups: tuple = _f(("@default",), "syscall groups from policies/seccomp/ that are allowed",
                       _tuple_of_str)
    allow: tuple = _f((), "extra syscalls allowed by name", _tuple_of_str)
    deny: tuple = _f((), "syscalls refused with EPERM even if a group allows them", _tuple_of_str)
    socket_families: tuple = _f(("unix", "inet", "inet6"), "socket families the agent may open",
                                _tuple_of_str)
    probe_threshold: int = _f(10, "denied attempts after which a 'boundary probing' escalation is raised")
    notify: bool = _f(True, "report deny-list attempts through the supervisor (seccomp user "
                            "notification); false: refuse them with EPERM without a record")

    def check(self):
        if self.probe_threshold < 1:
            raise ValueError("probe_threshold: must be at least 1")
        # Unknown groups and syscall names, and allowing the fixed deny list, are errors
        # at load time (sandbox/kernel/seccomp.py owns the names and the groups).
        from sandbox.kernel.seccomp import check_section
        check_section(self)


@dataclass(frozen=True)
class ScannerPolicy:
    rules: tuple = _f(("default",), "rule files from policies/scanner/ (without .toml)", _tuple_of_str)
    expected_output: int = _f(16 * 1024**2, "output bytes per command above which volume is flagged",
                              parse_size)
    binary: str = _f("block", "what to do with binary output: block, flag or allow")

    def check(self):
        if self.binary not in ("block", "flag", "allow"):
            raise ValueError(f"binary: must be block, flag or allow, got {self.binary!r}")


@dataclass(frozen=True)
class EscalationPolicy:
    denials: int = _f(10, "denials (seccomp, network, DNS) before a 'boundary probing' escalation")
    memory_pct: int = _f(90, "memory use, percent of the limit, that raises a warning")
    pids_pct: int = _f(90, "process count, percent of the limit, that raises a warning")
    error_rate: int = _f(5, "failed commands in a row that raise an 'error spike' warning")
    freeze_on_critical: bool = _f(True, "freeze the sandbox on a critical escalation until an operator acts")
    severity: tuple = _f((), "severity per trigger, e.g. { output_volume = \"critical\" } (kinds and "
                             "defaults: ESCALATION_KINDS); critical ones freeze the sandbox", _str_map)

    def check(self):
        for name in ("memory_pct", "pids_pct"):
            if not 1 <= getattr(self, name) <= 100:
                raise ValueError(f"{name}: must be between 1 and 100")
        for name in ("denials", "error_rate"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1")
        for kind, level in self.severity:
            if kind not in ESCALATION_KINDS:
                raise ValueError(f"severity: unknown trigger {kind!r} (known: {', '.join(ESCALATION_KINDS)})")
            if level not in ESCALATION_SEVERITIES:
                raise ValueError(f"severity: {kind}: must be one of {', '.join(ESCALATION_SEVERITIES)}")


# Escalation triggers and their default severities (sandbox/audit/escalation.py raises them).
ESCALATION_KINDS = {"boundary_probing": "warning", "secret_in_output": "critical",
                    "resource_limit": "warning", "error_spike": "warning",
                    "output_volume": "warning", "teardown_failed": "critical"}
ESCALATION_SEVERITIES = ("info", "warning", "critical")


@dataclass(frozen=True)
class Policy:
    name: str = _f("unnamed", "the policy's name (its file name without .toml)")
    description: str = _f("", "what this policy is for")
    hostname: str = _f("sandbox", "hostname inside the sandbox (own UTS namespace)")
    timeout: float = _f(3600.0, "lifetime of the sandbox; it is killed when it expires", parse_duration)
    command_timeout: float = _f(600.0, "default wall-clock limit of one command", parse_duration)
    user: UserPolicy = field(default_factory=UserPolicy)
    environment: EnvironmentPolicy = field(default_factory=EnvironmentPolicy)
    filesystem: FilesystemPolicy = field(default_factory=FilesystemPolicy)
    limits: LimitsPolicy = field(default_factory=LimitsPolicy)
    network: NetworkPolicy = field(default_factory=NetworkPolicy)
    seccomp: SeccompPolicy = field(default_factory=SeccompPolicy)
    scanner: ScannerPolicy = field(default_factory=ScannerPolicy)
    escalation: EscalationPolicy = field(default_factory=EscalationPolicy)

    def check(self):
        if not _HOSTNAME.fullmatch(self.hostname):
            raise ValueError(f"hostname: not a valid hostname: {self.hostname!r}")
        if not 0 < self.timeout <= 7 * 86400:
            raise ValueError("timeout: must be more than 0 and at most 7 days")
        if not 0 < self.command_timeout <= self.timeout:
            raise ValueError("command_timeout: must be more than 0 and at most timeout")


def _check_abs_path(p: str, name: str):
    if not p.startswith("/"):
        raise ValueError(f"{name}: must be an absolute path, got {p!r}")
    if any(part in ("..", ".") for part in p.split("/")):
        raise ValueError(f"{name}: must not contain '.' or '..': {p!r}")
    if "\0" in p:
        raise ValueError(f"{name}: must not contain NUL")

"""Crash recovery: remove everything sandboxes of a dead daemon left behind, and prove it.

`recover(state_dir, audit)` runs at daemon start. For every intent record under
`<state_dir>/sandboxes/` (sandbox/runtime/intent.py) whose owner is no longer running, it
removes each resource the record names, newest kind last in dependency order (processes
first, so nothing holds a cgroup, mount or netns; the directory last), each through the
cleanup function of the module that made it (CLEANUP below: kind -> "module:function"; each
is idempotent and raises unless the object is verifiably gone). It audits what it found
and what it removed, keeps the intent record of a sandbox whose teardown failed (the next
start retries: recovery is idempotent) and raises an escalation for it.

Then a sweep removes objects of ours that no intent names (a crash between making an
object's parent and recording it): sandbox directories in this state dir without an
intent record (and any mount under them; only older daemons made such directories), the
shared /etc views of processes no longer running (sandbox/kernel/mounts.py, etc_view), and
cgroups whose name carries this daemon's sandbox-id prefix. The sweep touches only this state dir and names with the prefix the
caller gives (tests give `sbxt-<pid>-`), never anything another daemon or test could own;
with no prefix it does not touch cgroups. The network module's own leftover sweep
(network.cleanup_leftovers) is run only when asked (`network_sweep=True`): it works in the
network namespace the daemon is configured for.
"""
from __future__ import annotations

import importlib
import os
import select
import shutil
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from sandbox.audit.sink import NULL_SINK
from sandbox.errors import SandboxError, TeardownError
from sandbox.runtime.intent import (INTENT_FILE, INTENT_SUFFIX, Intent, intent_id, list_intents,
                                    proc_starttime)

# Who removes each kind (docs/internals.md). A kind's function receives the intent fields.
# Kinds whose module has no cleanup function (yet) fall back to the safe generic ones here.
# process and dir use the ones here: killing goes through a pidfd with the start time checked
# again after pidfd_open (no recycled-pid race), and a directory is removed only after every
# mount under it is detached (an rmtree must never walk into a bind of host files).
CLEANUP = {
    "process": "sandbox.runtime.recovery:kill_process",
    "mount": "sandbox.kernel.mounts:cleanup",
    "disk": "sandbox.kernel.disk:cleanup",
    "qdisc": "sandbox.kernel.tc:cleanup_qdisc",
    "nft": "sandbox.kernel.netfilter:cleanup",
    "veth": "sandbox.kernel.network:cleanup_veth",
    "netns": "sandbox.kernel.network:cleanup_netns",
    "cgroup": "sandbox.kernel.cgroups:cleanup",
    "uidrange": "sandbox.runtime.uidrange:cleanup",
    "dir": "sandbox.runtime.recovery:remove_dir",
}
ORDER = ("process", "mount", "disk", "qdisc", "nft", "veth", "netns", "cgroup", "uidrange", "dir")
_KILL_WAIT = 5.0          # seconds a SIGKILLed process may take to exit (bounded)


# ---- generic fallbacks -------------------------------------------------------------------

def _proc_state(pid: int) -> str | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rindex(b")") + 2:].split()[0].decode()


def kill_process(fields: dict) -> None:
    """SIGKILL the process (pid, starttime) if it still exists, and wait until it has exited.

    A pid alone is never signalled: after a crash the number may belong to a stranger. The
    start time is compared before and again after pidfd_open(2) (the pidfd pins that one
    process), so a pid recycled in between is never killed. A zombie counts as gone: it holds
    nothing but its pid, and its (new) parent reaps it."""
    pid, start = int(fields["pid"]), fields.get("starttime")
    if start is None:
        raise TeardownError("process record without a start time: refusing to signal a bare pid",
                            leftovers=[f"pid {pid}"])
    if proc_starttime(pid) != start:
        return
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if proc_starttime(pid) != start:
            return
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            return
        # A pidfd polls readable once the process has exited (pidfd_open(2)).
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        poller.poll(int(_KILL_WAIT * 1000))
    finally:
        os.close(pidfd)
    if proc_starttime(pid) == start and _proc_state(pid) not in ("Z", "X", None):
        raise TeardownError("process survived SIGKILL", leftovers=[f"pid {pid}"])


def _mounts_under(path: str) -> list[str]:
    from sandbox.kernel.mounts import mounts_under
    return mounts_under(path)


def remove_dir(fields: dict) -> None:
    """Remove a sandbox directory (unless the record says keep), after detaching any mount
    under it, deepest first, so rmtree never walks into a bind of something else."""
    if fields.get("keep"):
        return
    path = os.path.normpath(str(fields["path"]))
    if not os.path.isabs(path) or path.count("/") < 2:
        raise TeardownError("refusing to remove a top-level or relative directory", leftovers=[path])
    from sandbox.kernel.mounts import cleanup as umount
    for mp in sorted(_mounts_under(path), key=len, reverse=True):
        umount({"path": mp})
    if _mounts_under(path):
        raise TeardownError("mounts left under directory", leftovers=_mounts_under(path))
    if os.path.lexists(path):
        shutil.rmtree(path)    # fd-based on Linux: does not follow symlinks out of the tree
    if os.path.lexists(path):
        raise TeardownError("directory survived removal", leftovers=[path])


def remove_nft_table(fields: dict) -> None:
    """Delete a sandbox's nft table in the daemon's host-side netns; verify it is gone."""
    from sandbox.kernel import network
    from sandbox.kernel.netfilter import Firewall

    def run():
        network.cleanup_table_now(fields["table"])
        fw = Firewall()
        try:
            if fields["table"] in fw.tables(prefix=fields["table"]):
                raise TeardownError("nft table survived deletion", leftovers=[fields["table"]])
        finally:
            fw.close()
    network.HostSide.get().call(run)


FALLBACK: dict[str, Callable[[dict], None]] = {
    "nft": remove_nft_table,
}


def cleanup_function(kind: str) -> Callable[[dict], None]:
    """The owning module's cleanup for `kind`, or the generic fallback if it has none."""
    mod_name, fn_name = CLEANUP[kind].split(":")
    try:
        return getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError):
        if kind in FALLBACK:
            return FALLBACK[kind]
        raise SandboxError(f"no cleanup function for intent kind {kind!r} ({CLEANUP[kind]})",
                           step="recovery") from None


# ---- the report --------------------------------------------------------------------------

@dataclass
class SandboxRecovery:
    sandbox: str
    found: list[dict] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


@dataclass
class RecoveryReport:
    sandboxes: list[SandboxRecovery] = field(default_factory=list)
    skipped_live: list[str] = field(default_factory=list)   # intents of a running daemon
    orphans: list[str] = field(default_factory=list)        # swept objects no intent named
    leftovers: list[str] = field(default_factory=list)      # could not be removed

    @property
    def ok(self) -> bool:
        return not self.leftovers

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def _describe(res: dict) -> str:
    fields = ", ".join(f"{k}={v}" for k, v in sorted(res.items()) if k != "kind")
    return f"{res['kind']}({fields})"


def _owner_alive(intent: Intent) -> bool:
    owner = intent.data.get("owner") or {}
    pid, start = owner.get("pid"), owner.get("starttime")
    return bool(pid) and start is not None and proc_starttime(int(pid)) == start


# ---- recovery ----------------------------------------------------------------------------

def recover_sandbox(intent: Intent, audit=NULL_SINK) -> SandboxRecovery:
    """Remove every resource one intent names; forget the record only if all are gone."""
    rep = SandboxRecovery(intent.sandbox_id, found=intent.resources)
    sid = rep.sandbox
    audit.record("recovery_found", sandbox=sid, outcome="warning",
                 details={"resources": [_describe(r) for r in rep.found],
                          "meta": intent.data.get("meta", {})})
    ordered = sorted(enumerate(rep.found),
                     key=lambda ir: (ORDER.index(ir[1]["kind"]) if ir[1]["kind"] in ORDER else
                                     len(ORDER), -ir[0]))
    for _, res in ordered:
        fields = {k: v for k, v in res.items() if k != "kind"}
        what = _describe(res)
        try:
            cleanup_function(res["kind"])(fields)
        except Exception as e:  # noqa: BLE001 - every resource gets its chance; all reported
            rep.failed.append(f"{what}: {e}")
            audit.record("recovery_leftover", sandbox=sid, resource=res["kind"], outcome="error",
                         details={"object": what, "error": str(e)})
            continue
        rep.removed.append(what)
        intent.remove(res["kind"], **fields)
        audit.record("recovery_removed", sandbox=sid, resource=res["kind"], details={"object": what})
    if not rep.failed:
        intent.close()
        if os.path.lexists(intent.dir):     # an older daemon's per-sandbox directory
            remove_dir({"path": str(intent.dir)})
    return rep


def recover(state_dir: Path, audit=NULL_SINK, *, escalations=None, id_prefix: str = "",
            cgroup_parent: str | None = None, network_sweep: bool = False,
            disk_base: Path | None = None) -> RecoveryReport:
    """Clean up after a crashed daemon. Idempotent. See the module docstring.

    `escalations`: an Escalations (sandbox/audit/escalation.py); a sandbox whose teardown
    left something raises a critical "teardown_failed" escalation there.
    `id_prefix`: the prefix of this daemon's sandbox ids; cgroups and disks (images in
    `disk_base`, default the disk module's) named with it that no intent names are swept
    (empty: no cgroup or disk sweep). `network_sweep`: also run the network module's
    sweep of our netns/veth/nft names in its configured host netns."""
    state_dir = Path(state_dir)
    report = RecoveryReport()
    intents = []
    for path in list_intents(state_dir):
        try:
            intents.append(Intent.load(path))
        except SandboxError as e:
            report.leftovers.append(str(e))
            audit.record("recovery_leftover", resource="intent", outcome="error",
                         details={"path": str(path), "error": str(e)})
    audit.record("recovery_start", details={"state_dir": str(state_dir), "intents": len(intents)})
    live = set()
    for intent in intents:
        if _owner_alive(intent):
            report.skipped_live.append(intent.sandbox_id)
            live.add(intent.sandbox_id)
            continue
        rep = recover_sandbox(intent, audit)
        report.sandboxes.append(rep)
        report.leftovers += [f"{rep.sandbox}: {f}" for f in rep.failed]
        if rep.failed and escalations is not None:
            escalations.observe_teardown_failure(rep.sandbox, rep.failed)
    _sweep(state_dir, audit, report, live, id_prefix, cgroup_parent)
    if id_prefix:
        _sweep_disks(Path(disk_base) if disk_base else None, report, live, id_prefix)
    if network_sweep:
        from sandbox.kernel import network
        try:
            report.orphans += network.cleanup_leftovers(active_ids=sorted(live))
        except Exception as e:  # noqa: BLE001 - reported and audited, never hidden
            report.leftovers.append(f"network sweep: {e}")
    for name in report.orphans:
        audit.record("recovery_removed", resource="orphan", details={"object": name})
    audit.record("recovery", outcome="ok" if report.ok else "error",
                 details={"sandboxes": [s.sandbox for s in report.sandboxes],
                          "removed": sum(len(s.removed) for s in report.sandboxes),
                          "orphans": len(report.orphans), "leftovers": report.leftovers,
                          "skipped_live": report.skipped_live})
    return report


def _sweep(state_dir: Path, audit, report: RecoveryReport, live: set, id_prefix: str,
           cgroup_parent: str | None) -> None:
    base = state_dir / "sandboxes"
    if base.is_dir():
        for d in sorted(base.iterdir()):
            if d.name in live or not d.is_dir() or (d / INTENT_FILE).exists() or \
                    (base / f"{d.name}{INTENT_SUFFIX}").exists():
                continue
            try:
                remove_dir({"path": str(d)})
                report.orphans.append(f"dir({d})")
            except Exception as e:  # noqa: BLE001
                report.leftovers.append(f"dir({d}): {e}")
    from sandbox.kernel import mounts
    removed, failed = mounts.sweep_etc_cache(state_dir)   # /etc views of dead processes
    report.orphans += [f"etc({p})" for p in removed]
    report.leftovers += [f"etc({p})" for p in failed]
    if not id_prefix:
        return
    from sandbox.kernel import cgroups
    parent = cgroup_parent or cgroups.DEFAULT_PARENT
    for cg in _prefixed_cgroups(parent, id_prefix):
        if any(part in live for part in cg.parts):
            continue
        try:
            cgroups.cleanup({"path": str(cg)})
            report.orphans.append(f"cgroup({cg})")
        except Exception as e:  # noqa: BLE001
            report.leftovers.append(f"cgroup({cg}): {e}")


def _loop_of(image: Path) -> str:
    """The loop device attached to `image` ("" if none): /sys/block/loopN/loop/backing_file."""
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            if backing.read_text().strip() == str(image):
                return f"/dev/{backing.parent.parent.name}"
        except OSError:
            continue
    return ""


def _sweep_disks(disk_base: Path | None, report: RecoveryReport, live: set, id_prefix: str) -> None:
    """Disk images named `<id_prefix>...` that no live intent owns (e.g. a destroy that could
    not detach the loop device in time, after which its intent was already gone)."""
    from sandbox.kernel import disk
    base = disk_base or disk.DEFAULT_BASE
    for img in sorted((base / "images").glob(f"{id_prefix}*.img")):
        sid = img.name[:-len(".img")]
        if sid in live:
            continue
        try:
            disk.cleanup({"image": str(img), "mountpoint": str(base / "mnt" / sid),
                          "loopdev": _loop_of(img)})
            report.orphans.append(f"disk({img})")
        except Exception as e:  # noqa: BLE001
            report.leftovers.append(f"disk({img}): {e}")


def _prefixed_cgroups(parent: str, id_prefix: str) -> list[Path]:
    """Directories named `<id_prefix>...` under `parent` in every cgroup hierarchy: the root
    itself on a unified host, each controller's and the cgroup2 mount's on v1/hybrid."""
    root = Path("/sys/fs/cgroup")
    if (root / "cgroup.controllers").exists():
        hierarchies = [root]
    else:
        hierarchies = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    found = []
    for hier in hierarchies:
        d = hier / parent
        if d.is_dir():
            found += [c for c in d.iterdir() if c.is_dir() and c.name.startswith(id_prefix)]
    return sorted(set(found))


# ---- proving nothing is left (crash tests, soak, doctor) ----------------------------------

def find_leftovers(state_dir: Path, *, id_prefix: str, cgroup_parent: str | None = None,
                   network_check: bool = False, disk_base: Path | None = None) -> list[str]:
    """Everything of sandboxes named `<id_prefix>...` still on the host: intent records,
    sandbox/workspace directories in `state_dir`, disk images, their mounts and loop devices
    (in `disk_base`, default the disk module's, and in state_dir/disks), mounts under
    state_dir, cgroups, processes in those cgroups, and (network_check) netns, veths and nft
    tables in the network module's configured host netns (the veth and table check assumes
    that namespace is the caller's own, as in tests and the soak run). Empty when teardown
    or recovery was complete."""
    from sandbox.kernel import disk
    state_dir = Path(state_dir)
    left = [f"intent {p}" for p in list_intents(state_dir)
            if intent_id(p).startswith(id_prefix)]
    dirs = [state_dir / "sandboxes", state_dir / "workspaces"]
    for base in {Path(disk_base or disk.DEFAULT_BASE), state_dir / "disks"}:
        dirs += [base / "images", base / "mnt"]
    for d in dirs:
        if d.is_dir():
            left += [f"file {p}" for p in d.iterdir() if p.name.startswith(id_prefix)]
    left += [f"mount {m}" for m in _mounts_under(str(state_dir))]
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            name = Path(backing.read_text().strip()).name
        except OSError:
            continue
        if name.startswith(id_prefix):
            left.append(f"loop {backing.parent.parent.name} {name}")
    from sandbox.kernel import cgroups
    parent = cgroup_parent or cgroups.DEFAULT_PARENT
    left += [f"cgroup {c}" for c in _prefixed_cgroups(parent, id_prefix)]
    needle = f"/{parent}/{id_prefix}".encode()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cg = (proc / "cgroup").read_bytes()
                if needle in cg and _proc_state(int(proc.name)) != "Z":
                    where = next(ln for ln in cg.decode().splitlines() if needle.decode() in ln)
                    left.append(f"process {proc.name} in {where.split(':', 2)[2]}")
            except OSError:
                pass
    if network_check:
        left += _network_leftovers(id_prefix)
    return left


def _network_leftovers(id_prefix: str) -> list[str]:
    from sandbox.kernel import network
    from sandbox.kernel.netfilter import Firewall, table_name
    cfg = network.CONFIG
    left = []
    if os.path.isdir(cfg.netns_dir):
        left += [f"netns {n}" for n in os.listdir(cfg.netns_dir)
                 if n.startswith(network.netns_name(id_prefix, cfg))]

    def in_host():
        out = []
        fw = Firewall()
        try:
            out += [f"nft {t}" for t in fw.tables(prefix=table_name(id_prefix))]
        finally:
            fw.close()
        import contextlib
        with contextlib.closing(network._ipr()) as ipr:
            out += [f"link {l.get_attr('IFLA_IFNAME')}" for l in ipr.get_links()
                    if (l.get_attr("IFLA_IFNAME") or "").startswith(cfg.prefix)]
        return out
    return left + network.HostSide.get().call(in_host)

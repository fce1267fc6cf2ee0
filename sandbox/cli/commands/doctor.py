"""sandboxctl doctor: which kernel features this host has, which controls it can enforce."""
from __future__ import annotations

import importlib
import os
import tempfile
import time

HELP = "check the host's kernel features and which policy controls it can enforce"

# facility modules asked for probe() -> list of (feature, ok, detail) or a dict
PROBE_MODULES = ("sandbox.kernel.namespaces", "sandbox.kernel.caps", "sandbox.kernel.userns",
                 "sandbox.kernel.cgroups", "sandbox.kernel.disk", "sandbox.kernel.seccomp",
                 "sandbox.kernel.network", "sandbox.kernel.netfilter", "sandbox.kernel.dns",
                 "sandbox.kernel.tc", "sandbox.runtime.supervisor")


def add_arguments(parser):
    parser.add_argument("--no-spawn", action="store_true",
                        help="skip the end-to-end check (create a sandbox, run /bin/true)")


def _rows_from(module: str) -> list[tuple[str, bool, str]]:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            return []
        raise
    probe = getattr(mod, "probe", None)
    if probe is None:
        return []
    try:
        got = probe()
    except Exception as e:  # noqa: BLE001 - a failing probe is a finding, not a crash
        return [(module.rsplit(".", 1)[-1], False, f"probe failed: {e}")]
    if got is None:
        return []
    if isinstance(got, dict):
        name = module.rsplit(".", 1)[-1]
        ok = bool(got.get("ok", got.get("enforceable", True)))
        return [(name, ok, "; ".join(f"{k}={v}" for k, v in got.items() if k != "ok"))]
    return [(str(f), bool(ok), str(d)) for f, ok, d in got]


def _seccomp_actions() -> tuple[str, bool, str]:
    try:
        acts = open("/proc/sys/kernel/seccomp/actions_avail").read().split()
    except OSError as e:
        return ("seccomp", False, str(e))
    need = {"errno", "user_notif", "kill_process"}
    return ("seccomp actions", need <= set(acts), " ".join(acts))


def _end_to_end() -> tuple[str, bool, str]:
    import asyncio
    from pathlib import Path

    from sandbox.policy import load_policy
    from sandbox.runtime.sandbox import Sandbox
    with tempfile.TemporaryDirectory(prefix="sbx-doctor-") as d:
        t0 = time.perf_counter()
        try:
            sb = Sandbox.create(load_policy("default"), state_dir=Path(d))
            try:
                res = asyncio.run(sb.exec(["/bin/true"]))
            finally:
                sb.destroy()
        except Exception as e:  # noqa: BLE001 - reported as the finding
            return ("sandbox spawn", False, str(e))
        ms = (time.perf_counter() - t0) * 1000
        return ("sandbox spawn", res.exit_code == 0,
                f"create + /bin/true + destroy in {ms:.0f} ms ({res.text})")


def run(args):
    rows = [("kernel", True, os.uname().release)]
    for module in PROBE_MODULES:
        rows += _rows_from(module)
    rows.append(_seccomp_actions())
    if not args.no_spawn:
        if os.geteuid() != 0:
            rows.append(("sandbox spawn", False, "needs root"))
        else:
            rows.append(_end_to_end())
    width = max(len(r[0]) for r in rows)
    for feature, ok, detail in rows:
        print(f"{'ok  ' if ok else 'FAIL'}  {feature:<{width}}  {detail}")
    return 0 if all(ok for _, ok, _ in rows) else 1

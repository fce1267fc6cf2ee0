"""Forensic replay: one sandbox's timeline from the audit log.

What ran (argv, cwd), what it printed after scanning, what was denied, what the scanner
found, which escalations were raised, and how it ended, in log order (seq order is the
order the daemon committed them, which for one sandbox is the order things happened).

What the recorders write (docs/internals.md, "Audit actions"), and how replay reads it:

| action | details | replay kind |
| --- | --- | --- |
| sandbox_create | policy, limits, network... | lifecycle |
| exec_start | exec_id, argv, cwd | command |
| output | exec_id, stream, bytes, sha256, verdict, text (released text, optional) | output |
| exec_end | exec_id, exit_code, signal, reason, usage, duration | exit |
| scan_finding | rule, stream, offset, length, hash (salted) | finding |
| escalation / escalation_ack | id, kind, severity | escalation |
| freeze, thaw, kill, sandbox_destroy, setup_step, teardown_step, recovery | ... | lifecycle |
| anything with outcome "denied" (seccomp_deny, net_drop, dns_refused, auth, limit_hit) | what was refused | denied |

Output text: the daemon may store the *released* text of an output chunk in `text`: it has
already been through the scanner and redacted, so it is exactly what the client received
and not secret (and the audit guard masks any secret shape again, and replaces values over
8 KiB by their hash). Chunks without text still show their size and sha256.
"""
from __future__ import annotations

from pathlib import Path

from sandbox.audit.query import iter_records

_LIFECYCLE = {"sandbox_create", "create", "freeze", "thaw", "resume", "kill", "sandbox_destroy",
              "destroy", "setup_step", "teardown_step", "recovery", "recovery_found",
              "recovery_removed", "recovery_leftover", "timeout", "file_write", "file_read",
              "sandbox_kill"}
_ENDED = {"sandbox_destroy", "destroy", "daemon_destroy", "recovery_removed"}


def _kind(rec: dict) -> str:
    action, outcome, details = rec.get("action"), rec.get("outcome"), rec.get("details") or {}
    if outcome == "denied":
        return "denied"
    if action in ("exec_start",) or (action == "exec" and "exit_code" not in details):
        return "command"
    if action in ("exec_end", "exec_exit") or (action == "exec" and "exit_code" in details):
        return "exit"
    if action in ("output", "exec_output"):
        return "output"
    if action in ("scan_finding", "finding"):
        return "finding"
    if action and action.startswith("escalation"):
        return "escalation"
    if action in _LIFECYCLE or (action or "").startswith("daemon_"):
        return "lifecycle"
    return "other"


def _text(kind: str, rec: dict) -> str:
    d = rec.get("details") or {}
    if kind == "command":
        return f"$ {' '.join(map(str, d.get('argv') or []))}" + (f"   (cwd {d['cwd']})" if d.get("cwd") else "")
    if kind == "output":
        body = d.get("text")
        head = f"{d.get('stream', 'out')} {d.get('bytes', '?')} bytes"
        if d.get("verdict") and d["verdict"] != "release":
            head += f" [{d['verdict']}]"
        return head + (":\n" + "\n".join("    | " + ln for ln in str(body).splitlines())
                       if isinstance(body, str) else f" sha256={d.get('sha256', '?')}")
    if kind == "exit":
        return (f"exit {d.get('exit_code')} ({d.get('reason', 'exited')})"
                + (f" signal {d['signal']}" if d.get("signal") else ""))
    if kind == "denied":
        what = rec.get("resource") or d.get("syscall") or d.get("dest") or d.get("name") or ""
        return f"DENIED {rec.get('action')} {what}".rstrip()
    if kind == "finding":
        return f"finding {d.get('rule')} in {d.get('stream', 'output')} at {d.get('offset')}"
    if kind == "escalation":
        return f"{rec.get('action')} {d.get('severity', '')} {d.get('kind', '')} {d.get('id', '')}".strip()
    return f"{rec.get('action')} {rec.get('resource') or ''} {rec.get('outcome')}".replace("  ", " ")


def timeline(records, sandbox_id: str) -> dict:
    events, commands, denials = [], [], []
    ended = None
    for rec in records:
        if rec.get("sandbox") != sandbox_id:
            continue
        kind = _kind(rec)
        ev = {"seq": rec.get("seq"), "ts": rec.get("ts"), "kind": kind, "action": rec.get("action"),
              "outcome": rec.get("outcome"), "resource": rec.get("resource"),
              "details": rec.get("details") or {}, "text": _text(kind, rec)}
        events.append(ev)
        if kind == "command":
            commands.append({"argv": ev["details"].get("argv"), "cwd": ev["details"].get("cwd"),
                             "exec_id": ev["details"].get("exec_id"), "seq": ev["seq"]})
        elif kind == "denied":
            denials.append(ev)
        if rec.get("action") in _ENDED:
            ended = {"action": rec["action"], "outcome": rec.get("outcome"), "ts": rec.get("ts"),
                     "seq": rec.get("seq")}
    return {"sandbox": sandbox_id, "events": events, "commands": commands,
            "denials": denials, "ended": ended}


def replay(state_dir: Path, sandbox_id: str) -> dict:
    """The timeline of `sandbox_id` from the log in `state_dir` (for the CLI and the API)."""
    return timeline(iter_records(state_dir, sandbox=sandbox_id), sandbox_id)


def format_timeline(tl: dict) -> str:
    if not tl["events"]:
        return f"no audit records for sandbox {tl['sandbox']}\n"
    lines = [f"sandbox {tl['sandbox']}: {len(tl['events'])} events, {len(tl['commands'])} commands, "
             f"{len(tl['denials'])} denied"]
    for ev in tl["events"]:
        lines.append(f"{ev['ts']} #{ev['seq']:<6} {ev['kind']:<10} {ev['text']}")
    end = tl["ended"]
    lines.append(f"ended: {end['action']} {end['outcome']} at {end['ts']}" if end else "ended: not yet")
    return "\n".join(lines) + "\n"

"""sandboxctl policy show NAME | check FILE: the effective seccomp filter of a policy, and
validation of a policy file (unknown syscalls and groups are clear errors)."""
from __future__ import annotations

HELP = "show a policy's effective syscall filter, or check a policy file"


def add_arguments(parser):
    sub = parser.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="print the allowed syscalls and the fixed deny list")
    show.add_argument("name", help="policy name (from the policy dirs) or path to a .toml file")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    check = sub.add_parser("check", help="validate a policy file; exit 2 with the reason if invalid")
    check.add_argument("file", help="path to a policy .toml file (or a policy name)")


def run(args) -> int:
    from sandbox.policy import load_policy

    # load_policy validates everything (the seccomp section through sandbox.kernel.seccomp)
    # and raises PolicyError naming the file and the field; main.py prints it and exits 2.
    policy = load_policy(args.name if args.action == "show" else args.file)
    if args.action == "check":
        print(f"{policy.name}: ok")
        return 0
    return _show(policy, args.json)


def _show(policy, as_json: bool) -> int:
    import json

    from sandbox.kernel import seccomp

    sec = policy.seccomp
    rules = seccomp.resolve_rules(sec)
    groups = seccomp.expand_groups(sec.groups)
    data = {
        "policy": policy.name,
        "groups": list(sec.groups),
        "default_action": "EPERM",
        "deny_action": "notify+EPERM (audited)" if rules.notify else "EPERM",
        "allow": [{"syscall": s, "from": groups.get(s, "allow" if s in sec.allow else "required"),
                   **({"arguments": seccomp.FIXED_DENY[s]} if s in seccomp.ARG_FILTERED else {})}
                  for s in rules.allow],
        "socket_families": list(rules.families),
        "policy_deny": sorted(sec.deny),
        "fixed_deny": [{"syscall": s, "why": seccomp.FIXED_DENY[s]} for s in sorted(seccomp.FIXED_DENY)],
        "enosys": list(seccomp.ENOSYS_DIRECT),
        "foreign_arch": "denied like the deny list (i386 int 0x80, x32)",
        "instructions": len(seccomp.compile_rules(rules)) // seccomp.SOCK_FILTER.size,
    }
    if as_json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"policy {data['policy']}: groups {', '.join(data['groups'])}")
    print(f"default: {data['default_action']}; deny list: {data['deny_action']}; "
          f"{data['instructions']} BPF instructions")
    print(f"\nallowed syscalls ({len(data['allow'])}):")
    for a in data["allow"]:
        extra = f"  [argument rules: never {a['arguments']}]" if "arguments" in a else ""
        print(f"  {a['syscall']:<26} {a['from']}{extra}")
    print(f"\nsocket families granted: {', '.join(data['socket_families']) or 'none'}")
    if data["policy_deny"]:
        print(f"denied by this policy: {', '.join(data['policy_deny'])}")
    print(f"\nfixed deny list ({len(data['fixed_deny'])}, no policy can allow these):")
    for d in data["fixed_deny"]:
        print(f"  {d['syscall']:<26} {d['why']}")
    print(f"\nENOSYS without a report: {', '.join(data['enosys'])} (libc falls back to clone)")
    print(f"foreign architectures: {data['foreign_arch']}")
    return 0

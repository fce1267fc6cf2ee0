"""Scanner rules: loaded from policies/scanner/NAME.toml (format documented in default.toml).

Every rule is checked when loaded (regex compiles, validators exist, kind/action/severity are
known, max_len bounds the match) so a broken rule file stops the scanner from being built
instead of silently scanning less.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from sandbox.errors import PolicyError
from sandbox.scan.findings import ACTIONS, KINDS, SEVERITIES
from sandbox.scan.validators import VALIDATORS

DECODERS = ("base64", "hex", "percent")
MAX_RULE_LEN = 65536


@dataclass(frozen=True)
class Rule:
    id: str
    kind: str
    pattern: str = ""              # Python regex (bytes); group "secret" is the value, if present
    hs: str = ""                   # hyperscan trigger expression (default: keywords or pattern)
    keywords: tuple = ()           # literal prefilter (case-insensitive) when hs is not given
    caseless: bool = False
    validators: tuple = ()
    entropy: float = 0.0           # Shannon bits/char floor on the value
    max_len: int = 256             # longest possible match (bounds the stream hold-back)
    min_len: int = 0               # encoded rules: shortest candidate run
    lookback: int = 16             # how far before the trigger's start the match may begin
    lookback_chars: str = ""       # [class] the match can only extend back over (see back_regex)
    severity: str = "high"
    action: str = "block"
    placeholders: bool = True      # drop values with placeholder words (EXAMPLE, xxxx, <...>)
    decoder: str = ""              # encoded rules: base64 | hex | percent
    description: str = ""
    source: str = ""

    @property
    def regex(self) -> re.Pattern:
        return _compile(self.pattern, self.caseless)

    @property
    def back_regex(self) -> re.Pattern | None:
        """`lookback_chars` repeated, matched against the REVERSED bytes before a trigger: how
        far back the match can start. The confirming regex then starts there instead of
        trying every one of `lookback` positions (4 us per e-mail trigger in a git log)."""
        return _compile(self.lookback_chars + "*", False) if self.lookback_chars else None


_cache: dict = {}


def _compile(pattern: str, caseless: bool) -> re.Pattern:
    key = (pattern, caseless)
    if key not in _cache:
        _cache[key] = re.compile(pattern.encode(), re.I if caseless else 0)
    return _cache[key]


_FIELDS = {"id": str, "kind": str, "pattern": str, "hs": str, "keywords": list, "caseless": bool,
           "validators": list, "entropy": (int, float), "max_len": int, "min_len": int, "lookback": int,
           "lookback_chars": str,
           "severity": str, "action": str, "placeholders": bool, "decoder": str,
           "description": str}


def _rule_from_table(table: dict, source: str, index: int) -> Rule:
    where = f"rule[{index}]" + (f" ({table['id']})" if isinstance(table.get("id"), str) else "")

    def bad(field, why):
        return PolicyError(why, field=f"{where}.{field}", source=source)

    for key, value in table.items():
        if key not in _FIELDS:
            raise bad(key, "unknown field")
        if not isinstance(value, _FIELDS[key]) or (key == "entropy" and isinstance(value, bool)):
            raise bad(key, f"wrong type {type(value).__name__}")
    for key in ("id", "kind"):
        if key not in table:
            raise bad(key, "missing")
    args = dict(table)
    args["keywords"] = tuple(args.get("keywords", ()))
    args["validators"] = tuple(args.get("validators", ()))
    args["entropy"] = float(args.get("entropy", 0.0))
    rule = Rule(source=source, **args)
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{1,63}", rule.id):
        raise bad("id", "must be lowercase letters, digits and '-'")
    if rule.kind not in KINDS:
        raise bad("kind", f"must be one of {', '.join(KINDS)}")
    if rule.action not in ACTIONS:
        raise bad("action", f"must be one of {', '.join(ACTIONS)}")
    if rule.severity not in SEVERITIES:
        raise bad("severity", f"must be one of {', '.join(SEVERITIES)}")
    for v in rule.validators:
        if v not in VALIDATORS:
            raise bad("validators", f"unknown validator {v!r} (known: {', '.join(sorted(VALIDATORS))})")
    if not 1 <= rule.max_len <= MAX_RULE_LEN:
        raise bad("max_len", f"must be between 1 and {MAX_RULE_LEN}")
    if not 0 <= rule.lookback <= MAX_RULE_LEN:
        raise bad("lookback", f"must be between 0 and {MAX_RULE_LEN}")
    if rule.lookback_chars:
        # one bracketed class, so the reversed-match trick stays exact (no sequences)
        if not re.fullmatch(r"\[\^?\]?(?:\\.|[^\]\\])*\]", rule.lookback_chars):
            raise bad("lookback_chars", "must be one character class like [A-Za-z0-9._-]")
        try:
            rule.back_regex
        except re.error as e:
            raise bad("lookback_chars", f"does not compile: {e}") from None
    if rule.kind == "encoded":
        if rule.decoder not in DECODERS:
            raise bad("decoder", f"must be one of {', '.join(DECODERS)}")
    elif rule.kind in ("secret", "pii"):
        if not rule.pattern:
            raise bad("pattern", "required for secret and pii rules")
        try:
            rx = rule.regex
        except re.error as e:
            raise bad("pattern", f"does not compile: {e}") from None
        if "secret" in rx.groupindex and rx.groups < 1:
            raise bad("pattern", "group 'secret' is empty")
    return rule


def rule_dirs() -> list[Path]:
    from sandbox.policy.load import policy_dirs
    return [d / "scanner" for d in policy_dirs()]


def find_rule_file(name: str) -> Path:
    if "/" in name or name.endswith(".toml"):
        path = Path(name)
        if path.is_file():
            return path
        raise PolicyError(f"no such scanner rule file: {name}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise PolicyError(f"not a scanner rule file name: {name!r}")
    for d in rule_dirs():
        if (d / f"{name}.toml").is_file():
            return d / f"{name}.toml"
    raise PolicyError(f"no scanner rules named {name!r} in " + ", ".join(map(str, rule_dirs())))


def load_rules(names=("default",)) -> list[Rule]:
    """The rules of each named file (policies/scanner/NAME.toml, or a path), in order.

    A later file may not redefine an earlier rule id (that would hide a rule silently)."""
    from sandbox.policy.load import read_policy_toml
    if isinstance(names, str):
        names = (names,)
    rules, seen = [], {}
    for name in names:
        path = find_rule_file(name)
        data = read_policy_toml(path)
        tables = data.get("rule", [])
        if not isinstance(tables, list) or not tables:
            raise PolicyError("no [[rule]] tables", source=str(path))
        for i, table in enumerate(tables):
            rule = _rule_from_table(table, str(path), i)
            if rule.id in seen:
                raise PolicyError(f"rule id {rule.id!r} already defined in {seen[rule.id]}",
                                  source=str(path))
            seen[rule.id] = str(path)
            rules.append(rule)
    return rules


def rules_hash(rules) -> str:
    """Stable hash of everything that shapes the compiled database."""
    blob = json.dumps([(r.id, r.kind, r.pattern, r.hs, r.keywords, r.caseless, r.decoder,
                        r.min_len) for r in rules])
    return hashlib.sha256(blob.encode()).hexdigest()

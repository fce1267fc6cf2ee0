"""The scanning engine: one hyperscan block-mode database for every rule, Python re to confirm.

Why this shape (and not hyperscan streaming mode or start-of-match offsets):
- hyperscan only TRIGGERS: each rule contributes a fast expression (its `hs` field, its
  keywords as literals, or its pattern) compiled without SOM (leftmost start tracking costs
  speed and rejects some patterns). The callback only appends (id, end offset).
- Python `re` then CONFIRMS the rule's full pattern in a window of max_len bytes around each
  trigger, extracts the value (group "secret"), and runs the entropy floor, placeholder
  filter and validators. Benign build logs produce few triggers, so almost all bytes are
  touched only by hyperscan's SIMD code.
- Streaming is block mode over (a little released context) + (held-back tail) + (new chunk).
  To redact before release we must hold back anything that might still become part of a
  match, so the tail is `window` bytes = the longest max_len of any rule (+ slack). That
  costs `window` bytes of memory and of latency per stream (bytes are released once `window`
  more bytes have arrived, or at finish()), and re-scanning the tail on the next feed (~12%
  more hyperscan work for 64 KiB pipe reads with the default 8 KiB window). The costly
  character-class database is not run over the tail again: its triggers are short and
  bounded, so it scans the new bytes plus a margin and the stream carries its earlier
  triggers over (ScanStream._scan); the literal database is rescanned (its triggers are
  not bounded, e.g. the e-mail domain run). Small pieces are buffered without scanning until 2 x
  `window` bytes are held, so every scan releases at least `window` bytes (the hold-back is
  between 1 and 2 windows).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from bisect import bisect_right
from pathlib import Path

import hyperscan

from sandbox.errors import ScanError
from sandbox.scan.decoders import FROM_RAW, SPAN, TRIGGERS, is_text
from sandbox.scan.findings import ACTION_RANK, Finding, ScanResult, masked_preview, salted_hash
from sandbox.scan.rules import Rule, load_rules, rules_hash
from sandbox.scan.validators import AT_TRIGGER, VALIDATORS, is_placeholder, shannon_entropy

# Control bytes that do not occur in text output (TAB, LF, VT, FF, CR and ESC for colours do).
BINARY_TRIGGER = r"[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f]"
BINARY_WINDOW = 1024          # bytes examined around a control byte
BINARY_RATIO = 0.08           # control-byte share of a window above which it is binary
# Bytes that are not control bytes (deleted before counting): UTF-8 text is not binary.
_NOT_CONTROL = bytes(b for b in range(256) if not (b <= 8 or 14 <= b <= 26 or 28 <= b <= 31 or b == 127))
KEEP_MIN = 128 * 1024          # glibc's default mmap threshold: larger blocks are the ones trimmed
CONTEXT = 64                  # released bytes kept before the tail for lookbehinds
SLACK = 16                    # lookaround margin added to windows
MAX_DEPTH = 2                 # decode-and-rescan nesting (base64 of hex of a secret)
# Decoded texts of one buffer are rescanned in one hyperscan pass, joined with SEP. No trigger
# crosses it: triggers that may span lines do so only over whitespace, '=', ':' and quotes
# (azure keys, generic assignments), never over \x01; value classes exclude whitespace. The
# leading anchor of run triggers ([^A-Za-z0-9+/_-] and alike) matches its last '\n' as it
# would match the start of a lone text. Binary detection is off for decoded text.
SEP = b"\n\x01\n"
# Triggers are compiled into two databases: the literal-anchored ones (every secret rule, the
# e-mail '@', E.164 '+', percent '%', the separators of SSN and NANP numbers, binary control
# bytes), which hyperscan runs at memory speed, and the ones made of character classes only
# (card digit runs, base64 and hex runs of encoded text), which need an automaton active on
# every byte (see _class_led). Measured on the generated build log: two passes split this way
# run ~12% faster than one database of everything and than the earlier split by rule family
# (secret / pii / encoded), whose every pass mixed both.


def _cache_dir() -> Path:
    base = os.environ.get("SANDBOXD_SCAN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sandboxd")
    return Path(base)


class _Trigger:
    """What one hyperscan id stands for: a rule, the fixed trigger length (0 if variable) and
    whether hyperscan reports the start of the trigger (SOM) for it."""
    __slots__ = ("rule", "index", "trig_len", "som")

    def __init__(self, rule, index, trig_len=0):
        self.rule, self.index, self.trig_len, self.som = rule, index, trig_len, False


def _expressions(rules):
    """(expression, hyperscan flags, _Trigger) for each trigger of each rule."""
    out = []
    for index, rule in enumerate(rules):
        if rule.kind == "encoded":
            expr, trig_len = TRIGGERS[rule.decoder](rule.min_len)
            out.append((expr, 0, _Trigger(rule, index, trig_len)))
        elif rule.kind == "binary":
            out.append((rule.hs or BINARY_TRIGGER, hyperscan.HS_FLAG_SINGLEMATCH, _Trigger(rule, index)))
        elif rule.kind in ("secret", "pii"):
            flags = hyperscan.HS_FLAG_CASELESS if rule.caseless else 0
            if rule.hs:
                out.append((rule.hs, flags, _Trigger(rule, index)))
            elif rule.keywords:
                for kw in rule.keywords:
                    lit = "".join("\\x%02x" % b for b in kw.encode())
                    out.append((lit, hyperscan.HS_FLAG_CASELESS, _Trigger(rule, index)))
            else:
                out.append((rule.pattern, flags, _Trigger(rule, index)))
    return out


def _class_led(expr: str, rule: Rule) -> bool:
    """A pii/encoded trigger made of character classes only: no literal byte that every match
    contains, so hyperscan has nothing to search for first and runs an automaton over every
    byte. Those go to the character-class database; a pii trigger with a required literal
    (the '-' of an SSN, the ')' '-' '.' of a NANP number) goes to the literal one, where
    hyperscan checks the digits around each separator instead (measured on the generated
    build log: 0.4 ms/MB less for both passes together). Secret triggers always carry a
    literal (prefix or keyword) even when written with a class in front."""
    return rule.kind in ("pii", "encoded") and not _required_literal(expr)


def _required_literal(expr: str) -> bool:
    """Every match of `expr` contains some literal byte outside a character class (read
    with Python's regex parser; unreadable means no)."""
    import re._constants as c
    import re._parser as sre_parse

    def seq(tokens) -> bool:
        return any(one(op, av) for op, av in tokens)

    def one(op, av) -> bool:
        if op is c.LITERAL:
            return True
        if op is c.SUBPATTERN:
            return seq(av[-1])
        if op is c.BRANCH:
            return all(seq(alt) for alt in av[1])
        if op in (c.MAX_REPEAT, c.MIN_REPEAT):
            return av[0] >= 1 and seq(av[2])
        return False
    try:
        return seq(sre_parse.parse(expr))
    except Exception:  # noqa: BLE001 - any doubt: treat as class-led (the old default)
        return False


def _try_compile(exprs, ids, som):
    db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    db.compile(expressions=[e.encode() for e, _, _ in exprs], ids=ids, elements=len(exprs),
               flags=[f | (hyperscan.HS_FLAG_SOM_LEFTMOST if s else 0) for (_, f, _), s in zip(exprs, som)])
    return db


def _build(exprs, ids):
    """Compile with start-of-match reporting for secret/pii triggers where hyperscan can
    (SOM lets the confirming regex start at the trigger instead of max_len before it);
    expressions too large for SOM (long bounded repeats) are compiled without it."""
    som = [t.rule.kind in ("secret", "pii") for _, _, t in exprs]
    try:
        return _try_compile(exprs, ids, som), som
    except hyperscan.error:
        pass
    for i, wanted in enumerate(som):
        if wanted:
            try:
                _try_compile([exprs[i]], [ids[i]], [True])
            except hyperscan.error:
                som[i] = False
    try:
        return _try_compile(exprs, ids, som), som
    except hyperscan.error as e:
        raise ScanError(f"scanner rules do not compile for hyperscan: {e} "
                        f"(rules: {', '.join(t.rule.id for _, _, t in exprs)})") from None


_BUILD_ID = None


def _hs_build() -> str:
    """What a compiled database depends on besides its expressions: the hyperscan library's
    version and the CPU features it compiles for (db.info() of a one-literal probe, e.g.
    "Version: 5.4.12 Features: AVX2 Mode: BLOCK"). The binding's version alone does not pin
    them: the same binding links different library builds, and a database compiled for
    other CPU features must never be reused. Computed once per process (~3 ms)."""
    global _BUILD_ID
    if _BUILD_ID is None:
        probe = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        probe.compile(expressions=[b"a"], ids=[0], elements=1, flags=[0])
        _BUILD_ID = _info_id(probe)
    return _BUILD_ID


def _info_id(db) -> str:
    """The library version and feature string of a database, without its mode."""
    info = db.info()
    info = info.decode("ascii", "replace") if isinstance(info, bytes) else str(info)
    return " ".join(info.split("Mode:")[0].split())


def _compile(exprs, ids, key: str, use_cache: bool):
    """Compile, or load from the on-disk cache keyed by the rules hash, one block database;
    returns (database, per-expression SOM flags).

    The cache matters for `sandboxctl scan` startup: compiling the default rules takes
    about 2 s, loading them a few ms. Files are private to the user and only trusted when
    owned by us and not group/other-writable (a swapped database would blind the scanner)."""
    # the key names exactly what is compiled (expressions, flags, ids), not only the rules: a
    # cache written by an engine that grouped the triggers differently is never loaded
    what = hashlib.sha256(repr([(e, f) for e, f, _ in exprs] + [ids]).encode()).hexdigest()[:16]
    # ... and the library build that compiled it: binding version, library version and CPU
    # features (a database built for AVX2 must not be loaded by a build without it, and a
    # library upgrade recompiles instead of trusting its loader to refuse old databases)
    build = _hs_build()
    lib = hashlib.sha256(build.encode()).hexdigest()[:12]
    path = _cache_dir() / f"scan-{key}-{what}-hs{hyperscan.__version__}-{lib}.db"
    if use_cache:
        try:
            st = path.stat()
            if st.st_uid == os.geteuid() and not st.st_mode & 0o022:
                blob = path.read_bytes()
                som = [c == 0x31 for c in blob[:len(exprs)]]
                db = hyperscan.loadb(blob[len(exprs):], hyperscan.HS_MODE_BLOCK)
                if _info_id(db) == build:
                    return db, som
        except (OSError, hyperscan.error):
            pass                      # missing or unusable cache: compile
    db, som = _build(exprs, ids)
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(bytes(0x31 if x else 0x30 for x in som) + hyperscan.dumpb(db))
            os.replace(tmp, path)
        except OSError:
            pass                      # a read-only home only costs compile time
    return db, som


class Scanner:
    """A compiled rule set, shared by all streams and threads (scratch space is per thread);
    a ScanStream belongs to one output and is used from one thread at a time."""

    def __init__(self, rules: list[Rule], *, expected_output: int | None = None,
                 binary: str | None = None, max_depth: int = MAX_DEPTH, cache: bool = True):
        if binary not in (None, "block", "flag", "allow"):
            raise ScanError(f"binary must be block, flag or allow, got {binary!r}")
        rules = [self._with_binary_action(r, binary) for r in rules]
        self.rules = [r for r in rules if r is not None]
        if not any(r.kind in ("secret", "pii") for r in self.rules):
            raise ScanError("a scanner needs at least one secret or pii rule")
        self.expected_output = expected_output
        self.max_depth = max_depth
        self.volume_rule = next((r for r in self.rules if r.kind == "volume"),
                                Rule(id="volume", kind="volume", severity="medium", action="flag"))
        exprs = _expressions(self.rules)
        self._triggers = [t for _, _, t in exprs]
        key = rules_hash(self.rules)
        self._dbs = []
        self._class_db = None       # the character-class database, see ScanStream._scan
        for group, wanted in enumerate((False, True)):
            ids = [i for i, (e, _, t) in enumerate(exprs) if _class_led(e, t.rule) == wanted]
            if ids:
                db, som = _compile([exprs[i] for i in ids], ids, f"{key}-{group}", cache)
                for i, flag in zip(ids, som):
                    self._triggers[i].som = flag
                if wanted:
                    self._class_db = db
                else:
                    self._dbs.append(db)
        class_exprs = [e for e, _, t in exprs if _class_led(e, t.rule)]
        self._class_margin = _margin(class_exprs)
        if self._class_margin is None and self._class_db is not None:
            self._dbs.append(self._class_db)   # unbounded trigger: rescan it all, like the rest
            self._class_db = None
        # The triggers of one rule with the same SOM setting confirm together (e.g. the
        # aws_secret and secret_access_key keywords in one AWS_SECRET_ACCESS_KEY): one regex
        # run covers them all. Hyperscan ids map to such groups, numbered in rule order, so
        # the match callback files each trigger under its group directly.
        groups = sorted({(t.index, not t.som) for t in self._triggers})
        number = {g: n for n, g in enumerate(groups)}
        self._group_of = [number[(t.index, not t.som)] for t in self._triggers]
        self._groups = [None] * len(groups)
        for i, t in enumerate(self._triggers):
            if self._groups[self._group_of[i]] is None:
                self._groups[self._group_of[i]] = _Group(t)
        self._class_groups = frozenset(self._group_of[i] for i, (e, _, t) in enumerate(exprs)
                                       if _class_led(e, t.rule))
        if self._class_groups & frozenset(self._group_of[i] for i, (e, _, t) in enumerate(exprs)
                                          if not _class_led(e, t.rule)) and self._class_db is not None:
            self._dbs.append(self._class_db)   # a group fed by both databases: no shortcut
            self._class_db = None
        self._local = threading.local()     # hyperscan scratch space is per thread
        self._rejected: set = set()         # see _valid
        self._quiet: set = set()            # see QUIET_BYTES
        self._quiet_bytes = 0
        self.window = max([r.max_len for r in self.rules if r.kind != "volume"] + [64]) + SLACK

    @staticmethod
    def _with_binary_action(rule: Rule, binary):
        if rule.kind != "binary" or binary is None:
            return rule
        if binary == "allow":
            return None
        return Rule(**{**rule.__dict__, "action": binary})

    @classmethod
    def from_policy(cls, scanner_policy, **kw) -> "Scanner":
        """From a ScannerPolicy (policy.scanner): its rule files, expected_output and binary."""
        return cls(load_rules(scanner_policy.rules), expected_output=scanner_policy.expected_output,
                   binary=scanner_policy.binary, **kw)

    def stream(self, salt: bytes = b"") -> "ScanStream":
        return ScanStream(self, salt)

    def scan(self, data: bytes, salt: bytes = b"") -> ScanResult:
        """Scan one complete buffer (feed + finish)."""
        s = self.stream(salt)
        first = s.feed(data)
        last = s.finish()
        return ScanResult(first.released + last.released, first.findings + last.findings,
                          s.blocked)

    # -- the block scan -------------------------------------------------------------------

    def _hits(self, buf: bytes, class_from: int = 0, carried=()) -> dict:
        """{trigger group: [(from, to), ...]} of every hyperscan database over buf.

        The character-class database (bounded triggers, at most _class_margin - 1 bytes
        long) may skip what a stream already scanned: with class_from > 0 it scans only from
        class_margin bytes before class_from and keeps triggers ending after class_from;
        `carried` (group, from, to) supplies the earlier ones (ScanStream._scan)."""
        hits: dict = {}
        get = hits.get
        group_of = self._group_of

        def on(i, frm, to, _flags, _ctx):
            g = group_of[i]
            got = get(g)
            if got is None:
                hits[g] = [(frm, to)]
            else:
                got.append((frm, to))

        scratches = getattr(self._local, "scratches", None)
        if scratches is None:
            scratches = self._local.scratches = (
                [hyperscan.Scratch(db) for db in self._dbs],
                hyperscan.Scratch(self._class_db) if self._class_db is not None else None)
        for db, scratch in zip(self._dbs, scratches[0]):
            db.scan(buf, match_event_handler=on, scratch=scratch)
        if self._class_db is None:
            return hits
        if class_from <= 0:
            self._class_db.scan(buf, match_event_handler=on, scratch=scratches[1])
            return hits
        lo = class_from - self._class_margin
        if lo < 0:
            lo = 0

        def on_part(i, frm, to, _flags, _ctx):
            to += lo
            if to > class_from:
                g = group_of[i]
                got = get(g)
                if got is None:
                    hits[g] = [(frm + lo, to)]
                else:
                    got.append((frm + lo, to))

        self._class_db.scan(memoryview(buf)[lo:], match_event_handler=on_part, scratch=scratches[1])
        for g, frm, to in carried:
            got = get(g)
            if got is None:
                hits[g] = [(frm, to)]
            else:
                got.append((frm, to))
        return hits

    def find(self, buf: bytes, depth: int = 0, detect_binary: bool = True,
             limit: int | None = None) -> list:
        """Confirmed findings in one buffer: list of (start, end, rule, value, encoding);
        with `limit`, not necessarily those starting at or after it (see _found)."""
        hits = self._hits(buf)
        if not hits:
            return []
        return self._found(buf, hits, depth, detect_binary, limit)

    def _found(self, buf: bytes, hits: dict, depth: int, detect_binary: bool,
               limit: int | None = None) -> list:
        """Confirm the triggers in `hits`. With a `limit`, findings that would start at or
        after it are not wanted (a stream holds them back and finds them again in its next
        scan): triggers that can only produce such findings are not confirmed at all. Exact,
        since no finding of theirs could end before the limit or straddle it."""
        groups = self._groups
        found: list = []
        pending = []              # encoded candidates: rescanned together, below
        for g in sorted(hits):
            group = groups[g]
            ends = hits[g]
            if limit is not None:
                at, bound = group.at, limit + group.reach
                ends = [e for e in ends if e[at] < bound]
                if not ends:
                    continue
            kind = group.kind
            if kind == "encoded":
                if depth < self.max_depth:
                    slot: list = []
                    cands = self._candidates(buf, group.trig, ends, slot, depth)
                    if cands:
                        found.append(slot)       # keeps rule order for _resolve's ties
                        pending += cands
            elif kind == "binary":
                if detect_binary:
                    found += _binary(buf, min(ends)[1], group.rule)
            else:
                found += _confirm(buf, group, ends, self._rejected)
        if not pending:
            return _resolve(found)
        results = self._find_many([c[2] for c in pending], depth + 1)
        for (start, end, _decoded, decoder, slot, key), inner_found in zip(pending, results):
            if not inner_found:
                self._remember_quiet(key)
            for _s, _e, inner, value, enc in inner_found:
                slot.append((start, end, inner, value, (decoder,) + enc))
        flat = []
        for f in found:
            if type(f) is list:
                flat += f
            else:
                flat.append(f)
        return _resolve(flat)

    def _candidates(self, buf, trig, ends, slot, depth) -> list:
        """Decoded text runs of one encoded rule: (start, end, decoded, decoder, slot, key).
        Runs this scanner already decoded to nothing worth reporting at this depth (key in
        _quiet) are skipped without decoding them again."""
        out, done = [], -1
        rule = trig.rule
        span, from_raw = SPAN[rule.decoder], FROM_RAW[rule.decoder]
        quiet = self._quiet
        for _, to in sorted(ends):
            if to <= done:
                continue
            start, end, raw = span(buf, to, trig.trig_len, rule.max_len)
            # min_len: the one check below that depends on the rule, not on the bytes (two
            # rules of a decoder may differ in it: quiet for one is not quiet for the other)
            key = (rule.decoder, rule.min_len, depth, raw)
            if key in quiet:
                done = end
                continue
            decoded = from_raw(raw)
            if decoded is None:
                continue
            done = end
            if (len(decoded) < rule.min_len or not is_text(decoded, 0.8)
                    or len(decoded) == end - start and decoded == buf[start:end]):
                self._remember_quiet(key)
                continue
            out.append((start, end, decoded, rule.decoder, slot, key))
        return out

    def _remember_quiet(self, key) -> None:
        if self._quiet_bytes > QUIET_BYTES:
            self._quiet.clear()
            self._quiet_bytes = 0
        self._quiet.add(key)
        self._quiet_bytes += len(key[-1]) + 100

    def _find_many(self, texts: list, depth: int) -> list:
        """find() of each text (no binary detection), with ONE hyperscan pass per database
        over all of them: a feed's decoded texts (~6 per 64 KiB of build log, each a few
        hundred bytes) cost one call instead of one per text. They are joined with SEP, which
        no trigger can match across (see SEP); each trigger goes to the text it ends in, and
        confirmation runs on that text alone, exactly as a separate scan would."""
        if len(texts) == 1:
            return [self.find(texts[0], depth, detect_binary=False)]
        joined = SEP.join(texts)
        hits = self._hits(joined)
        out = [[] for _ in texts]
        if not hits:
            return out
        bounds, at = [], 0
        for t in texts:
            bounds.append((at, at + len(t)))
            at += len(t) + len(SEP)
        starts = [b[0] for b in bounds]
        per_text: list = [None] * len(texts)
        for g, ends in hits.items():
            for frm, to in ends:
                k = bisect_right(starts, to - 1) - 1     # the text holding byte to - 1
                lo, hi = bounds[k]
                if to > hi:
                    continue                             # ends in a separator: no text's own
                d = per_text[k]
                if d is None:
                    d = per_text[k] = {}
                d.setdefault(g, []).append((frm - lo if frm > lo else 0, to - lo))
        for k, d in enumerate(per_text):
            if d is not None:
                out[k] = self._found(texts[k], d, depth, False)
        return out


def _margin(exprs) -> int | None:
    """More than the longest match of any of these hyperscan expressions (read with Python's
    regex parser, which agrees with hyperscan on these plain classes and repeats), or None
    if one is unbounded or not readable."""
    import re._parser as sre_parse
    longest = 0
    for e in exprs:
        try:
            width = sre_parse.parse(e).getwidth()[1]
        except Exception:  # noqa: BLE001 - any doubt: no shortcut
            return None
        if width >= sre_parse.MAXREPEAT or width > 4096:
            return None
        longest = max(longest, width)
    return longest + 8


class _Group:
    """The triggers of one rule with one SOM setting, and what confirming them needs,
    worked out once per scanner instead of once per buffer."""
    __slots__ = ("trig", "rule", "kind", "index", "som", "search", "group", "back", "ahead",
                 "back_rx", "skip", "at", "reach")

    def __init__(self, trig: _Trigger):
        rule = trig.rule
        self.trig, self.rule, self.kind, self.index, self.som = trig, rule, rule.kind, trig.index, trig.som
        self.search = self.group = self.back_rx = self.skip = None
        self.back = self.ahead = 0
        # how far before a trigger a finding from it can start: before hit[at] - reach
        # (at 0: the trigger's start, with SOM; at 1: its end). See Scanner._found's limit.
        self.at, self.reach = 1, 1                      # binary: the control byte's window
        if rule.kind == "encoded":                      # the run starts trig_len before the
            self.reach = trig.trig_len or rule.max_len  # end (percent: a token around it)
        if rule.kind not in ("secret", "pii"):
            return
        self.at, self.reach = (0, rule.lookback) if trig.som else (1, rule.max_len + SLACK)
        rx = rule.regex
        self.search = rx.search
        self.group = "secret" if "secret" in rx.groupindex else 0
        if trig.som:                  # the match starts near the trigger's start
            self.back, self.ahead = rule.lookback, rule.max_len + SLACK
            self.back_rx = rule.back_regex
            for v in rule.validators:
                self.skip = AT_TRIGGER.get(v) or self.skip
        else:                         # it contains the trigger's end, at most max_len long
            self.back = self.ahead = rule.max_len + SLACK


def _confirm(buf: bytes, grp: _Group, hits: list, rejected: set) -> list:
    """Run the rule's regex from each trigger (from its start with SOM, else from max_len
    before its end) and keep the values that pass the checks. Runs once per trigger hit
    that survives the hyperscan pass, so the loop avoids builtin calls (max/min) and named
    group lookups it does not need."""
    rule, index, som = grp.rule, grp.index, grp.som
    search, group, back, ahead, back_rx, skip = grp.search, grp.group, grp.back, grp.ahead, grp.back_rx, grp.skip
    out, covered = [], -1
    for frm, to in sorted(hits):
        if to <= covered:
            continue                  # inside a match already confirmed
        if skip is not None and skip(buf, frm):
            continue                  # every match through this trigger would be rejected
        anchor = frm if som else to
        pos = anchor - back if anchor > back else 0
        if back_rx is not None:       # the match can only start where the run of
            pos = frm - back_rx.match(buf[pos:frm][::-1]).end()    # lookback_chars does
        hi = anchor + ahead           # endpos past the buffer's end is clamped by re
        while pos <= to:              # search, not finditer: stop once past this trigger
            m = search(buf, pos, hi)
            if m is None:
                break
            ms, me = m.span()
            if ms > to:
                break
            pos = me if me > ms else ms + 1
            if me > covered:
                covered = me
            vs, ve = m.span(group)
            if vs < 0:
                continue
            value = buf[vs:ve]
            if _valid(rule, index, value, m.group(), rejected):
                out.append((vs, ve, rule, value, ()))
    return out


# A scanner remembers values its rules' checks rejected, so a build log repeating the same
# author e-mail, documentation key or digest does not re-run the validators on every line.
# Only REJECTED values (benign by the rule's own checks, never secrets) are kept, keyed by
# the rule's index in that scanner (ids may mean other checks in another scanner); bounded;
# shared by the scanner's threads (set add/contains are atomic under the GIL).
REJECTED_MAX = 4096
# ... and encoded runs (decoder, the rule's min_len, depth, the encoded bytes) that decoded to
# nothing worth reporting: not text, too short for the rule, or text without findings. The
# decoded text and its findings depend on those bytes and the depth alone, so the same run
# seen again (the same base64 config blob in every deploy log line) is skipped without
# decoding or rescanning it. Only quiet runs are kept, never one with a finding; bounded by
# the bytes held (cleared when over).
QUIET_BYTES = 1 << 20


def _valid(rule: Rule, index: int, value: bytes, match: bytes, rejected: set) -> bool:
    """Cheapest checks first: validators are mostly one regex, entropy counts every byte."""
    key = (index, value, match)
    if key in rejected:
        return False
    if (not all(VALIDATORS[v](value, match) for v in rule.validators)
            or (rule.placeholders and is_placeholder(value))
            or (rule.entropy and shannon_entropy(value) < rule.entropy)):
        if len(rejected) >= REJECTED_MAX:
            rejected.clear()
        rejected.add(key)
        return False
    return True


def _binary(buf: bytes, first: int, rule: Rule) -> list:
    """A control byte was seen at `first` (the trigger reports only the first one): binary if
    a NUL follows, or a 1 KiB window from there on holds more than 8% control bytes (a stray
    bell or backspace in a terminal UI stays text)."""
    nul = buf.find(b"\x00", max(0, first - 1))
    if nul >= 0:
        return [(nul, nul + 1, rule, b"\x00", ())]
    for lo in range(max(0, first - 1), len(buf), BINARY_WINDOW):
        window = buf[lo:lo + BINARY_WINDOW]
        if len(window.translate(None, _NOT_CONTROL)) > max(len(window), BINARY_WINDOW // 4) * BINARY_RATIO:
            return [(lo, lo + 1, rule, b"", ())]
    return []


def _stronger(k, f) -> bool:
    """k outranks f: higher action, then secret over pii, then longer, then earlier rule."""
    return ((ACTION_RANK[k[2].action], k[2].kind == "secret", k[1] - k[0])
            >= (ACTION_RANK[f[2].action], f[2].kind == "secret", f[1] - f[0]))


def _resolve(found: list) -> list:
    """Drop duplicates and findings inside a stronger one (the same token matched by a
    specific rule and the generic assignment rule is reported once, by the stronger).
    Linear in the number of findings outside clusters of overlapping spans."""
    if len(found) < 2:
        return found
    uniq: dict = {}
    for f in found:                       # found is in rule order: earlier rules win ties
        uniq.setdefault((f[0], f[1], f[2].id), f)
    ordered = sorted(uniq.values(), key=lambda f: (f[0], -f[1]))
    kept, cluster, reach = [], [], -1
    for f in ordered + [None]:
        if f is None or f[0] >= reach:    # a new cluster of overlapping spans starts
            kept += [g for g in cluster if not any(
                h is not g and h[0] <= g[0] and g[1] <= h[1] and _stronger(h, g)
                and not (_stronger(g, h) and cluster.index(g) < cluster.index(h))
                for h in cluster)]
            cluster, reach = [], -1
        if f is not None:
            cluster.append(f)
            reach = max(reach, f[1])
    return kept


class ScanStream:
    """One output stream (stdout, stderr, a file). feed() chunks of any size, then finish()."""

    def __init__(self, scanner: Scanner, salt: bytes):
        self.scanner = scanner
        self.salt = bytes(salt)
        self.blocked = False
        self.total = 0              # bytes fed
        self._ctx = b""             # last released bytes (lookbehind context only)
        self._tail = b""            # held back, not yet released
        self._tail_at = 0           # stream offset of _tail[0]
        self._binary_seen = False
        self._volume_seen = False
        self._finished = False
        self._keep = None
        self._class_at = 0          # stream bytes the character-class database has seen
        self._class_carry = []      # its triggers that end in the held-back bytes

    def feed(self, chunk: bytes) -> ScanResult:
        if self._finished:
            raise ScanError("feed() after finish() on a scan stream")
        self.total += len(chunk)
        extra = self._volume()
        if len(self._tail) + len(chunk) <= 2 * self.scanner.window:
            # buffer until a scan can release at least `window` bytes: a writer trickling
            # single bytes costs O(1) scanning per byte, not O(window)
            self._tail += chunk
            return self._result(b"", extra)
        return self._scan(chunk, final=False, extra=extra)

    def finish(self) -> ScanResult:
        """Scan and release the held-back tail. The stream is done afterwards."""
        if self._finished:
            return ScanResult(b"", [], self.blocked)
        self._finished = True
        try:
            return self._scan(b"", final=True, extra=[])
        finally:
            self._keep, self._ctx = None, b""

    def _volume(self) -> list:
        limit = self.scanner.expected_output
        if limit is None or self._volume_seen or self.total <= limit:
            return []
        self._volume_seen = True
        r = self.scanner.volume_rule
        return [Finding(r.id, r.kind, r.severity, r.action, limit, self.total,
                        preview=f"{self.total} bytes > {limit}")]

    def _scan(self, chunk: bytes, final: bool, extra: list) -> ScanResult:
        ctx = self._ctx
        buf = b"".join((ctx, self._tail, chunk))      # one copy of the chunk, not two
        base = self._tail_at - len(ctx)
        cut = len(buf) if final else len(buf) - self.scanner.window
        # findings starting at or after the cut are held back and found again next time:
        # the scanner does not confirm triggers that can only produce those
        sc = self.scanner
        # the character-class triggers in the held-back bytes were found by the last scan:
        # carried over instead of scanned again (that database is the costly one)
        class_from = self._class_at - base if sc._class_db is not None else 0
        carried = [(g, frm - base if frm > base else 0, to - base) for g, frm, to in self._class_carry]
        hits = sc._hits(buf, class_from, carried)
        found = sc._found(buf, hits, 0, not self._binary_seen,
                          None if final else max(cut, len(ctx))) if hits else []
        found = [f for f in found if f[0] >= len(ctx)]
        moved = True
        while moved:                 # never release part of a match
            moved = False
            for s, e, *_ in found:
                if s < cut < e:
                    cut, moved = s, True
        cut = max(cut, len(ctx))
        now = [f for f in found if f[1] <= cut]
        findings = extra + [self._finding(f, base) for f in now]
        if any(f.kind == "binary" for f in findings):
            self._binary_seen = True
        if any(f.blocks for f in findings):
            self.blocked = True
        released = b"" if self.blocked else _redact(buf, len(ctx), cut, now)
        self._ctx = buf[max(0, cut - CONTEXT):cut]
        self._tail = buf[cut:]
        self._tail_at = base + cut
        if sc._class_db is not None:
            keep_from = base + cut - len(self._ctx)      # the next scan's buffer starts here
            self._class_at = base + len(buf)
            self._class_carry = [(g, base + frm, base + to) for g in sc._class_groups.intersection(hits)
                                 for frm, to in hits[g] if base + to > keep_from]
        # Keep a large scan's buffers until the next scan: freed here, together with the
        # caller's chunk they leave more than glibc's trim threshold free at the top of the
        # heap, which it hands back to the kernel and faults in again on the next feed
        # (bench_scan.py, 1 MiB chunks: ~740 -> ~35 page faults per MB, 124 -> 158 MB/s cpu in
        # one interleaved run). Small scans reuse heap memory anyway: nothing is kept for them.
        self._keep = (buf, released) if len(buf) > KEEP_MIN else None
        return self._result(released, findings)

    def _result(self, released, findings) -> ScanResult:
        if any(f.blocks for f in findings):
            self.blocked = True
        return ScanResult(b"" if self.blocked else released, findings, self.blocked)

    def _finding(self, f, base) -> Finding:
        start, end, rule, value, enc = f
        return Finding(rule.id, rule.kind, rule.severity, rule.action, base + start, base + end,
                       salted_hash(self.salt, value), masked_preview(value), enc)


def _redact(buf: bytes, lo: int, hi: int, found: list) -> bytes:
    spans = sorted((s, e, r.id) for s, e, r, _, _ in found if r.action == "redact")
    if not spans:
        return buf[lo:hi]
    out, pos = [], lo
    for s, e, rid in spans:
        if e <= pos:
            continue
        out.append(buf[pos:max(pos, s)])
        out.append(b"[REDACTED:" + rid.encode() + b"]")
        pos = e
    out.append(buf[pos:hi])
    return b"".join(out)

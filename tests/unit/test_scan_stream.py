"""Streaming semantics of the scanner: matches across every chunk boundary, hold-back and
release, block/redact/flag, binary and volume, and findings that never carry the secret."""
import dataclasses
import json

import pytest

from sandbox.errors import ScanError
from sandbox.scan import Scanner, load_rules
from tests.helpers import fakes

RULES = load_rules()
FILLER = (b"gcc -O2 -Wall -c src/module.c -o build/module.o\n"
          b"tests/test_io.py::test_roundtrip PASSED [ 42%]\n"
          b"commit 3f9a1c2e8b7d6f5a4c3b2a1908f7e6d5c4b3a291\n")


def small_window_rules():
    """Rules whose max_len keeps the window small, so streams of a few KiB cross many cuts."""
    out = []
    for r in RULES:
        if r.kind == "encoded":
            out.append(dataclasses.replace(r, max_len=512))
        elif r.max_len <= 600:
            out.append(r)
    return out


@pytest.fixture(scope="module")
def small():
    return Scanner(small_window_rules())


@pytest.fixture(scope="module")
def full():
    return Scanner(RULES)


def feed_chunks(scanner, data, sizes, salt=b"s"):
    stream = scanner.stream(salt)
    released, findings, pos, i = [], [], 0, 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        out = stream.feed(data[pos:pos + size])
        released.append(out.released)
        findings += out.findings
        pos, i = pos + size, i + 1
    out = stream.finish()
    return b"".join(released) + out.released, findings + out.findings, stream.blocked


def summary(findings):
    return sorted((f.rule_id, f.start, f.end, f.hash, f.encoding) for f in findings)


def padded(secret, before=12, after=12):
    return FILLER * before + b"key: " + secret + b"\n" + FILLER * after


def assert_same_release(got, ref, data):
    """Unblocked: byte-identical output. Blocked: what left before the block is a clean
    prefix of the input that stops before the secret (how much depends on the chunking)."""
    released, _, blocked = got
    assert blocked == ref[2]
    if blocked:
        assert data.startswith(released)
        assert len(released) <= min(f.start for f in ref[1] if f.action == "block")
    else:
        assert released == ref[0]


def test_window_is_the_longest_rule(small, full):
    assert full.window >= max(r.max_len for r in RULES)
    assert small.window < 1200


@pytest.mark.parametrize("rule_id", ["github-token", "email", "url-credentials", "credit-card",
                                     "aws-secret-access-key", "generic-assignment"])
def test_match_split_at_every_boundary(small, rule_id):
    value = fakes.FAKES[rule_id]()
    data = padded(value, before=8, after=4)
    ref = feed_chunks(small, data, [len(data)])
    assert any(f.rule_id == rule_id for f in ref[1])
    for split in range(1, len(data)):
        got = feed_chunks(small, data, [split, len(data)])
        assert summary(got[1]) == summary(ref[1]), f"split at {split}"
        assert_same_release(got, ref, data)


@pytest.mark.parametrize("rule_id", ["github-token", "email", "slack-token", "us-ssn"])
def test_byte_by_byte_and_every_chunk_size(small, rule_id):
    value = fakes.FAKES[rule_id]()
    data = padded(value, before=6, after=3)
    ref = feed_chunks(small, data, [len(data)])
    assert [f.rule_id for f in ref[1]] == [rule_id]
    assert data[ref[1][0].start:ref[1][0].end] == value
    for sizes in [[1]] + [[k] for k in range(2, 700, 13)] + [[3, 1, 250, 7]]:
        got = feed_chunks(small, data, sizes)
        assert summary(got[1]) == summary(ref[1]), sizes
        assert_same_release(got, ref, data)


def test_encoded_secret_split_at_every_boundary(small):
    import base64
    encoded = base64.b64encode(b"export GITHUB_TOKEN=" + fakes.gh_token())
    data = padded(encoded, before=8, after=3)
    ref = feed_chunks(small, data, [len(data)])
    assert [(f.rule_id, f.encoding) for f in ref[1]] == [("github-token", ("base64",))]
    start = data.index(encoded)
    assert (ref[1][0].start, ref[1][0].end) == (start, start + len(encoded))
    for split in range(1, len(data)):
        assert summary(feed_chunks(small, data, [split, len(data)])[1]) == summary(ref[1]), split


def test_private_key_split_with_the_full_rule_set(full):
    data = FILLER * 200 + fakes.pem_private_key() + FILLER * 40
    ref = feed_chunks(full, data, [len(data)])
    assert [f.rule_id for f in ref[1]] == ["private-key"] and ref[2]
    for split in range(1, len(data), 97):
        got = feed_chunks(full, data, [split, 4096])
        assert (summary(got[1]), got[2]) == (summary(ref[1]), True), split


def test_offsets_are_stream_offsets(small):
    token = fakes.gh_token()
    data = FILLER * 30 + token + b"\n"
    _, findings, _ = feed_chunks(small, data, [100])
    assert [(f.start, f.end) for f in findings] == [(data.index(token), data.index(token) + len(token))]


def test_block_releases_nothing_more(small):
    stream = small.stream(b"s")
    first = stream.feed(FILLER * 30)
    assert first.released and not first.blocked
    hit = stream.feed(b"token " + fakes.gh_token() + b"\n" + FILLER * 30)
    after = stream.feed(FILLER * 30)
    last = stream.finish()
    assert hit.blocked and after.blocked and last.blocked and stream.blocked
    assert hit.released == after.released == last.released == b""
    assert [f.rule_id for f in hit.findings] == ["github-token"]


def test_redact_replaces_the_value_only(full):
    mail, pw = fakes.email(), fakes.url_with_password()
    data = b"contact " + mail + b" now\nconnect " + pw + b"\n"
    out = full.scan(data)
    assert not out.blocked
    assert mail not in out.released and b"[REDACTED:email]" in out.released
    assert b"contact [REDACTED:email] now\n" in out.released
    assert b"[REDACTED:url-credentials]@db." in out.released
    assert out.released.endswith(b":5432/app\n")


def test_flag_releases_unchanged():
    rules = [dataclasses.replace(r, action="flag") if r.id == "email" else r for r in RULES]
    scanner = Scanner(rules)
    data = b"mail " + fakes.email() + b"\n"
    out = scanner.scan(data)
    assert out.released == data and not out.blocked
    assert [(f.rule_id, f.action) for f in out.findings] == [("email", "flag")]


@pytest.mark.parametrize("binary", ["block", "flag", "allow"])
def test_nul_bytes_are_binary(binary):
    scanner = Scanner(RULES, binary=binary)
    data = FILLER + b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256)) + FILLER
    out = scanner.scan(data)
    kinds = [f.kind for f in out.findings]
    if binary == "allow":
        assert kinds == [] and out.released == data
    else:
        assert kinds == ["binary"]
        assert out.blocked is (binary == "block")
        assert out.released == (b"" if binary == "block" else data)


def test_mostly_control_bytes_without_nul_are_binary(full):
    data = FILLER + bytes(b % 31 + 1 for b in range(2000)) + FILLER
    assert [f.kind for f in full.scan(data).findings] == ["binary"]


def test_colours_and_progress_bars_are_text(full):
    data = b"\x1b[32mPASSED\x1b[0m\r[=====>   ] 50%\r[==========] 100%\t\x0cdone\n" * 50 + b"bell\x07\n"
    assert full.scan(data).findings == []


def test_binary_reported_once_per_stream(full):
    _, findings, _ = feed_chunks(full, (FILLER * 100 + b"\x00\x01\x02" * 400) * 4, [5000])
    assert [f.kind for f in findings] == ["binary"]


def test_volume_flagged_once():
    scanner = Scanner(RULES, expected_output=1000)
    released, findings, blocked = feed_chunks(scanner, FILLER * 40, [300])
    vol = [f for f in findings if f.kind == "volume"]
    assert len(vol) == 1 and vol[0].action == "flag" and vol[0].start == 1000
    assert not blocked and released == FILLER * 40


def test_from_policy_uses_the_scanner_section():
    from sandbox.policy import load_policy
    policy = load_policy("default")
    scanner = Scanner.from_policy(policy.scanner)
    assert scanner.expected_output == policy.scanner.expected_output
    assert {r.id for r in scanner.rules} >= {"github-token", "binary"}


def test_no_secret_in_any_serialised_finding(full):
    for rule_id, make in fakes.FAKES.items():
        import base64
        value = make()
        for data in (b"x " + value + b"\n", b"y " + base64.b64encode(value) + b"\n"):
            result = full.scan(data, salt=b"salt")
            assert result.findings, rule_id
            for f in result.findings:
                for text in (json.dumps(f.to_dict()), repr(f), str(f), json.dumps(f.to_jsonl()), repr(result)):
                    secret = data[f.start:f.end]
                    assert secret not in text.encode() and value not in text.encode(), rule_id


def test_salted_hash_links_within_a_salt_only(full):
    token = fakes.gh_token()
    a = full.scan(b"a " + token, salt=b"one").findings[0].hash
    b = full.scan(b"b  " + token, salt=b"one").findings[0].hash
    c = full.scan(b"a " + token, salt=b"two").findings[0].hash
    assert a == b != c and len(a) == 16


def test_feed_after_finish_is_an_error(full):
    stream = full.stream()
    stream.finish()
    with pytest.raises(ScanError):
        stream.feed(b"more")


CACHE_RULES = [r for r in RULES if r.id in ("github-token", "jwt", "email", "encoded-base64", "binary")]


def test_compiled_database_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("SANDBOXD_SCAN_CACHE", str(tmp_path))
    first = Scanner(CACHE_RULES)
    files = sorted(tmp_path.iterdir())
    assert len(files) == 2 and all(f.stat().st_mode & 0o077 == 0 for f in files)
    second = Scanner(CACHE_RULES)
    assert not second._triggers[1].som          # jwt is too large for start-of-match
    assert [t.som for t in first._triggers] == [t.som for t in second._triggers]
    data = b"x " + fakes.gh_token() + b" " + fakes.email() + b"\n"
    assert summary(first.scan(data).findings) == summary(second.scan(data).findings)


@pytest.mark.parametrize("other", ["Version: 9.9.9 Features:", "Version: {v} Features: AVX512"])
def test_cache_key_names_the_library_version_and_cpu_features(tmp_path, monkeypatch, other):
    """A database compiled by another hyperscan library, or for other CPU features, is never
    loaded: the cache file name carries both (db.info()), not only the binding's version."""
    from sandbox.scan import engine
    monkeypatch.setenv("SANDBOXD_SCAN_CACHE", str(tmp_path))
    real = engine._hs_build()
    assert real.startswith("Version: ") and "Features:" in real
    Scanner(CACHE_RULES)
    ours = sorted(tmp_path.iterdir())
    compiled = []
    build = engine._build
    monkeypatch.setattr(engine, "_build", lambda *a: compiled.append(1) or build(*a))
    Scanner(CACHE_RULES)
    assert compiled == [] and sorted(tmp_path.iterdir()) == ours     # same build: loaded
    version = real.split()[1]
    monkeypatch.setattr(engine, "_BUILD_ID", other.format(v=version))
    Scanner(CACHE_RULES)
    assert len(compiled) == 2                                       # other build: compiled
    assert len(set(tmp_path.iterdir()) - set(ours)) == 2


def test_a_cached_database_of_another_build_is_recompiled(tmp_path, monkeypatch):
    """Even under the right name, a cached database whose db.info() differs from this
    library's is compiled again rather than used."""
    from sandbox.scan import engine
    monkeypatch.setenv("SANDBOXD_SCAN_CACHE", str(tmp_path))
    Scanner(CACHE_RULES)
    compiled = []
    build = engine._build
    monkeypatch.setattr(engine, "_build", lambda *a: compiled.append(1) or build(*a))
    monkeypatch.setattr(engine, "_info_id", lambda db: "Version: 0.0.0 Features: none")
    monkeypatch.setattr(engine, "_BUILD_ID", engine._hs_build())       # name unchanged
    Scanner(CACHE_RULES)
    assert len(compiled) == 2


def test_a_cache_others_can_write_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("SANDBOXD_SCAN_CACHE", str(tmp_path))
    Scanner(CACHE_RULES)
    for f in tmp_path.iterdir():
        f.write_bytes(b"garbage")
        f.chmod(0o666)
    scanner = Scanner(CACHE_RULES)      # recompiles instead of loading the tampered files
    assert [f.rule_id for f in scanner.scan(b"t " + fakes.gh_token()).findings] == ["github-token"]


def test_mixed_log_with_every_fake_under_random_chunking(full):
    """Every rule's fake (some base64/hex-encoded) planted deep in a generated build log, far
    beyond the window from the start; random chunkings find exactly what one pass finds."""
    import base64
    import random
    r = random.Random(1234)
    lines = (FILLER * 3000).split(b"\n")
    for make in fakes.FAKES.values():
        value = make()
        value = r.choice([value, value, base64.b64encode(value), value.hex().encode()])
        lines.insert(r.randrange(len(lines) // 4, len(lines)), b"out: " + value)
    data = b"\n".join(lines)
    ref = feed_chunks(full, data, [len(data)])
    assert {f.rule_id for f in ref[1]} == set(fakes.FAKES)
    for _ in range(4):
        sizes = [r.choice([7, 100, 4000, 9000, 70000]) for _ in range(50)]
        assert summary(feed_chunks(full, data, sizes)[1]) == summary(ref[1]), sizes


def test_one_scanner_serves_many_threads(full):
    import threading
    tokens = [fakes.gh_token() for _ in range(4)]
    results, errors = {}, []

    def work(i):
        try:
            data = (FILLER * 400 + b"t " + tokens[i] + b"\n") * 3
            results[i] = feed_chunks(full, data, [5000])[1]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(results) == 4
    assert all([f.rule_id for f in fs] == ["github-token"] * 3 for fs in results.values())


def test_noreply_lookalike_email_split_at_every_boundary(small):
    """The e-mail trigger skips '@users.noreply.github.com' only when the domain ends there:
    a longer domain cut right after '.com' by a chunk boundary is still found."""
    mail = b"12345+dev@users.noreply.github.company.com"
    data = padded(mail, before=4, after=2) + b"x@users.noreply.github.com>\n"
    ref = feed_chunks(small, data, [len(data)])
    assert [(f.rule_id, f.start, f.end) for f in ref[1]] == [("email", data.index(mail), data.index(mail) + len(mail))]
    for split in range(1, len(data)):
        got = feed_chunks(small, data, [split, len(data)])
        assert summary(got[1]) == summary(ref[1]), f"split at {split}"
        assert_same_release(got, ref, data)


def test_finish_drops_the_buffers_kept_between_large_feeds(full):
    """Large feeds keep their scan buffers until the next feed (allocator reuse, see
    ScanStream._scan); finish() lets go of them, so no output bytes outlive the stream."""
    stream = full.stream(b"s")
    out = stream.feed(FILLER * 3000)
    assert stream._keep is not None and out.released
    stream.finish()
    assert stream._keep is None and stream._tail == b"" and stream._ctx == b""


def test_limit_leaves_every_finding_before_it_unchanged(full):
    """A stream's non-final scan asks find() for findings starting before its cut only
    (limit): triggers that can only yield later findings are not confirmed. Everything
    starting before the limit, straddlers included, is exactly what an unlimited find()
    returns; at least some later triggers are really skipped."""
    import base64
    import random
    r = random.Random(77)
    values = [make() for make in fakes.FAKES.values()]
    lines = (FILLER * 60).split(b"\n")
    for v in values * 2:
        v = r.choice([v, base64.b64encode(b"k=" + v), v.hex().encode()])
        lines.insert(r.randrange(len(lines)), b"out: " + v)
    buf = b"\n".join(lines)
    whole = sorted((s, e, rule.id, enc) for s, e, rule, _v, enc in full.find(buf))
    skipped = 0
    for limit in sorted(r.sample(range(len(buf)), 60)) + [f[0] for f in whole] + [f[0] + 1 for f in whole]:
        part = sorted((s, e, rule.id, enc) for s, e, rule, _v, enc in full.find(buf, limit=limit))
        assert [f for f in part if f[0] < limit] == [f for f in whole if f[0] < limit], limit
        skipped += len(part) < len(whole)
    assert skipped


@pytest.mark.parametrize("make", ["credit-card", "us-ssn", "phone-nanp", "base64", "hex"])
def test_class_triggers_carried_across_scans_at_every_boundary(small, make):
    """A stream scans the character-class trigger database (digit runs, base64/hex runs) only
    over new bytes (plus a margin longer than any such trigger) and carries the triggers it
    found in the held-back bytes: every split position finds what one pass finds. (SSN and
    NANP triggers have required separators and run in the literal database: checked too.)"""
    import base64
    value = {"base64": lambda: base64.b64encode(b"token " + fakes.gh_token()),
             "hex": lambda: (b"k=" + fakes.gh_token()).hex().encode()}.get(make, fakes.FAKES.get(make))()
    data = padded(value, before=4, after=4) + b"tail 4111 1111 1111 1111 " + padded(value, 2, 2)
    ref = feed_chunks(small, data, [len(data)])
    assert ref[1]
    assert small._class_db is not None and small._class_margin < 64
    for split in range(1, len(data), 7):
        for sizes in ([split, len(data)], [split, 5000, 3]):
            got = feed_chunks(small, data, sizes)
            assert summary(got[1]) == summary(ref[1]), (split, sizes)
            assert_same_release(got, ref, data)


def test_unbounded_class_trigger_rescans_everything():
    """With a character-class trigger of unbounded length the shortcut is off (the margin
    could not cover it) and streams rescan the held-back bytes as before."""
    import dataclasses
    rules = [dataclasses.replace(r, hs="[2-6][0-9]{3}[0-9 -]+[0-9]{4}") if r.id == "credit-card" else r
             for r in small_window_rules()]
    scanner = Scanner(rules, cache=False)
    assert scanner._class_db is None and len(scanner._dbs) == 2
    data = padded(fakes.FAKES["credit-card"](), before=30, after=30)
    ref = feed_chunks(scanner, data, [len(data)])
    assert [f.rule_id for f in ref[1]] == ["credit-card"]
    for split in range(1, len(data), 97):
        assert summary(feed_chunks(scanner, data, [split, 3000])[1]) == summary(ref[1])


def test_triggers_with_a_required_literal_run_in_the_literal_database(full):
    """Only triggers of character classes alone go to the character-class database; SSN and
    NANP triggers (required separators) are searched by their literals."""
    from sandbox.scan.engine import _required_literal
    assert _required_literal(r"[0-9]{3}-[0-9]{2}-[0-9]{4}")
    assert _required_literal(r"[2-9][0-9]{2}(?:\) ?|-|\.)[2-9][0-9]{2}[.-][0-9]{4}")
    assert not _required_literal(r"(?:^|[^0-9A-Za-z.-])[2-6][0-9]{3}[ -]?[0-9]{4}")
    assert not _required_literal(r"(?:^|[^0-9a-f])(?:[2-7][0-9a-f]|0[9aAdD]){8}")
    assert not _required_literal(r"x?[0-9]{4}")
    in_class = {t.rule.id for i, t in enumerate(full._triggers) if full._group_of[i] in full._class_groups}
    assert in_class == {"credit-card", "encoded-base64", "encoded-hex"}

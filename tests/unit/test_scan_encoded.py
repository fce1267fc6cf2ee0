"""Encoded forms: base64 (standard and URL-safe), hex and percent-encoding of every rule's
fakes are decoded and rescanned; a finding reports the span of the ENCODED text."""
import base64
import binascii

import pytest

from sandbox.scan import Scanner, load_rules
from tests.helpers import fakes

RULES = load_rules()
SECRET_RULES = [r.id for r in RULES if r.kind in ("secret", "pii")]


def percent(value: bytes) -> bytes:
    return b"".join(b"%%%02X" % c for c in value)


ENCODINGS = {
    "base64": (base64.b64encode, ("base64",)),
    "base64url": (lambda v: base64.urlsafe_b64encode(v).rstrip(b"="), ("base64",)),
    "hex": (binascii.hexlify, ("hex",)),
    "percent": (percent, ("percent",)),
    "base64-of-hex": (lambda v: base64.b64encode(binascii.hexlify(v)), ("base64", "hex")),
}


@pytest.fixture(scope="module")
def scanner():
    return Scanner(RULES)


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
@pytest.mark.parametrize("rule_id", SECRET_RULES)
def test_encoded_fakes_are_found_at_the_encoded_span(scanner, rule_id, encoding):
    encode, chain = ENCODINGS[encoding]
    encoded = encode(fakes.FAKES[rule_id]())
    data = b"$ echo " + encoded + b" | next-step\n"
    found = scanner.scan(data).findings
    start = data.index(encoded)
    hits = [f for f in found if f.rule_id == rule_id]
    assert hits, f"{rule_id}/{encoding}: found {[(f.rule_id, f.encoding) for f in found]}"
    assert all((f.start, f.end, f.encoding) == (start, start + len(encoded), chain) for f in hits)


def test_single_escape_hides_nothing(scanner):
    token = fakes.gh_token()
    data = b"url=https://x.test/?t=" + token.replace(b"_", b"%5F") + b" done\n"
    assert [(f.rule_id, f.encoding) for f in scanner.scan(data).findings] == [("github-token", ("percent",))]


def test_depth_is_bounded(scanner):
    token = fakes.gh_token()
    twice = base64.b64encode(base64.b64encode(b"GH=" + token))
    thrice = base64.b64encode(twice)
    assert [f.encoding for f in scanner.scan(twice).findings] == [("base64", "base64")]
    assert scanner.scan(thrice).findings == []          # max_depth = 2, documented
    deeper = Scanner(RULES, max_depth=3)
    assert [f.encoding for f in deeper.scan(thrice).findings] == [("base64", "base64", "base64")]


def test_encoded_redaction_covers_the_encoded_text(scanner):
    encoded = base64.b64encode(b"mail me: " + fakes.email())
    out = scanner.scan(b"note " + encoded + b" end\n")
    assert out.released == b"note [REDACTED:email] end\n"


def test_encodings_of_benign_text_and_random_bytes_are_quiet(scanner):
    import random
    r = random.Random(7)
    lines = [base64.b64encode(b"hello world, this is an ordinary config line %d" % i) for i in range(50)]
    lines += [base64.b64encode(r.randbytes(r.randint(20, 400))) for _ in range(300)]
    lines += [binascii.hexlify(r.randbytes(32)) for _ in range(300)]
    lines += [b"https://files.test/pkg/name%%20with%%20spaces-%d.tar.gz" % i for i in range(50)]
    assert scanner.scan(b"\n".join(lines)).findings == []


def test_decoded_texts_rescanned_together_find_what_separate_scans_find(scanner):
    """A buffer's decoded texts are rescanned in one hyperscan pass (joined with SEP); each
    text's findings are exactly those of scanning it alone, whatever its neighbours hold:
    texts ending in a keyword ("password", "AccountKey") next to texts starting with a value,
    fakes of every rule, benign config text."""
    import random
    r = random.Random(99)
    values = [make() for make in fakes.FAKES.values()]
    edges = [b"password", b"AccountKey", b"token: ", b"service_account", b"@", b"x" * 40,
             b"=" + fakes.rand(fakes.B62, 43).encode(), b": Abcd1234efgh5678", b"-----BEGIN"]
    texts = []
    for _ in range(200):
        parts = [r.choice(values + edges) for _ in range(r.randint(1, 3))]
        texts.append(r.choice([b" ", b"\n", b""]).join(parts))
    for _ in range(20):
        batch = r.sample(texts, r.randint(2, 12))
        together = scanner._find_many(batch, 1)
        alone = [scanner.find(t, 1, detect_binary=False) for t in batch]
        key = lambda fs: sorted((s, e, rule.id, v, enc) for s, e, rule, v, enc in fs)  # noqa: E731
        assert [key(f) for f in together] == [key(f) for f in alone]
    assert any(together) and not all(together)          # the batches mix hits and misses


def test_many_encoded_values_in_one_buffer_each_at_its_own_span(scanner):
    values = [fakes.gh_token(), fakes.email(), fakes.aws_key_id(), fakes.jwt(), fakes.ssn()]
    encoded = [base64.b64encode(b"v=" + v) for v in values]
    data = b"".join(b"blob " + e + b" ok\n" + base64.b64encode(b"ordinary config text %d" % i) + b"\n"
                    for i, e in enumerate(encoded))
    found = sorted((f.start, f.end, f.encoding) for f in scanner.scan(data).findings)
    want = sorted((data.index(e), data.index(e) + len(e), ("base64",)) for e in encoded)
    assert found == want


def test_quiet_runs_are_not_decoded_again_and_runs_with_findings_always_are(monkeypatch):
    """A scanner remembers encoded runs that decoded to nothing worth reporting (not text, or
    text without findings) and skips them when they come back; a run that holds a finding is
    never remembered, however often it repeats."""
    import sandbox.scan.engine as engine
    scanner = Scanner(RULES)
    benign = base64.b64encode(b'{"name": "build", "replicas": 3, "image": "registry.local/x:1.2"}')
    secret = base64.b64encode(b"token " + fakes.gh_token())
    decoded = []
    real = dict(engine.FROM_RAW)
    monkeypatch.setattr(engine, "FROM_RAW", {k: (lambda raw, f=f: decoded.append(raw) or f(raw))
                                             for k, f in real.items()})
    for round_ in range(3):
        decoded.clear()
        found = scanner.scan(b"data: " + benign + b"\nkey: " + secret + b"\n").findings
        assert [(f.rule_id, f.encoding) for f in found] == [("github-token", ("base64",))]
        assert decoded == [v.rstrip(b"=") for v in ([benign, secret] if round_ == 0 else [secret])]
    # the memory is bounded: past QUIET_BYTES it starts afresh
    monkeypatch.setattr(engine, "QUIET_BYTES", 0)
    scanner.scan(b"data: " + benign + b"\n")
    assert len(scanner._quiet) <= 1


def test_a_run_quiet_for_one_encoded_rule_is_still_decoded_for_another():
    """The quiet-run memory is per rule setting: a percent-encoded token shorter than one
    rule's min_len is not worth reporting for THAT rule, but another rule of the same
    decoder with a smaller min_len must still decode it (operators may add such rules)."""
    from dataclasses import replace
    base = next(r for r in RULES if r.id == "encoded-percent")
    rules = [r for r in RULES if r.id != "encoded-percent"]
    rules += [replace(base, id="encoded-percent-long", min_len=4096), base]
    scanner = Scanner(rules, cache=False)
    encoded = percent(b"token " + fakes.gh_token())
    data = b"curl -d " + encoded + b" https://x\n"
    for _ in range(2):                   # the first scan, and again with the memory filled
        found = scanner.scan(data).findings
        assert [(f.rule_id, f.encoding) for f in found] == [("github-token", ("percent",))]

"""Scanner rules: every rule finds its fake secrets and none of its hard negatives; validators;
rule-file errors. Fake secrets come from tests/helpers/fakes.py (generated at run time)."""
import pytest

from sandbox.errors import PolicyError
from sandbox.scan import Scanner, load_rules
from sandbox.scan import validators as v
from tests.helpers import fakes

RULES = load_rules()
SECRET_RULES = [r.id for r in RULES if r.kind in ("secret", "pii")]


@pytest.fixture(scope="module")
def scanner():
    return Scanner(RULES)


def test_every_secret_and_pii_rule_has_fakes_and_hard_negatives():
    assert set(SECRET_RULES) == set(fakes.FAKES) == set(fakes.HARD_NEGATIVES)


@pytest.mark.parametrize("rule_id", SECRET_RULES)
def test_rule_finds_its_fakes_in_context(scanner, rule_id):
    for _ in range(5):
        value = fakes.FAKES[rule_id]()
        data = b"2024-11-25 build step 3/7\nvalue: " + value + b" trailing words\n"
        found = scanner.scan(data).findings
        hits = [f for f in found if f.rule_id == rule_id]
        assert hits, f"{rule_id} missed its fake (found: {[f.rule_id for f in found]})"
        start = data.index(value)
        assert all(start <= f.start and f.end <= start + len(value) for f in hits)


@pytest.mark.parametrize("rule_id", SECRET_RULES)
def test_rule_ignores_its_hard_negatives(scanner, rule_id):
    for negative in fakes.HARD_NEGATIVES[rule_id]():
        found = scanner.scan(b"log line\n" + negative + b" more\n").findings
        assert not found, f"{rule_id}: hard negative reported as {[f.rule_id for f in found]}"


def test_github_and_npm_checksums():
    for _ in range(20):
        assert v.github_checksum(fakes.gh_token(), b"")
        assert not v.github_checksum(fakes.gh_token(valid=False), b"")
        assert v.github_checksum(fakes.npm_token(), b"")
    assert not v.github_checksum(b"ghp_short", b"")


@pytest.mark.parametrize("sep", ["", " ", "-"])
def test_luhn_valid_cards_block_and_invalid_ones_do_not(scanner, sep):
    for prefix in ("4", "51", "6011"):
        good, bad = fakes.card_number(sep, prefix=prefix), fakes.card_number(sep, valid=False, prefix=prefix)
        assert v.luhn(good, b"") and not v.luhn(bad, b"")
        assert [f.rule_id for f in scanner.scan(b"card " + good + b"\n").findings] == ["credit-card"]
        assert scanner.scan(b"card " + bad + b"\n").findings == []


def test_card_separators_must_be_consistent():
    digits = fakes.card_number("").decode()
    mixed = (digits[:4] + " " + digits[4:8] + "-" + digits[8:12] + " " + digits[12:]).encode()
    assert not v.card_number(mixed, b"")
    assert v.card_number(digits.encode(), b"")


@pytest.mark.parametrize("value,ok", [(b"123-12-1234", True), (b"000-12-1234", False), (b"666-12-1234", False),
                                      (b"900-12-1234", False), (b"123-00-1234", False), (b"123-12-0000", False)])
def test_ssn_rules(value, ok):
    assert v.ssn(value, b"") is ok


def test_documentation_examples_are_placeholders(scanner):
    data = (b"export AWS_ACCESS_KEY_ID=AKIA" + b"IOSFODNN7EXAMPLE\n"
            b"export AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + b"EXAMPLEKEY\n"
            b"token = <your-token>\napi_key = xxxxxxxxxxxxxxxx\npassword: 12345678901\n")
    assert scanner.scan(data).findings == []


def test_entropy():
    assert v.shannon_entropy(b"aaaaaaaa") == 0
    assert v.shannon_entropy(bytes(range(256))) == 8


def test_bad_rule_files_fail_closed(tmp_path):
    cases = {
        "unknown validator": '[[rule]]\nid = "x-rule"\nkind = "secret"\npattern = "abc"\nvalidators = ["nope"]\n',
        "bad kind": '[[rule]]\nid = "x-rule"\nkind = "weird"\npattern = "abc"\n',
        "bad regex": '[[rule]]\nid = "x-rule"\nkind = "secret"\npattern = "(abc"\n',
        "unknown field": '[[rule]]\nid = "x-rule"\nkind = "secret"\npattern = "abc"\ncolour = "red"\n',
        "bad action": '[[rule]]\nid = "x-rule"\nkind = "secret"\npattern = "abc"\naction = "shrug"\n',
        "no rules": 'title = "empty"\n',
        "lookback_chars not a class": '[[rule]]\nid = "x-rule"\nkind = "secret"\npattern = "abc"\nlookback_chars = "ab"\n',
        "lookback_chars two classes": '[[rule]]\nid = "x-rule"\nkind = "secret"\npattern = "abc"\nlookback_chars = "[a][b]"\n',
    }
    for why, text in cases.items():
        path = tmp_path / "bad.toml"
        path.write_text(text)
        with pytest.raises(PolicyError):
            load_rules([str(path)])
        assert why


def test_duplicate_rule_ids_across_files_are_refused(tmp_path):
    path = tmp_path / "extra.toml"
    path.write_text('[[rule]]\nid = "email"\nkind = "pii"\npattern = "x@y"\n')
    with pytest.raises(PolicyError, match="already defined"):
        load_rules(["default", str(path)])


def test_rejected_values_are_remembered_per_scanner_not_per_rule_id():
    """The rejected-value memo must not leak between scanners whose rules share an id but
    not their checks: a value one scanner's email rule rejects is still found by another's."""
    import dataclasses
    import secrets as rnd
    rules = load_rules()
    strict = Scanner(rules)
    lax = Scanner([dataclasses.replace(r, validators=()) if r.id == "email" else r for r in rules])
    data = b"Author: Dev <" + rnd.token_hex(4).encode() + b"@users.noreply.github.com>\n"
    for _ in range(2):                     # the second pass is answered from the memo
        assert [f.rule_id for f in strict.scan(data).findings] == []
        assert [f.rule_id for f in lax.scan(data).findings] == ["email"]


def test_noreply_check_at_the_trigger_agrees_with_the_full_validation(monkeypatch):
    """The engine skips the e-mail regex where the trigger is '@users.noreply.github.com' and
    the domain ends there (validators.noreply_at): the same findings as the full path for
    every neighbour of that domain, cases and ends of buffer included."""
    from sandbox.scan import engine
    rules = load_rules()
    scanner = Scanner(rules)
    local = b"12345+dev"
    tails = [b">", b" ", b"\n", b"_x", b".", b".evil.io", b"-x.io", b"pany.com", b"x", b"0.io",
             b">, a@users.noreply.github.com", b""]
    doms = [b"users.noreply.github.com", b"USERS.noreply.github.com", b"users.noreply.github.co",
            b"users.noreply.github.com.evil.io"]
    cases = [b"Author: Dev <" + local + b"@" + d + t for d in doms for t in tails]
    cases += [b"mailto:" + local + b"@users.noreply.github.com.x.io", b"@users.noreply.github.com"]

    def run(scanner):
        return [[(f.rule_id, f.start, f.end) for f in scanner.scan(c).findings] for c in cases]

    with_check = run(scanner)
    monkeypatch.setattr(engine, "AT_TRIGGER", {})
    plain = Scanner(rules)
    assert all(g.skip is None for g in plain._groups) and any(g.skip for g in scanner._groups)
    assert with_check == run(plain)
    assert sum(map(bool, with_check)) >= 6              # the lookalikes are found
    assert with_check[0] == []                          # the noreply author is not

"""Named validators a rule can require of its captured value, plus entropy and placeholders.

A regex alone flags git SHAs, UUIDs, digests and documentation examples all day; these
checks are what keep precision high. Each validator takes the captured value (bytes) and
the whole match (bytes) and returns True when the value is plausibly real. Validators never
log or raise with the value: they only answer yes or no.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import re
import zlib
from collections import Counter

_B62 = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def shannon_entropy(value: bytes) -> float:
    """Bits per symbol of the value's own byte distribution (0 for empty)."""
    if not value:
        return 0.0
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in Counter(value).values())


def base62_crc32(data: bytes) -> bytes:
    """The 6-character base62 CRC32 that GitHub and npm append to their tokens.

    Format described in github.blog 2021-04-05 "Behind GitHub's new authentication token
    formats": prefix + 30 random base62 characters + CRC32 of them, base62, zero-padded to 6.
    """
    n = zlib.crc32(data) & 0xFFFFFFFF
    out = bytearray()
    while n:
        n, r = divmod(n, 62)
        out.append(_B62[r])
    return bytes(reversed(out)).rjust(6, b"0")


def github_checksum(value: bytes, match: bytes) -> bool:
    """ghp_/gho_/ghu_/ghs_/ghr_ and npm_ tokens: the last 6 characters are CRC32 of the 30 before."""
    body = value.split(b"_", 1)[-1]
    if len(body) != 36:
        return False
    return base62_crc32(body[:30]) == body[30:]


def luhn(value: bytes, match: bytes) -> bool:
    digits = [c - 48 for c in value if 48 <= c <= 57]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


# IIN ranges and lengths of the major card brands (ISO/IEC 7812; brand published ranges).
_CARD_BRANDS = (
    (re.compile(rb"4"), (13, 16, 19)),                                   # Visa
    (re.compile(rb"5[1-5]|2(?:2[2-9]|[3-6][0-9]|7[01]|720)"), (16,)),    # Mastercard
    (re.compile(rb"3[47]"), (15,)),                                     # Amex
    (re.compile(rb"6(?:011|5|4[4-9])"), (16, 19)),                      # Discover
    (re.compile(rb"35(?:2[89]|[3-8])"), (16, 19)),                      # JCB
    (re.compile(rb"3(?:0[0-5]|[68])"), (14, 16, 19)),                   # Diners
)


def card_number(value: bytes, match: bytes) -> bool:
    """Luhn plus a known brand prefix and length, and separators in consistent places only."""
    digits = bytes(c for c in value if 48 <= c <= 57)
    seps = set(value) - set(b"0123456789")
    if len(seps) > 1:
        return False
    if seps:
        groups = [len(g) for g in _CARD_SEP.split(value)]
        if groups not in ([4, 4, 4, 4], [4, 6, 5], [4, 6, 4], [4, 4, 4, 4, 3], [4, 4, 4, 1]):
            return False
    if len(set(digits)) < 4:
        return False
    for prefix, lengths in _CARD_BRANDS:
        if prefix.match(digits) and len(digits) in lengths:
            return luhn(digits, match)
    return False


def ssn(value: bytes, match: bytes) -> bool:
    """US SSN: area not 000, 666 or 900-999; group not 00; serial not 0000 (SSA rules)."""
    digits = bytes(c for c in value if 48 <= c <= 57)
    if len(digits) != 9:
        return False
    area, group, serial = digits[:3], digits[3:5], digits[5:]
    if area in (b"000", b"666") or area[0:1] == b"9" or group == b"00" or serial == b"0000":
        return False
    return len(set(digits)) > 2


def nanp_phone(value: bytes, match: bytes) -> bool:
    """NANP: area and exchange start 2-9, no N11 codes, not the 555-01xx fiction range."""
    digits = bytes(c for c in value if 48 <= c <= 57)
    if len(digits) == 11 and digits[:1] == b"1":
        digits = digits[1:]
    if len(digits) != 10:
        return False
    area, exch, line = digits[:3], digits[3:6], digits[6:]
    if area[0] < 50 or exch[0] < 50 or area[1:] == b"11" or exch[1:] == b"11":
        return False
    if exch == b"555" and line.startswith(b"01"):
        return False
    return len(set(digits)) > 3


def e164_phone(value: bytes, match: bytes) -> bool:
    digits = value.lstrip(b"+")
    return 8 <= len(digits) <= 15 and len(set(digits)) > 3


def _b64url_json(part: bytes):
    try:
        return json.loads(base64.urlsafe_b64decode(part + b"=" * (-len(part) % 4)))
    except (ValueError, binascii.Error):
        return None


def jwt_structure(value: bytes, match: bytes) -> bool:
    """Three base64url parts; the header is a JSON object with "alg", the payload a JSON object."""
    parts = value.split(b".")
    if len(parts) != 3:
        return False
    header, payload = _b64url_json(parts[0]), _b64url_json(parts[1])
    return isinstance(header, dict) and "alg" in header and isinstance(payload, dict)


_DIGITS = b"0123456789"


def _classes(value: bytes) -> tuple:
    """(has lower, has upper, has digit), with C-speed bytes methods."""
    return (value.upper() != value, value.lower() != value,
            len(value.translate(None, _DIGITS)) != len(value))


def mixed_charset(value: bytes, match: bytes) -> bool:
    """Random credentials mix classes: at least two of lower, upper, digit."""
    return sum(_classes(value)) >= 2


def aws_secret_context(value: bytes, match: bytes) -> bool:
    """A 40-char AWS secret key is only accepted next to AWS wording (the pattern requires
    it) and when it is not hex or pure base64 of a digest (all upper/lower/digit mixed)."""
    if _HEX40.fullmatch(value):
        return False
    return all(_classes(value))


def azure_key(value: bytes, match: bytes) -> bool:
    """Azure storage account keys are base64 of exactly 64 random bytes."""
    try:
        return len(base64.b64decode(value, validate=True)) == 64
    except (ValueError, binascii.Error):
        return False


# Validator regexes, compiled once (re's own cache costs a lookup per call, and validators
# run for every trigger hit that the confirming regex accepts).
_HEX40 = re.compile(rb"[0-9a-f]{40}|[0-9A-F]{40}")
_NOBODY_DOMAIN = re.compile(rb"(?:^|\.)(?:example\.(?:com|org|net)|example|test|invalid|localhost|local|"
                            rb"localdomain|users\.noreply\.github\.com)$")
_NOBODY_LOCAL = re.compile(rb"no-?reply|do-?not-?reply|^git$|^root$|^nobody$")
_FILE_TLDS = frozenset((b"png", b"jpg", b"gif", b"svg", b"js", b"ts", b"py", b"css", b"map", b"json",
                        b"lock", b"txt", b"md", b"so", b"o", b"a", b"h", b"c", b"tar", b"gz", b"whl"))
_TEMPLATE_PASSWORD = re.compile(rb"\$\{?[A-Za-z_]+\}?|%\(?[a-z_]+\)?s?|\*+|x+|pass(word)?|secret|"
                                rb"\{\{?[^}]*\}\}?|<[^>]*>|:?[a-z_]+", re.I)
_CODE_VALUE = re.compile(rb"[$%{<(\[]|\w+\(|(?:true|false|null|none|nil|undefined|required|optional)$", re.I)
_WORD_VALUE = re.compile(rb"[A-Za-z_$][\w$]*(?:\.[A-Za-z_$][\w$]*)+|/[\w./-]+|[A-Za-z_]+|[0-9.]+")
_CARD_SEP = re.compile(rb"[ -]")


def email_domain(value: bytes, match: bytes) -> bool:
    """Drop addresses no person reads: example/test/invalid domains, noreply, package
    author placeholders, and things that look like versions or file names."""
    local, _, domain = value.rpartition(b"@")
    domain = domain.lower()
    if _NOBODY_DOMAIN.search(domain):
        return False
    if _NOBODY_LOCAL.search(local.lower()):
        return False
    tld = domain.rsplit(b".", 1)[-1]
    if tld in _FILE_TLDS:
        return False
    return not local[:1].isdigit() or not domain[:1].isdigit()


_NOREPLY_AT = b"@users.noreply.github.com"
_DOMAIN_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-")


def noreply_at(buf: bytes, at: int) -> bool:
    """The e-mail trigger starting at buf[at] ('@') is a GitHub noreply commit author, which
    email_domain rejects whatever the local part: the domain is exactly that one (the byte
    after it cannot continue a domain). ~240 of ~270 e-mail triggers per MB of build log;
    this test costs ~0.1 us, the regex and validator it saves ~3 us."""
    if not buf.startswith(_NOREPLY_AT, at):
        return False
    after = at + len(_NOREPLY_AT)
    return after >= len(buf) or buf[after] not in _DOMAIN_BYTES


def url_password(value: bytes, match: bytes) -> bool:
    """The password part of scheme://user:pass@host is not a template or variable."""
    return not _TEMPLATE_PASSWORD.fullmatch(value)


def assignment_value(value: bytes, match: bytes) -> bool:
    """Generic password=/secret: values: not code, not a reference, not a path or a word."""
    if _CODE_VALUE.match(value):
        return False
    if _WORD_VALUE.fullmatch(value):
        return False
    return mixed_charset(value, match)


VALIDATORS = {
    "luhn": luhn,
    "card_number": card_number,
    "ssn": ssn,
    "nanp_phone": nanp_phone,
    "e164_phone": e164_phone,
    "jwt_structure": jwt_structure,
    "github_checksum": github_checksum,
    "npm_checksum": github_checksum,
    "aws_secret_context": aws_secret_context,
    "azure_key": azure_key,
    "mixed_charset": mixed_charset,
    "email_domain": email_domain,
    "url_password": url_password,
    "assignment_value": assignment_value,
}

# Checks at the trigger's start (SOM) that prove a validator would reject every match through
# that trigger: the engine skips the confirming regex there. Exact, never a guess: anything
# the check is unsure of goes through the full path.
AT_TRIGGER = {
    "email_domain": noreply_at,
}

# Words that mark documentation, templates and test data (case-insensitive substrings of the
# captured value). AWS's own documentation keys end in EXAMPLE / EXAMPLEKEY.
PLACEHOLDERS = (
    b"example", b"sample", b"dummy", b"placeholder", b"changeme", b"change_me", b"your_",
    b"your-", b"yourkey", b"xxxx", b"****", b"0000000", b"1234567", b"abcdefgh", b"redacted",
    b"insert", b"replace", b"fake", b"<", b">", b"${", b"{{", b"%(", b"todo", b"notreal",
)
_PLACEHOLDER_RX = re.compile(b"|".join(re.escape(p) for p in PLACEHOLDERS), re.I)

# Well-known documentation values that are not caught by the words above.
PLACEHOLDER_VALUES = frozenset({
    b"078-05-1120", b"219-09-9999", b"123-45-6789",                      # SSA examples
    b"4111111111111111", b"4242424242424242", b"5555555555554444",       # processor test cards
    b"5105105105105100", b"378282246310005", b"371449635398431", b"6011111111111117",
    b"4012888888881881", b"4000056655665556", b"5200828282828210", b"3566002020360505",
})


def is_placeholder(value: bytes) -> bool:
    if _PLACEHOLDER_RX.search(value) or value in PLACEHOLDER_VALUES:
        return True
    digits_only = value.translate(None, b" -")
    return digits_only in PLACEHOLDER_VALUES or len(set(value.lower())) <= 2

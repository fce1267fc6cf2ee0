"""Encoded forms: find candidate runs of base64, hex and percent-encoding and decode them.

The trick that keeps this cheap and precise: we only care about encodings of TEXT (a secret,
an e-mail, a connection string are text), and encoded text has structure. Base64 of bytes in
{TAB, LF, CR, 0x20-0x7E} has a restricted alphabet in the first three characters of every
4-character quad (derived below from the bit layout of RFC 4648 section 4); hex of such bytes
has a high nibble of 2-7 (or 0 followed by 9/a/d). The hyperscan trigger looks for a few of
those quads/pairs in a row, so git SHAs, sha256 digests, UUIDs and `sha512-...` integrity
hashes (encodings of random bytes) rarely trigger at all, and when one does, decoding shows
non-text and it costs a few microseconds.

Each decoder comes in two steps: SPAN[name] finds the encoded text a trigger ended in (its
start/end offsets in the buffer and the raw bytes to decode), FROM_RAW[name] decodes those
bytes (None: not decodable). The engine rescans the decoded text with the same rules
(bounded depth) and reports any finding at the encoded span.
"""
from __future__ import annotations

import binascii
import re
from urllib.parse import unquote_to_bytes

_B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64URL = b"-_"
TEXT_BYTES = bytes([9, 10, 13]) + bytes(range(0x20, 0x7F))
_NON_TEXT_DELETE = TEXT_BYTES            # bytes.translate(None, TEXT_BYTES) keeps non-text only


def _quad_index_sets():
    """Which base64 indices can appear at positions 0..2 of a quad encoding three text bytes."""
    c0 = {b >> 2 for b in TEXT_BYTES}
    c1 = {((a & 3) << 4) | (b >> 4) for a in TEXT_BYTES for b in TEXT_BYTES}
    c2 = {((b & 15) << 2) | (c >> 6) for b in TEXT_BYTES for c in TEXT_BYTES}
    return c0, c1, c2, set(range(64))


def _char_class(indices) -> str:
    chars = set()
    for i in indices:
        chars.add(chr(_B64[i]))
        if i >= 62:
            chars.add(chr(_B64URL[i - 62]))
    return "[" + "".join(re.escape(c) if c in "-/+" else c for c in sorted(chars)) + "]"


_QUAD = "".join(_char_class(s) for s in _quad_index_sets())


def base64_trigger(min_len: int) -> tuple[str, int]:
    """(hyperscan expression, fixed length) matching ceil(min_len/3) text quads in a row."""
    quads = max(3, -(-min_len // 3))
    # anchored at the start of a run (after a non-alphabet byte): one trigger per run, not
    # one per end offset inside long runs; text not at a run's start is out of scope
    return f"(?:^|[^A-Za-z0-9+/_-])(?:{_QUAD}){{{quads}}}", quads * 4


def hex_trigger(min_len: int) -> tuple[str, int]:
    pairs = max(8, min_len)
    return f"(?:^|[^0-9a-fA-F])(?:[2-7][0-9a-fA-F]|0[9aAdD]){{{pairs}}}", pairs * 2


def percent_trigger(min_len: int) -> tuple[str, int]:
    # one escape of a printable character is enough: "ghp%5F..." hides a token behind a
    # single escape; decoding a URL costs microseconds and only rescans its text
    return r"%[2-7][0-9A-Fa-f]", 0


TRIGGERS = {"base64": base64_trigger, "hex": hex_trigger, "percent": percent_trigger}

_RUNS = {
    "base64": re.compile(rb"[A-Za-z0-9+/_-]+=*"),
    "hex": re.compile(rb"[0-9a-fA-F]+"),
}
_URL_TO_STD = bytes.maketrans(b"-_", b"+/")


_TOKEN_END = re.compile(rb"[^\s\"'<>`]*")


def _run_from(kind: str, buf: bytes, lo: int, max_len: int) -> int:
    """End of the run of the decoder's alphabet that starts at lo (at most max_len long)."""
    return _RUNS[kind].match(buf, lo, min(len(buf), lo + max_len)).end()


def is_text(data: bytes, ratio: float = 0.9) -> bool:
    return bool(data) and len(data.translate(None, _NON_TEXT_DELETE)) <= len(data) * (1 - ratio)


_B64_RUN = re.compile(rb"[A-Za-z0-9+/_-]+")
_B64_PAD = re.compile(rb"={0,2}")


def span_base64(buf: bytes, to: int, trig_len: int, max_len: int):
    """(start, end, raw): the encoded span reported (padding included) and the run decoded."""
    start = to - trig_len                 # the trigger starts the run: its alignment is known
    end = _B64_RUN.match(buf, start, start + max_len).end()   # ('=' is not in the alphabet)
    return start, _B64_PAD.match(buf, end).end(), buf[start:end]


def from_base64(raw: bytes):
    body = raw.translate(_URL_TO_STD)
    rest = len(body) % 4
    if rest:
        body = body[:len(body) - rest] + _pad_tail(body)
    try:
        return binascii.a2b_base64(body)
    except binascii.Error:
        return None


def _pad_tail(body: bytes) -> bytes:
    rest = len(body) % 4
    return body[len(body) - rest:] + b"=" * (4 - rest) if rest >= 2 else b""


def span_hex(buf: bytes, to: int, trig_len: int, max_len: int):
    start = to - trig_len
    end = _run_from("hex", buf, start, max_len)
    end -= (end - start) % 2
    return start, end, buf[start:end]


def from_hex(raw: bytes):
    return bytes.fromhex(raw.decode("ascii"))


def span_percent(buf: bytes, to: int, trig_len: int, max_len: int):
    """The whitespace/quote-delimited token around the escape that ended at `to`."""
    lo = max(0, to - max_len // 2)
    back = _TOKEN_END.match(buf[lo:to][::-1]).end()      # reversed: linear, not quadratic
    start = to - back
    end = min(_TOKEN_END.match(buf, to).end(), start + max_len)
    return start, end, buf[start:end]


# Each decoder in two steps: SPAN finds the encoded text from a trigger's end (its span and
# the bytes to decode), FROM_RAW decodes those bytes (None: not decodable). The decoded text
# depends on the raw bytes alone, so a scanner can remember runs that decoded to nothing
# worth reporting (Scanner._quiet) without decoding them again.
SPAN = {"base64": span_base64, "hex": span_hex, "percent": span_percent}
FROM_RAW = {"base64": from_base64, "hex": from_hex, "percent": unquote_to_bytes}


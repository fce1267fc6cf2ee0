#!/usr/bin/env python3
"""Generate realistic, secret-free build/test log text for the scanner benchmark and the
precision tests: compiler, pytest, npm, pip, git, docker output with git SHAs, UUIDs,
sha256 digests, npm integrity hashes, base64 blobs, minified JS and documentation example
keys. Every scanner finding on this text is a false positive.

    scripts/gen_buildlog.py SIZE_MB OUT_FILE [--seed N]
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import random
import string
import sys
import uuid

ALNUM = string.ascii_letters + string.digits
WORDS = ("build compile link test cache layer module package install resolve fetch verify "
         "download extract configure generate optimize bundle transform render parse request "
         "response handler server client worker queue index schema model view router config "
         "logger metrics session buffer stream socket thread process memory timeout retry").split()
# AWS's documentation keys, printed by countless tutorials and test fixtures.
DOC_KEYS = ("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "AKIAI44QH8DHBEXAMPLE", "je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY")


def git_sha(r):
    return "%040x" % r.getrandbits(160)


def sha256_hex(r):
    return hashlib.sha256(r.randbytes(16)).hexdigest()


def uuid4(r):
    return str(uuid.UUID(int=r.getrandbits(128), version=4))


def npm_integrity(r):
    return "sha512-" + base64.b64encode(r.randbytes(64)).decode()


def base64_blob(r):
    """Base64 of ordinary data: compressed/binary payloads and text (JSON config)."""
    if r.random() < 0.5:
        return base64.b64encode(r.randbytes(r.randint(24, 300))).decode()
    text = '{"name": "%s", "replicas": %d, "image": "registry.local/%s:%d.%d"}' % (
        r.choice(WORDS), r.randint(1, 9), r.choice(WORDS), r.randint(1, 9), r.randint(0, 30))
    return base64.b64encode(text.encode()).decode()


def minified_js(r):
    parts = []
    for _ in range(r.randint(8, 30)):
        a, b = r.choice(string.ascii_letters), r.choice(string.ascii_letters)
        parts.append(r.choice((
            f"function {a}({b}){{return {b}&&{b}.__esModule?{b}:{{default:{b}}}}}",
            f"var {a}={b}.exports={{}};{a}.token=function(e){{return e.split(\".\")}}",
            f"{a}.prototype.{r.choice(WORDS)}=function(t,n){{this._{r.choice(WORDS)}=t||n}}",
            f"e.password=t.password,e.apiKey=n.apiKey;",
            f"Object.defineProperty({a},\"{r.choice(WORDS)}\",{{enumerable:!0,get:function(){{return {b}}}}})",
            f"{a}=\"{''.join(r.choice(ALNUM) for _ in range(r.randint(4, 24)))}\";",
        )))
    return ";".join(parts)


def doc_key(r):
    return r.choice(DOC_KEYS)


BENIGN = {"git_sha": git_sha, "sha256": sha256_hex, "uuid": uuid4, "npm_integrity": npm_integrity,
          "base64_blob": base64_blob, "minified_js": minified_js, "doc_key": doc_key}


def _ts(r):
    return "2024-%02d-%02dT%02d:%02d:%02d.%03dZ" % (r.randint(1, 12), r.randint(1, 28), r.randint(0, 23),
                                                  r.randint(0, 59), r.randint(0, 59), r.randint(0, 999))


def _path(r):
    return "/".join(r.choice(WORDS) for _ in range(r.randint(2, 5))) + r.choice((".c", ".py", ".ts", ".go", ".rs"))


# How often each kind of line below appears (per 1000 lines): mostly compiler, test and
# package-manager chatter; base64 blobs, minified JS and documentation keys are rarer.
KIND_WEIGHTS = (100, 80, 140, 20, 60, 30, 60, 20, 30, 30, 50, 120, 20, 10, 5, 120)


def _line(r):
    w = r.choice
    kind = r.choices(range(len(KIND_WEIGHTS)), KIND_WEIGHTS)[0]
    if kind == 0:
        return f"{_path(r)}:{r.randint(1, 900)}:{r.randint(1, 80)}: warning: unused variable '{w(WORDS)}' [-Wunused-variable]"
    if kind == 1:
        return f"gcc -O2 -g -Wall -fPIC -I/usr/include/{w(WORDS)} -c {_path(r)} -o build/{w(WORDS)}.o"
    if kind == 2:
        return f"tests/test_{w(WORDS)}.py::test_{w(WORDS)}_{w(WORDS)}[{w(WORDS)}-{r.randint(0, 99)}] {w(('PASSED', 'PASSED', 'PASSED', 'SKIPPED', 'XFAIL'))} [{r.randint(1, 100):3d}%]"
    if kind == 3:
        return f"E       AssertionError: assert {r.randint(0, 9999)} == {r.randint(0, 9999)} (run {uuid4(r)})"
    if kind == 4:
        return f'    "node_modules/{w(WORDS)}-{w(WORDS)}": {{"version": "{r.randint(0, 9)}.{r.randint(0, 40)}.{r.randint(0, 20)}", "resolved": "https://registry.npmjs.org/{w(WORDS)}/-/{w(WORDS)}-1.{r.randint(0, 9)}.0.tgz", "integrity": "{npm_integrity(r)}"}},'
    if kind == 5:
        return f"npm WARN deprecated {w(WORDS)}@{r.randint(0, 9)}.{r.randint(0, 9)}.{r.randint(0, 9)}: this package is no longer supported"
    if kind == 6:
        return f"  Downloading {w(WORDS)}_{w(WORDS)}-{r.randint(0, 9)}.{r.randint(0, 30)}.{r.randint(0, 9)}-py3-none-any.whl ({r.randint(10, 999)} kB)  --hash=sha256:{sha256_hex(r)}"
    if kind == 7:
        return f"Successfully installed {' '.join(f'{w(WORDS)}-{r.randint(0, 9)}.{r.randint(0, 20)}.{r.randint(0, 9)}' for _ in range(r.randint(1, 6)))}"
    if kind == 8:
        return f"commit {git_sha(r)}\nAuthor: {w(WORDS).title()} Dev <{r.randint(1000, 999999)}+{w(WORDS)}@users.noreply.github.com>\nDate:   Mon Nov {r.randint(1, 28)} 10:{r.randint(10, 59)}:00 2024 +0000\n\n    Fix {w(WORDS)} {w(WORDS)} in {_path(r)}"
    if kind == 9:
        return f"{git_sha(r)[:7]} Merge pull request #{r.randint(1, 9999)} from {w(WORDS)}/{w(WORDS)}-{w(WORDS)}"
    if kind == 10:
        return f"#{r.randint(1, 30)} [{r.randint(1, 9)}/{r.randint(9, 20)}] RUN pip install --no-cache-dir -r requirements.txt\n#{r.randint(1, 30)} sha256:{sha256_hex(r)} {r.randint(1, 99)}.{r.randint(0, 9)}MB / {r.randint(100, 300)}.0MB {r.randint(0, 9)}.{r.randint(0, 9)}s"
    if kind == 11:
        return f"{_ts(r)} INFO  [{w(WORDS)}] request_id={uuid4(r)} trace={'%032x' % r.getrandbits(128)} duration_ms={r.randint(1, 9000)} status={w((200, 201, 204, 404, 500))}"
    if kind == 12:
        return f"data: {base64_blob(r)}"
    if kind == 13:
        return minified_js(r)
    if kind == 14:
        return f"# example: export AWS_ACCESS_KEY_ID={DOC_KEYS[0]} AWS_SECRET_ACCESS_KEY={DOC_KEYS[1]}"
    return f"[{_ts(r)}] {w(WORDS)} {w(WORDS)}: {r.randint(0, 10**6)} bytes in {r.random():.3f}s ({r.randint(1, 900)} MB/s) pid={r.randint(100, 65535)}"


def generate(size: int, seed: int = 1) -> bytes:
    """About `size` bytes of log text: a pool of generated lines sampled with repetition."""
    r = random.Random(seed)
    pool = [_line(r).encode() + b"\n" for _ in range(20000)]
    out, n = [], 0
    while n < size:
        block = b"".join(r.choices(pool, k=2000))
        out.append(block)
        n += len(block)
    return b"".join(out)[:size]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("size_mb", type=float)
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    with open(a.out, "wb") as f:
        f.write(generate(int(a.size_mb * 1024 * 1024), a.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""sandboxctl scan: the --jsonl format, exit codes, FILE and stdin arriving in pieces."""
import base64
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.helpers import fakes

ROOT = Path(__file__).resolve().parents[2]
SANDBOXCTL = [sys.executable, "-m", "sandbox.cli.main", "scan"]


def run_scan(args, data=None, stdin=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(SANDBOXCTL + args, input=data, stdin=stdin, capture_output=True,
                          env=env, cwd=ROOT, timeout=60)


def jsonl(stdout: bytes):
    return [json.loads(line) for line in stdout.decode().splitlines()]


def test_jsonl_exact_format_and_exit_1_on_block():
    token, mail = fakes.gh_token(), fakes.email()
    encoded = base64.b64encode(b"TOKEN=" + fakes.gh_token())
    data = b"build ok\n" + token + b"\nmail " + mail + b"\nx " + encoded + b"\n"
    res = run_scan(["--jsonl"], data)
    assert res.returncode == 1, res.stderr
    lines = jsonl(res.stdout)
    for line in lines:
        assert list(line) == ["start", "end", "kind", "block"]
    got = sorted((d["start"], d["end"], d["kind"], d["block"]) for d in lines)
    t, m, e = data.index(token), data.index(mail), data.index(encoded)
    assert got == [(t, t + len(token), "secret", True), (m, m + len(mail), "pii", False),
                   (e, e + len(encoded), "secret", True)]
    for secret in (token, mail, encoded):
        assert secret not in res.stdout + res.stderr


def test_exit_0_when_nothing_blocks(tmp_path):
    path = tmp_path / "log.txt"
    path.write_bytes(b"compiling...\nmail " + fakes.email() + b"\nall good\n")
    res = run_scan(["--jsonl", str(path)])
    assert res.returncode == 0, res.stderr
    assert [d["kind"] for d in jsonl(res.stdout)] == ["pii"]
    clean = run_scan(["--jsonl"], b"nothing to see\n")
    assert (clean.returncode, clean.stdout) == (0, b"")


def test_table_output_is_readable_and_secret_free():
    token = fakes.gh_token()
    res = run_scan([], b"x " + token + b"\n")
    assert res.returncode == 1
    assert b"github-token" in res.stdout and b"BLOCKED" in res.stdout and token not in res.stdout


def test_missing_file_is_an_error():
    res = run_scan(["/nonexistent/sbxt-%d" % os.getpid()])
    assert res.returncode == 2 and b"cannot open" in res.stderr


def test_stdin_in_pieces_with_pauses():
    """A writer emits a token split across three writes with 0.2 s pauses."""
    token = fakes.gh_token()
    pieces = [b"line one\nsecret: " + token[:10], token[10:25], token[25:] + b"\nbye\n"]
    writer = textwrap.dedent(f"""
        import os, sys, time
        for piece in {pieces!r}:
            os.write(1, piece)
            time.sleep(0.2)
    """)
    w = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE)
    try:
        res = run_scan(["--jsonl"], stdin=w.stdout)
    finally:
        w.stdout.close()
        w.wait(timeout=30)
    start = b"".join(pieces).index(token)
    assert res.returncode == 1, res.stderr
    assert jsonl(res.stdout) == [{"start": start, "end": start + 40, "kind": "secret", "block": True}]


def test_stdin_pipe_is_widened_to_the_read_size():
    """A pipe on stdin is made to hold READ_SIZE bytes, so one read can take a whole MiB a
    fast writer queued (the default 64 KiB pipe made every feed a small one); a file is
    left alone."""
    import fcntl
    from sandbox.cli.commands import scan
    r, w = os.pipe()
    try:
        assert fcntl.fcntl(r, fcntl.F_GETPIPE_SZ) < scan.READ_SIZE
        scan._widen_pipe(r)
        assert fcntl.fcntl(r, fcntl.F_GETPIPE_SZ) == scan.READ_SIZE
    finally:
        os.close(r)
        os.close(w)
    fd = os.open(__file__, os.O_RDONLY)
    try:
        scan._widen_pipe(fd)           # not a pipe: nothing to do, no error
    finally:
        os.close(fd)

"""Helpers for engine tests: make sandboxes that are always destroyed, run commands."""
from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

PY = "/usr/bin/python3"  # Debian's python3, visible inside through the /usr bind
SANDBOXCTL = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "sandboxctl")


# Engine tests run without the disk step (limits.disk = 0: /tmp is the engine's own tmpfs,
# the workspace a plain directory): the disk facility has its own tests, and its images
# and loop devices would make these tests depend on host disk room and loop teardown.
SMALL_DISK = {"limits": {"disk": "0"}}


def engine_policy(overrides: dict | None = None):
    from sandbox.policy import load_policy, merge_overrides
    return load_policy("default", merge_overrides(SMALL_DISK, overrides or {}))


def policy_file(tmp_path: Path) -> str:
    """The default policy without the disk step, as a file for `sandboxctl run --policy`."""
    src = Path(__file__).resolve().parents[2] / "policies" / "default.toml"
    text = src.read_text()
    assert 'disk = "10GiB"' in text
    out = tmp_path / "sbxt-engine.toml"
    out.write_text(text.replace('disk = "10GiB"', 'disk = "0"'))
    return str(out)


def run(sb, argv, **kw):
    """exec() from sync test code; returns the ExecResult (stdout/stderr collected)."""
    return asyncio.run(sb.exec(argv, **kw))


def sh(sb, script: str, **kw):
    return run(sb, ["/bin/sh", "-c", script], **kw)


def py(sb, code: str, **kw):
    return run(sb, [PY, "-c", code], **kw)


def compile_c(src: str, out: Path, *extra: str) -> Path:
    c = out.with_suffix(".c")
    c.write_text(src)
    subprocess.run(["gcc", "-O1", "-o", str(out), str(c), *extra], check=True)
    return out


@pytest.fixture
def state_dir(tmp_path):
    d = tmp_path / "state"
    d.mkdir()
    return d


@pytest.fixture
def make_sandbox(state_dir):
    """make_sandbox(policy=None, **create_kwargs) -> Sandbox; all destroyed at teardown."""
    from sandbox.runtime.sandbox import Sandbox
    made = []

    def make(policy=None, **kw):
        sb = Sandbox.create(policy or engine_policy(), state_dir=state_dir, **kw)
        made.append(sb)
        return sb

    yield make
    errors = []
    for sb in made:
        try:
            sb.destroy()
        except Exception as e:  # noqa: BLE001 - destroy every one, then report
            errors.append(e)
    if errors:
        raise errors[0]


@pytest.fixture
def host_sleeper():
    """A process outside any sandbox (ours, ended by pid at teardown)."""
    p = subprocess.Popen(["sleep", "300"])
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def tag() -> str:
    return f"sbxt-{os.getpid()}"

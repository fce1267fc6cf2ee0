"""The test plumbing itself: the summary CI reads can never look cleaner than the run was, and
scripts/vm-test refuses loudly when it cannot boot the right kernel. No root, no VM."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def junit(tmp_path: Path, name: str, tests=0, failures=0, errors=0, skipped=0, time=1.5) -> str:
    p = tmp_path / name
    p.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="{tests}" '
                 f'failures="{failures}" errors="{errors}" skipped="{skipped}" time="{time}">'
                 '</testsuite></testsuites>')
    return str(p)


def summary(*args: str) -> str:
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "junit-summary"), *args],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_summary_adds_up_reports(tmp_path):
    a = junit(tmp_path, "a.xml", tests=10, failures=1, skipped=2)
    b = junit(tmp_path, "b.xml", tests=5, errors=1, time=2.0)
    assert summary(a, b) == "1 failed, 11 passed, 2 skipped, 1 error in 3.5s"


def test_summary_all_passed(tmp_path):
    assert summary(junit(tmp_path, "a.xml", tests=3)) == "3 passed in 1.5s"


def test_missing_report_is_an_error(tmp_path):
    a = junit(tmp_path, "a.xml", tests=3)
    assert summary(a, str(tmp_path / "vm.xml")) == "3 passed, 1 error in 1.5s"


def test_failed_run_with_a_clean_report_is_an_error(tmp_path):
    """pytest exit 5 (nothing collected) leaves a clean, empty report: still not a pass."""
    empty = junit(tmp_path, "a.xml", tests=0)
    assert summary("--failed-runs", "1", empty) == "0 passed, 1 error in 1.5s"


def vm_test(env_extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([str(REPO / "scripts" / "vm-test")], capture_output=True, text=True,
                          env=env, timeout=60)


def test_vm_test_fails_loudly_without_its_kernel(tmp_path):
    res = vm_test({"SANDBOXD_VM_KERNEL": str(tmp_path / "vmlinuz-none")})
    assert res.returncode == 1
    assert "FAILED" in res.stderr and "vmlinuz-none" in res.stderr


def test_vm_test_refuses_the_cloud_kernel(tmp_path):
    k = tmp_path / "vmlinuz-6.1.0-99-cloud-amd64"
    k.write_bytes(b"not a kernel")
    res = vm_test({"SANDBOXD_VM_KERNEL": str(k)})
    assert res.returncode == 1 and "no 9p" in res.stderr


@pytest.mark.parametrize("script", ["setup", "test", "vm-test", "bench", "junit-summary",
                                    "policy-doc"])
def test_scripts_are_executable(script):
    assert os.access(REPO / "scripts" / script, os.X_OK)

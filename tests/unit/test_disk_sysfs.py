"""The disk teardown's reading of sysfs while the kernel detaches the loop device: a node
being removed answers ENODEV, which means "gone", not "teardown failed" (it did, 1 in
150-300 concurrent teardowns, before this was handled)."""
import errno
from pathlib import Path

import pytest

from sandbox.kernel import disk


def _raising(err):
    def read(*_a, **_kw):
        raise OSError(err, "injected")
    return read


def test_backing_file_being_removed_reads_as_detached(monkeypatch):
    monkeypatch.setattr(Path, "read_text", _raising(errno.ENODEV))
    assert disk._loop_backing("/dev/loop7") is None


def test_other_sysfs_errors_are_not_hidden(monkeypatch):
    monkeypatch.setattr(Path, "read_text", _raising(errno.EIO))
    with pytest.raises(OSError):
        disk._loop_backing("/dev/loop7")


def test_ext4_node_being_removed_means_released(monkeypatch):
    d = disk.SandboxDisk(Path("/nonexistent/x.img"), Path("/nonexistent/mnt"), "/dev/loop7", 1)
    monkeypatch.setattr(disk, "_loop_backing", lambda dev: "/nonexistent/x.img")
    real_stat = disk.os.stat

    def stat(path, *a, **kw):
        if str(path).startswith("/sys/fs/ext4/"):
            raise OSError(errno.ENODEV, "injected")
        return real_stat(path, *a, **kw)
    monkeypatch.setattr(disk.os, "stat", stat)
    assert d._fs_alive() is False

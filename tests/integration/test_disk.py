"""The sandbox disk (sandbox/kernel/disk.py) on the real kernel: an ext4 image on a loop
device bounds what can be written; teardown leaves no mount, loop device or image."""
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from sandbox.errors import UnsupportedError
from sandbox.kernel import disk
from tests.helpers.limits import SMALL, MiB

FILLER = "dd if=/dev/zero of={path} bs=1M count=1000 2>&1; echo rc=$?"


@pytest.fixture
def base():
    b = Path(f"/var/tmp/sbxt-{os.getpid()}-disk")
    try:
        yield b
    finally:
        mnt = b / "mnt"
        left = [p for p in mnt.iterdir()] if mnt.exists() else []
        for p in left:
            if disk.is_mountpoint(p):
                disk._umount(p, disk.MNT_DETACH)
        shutil.rmtree(b, ignore_errors=True)
        assert not left, f"a test left disks mounted: {left}"


def _gone(d: disk.SandboxDisk):
    assert not d.image.exists() and not d.mountpoint.exists()
    assert not disk.is_mountpoint(d.mountpoint)
    assert not d._fs_alive()
    for _ in range(200):      # the loop's own detach is the kernel's asynchronous rundown
        if disk._loop_backing(d.loopdev) != str(d.image):
            break
        time.sleep(0.05)
    assert disk._loop_backing(d.loopdev) != str(d.image), "the loop device never let go"


def test_disk_filler_gets_enospc_at_the_limit(base):
    d = disk.create("filler", SMALL.disk, base=base)
    try:
        os.chown(d.workspace_dir, 1 << 20, 1 << 20)   # the engine gives it to the sandbox
        for target in (d.tmp_dir, d.workspace_dir):
            out = subprocess.run(["/bin/sh", "-c", FILLER.format(path=target / "fill")],
                                 capture_output=True, text=True, timeout=60).stdout
            assert "No space left on device" in out and "rc=1" in out
            written = (target / "fill").stat().st_size
            assert written <= SMALL.disk
            (target / "fill").unlink()
        # The host holds at most the image's size, whatever was written inside.
        assert d.image.stat().st_blocks * 512 <= SMALL.disk
    finally:
        d.remove()
    _gone(d)


def test_layout_inside_the_disk(base):
    d = disk.create("layout", SMALL.disk, base=base)
    try:
        assert sorted(p.name for p in d.mountpoint.iterdir()) == ["lost+found", "tmp", "workspace"]
        assert d.tmp_dir.stat().st_mode & 0o7777 == 0o1777
        assert d.workspace_dir.parent == d.mountpoint
        lines = [l.split() for l in open("/proc/self/mountinfo") if l.split()[4] == str(d.mountpoint)]
        assert lines and "nosuid" in lines[0][5] and "nodev" in lines[0][5]
        # no write barriers: the disk's flushes would be fsyncs of the image on the host
        assert "nobarrier" in lines[0][-1].split(",")
    finally:
        d.remove()
    _gone(d)


def test_no_room_on_the_host_is_refused(base, monkeypatch):
    """Sparse images promise space: when live ones could grow past the free space, refuse."""
    live = disk.create("live", SMALL.disk, base=base)
    try:
        monkeypatch.setattr(disk, "_unwritten", lambda img: 1 << 60)   # live images promise 1 EiB
        with pytest.raises(UnsupportedError, match="not enough host disk"):
            disk.create("noroom", SMALL.disk, base=base)
        assert [p.name for p in (base / "images").iterdir()] == ["live.img"]
    finally:
        live.remove()


def test_host_workspace_is_refused_unless_the_policy_accepts_it(tmp_path):
    with pytest.raises(UnsupportedError, match="host_workspace"):
        disk.check_host_workspace(SMALL, tmp_path)
    disk.check_host_workspace(SMALL, None)


def test_cleanup_after_a_crash_is_idempotent(base):
    d = disk.create("crash", SMALL.disk, base=base)
    fields = {"image": str(d.image), "mountpoint": str(d.mountpoint), "loopdev": d.loopdev}
    disk.cleanup(fields)
    disk.cleanup(fields)
    _gone(d)


def test_remove_while_a_host_process_holds_a_file(base, monkeypatch):
    """An open file (e.g. a straggler) must not make teardown leave the image behind."""
    monkeypatch.setattr(disk, "_WAIT_SECONDS", 0.2)  # do not wait the full 30 s here
    d = disk.create("busy", 16 * MiB, base=base)
    f = open(d.tmp_dir / "held", "w")
    try:
        with pytest.raises(Exception, match="still in use"):
            d.remove()                 # lazily detached, loop still busy: reported, not hidden
    finally:
        f.close()
    disk.cleanup({"image": str(d.image), "mountpoint": str(d.mountpoint), "loopdev": d.loopdev})
    _gone(d)


def test_concurrent_creates_and_removes_in_one_process(base):
    """The daemon makes disks from several threads at once: the first template of a size
    and the host-room check must not trip over each other (seen: a shared temporary name
    gave corrupt templates that failed to mount with EIO, and an image removed between the
    room check's listing and its stat failed the create)."""
    import threading
    errors = []

    def worker(i):
        for j in range(6):
            try:
                d = disk.create(f"sbxt-{os.getpid()}-c{i}-{j}", SMALL.disk, base=base)
                d.remove()
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert not list((base / "images").iterdir()) and not list((base / "mnt").iterdir())


def _data_bytes(path: Path) -> int:
    """Bytes in the file's data extents (SEEK_DATA/SEEK_HOLE): what each sandbox copies."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos, total = os.fstat(fd).st_size, 0, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            total += pos - start
        return total
    finally:
        os.close(fd)


def test_template_is_nearly_all_holes_and_keeps_its_inode_tables_zeroed(base):
    """Every byte of the template is copied, flushed and freed per sandbox: a 10 GiB one
    holds well under 1 MiB (with resize_inode's reserved GDT blocks it held 4.2 MB). The
    inode tables stay holes marked zeroed (no ext4lazyinit writing 160 MiB after mount), and
    the filesystem still spans exactly the image (the size bound)."""
    size = 10 * 1024**3
    tpl = disk._template(base, size)
    assert tpl.stat().st_size == size and _data_bytes(tpl) < 256 * 1024
    out = subprocess.run(["dumpe2fs", str(tpl)], capture_output=True, text=True, check=True).stdout
    groups = [l for l in out.splitlines() if l.startswith("Group ") and "(Blocks" in l]
    assert len(groups) == size // (128 * 1024**2)
    assert all("ITABLE_ZEROED" in g for g in groups), [g for g in groups if "ITABLE_ZEROED" not in g]
    head = dict(l.split(":", 1) for l in out.splitlines() if ":" in l and not l.startswith(" "))
    assert int(head["Block count"]) * int(head["Block size"]) == size
    assert "has_journal" not in head["Filesystem features"]
    assert "resize_inode" not in head["Filesystem features"]


def test_teardown_never_shuts_down_a_filesystem_that_is_not_its_own(base):
    """The disk's teardown shuts its filesystem down (EXT4_IOC_SHUTDOWN) before unmounting.
    Whatever else is mounted on its mount point (here another sandbox's disk, bound there)
    must never get that ioctl: it would stop that filesystem (through an empty mount point,
    the host's own)."""
    a = disk.create("own", 16 * MiB, base=base)
    b = disk.create("other", 16 * MiB, base=base)
    try:
        assert disk._umount(a.mountpoint) == 0
        subprocess.run(["mount", "--bind", str(b.mountpoint), str(a.mountpoint)], check=True)
        a.remove()                                   # unmounts the bind, shuts nothing down
        assert not disk.is_mountpoint(a.mountpoint) and not a.image.exists()
        (b.tmp_dir / "still-writable").write_text("yes")
        os.sync()
        assert (b.tmp_dir / "still-writable").read_text() == "yes"
    finally:
        b.remove()
    _gone(a)
    _gone(b)


def test_teardown_shuts_down_only_a_disk_that_was_written_to(base, monkeypatch):
    """EXT4_IOC_SHUTDOWN (no writeback) is what keeps a teardown from writing a full disk
    back through the loop; a disk nothing was written to has nothing to write back, so its
    teardown skips the ioctl. Data not yet allocated (delayed allocation) and a new empty
    file both count as written."""
    calls = []
    real = disk._shutdown_fd
    monkeypatch.setattr(disk, "_shutdown_fd", lambda fd: (calls.append(fd), real(fd)))
    disks = [disk.create(f"w{i}", 16 * MiB, base=base) for i in range(3)]
    try:
        (disks[1].tmp_dir / "data").write_bytes(b"x" * 65536)      # dirty, not yet synced
        (disks[2].tmp_dir / "empty").touch()
        shut = []
        for d in disks:
            before = len(calls)
            d.remove()
            shut.append(len(calls) - before)
        assert shut == [0, 1, 1]
    finally:
        for d in disks:
            d.remove()
    for d in disks:
        _gone(d)

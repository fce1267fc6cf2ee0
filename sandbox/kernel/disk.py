"""The sandbox's disk: /tmp and the workspace on a loop-mounted ext4 image of the policy's size.

Why a loop-mounted image (and not the alternatives):
- a per-sandbox tmpfs is charged to the memory cgroup: a 10 GiB disk limit would need a
  10 GiB memory limit, and writing files would OOM-kill the agent instead of giving ENOSPC;
- project quotas need an ext4/xfs mounted with prjquota (and the `project` feature set by
  tune2fs on an unmounted fs): not what an ordinary ext4 host has (this one has not);
- an ext4 image of exactly `limits.disk` bytes is a hard bound the kernel enforces: the agent
  gets ENOSPC from its own filesystem; nothing it does can grow the image past its size.

The image is sparse, so it costs the host only what the agent writes. To make "the host disk
is never filled" true even with many sandboxes, creation reserves: it refuses (fail closed)
unless the image directory's free space covers every live image's unwritten remainder plus
this one plus a headroom (`_check_room`, under a lock).

Cost: mkfs.ext4 runs once per size into a template (no journal: the disk dies with the
sandbox, crash consistency buys nothing). lazy_itable_init=0 with discard: on a file, mke2fs
"discards" by punching holes, which reads back as zeroes, so it marks every inode table
ITABLE_ZEROED without writing it. Otherwise the kernel's ext4lazyinit thread would write
160 MiB of zeroes into every 10 GiB sandbox disk after mount. The template holds as little
data as ext4 allows, because every sandbox pays for each byte of it three times: copying it,
LOOP_CONFIGURE flushing the copy's dirty pages to the host disk before it switches the loop to
direct I/O, and freeing it at unlink. No resize_inode (its reserved GDT blocks were 4.2 of the
4.4 MB of a 10 GiB template: the disk never grows), no backup superblocks (sparse_super2 with
num_backup_sb=0: a disk that dies with its sandbox is never fsck'd from a backup), metadata
packed at the start (packed_meta_blocks): 60 KB in 4 extents for 10 GiB (SEEK_DATA). Neither
changes the size bound (the filesystem still spans exactly the image) nor the zeroed inode
tables. tmp/ (1777) and workspace/ (0755, root: the engine gives it to the sandbox's uid) are
made by mkfs (-d) in the template, not on every mounted disk (their first write on a fresh
disk reads bitmaps through the loop: ~1 ms per sandbox, measured). Each sandbox copies only
the template's data extents (SEEK_DATA/SEEK_HOLE + copy_file_range), attaches a loop device
with LOOP_CTL_GET_FREE + LOOP_CONFIGURE (one ioctl, LO_FLAGS_AUTOCLEAR so the device detaches
itself when the last mount of it goes) and mounts it nosuid,nodev.

No pool of pre-copied images: with a 60 KB template the copy is ~0.3 ms of CPU, which a
background thread would spend all the same (CPU, not latency, bounds the daemon's
throughput), while pooled images would count against the host-room reservation
(`_check_room`: each promises its full size) and add a kind of file for recovery to find.

The daemon-made workspace lives on the image too (the engine makes workspace/ there, owned
by the sandbox's uid); with keep_workspace it is copied out before the image goes.
A host workspace directory (a caller's existing tree) cannot be bounded by this image
without changing where the agent's writes land. `limits.host_workspace` decides:
"refuse" (the default: fail closed) or "unbounded" (the operator accepts that writes to
that one directory are bounded only by the host filesystem; /tmp stays bounded; the
setup step's audit record says so).

Teardown shuts the filesystem down (EXT4_IOC_SHUTDOWN, no writeback) unless nothing was
written to it, unmounts, verifies
(bounded wait) that no mount or open file holds the filesystem any more, deletes the image and
verifies it is gone; the loop device then detaches itself (AUTOCLEAR).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sandbox.errors import MountError, TeardownError, UnsupportedError

# Where disk images live. SANDBOXD_DISK_BASE lets a test run keep its images apart.
DEFAULT_BASE = Path(os.environ.get("SANDBOXD_DISK_BASE") or "/var/lib/sandboxd/disks")
HEADROOM = 1024**3        # free space always left to the host (at most 10% of its filesystem)
MKFS = "/usr/sbin/mkfs.ext4"
# linux/loop.h
LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LOOP_GET_STATUS64 = 0x4C05
LO_FLAGS_AUTOCLEAR = 4
LO_FLAGS_DIRECT_IO = 16
BLOCK = 4096              # the image's ext4 block size = the loop device's logical block size
_LOOP_INFO64 = "=QQQQQIIII64s64s32sQQ"  # struct loop_info64 (232 bytes)
_LOOP_CONFIG = "=II" + _LOOP_INFO64[1:] + "8Q"   # struct loop_config (304 bytes)
MS_NOSUID, MS_NODEV = 0x2, 0x4
# fs/ext4/ext4.h: EXT4_IOC_SHUTDOWN = _IOR('X', 125, __u32); NOLOGFLUSH drops dirty data
EXT4_IOC_SHUTDOWN = 0x8004587D
EXT4_GOING_FLAGS_NOLOGFLUSH = 2
MNT_DETACH = 2
# Bounded: 30 s for the last mount to let go (seen >10 s when loaded). The filesystem is
# usually gone at the first look; polls start at 0.1 ms and back off to 5 ms (a fixed 5 ms
# sleep cost a whole 5 ms whenever it was not).
_WAIT_SECONDS, _WAIT_FIRST, _WAIT_MAX = 30.0, 0.0001, 0.005
# No write barriers (ext4(5) barrier=0): a cache flush of the loop device is an fsync of the
# image on the host filesystem, and the disk is thrown away with its sandbox (crash recovery
# deletes images, never fscks them), so ordering its writes across a host crash buys
# nothing. Without them the agent's fsync() calls cost no host journal commits, and the
# unmount of a disk with only its workspace chown to write back took 0.87 ms instead of
# 1.75 ms (its superblock and inode writes had come with ~5 flushes).
MOUNT_DATA = "barrier=0"
MKFS_FEATURES = "^has_journal,^resize_inode,sparse_super2"
MKFS_EXTENDED = "lazy_itable_init=0,num_backup_sb=0,packed_meta_blocks=1"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _mount(src: str, dst: Path, fstype: str, flags: int, data: str = ""):
    if _libc.mount(src.encode(), str(dst).encode(), fstype.encode(), flags,
                   data.encode() or None) != 0:
        e = ctypes.get_errno()
        raise MountError(f"cannot mount {src} on {dst}", errno=e, syscall="mount")


def _umount(dst: Path, flags: int = 0) -> int:
    return 0 if _libc.umount2(str(dst).encode(), flags) == 0 else ctypes.get_errno()


def is_mountpoint(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


# ---------------------------------------------------------------------------- templates

def _template(base: Path, size: int) -> Path:
    """An ext4 image of `size` bytes made once (atomically, so concurrent makers are safe)."""
    tdir = base / "templates"
    # v3: minimal data, tmp/ and workspace/ made (module docstring); z: inode tables zeroed
    path = tdir / f"ext4-v3z-b{BLOCK}-{size}.img"
    if path.exists():
        return path
    tdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # One temporary name per maker: threads of one daemon make templates concurrently too.
    tmp = tdir / f".ext4-{size}.{os.getpid()}.{threading.get_ident()}.tmp"
    proto = tdir / f".proto.{os.getpid()}.{threading.get_ident()}"
    try:
        shutil.rmtree(proto, ignore_errors=True)
        proto.mkdir(mode=0o755)
        os.mkdir(proto / "tmp", 0o755)
        os.mkdir(proto / "workspace", 0o755)
        os.chmod(proto, 0o755)
        os.chmod(proto / "workspace", 0o755)
        os.chmod(proto / "tmp", 0o1777)              # mkdir's mode is cut by the umask
        with open(tmp, "wb") as f:
            f.truncate(size)
        r = subprocess.run([MKFS, "-q", "-F", "-m", "0", "-b", str(BLOCK), "-O", MKFS_FEATURES,
                            "-E", MKFS_EXTENDED, "-L", "sbx-disk", "-d", str(proto), str(tmp)],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise MountError(f"mkfs.ext4 failed for a {size}-byte image: {r.stderr.strip()[:200]}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(proto, ignore_errors=True)
    return path


def _sparse_copy(src: Path, dst: Path):
    """Copy only src's data extents (SEEK_DATA/SEEK_HOLE); the holes stay holes."""
    with open(src, "rb") as fi, open(dst, "xb") as fo:
        size = os.fstat(fi.fileno()).st_size
        os.ftruncate(fo.fileno(), size)
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:        # no data after pos
                    break
                raise
            end = os.lseek(fi.fileno(), start, os.SEEK_HOLE)
            off_in, left = start, end - start
            while left > 0:
                n = os.copy_file_range(fi.fileno(), fo.fileno(), left, off_in, off_in)
                if n == 0:
                    break
                off_in += n
                left -= n
            pos = end


# ---------------------------------------------------------------------------- room on the host

def _unwritten(img: Path) -> int:
    try:
        st = img.stat()
    except FileNotFoundError:  # removed by a concurrent destroy since the listing
        return 0
    return max(0, st.st_size - st.st_blocks * 512)


def _check_room(base: Path, size: int):
    """Fail closed unless the host can hold every live image filled up, plus this one."""
    st = os.statvfs(base)
    free = st.f_bavail * st.f_frsize
    headroom = min(HEADROOM, st.f_blocks * st.f_frsize // 10)
    committed = sum(_unwritten(p) for p in (base / "images").glob("*.img"))
    if free < committed + size + headroom:
        raise UnsupportedError(
            f"not enough host disk for a {size >> 20} MiB sandbox disk in {base}: "
            f"{free >> 20} MiB free, {committed >> 20} MiB promised to live sandboxes, "
            f"{headroom >> 20} MiB kept for the host")


# ---------------------------------------------------------------------------- loop devices

def _open_loop_control() -> int:
    """/dev/loop-control, loading the loop module first where it is not loaded yet (a
    freshly booted host or VM); without it no bounded disk can be made: fail closed."""
    for attempt in range(2):
        try:
            return os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            if attempt == 0:
                subprocess.run(["modprobe", "loop"], capture_output=True, timeout=30)
    raise UnsupportedError("no /dev/loop-control (loop driver missing, modprobe loop failed): "
                           "the disk limit cannot be enforced")


def _loop_attach(image: Path) -> tuple[str, int]:
    """Attach image to a free loop device with LOOP_CONFIGURE (Linux 5.8). Direct I/O: the
    loop writes straight to the image instead of through a second page cache charged to the
    sandbox's memory cgroup, whose writeback under the memory limit made teardown slow (the
    kernel quietly falls back to buffered I/O where the image's filesystem cannot). Retries when
    another process takes the device between GET_FREE and CONFIGURE (EBUSY). Returns the
    device and an open fd of it: with LO_FLAGS_AUTOCLEAR the device detaches at its last
    close, so the caller keeps the fd until the mount holds the device (and a crash before
    that leaves nothing attached)."""
    ctl = _open_loop_control()
    img = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(16):
            n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            dev = f"/dev/loop{n}"
            lfd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
            try:
                name = str(image).encode()[:63]
                cfg = struct.pack(_LOOP_CONFIG, img, BLOCK, 0, 0, 0, 0, 0, 0, 0, 0,
                                  LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO, name, b"", b"", 0, 0,
                                  *([0] * 8))
                fcntl.ioctl(lfd, LOOP_CONFIGURE, cfg)
                return dev, lfd
            except OSError as e:
                os.close(lfd)
                if e.errno != errno.EBUSY:
                    raise MountError(f"cannot attach {image} to {dev}", errno=e.errno,
                                     syscall="ioctl(LOOP_CONFIGURE)") from e
        raise MountError(f"no free loop device for {image} after 16 tries")
    finally:
        os.close(img)
        os.close(ctl)


def _sysfs_gone(e: OSError) -> bool:
    """A sysfs file that is not there, or is being removed while we read it: kernfs answers
    ENODEV for a node being deactivated (the loop device's async AUTOCLEAR detach removes its
    loop/ group; seen as 1 in 150-300 teardowns failing under concurrency)."""
    return e.errno in (errno.ENOENT, errno.ENODEV)


def _loop_backing(dev: str) -> str | None:
    """The file a loop device is attached to, or None when it is free (or being freed)."""
    name = Path("/sys/block") / Path(dev).name / "loop" / "backing_file"
    try:
        return name.read_text().strip()
    except OSError as e:
        if _sysfs_gone(e):
            return None
        raise


# ---------------------------------------------------------------------------- the disk

def _fill_state(where) -> tuple[int, int]:
    """(free blocks, free inodes) of the filesystem at `where` (a path or an open fd). ext4's statfs subtracts delayed-
    allocation reservations from the free blocks (ext4_statfs, s_dirtyclusters_counter), so
    data written but not yet allocated counts as used."""
    st = os.statvfs(where)
    return st.f_bfree, st.f_ffree


def _shutdown_fd(fd: int):
    """The disk's contents die with the sandbox: shut the filesystem down without writing
    back dirty data (EXT4_IOC_SHUTDOWN, NOLOGFLUSH). Otherwise the last unmount (which may
    happen later, when the sandbox's mount namespace goes) first writes up to the whole
    disk through the loop device, for nothing. Best effort: unmount follows anyway."""
    try:
        fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("=I", EXT4_GOING_FLAGS_NOLOGFLUSH))
    except OSError:
        pass


@dataclass
class SandboxDisk:
    image: Path
    mountpoint: Path
    loopdev: str
    size: int
    # (free blocks, free inodes) right after mount; None when unknown (crash recovery)
    fresh: tuple[int, int] | None = None

    @property
    def tmp_dir(self) -> Path:
        return self.mountpoint / "tmp"

    @property
    def workspace_dir(self) -> Path:
        return self.mountpoint / "workspace"

    def _fs_alive(self) -> bool:
        """Does any mount or open file still hold this disk's filesystem? The ext4 superblock
        of loopN shows as /sys/fs/ext4/loopN while it exists (fs/ext4/sysfs.c); once it is
        gone the loop device's own detach (AUTOCLEAR) is the kernel's asynchronous rundown,
        which can take seconds on a loaded host and needs nothing more from us."""
        if not self.loopdev or _loop_backing(self.loopdev) != str(self.image):
            return False        # detached (maybe already re-used by another sandbox)
        try:
            os.stat(Path("/sys/fs/ext4", Path(self.loopdev).name))
        except OSError as e:
            if _sysfs_gone(e):
                return False
            raise
        return True

    def _unmount(self, left: list):
        """Shut the disk's filesystem down and unmount it, if it is mounted. The shutdown goes
        only to the filesystem of our own loop device (or, in recovery without a recorded
        device, to whatever is mounted on our own mount point): an EXT4_IOC_SHUTDOWN that
        reached the host's filesystem through an empty mount point would stop the host."""
        try:
            fd = os.open(self.mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW |
                         os.O_CLOEXEC)
        except FileNotFoundError:
            return
        except OSError:
            fd = -1
        try:
            dev = os.fstat(fd).st_dev if fd >= 0 else None
            if dev is not None and dev == os.stat(self.mountpoint.parent).st_dev:
                if not is_mountpoint(self.mountpoint):   # (a bind of the same filesystem?)
                    return                               # nothing mounted: nothing to undo
                dev = None
            ours = False
            if dev is not None:
                try:
                    ours = dev == os.stat(self.loopdev).st_rdev if self.loopdev else True
                except OSError:
                    ours = False
            # The shutdown costs ~0.8 ms; a disk that holds no more blocks or inodes than
            # when it was made has at most a few metadata blocks to write back (the
            # workspace's chown, the superblock; overwriting the template's few blocks in
            # place), which an unmount without barriers writes in less (0.87 vs 1.65 ms
            # measured with the chown). With data written the shutdown is kept: the
            # writeback grows with the data (equal at 1 MiB, measured).
            if ours and (self.fresh is None or _fill_state(fd) != self.fresh):
                _shutdown_fd(fd)
        finally:
            if fd >= 0:
                os.close(fd)
        err = _umount(self.mountpoint)
        if err == errno.EBUSY:               # a host process still in it: detach lazily;
            err = _umount(self.mountpoint, MNT_DETACH)   # the loop frees when it leaves
        if err and err != errno.EINVAL:      # EINVAL: not mounted (any more)
            left.append(f"mount {self.mountpoint} ({os.strerror(err)})")

    def _wait_released(self) -> bool:
        """Poll until no mount or open file holds the filesystem (bounded, backing off)."""
        deadline, pause = time.monotonic() + _WAIT_SECONDS, _WAIT_FIRST
        while self._fs_alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, _WAIT_MAX)
        return True

    def usage(self) -> dict:
        st = os.statvfs(self.mountpoint)
        return {"disk_used": (st.f_blocks - st.f_bfree) * st.f_frsize, "disk_limit": self.size}

    def remove(self):
        """Unmount, verify nothing holds the filesystem any more, delete the image, verify."""
        left = []
        self._unmount(left)
        if not self._wait_released():
            # A mount (in a namespace not yet freed) or an open file still holds the disk.
            # AUTOCLEAR detaches the loop when it goes; the unlinked image is freed then.
            left.append(f"filesystem of {self.image} still in use on {self.loopdev}")
        self.image.unlink(missing_ok=True)
        try:
            self.mountpoint.rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:
            left.append(f"{self.mountpoint} ({e.strerror})")
        if self.image.exists():
            left.append(str(self.image))
        if left:
            raise TeardownError("sandbox disk not fully removed", leftovers=left)


def create(name: str, size: int, *, base: Path = DEFAULT_BASE, intent=None) -> SandboxDisk:
    """Make, attach and mount a `size`-byte ext4 disk for sandbox `name`, with tmp/ (1777)
    and an empty root-owned workspace/ inside (the engine gives it to the sandbox's uid)."""
    if "/" in name or name in ("", ".", ".."):
        raise MountError(f"not a valid disk name: {name!r}")
    base = Path(base)
    (base / "images").mkdir(parents=True, exist_ok=True, mode=0o700)
    (base / "mnt").mkdir(parents=True, exist_ok=True, mode=0o700)
    image, mnt = base / "images" / f"{name}.img", base / "mnt" / name
    template = _template(base, size)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)        # room check and copy are one step
        _check_room(base, size)
        if intent is not None:
            intent.add("disk", image=str(image), mountpoint=str(mnt), loopdev="")
        _sparse_copy(template, image)
    disk = SandboxDisk(image, mnt, "", size)
    try:
        disk.loopdev, lfd = _loop_attach(image)
        try:
            mnt.mkdir(mode=0o700)
            _mount(disk.loopdev, mnt, "ext4", MS_NOSUID | MS_NODEV, MOUNT_DATA)
            disk.fresh = _fill_state(mnt)
        finally:
            os.close(lfd)
    except BaseException:
        try:
            disk.remove()
        except TeardownError:
            pass
        raise
    return disk


def cleanup(fields: dict):
    """Crash recovery for an intent record {kind: disk, image, mountpoint, loopdev}. Idempotent."""
    SandboxDisk(Path(fields["image"]), Path(fields["mountpoint"]), fields.get("loopdev") or "",
                0).remove()


def make_step(ctx):
    """The 'disk' step: a bounded disk for /tmp and the daemon-made workspace. Sets
    ctx.disk (the SandboxDisk), ctx.tmp_dir (bound as /tmp) and ctx.workspace_dir (where the
    engine makes the workspace when it was given no host directory). With limits.disk = 0
    the step does nothing. `ctx.disk_base` (tests) overrides where images live.
    keep_workspace: the workspace is copied out to state_dir/workspaces/<id> before the
    disk goes (cp -a: symlinks are copied as links, never followed)."""
    from sandbox.runtime.lifecycle import Step

    limits = ctx.policy.limits

    def do():
        ctx.disk = None
        if not limits.disk:
            return None
        check_host_workspace(limits, getattr(ctx, "workspace", None))
        disk = create(ctx.id, limits.disk, base=Path(getattr(ctx, "disk_base", None) or DEFAULT_BASE),
                      intent=getattr(ctx, "intent", None))
        ctx.disk = disk
        ctx.tmp_dir = str(disk.tmp_dir)
        if not getattr(ctx, "workspace", None):
            ctx.workspace_dir = str(disk.workspace_dir)
        return disk

    def undo(disk):
        if disk is None:
            return
        if getattr(ctx, "keep_workspace", False) and disk.workspace_dir.exists():
            keep_copy(disk.workspace_dir, Path(ctx.state_dir) / "workspaces" / ctx.id)
        disk.remove()

    return Step("disk", do, undo, describe="bounded disk for /tmp and the workspace")


def keep_copy(src: Path, dst: Path):
    """Copy a kept workspace off the disk before it is destroyed (owners and modes kept)."""
    dst.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if dst.exists():
        raise MountError(f"cannot keep the workspace: {dst} already exists")
    r = subprocess.run(["cp", "-a", "--", str(src), str(dst)], capture_output=True, text=True,
                       timeout=3600)
    if r.returncode != 0:
        raise MountError(f"cannot keep the workspace in {dst}: {r.stderr.strip()[:200]}")


def check_host_workspace(limits, workspace):
    """A caller's host directory is not on the bounded image: refuse unless the policy says
    the operator accepts it (limits.host_workspace = "unbounded")."""
    if workspace is None:
        return
    mode = getattr(limits, "host_workspace", "refuse")
    if mode != "unbounded":
        raise UnsupportedError(
            f"the disk limit ({limits.disk >> 20} MiB) cannot bound a host workspace directory; "
            "use a daemon-made workspace, or set limits.host_workspace = \"unbounded\" to accept "
            "that writes to that directory are bounded only by the host filesystem")


def probe(base: Path = DEFAULT_BASE) -> list[tuple[str, bool, str]]:
    """Rows for `sandboxctl doctor`: can this host make bounded sandbox disks?"""
    probe_dir = base
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    st = os.statvfs(probe_dir)
    free = st.f_bavail * st.f_frsize
    loop, mkfs = Path("/dev/loop-control").exists(), Path(MKFS).exists()
    return [("limit disk", loop and mkfs,
             f"ext4 image on a loop device (loop-control={'yes' if loop else 'MISSING'}, "
             f"mkfs.ext4={'yes' if mkfs else 'MISSING'}); images in {base}, "
             f"{free >> 30} GiB free there")]

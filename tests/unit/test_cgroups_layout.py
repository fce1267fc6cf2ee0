"""Layout detection and fail-closed checks of sandbox/kernel/cgroups.py, without root:
mountinfo text and fake cgroup directories stand in for the kernel."""
from pathlib import Path

import pytest

from sandbox.errors import CgroupError
from sandbox.kernel import cgroups
from sandbox.policy.schema import LimitsPolicy

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""


def test_mountinfo_parsing_finds_v1_controllers_and_cgroup2():
    unified, v1 = cgroups.parse_mountinfo(HYBRID)
    assert unified == Path("/sys/fs/cgroup/unified")
    assert v1 == {"cpu": Path("/sys/fs/cgroup/cpu,cpuacct"),
                  "cpuacct": Path("/sys/fs/cgroup/cpu,cpuacct"),
                  "memory": Path("/sys/fs/cgroup/memory"), "pids": Path("/sys/fs/cgroup/pids")}


def test_layout_kinds(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    v2 = f"41 31 0:38 / {tmp_path} rw - cgroup2 cgroup2 rw\n"
    assert cgroups.detect_layout(v2).kind == "v2"
    assert cgroups.detect_layout(HYBRID).kind == "hybrid"
    only_v1 = "\n".join(line for line in HYBRID.splitlines() if "cgroup2" not in line)
    assert cgroups.detect_layout(only_v1).kind == "v1"
    assert cgroups.detect_layout("").kind == "none"


def test_hybrid_with_a_stray_v2_controller_is_still_hybrid(tmp_path):
    (tmp_path / "cgroup.controllers").write_text("hugetlb\n")
    text = HYBRID.replace("/sys/fs/cgroup/unified", str(tmp_path))
    assert cgroups.detect_layout(text).kind == "hybrid"


@pytest.mark.parametrize("missing,kind", [("pids", "hybrid"), ("memory", "v2"), ("cpu", "v2"),
                                          ("freezer", "v1")])
def test_missing_controller_is_named(missing, kind):
    have = {"memory", "pids", "cpu", "cpuacct", "freezer"} - {missing}
    if kind == "v2":
        layout = cgroups.Layout("v2", Path("/nonexistent"), frozenset(have), {}, 0)
    else:
        layout = cgroups.Layout(kind, None if kind == "v1" else Path("/x"), frozenset(),
                                {c: Path("/x") for c in have}, 0)
    with pytest.raises(CgroupError, match=f"controller '{missing}'"):
        cgroups.check_enforceable(LimitsPolicy(), layout)


def test_no_cpu_limit_needs_no_cpu_controller():
    layout = cgroups.Layout("hybrid", Path("/x"), frozenset(), {"memory": Path("/x"),
                                                                "pids": Path("/x")}, 0)
    cgroups.check_enforceable(LimitsPolicy(cpus=0), layout)


def test_v2_controller_not_delegated_is_refused(tmp_path):
    """A fake cgroup2 root whose cgroup.controllers lacks pids: creation names it."""
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    (tmp_path / "cgroup.subtree_control").write_text("")
    layout = cgroups.Layout("v2", tmp_path, frozenset({"cpu", "memory", "pids"}), {}, 0)
    with pytest.raises(CgroupError, match="pids not available"):
        cgroups.V2Driver(layout, parent="p").create("sb", LimitsPolicy())


def test_reason_texts():
    cg = cgroups.SandboxCgroup("x", LimitsPolicy(memory=512 * 1024**2, pids=200), None, {})
    assert cg.reason({"oom_kills": 1, "pids_max_hits": 3}) == (
        "oom", "killed: memory limit 512 MiB reached")
    assert cg.reason_text({"oom_kills": 0, "pids_max_hits": 3}) == "stopped: process limit 200 reached"
    assert cg.reason({"oom_kills": 0, "pids_max_hits": 0}) == (None, "")


def test_human_size_and_kernel_version():
    assert cgroups.human_size(4 * 1024**3) == "4 GiB"
    assert cgroups.human_size(1536 * 1024) == "1536 KiB"
    assert cgroups.human_size(1536 * 1024 + 1) == "1.5 MiB"
    assert cgroups.kernel_at_least(5, 14, "6.18.44-fc") and not cgroups.kernel_at_least(5, 14, "5.10.0")
